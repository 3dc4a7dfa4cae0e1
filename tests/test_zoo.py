"""rl-zoo3's own train/enjoy loops through ``python -m sb3_safe_save.zoo``: every artifact in our format, configs safe."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rl_zoo3")  # first: rl-zoo3 brings yaml, and needs SB3 >= 2.7 (LinearSchedule); make test-min has neither

import gymnasium as gym
import numpy as np
import yaml
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_safe_save import FormatError, UntrustedTypeError, load_vecnormalize, read_manifest, safe


@pytest.fixture(scope="module", autouse=True)
def _restore_gymnasium_time_limit() -> Iterator[None]:
    """Importing rl_zoo3 replaces gymnasium's TimeLimit process-wide; put it back for the other test modules."""
    import gymnasium.envs.registration
    import gymnasium.wrappers
    import gymnasium.wrappers.common

    places = [(gymnasium.wrappers, "TimeLimit"), (gymnasium.wrappers.common, "TimeLimit")]
    places.append((gymnasium.envs.registration, "TimeLimit"))
    saved = [(obj, name, getattr(obj, name)) for obj, name in places]
    yield
    for obj, name, value in saved:
        setattr(obj, name, value)


def zoo(*args: str) -> None:
    from sb3_safe_save.zoo import main

    assert main(list(args)) == 0


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def no_pickles_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".pkl", ".zip")]


PPO_ARGS = ["--algo", "ppo", "--env", "CartPole-v1", "--seed", "0", "--verbose", "0"]
PPO_ARGS += ["-params", "n_envs:1", "n_steps:64", "batch_size:64", "n_epochs:1", "policy_kwargs:dict(net_arch=[8])"]


def test_ppo_cartpole_train_enjoy_continue(tmp_path: Path, no_pickle: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    # --save-replay-buffer: PPO has none, so nothing is written (as in stock rl-zoo3)
    zoo("train", *PPO_ARGS, "-n", "128", "-f", str(logs), "--eval-freq", "64", "--eval-episodes", "1", "--save-freq", "64",
        "--save-replay-buffer")  # fmt: skip
    run = logs / "ppo" / "CartPole-v1_1"
    assert files_under(run) == [
        "0.monitor.csv",
        "CartPole-v1.safetensors",
        "CartPole-v1/args.yml",
        "CartPole-v1/command.txt",
        "CartPole-v1/config.yml",
        "best_model.safetensors",
        "evaluations.npz",
        "rl_model_128_steps.safetensors",
        "rl_model_64_steps.safetensors",
    ]
    assert no_pickles_under(tmp_path) == []

    # the final model loads anywhere: rl-zoo3's lin_0.001 schedule is SB3's LinearSchedule, stored as data
    agent = safe(PPO).load(run / "CartPole-v1.safetensors")
    assert agent.num_timesteps == 128
    assert isinstance(agent.learning_rate, LinearSchedule)
    assert agent.learning_rate(0.25) == pytest.approx(0.25 * 0.001)
    assert agent.clip_range(0.5) == pytest.approx(0.5 * 0.2)
    assert safe(PPO).load(run / "rl_model_64_steps.safetensors").num_timesteps == 64
    assert read_manifest(run / "best_model.safetensors").base_algorithm.endswith(":PPO")
    config = yaml.safe_load((run / "CartPole-v1" / "config.yml").read_text())  # plain YAML, no Python tags
    assert config["learning_rate"] == "lin_0.001"
    assert config["n_steps"] == 64

    zoo("train", *PPO_ARGS, "-n", "64", "-f", str(logs), "--eval-freq", "-1", "-i", str(run / "CartPole-v1.safetensors"))
    run2 = logs / "ppo" / "CartPole-v1_2"
    args = yaml.safe_load((run2 / "CartPole-v1" / "args.yml").read_text())
    assert args["trained_agent"] == str(run / "CartPole-v1.safetensors")
    # 2 updates in the first run (2 rollouts x 1 epoch), 1 more here: training went on from the saved agent
    assert agent._n_updates == 2
    assert safe(PPO).load(run2 / "CartPole-v1.safetensors")._n_updates == 3
    assert no_pickles_under(tmp_path) == []

    capsys.readouterr()
    enjoy = ["enjoy", "--algo", "ppo", "--env", "CartPole-v1", "-f", str(logs), "--no-render", "-n", "30"]
    zoo(*enjoy)  # the latest run: the continued one
    assert f"Loading {run2 / 'CartPole-v1.safetensors'}" in capsys.readouterr().out
    zoo(*enjoy, "--exp-id", "1", "--load-best")
    assert f"Loading {run / 'best_model.safetensors'}" in capsys.readouterr().out


VECNORMALIZE = "vecnormalize.safetensors"
SAC_ARGS = ["--algo", "sac", "--env", "Pendulum-v1", "--seed", "0", "--verbose", "0", "--save-replay-buffer"]
SAC_ARGS += ["-params", "normalize:True", "learning_starts:64", "buffer_size:1000", "batch_size:16"]
SAC_ARGS += ["policy_kwargs:dict(net_arch=[8])"]


def test_sac_pendulum_normalize_train_enjoy_continue(
    tmp_path: Path, no_pickle: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    zoo("train", *SAC_ARGS, "-n", "128", "-f", str(logs), "--eval-freq", "64", "--eval-episodes", "1", "--save-freq", "64")
    run = logs / "sac" / "Pendulum-v1_1"
    assert files_under(run) == [
        "0.monitor.csv",
        "Pendulum-v1.safetensors",
        "Pendulum-v1/args.yml",
        "Pendulum-v1/command.txt",
        "Pendulum-v1/config.yml",
        "Pendulum-v1/vecnormalize.safetensors",
        "best_model.safetensors",
        "evaluations.npz",
        "replay_buffer.safetensors",
        "rl_model_128_steps.safetensors",
        "rl_model_64_steps.safetensors",
    ]
    assert no_pickles_under(tmp_path) == []
    stats = load_vecnormalize(run / "Pendulum-v1" / VECNORMALIZE, DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    assert 128 < stats.obs_rms.count < 130  # the training env's statistics: one update per step (and the first reset)

    # enjoy wraps its env in the stored statistics, frozen
    import sb3_safe_save._vecnormalize as vecnormalize_module

    restored: list[Any] = []
    original = vecnormalize_module.load_vecnormalize

    def spy(path: Any, venv: Any, **kwargs: Any) -> Any:
        restored.append(original(path, venv, **kwargs))
        return restored[-1]

    with monkeypatch.context() as m:
        m.setattr(vecnormalize_module, "load_vecnormalize", spy)
        capsys.readouterr()
        zoo("enjoy", "--algo", "sac", "--env", "Pendulum-v1", "-f", str(logs), "--no-render", "-n", "20")
    assert f"Loading {run / 'Pendulum-v1.safetensors'}" in capsys.readouterr().out
    assert len(restored) == 1
    assert restored[0].training is False and restored[0].norm_reward is False
    np.testing.assert_array_equal(restored[0].obs_rms.mean, stats.obs_rms.mean)

    resume = ["-i", str(run / "Pendulum-v1.safetensors"), "--trust", "rl_zoo3.wrappers.*"]  # --trust: our option, taken out
    zoo("train", *SAC_ARGS, "-n", "64", "-f", str(logs), "--eval-freq", "-1", *resume)
    run2 = logs / "sac" / "Pendulum-v1_2"
    assert "trust" not in yaml.safe_load((run2 / "Pendulum-v1" / "args.yml").read_text())
    agent = safe(SAC).load(run2 / "Pendulum-v1.safetensors")
    agent.load_replay_buffer(run2 / "replay_buffer.safetensors")
    assert agent.replay_buffer is not None and agent.replay_buffer.pos == 128 + 64  # the saved buffer, then 64 more rows
    stats2 = load_vecnormalize(run2 / "Pendulum-v1" / VECNORMALIZE, DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    assert stats2.obs_rms.count > 128 + 64  # the statistics went on too
    assert no_pickles_under(tmp_path) == []

    # share the continued run: its model, VecNormalize statistics and config (written, not uploaded, here)
    zoo(
        "push",
        "--algo",
        "sac",
        "--env",
        "Pendulum-v1",
        "-f",
        str(logs),
        "--repo-id",
        "me/sac",
        "--output",
        str(tmp_path / "repo"),
        "--n-eval-episodes",
        "1",
        "-n",
        "3",
    )
    repo = tmp_path / "repo"
    shipped = ["README.md", "config.json", "config.yml", "results.json", "sac-Pendulum-v1.safetensors", VECNORMALIZE]
    assert [f for f in files_under(repo) if f != "replay.mp4"] == shipped  # a replay where Pendulum can render here
    assert (repo / "sac-Pendulum-v1.safetensors").read_bytes() == (run2 / "Pendulum-v1.safetensors").read_bytes()
    card = (repo / "README.md").read_text()
    assert '    "me/sac", "sac-Pendulum-v1.safetensors",' in card
    assert 'statistics = hf_hub_download("me/sac", "vecnormalize.safetensors")' in card  # the snippet loads them
    assert "| VecNormalize statistics | in `vecnormalize.safetensors` |" in card
    results = json.loads((repo / "results.json").read_text())
    assert results["n_eval_episodes"] == 1 and results["is_deterministic"] is True
    metric = yaml.safe_load(card.split("---\n")[1])["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == f"{results['mean_reward']:.2f} +/- {results['std_reward']:.2f}"


# ------------------------------------------------------------------------------------ safe configs
def test_normalize_is_parsed_not_evaluated(tmp_path: Path) -> None:
    from sb3_safe_save._zoo import parse_normalize

    assert parse_normalize(True) == (True, {})
    assert parse_normalize(False) == (False, {})
    assert parse_normalize("dict(norm_obs=True, norm_reward=False)") == (True, {"norm_obs": True, "norm_reward": False})
    assert parse_normalize("{'norm_obs': False, 'clip_obs': 5.0}") == (True, {"norm_obs": False, "clip_obs": 5.0})
    assert parse_normalize({"norm_reward": False}) == (True, {"norm_reward": False})
    marker = tmp_path / "ran"
    for hostile in (f"__import__('pathlib').Path({str(marker)!r}).touch()", "dict(norm_obs=open('x'))", "dict(**x)"):
        with pytest.raises(FormatError, match="without eval"):
            parse_normalize(hostile)
    assert not marker.exists()


def test_stock_configs_read_safely(tmp_path: Path) -> None:
    from sb3_safe_save._zoo import load_config

    # what stock rl-zoo3 writes: an OrderedDict (and tuples) with Python tags
    stock = yaml.dump(collections.OrderedDict([("normalize", "dict(norm_obs=True)"), ("train_freq", (1, "episode"))]))
    assert "!!python/object/apply:collections.OrderedDict" in stock
    assert load_config(stock) == {"normalize": "dict(norm_obs=True)", "train_freq": (1, "episode")}
    marker = tmp_path / "ran"
    hostile = f"normalize: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path [{str(marker)!r}]]"
    with pytest.raises(FormatError, match="YAML tag that constructs Python objects"):
        load_config(hostile, "config.yml")
    assert not marker.exists()


def test_enjoy_refuses_untrusted_wrappers_in_a_saved_config(tmp_path: Path) -> None:
    from sb3_safe_save._zoo import get_saved_hyperparams

    (tmp_path / "config.yml").write_text("env_wrapper:\n- rl_zoo3.wrappers.TimeFeatureWrapper\n- evil.module.Wrapper\n")
    with pytest.raises(UntrustedTypeError, match="--trust") as info:
        get_saved_hyperparams(str(tmp_path))
    assert info.value.refs == ["evil.module.Wrapper"]
    hyperparams, _ = get_saved_hyperparams(str(tmp_path), trusted=["evil.*"])
    assert hyperparams["env_wrapper"] == ["rl_zoo3.wrappers.TimeFeatureWrapper", "evil.module.Wrapper"]
    assert hyperparams["normalize"] is False


def test_a_trusted_package_vouches_only_for_its_wrapper_classes(tmp_path: Path) -> None:
    """Under a trusted package, functions, modules and classes of the wrong kind are refused, before any call."""
    from sb3_safe_save._zoo import get_saved_hyperparams

    (tmp_path / "config.yml").write_text(
        "env_wrapper:\n"
        "- gymnasium.wrappers.TimeLimit: {max_episode_steps: 5}\n"  # re-exported from gymnasium.wrappers.common
        "- sb3_contrib.common.wrappers.TimeFeatureWrapper\n"
        "- gymnasium.wrappers.common.deepcopy\n"  # a function imported there
        "- stable_baselines3.common.vec_env.vec_video_recorder.os\n"  # a module
        "- stable_baselines3.common.vec_env.VecFrameStack\n"  # a VecEnvWrapper, not a gymnasium Wrapper
        "vec_env_wrapper:\n"
        "- stable_baselines3.common.vec_env.VecFrameStack: {n_stack: 2}\n"
        "- stable_baselines3.common.vec_env.DummyVecEnv\n"  # a VecEnv, not a wrapper
        "callback: stable_baselines3.common.vec_env.sync_envs_normalization\n"
    )
    with pytest.raises(UntrustedTypeError, match="--trust") as info:
        get_saved_hyperparams(str(tmp_path))
    assert info.value.refs == [
        "gymnasium.wrappers.common.deepcopy",
        "stable_baselines3.common.vec_env.DummyVecEnv",
        "stable_baselines3.common.vec_env.VecFrameStack",
        "stable_baselines3.common.vec_env.sync_envs_normalization",
        "stable_baselines3.common.vec_env.vec_video_recorder.os",
    ]
    assert "VecFrameStack (env_wrapper, vec_env_wrapper): is not a VecEnvWrapper and Wrapper class" in str(info.value)
    hyperparams, _ = get_saved_hyperparams(str(tmp_path), trusted=[*info.value.refs])  # the caller's own decision
    assert hyperparams["callback"] == "stable_baselines3.common.vec_env.sync_envs_normalization"


PATH_ARGUMENTS = {
    "VecMonitor filename": ("vec_env_wrapper", "stable_baselines3.common.vec_env.VecMonitor", "filename"),
    "VecVideoRecorder video_folder": ("vec_env_wrapper", "stable_baselines3.common.vec_env.VecVideoRecorder", "video_folder"),
    "RecordVideo name_prefix": ("env_wrapper", "gymnasium.wrappers.RecordVideo", "name_prefix"),
    "a trusted callback's save_path": ("callback", "stable_baselines3.common.callbacks.CheckpointCallback", "save_path"),
}


@pytest.mark.parametrize("case", list(PATH_ARGUMENTS.values()), ids=list(PATH_ARGUMENTS))
def test_a_saved_config_may_not_choose_where_a_wrapper_writes(tmp_path: Path, case: tuple[str, str, str]) -> None:
    """Refused (not ignored): the config is the attacker's, and a wrapper without its path would not do what it says."""
    from sb3_safe_save._zoo import get_saved_hyperparams

    key, name, argument = case
    target = tmp_path / "elsewhere" / "x"
    (tmp_path / "config.yml").write_text(f"{key}:\n- {name}: {{{argument}: {json.dumps(str(target))}}}\n")
    with pytest.raises(FormatError) as info:
        get_saved_hyperparams(str(tmp_path), trusted=[name])  # trusting the class does not trust the config's paths
    assert f"{tmp_path / 'config.yml'} gives wrappers or callbacks arguments that name a file or folder" in str(info.value)
    assert f"  {key}: {name}({argument}=...)" in str(info.value)
    assert "A saved config may not choose where enjoy writes" in str(info.value)
    assert not (tmp_path / "elsewhere").exists()


def test_enjoy_with_a_vecmonitor_filename_in_the_config_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sb3_safe_save.zoo import main

    run = tmp_path / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    (run / "CartPole-v1.safetensors").write_bytes(b"never loaded: the config is refused first")
    victim = tmp_path / "victim.monitor.csv"
    victim.write_text("precious\n")
    (run / "CartPole-v1" / "config.yml").write_text(
        "vec_env_wrapper:\n"
        f"- stable_baselines3.common.vec_env.VecMonitor: {{filename: {json.dumps(str(tmp_path / 'victim'))}}}\n"
        f"- stable_baselines3.common.vec_env.VecMonitor: {{filename: {json.dumps(str(tmp_path / 'made' / 'by' / 'x'))}}}\n"
    )
    args = ["enjoy", "--algo", "ppo", "--env", "CartPole-v1", "-f", str(tmp_path), "--no-render", "-n", "5", "--exp-id", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sb3_safe_save.zoo enjoy: error: " in err and "VecMonitor(filename=...)" in err
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "made").exists()


HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\u202eevil"  # set the title, ring, clear the screen, reverse the text
ESCAPED = "\\x1b]0;owned\\x07\\x1b[2J\\u202eevil"


def _enjoy_run(tmp_path: Path, config: str) -> list[str]:
    run = tmp_path / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    (run / "CartPole-v1.safetensors").write_bytes(b"never loaded")
    (run / "CartPole-v1" / "config.yml").write_text(config)
    return ["enjoy", "--algo", "ppo", "--env", "CartPole-v1", "-f", str(tmp_path), "--no-render", "-n", "5", "--exp-id", "1"]


@pytest.mark.parametrize(
    ("config", "status", "expected"),
    [  # YAML escapes: \e ESC, \a BEL, \u202E RIGHT-TO-LEFT OVERRIDE
        ('env_wrapper: "\\e]0;owned\\a\\e[2J\\u202Eevil"\n', 2, f"  {ESCAPED} (env_wrapper): not trusted"),
        ('env_kwargs: {"\\e]0;owned\\a\\e[2J\\u202Eevil": 1}\n', 1, f"got an unexpected keyword argument '{ESCAPED}'"),
    ],
    ids=["a refused wrapper name (SafeSaveError)", "an env argument (a TypeError in gymnasium: the traceback)"],
)
def test_enjoy_prints_text_from_a_config_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, status: int, expected: str
) -> None:
    from sb3_safe_save.zoo import main

    assert main(_enjoy_run(tmp_path, config)) == status
    out, err = capsys.readouterr()
    assert not any(c in out + err for c in "\x1b\x07\u202e")
    assert expected in err
    assert ("Traceback (most recent call last):" in err) == (status == 1)


def test_enjoy_reads_rl_zoo3_trained_agents_without_running_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stock rl-zoo3 run (``CartPole-v1.zip`` with an rl-zoo3 closure schedule, ``vecnormalize.pkl``): issue 25."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    def linear_schedule(initial_value: float) -> Any:  # rl-zoo3's closure: cloudpickled by value
        return lambda progress: progress * initial_value

    run = tmp_path / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=1))
    model = PPO(
        "MlpPolicy", env, n_steps=16, batch_size=16, learning_rate=linear_schedule(1e-3), policy_kwargs={"net_arch": [8]}
    )
    model.learn(16)
    model.save(run / "CartPole-v1.zip")
    env.save(str(run / "CartPole-v1" / "vecnormalize.pkl"))
    (run / "CartPole-v1" / "config.yml").write_text("n_envs: 1\nnormalize: true\npolicy: MlpPolicy\n")
    import pickle

    import cloudpickle
    import torch

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a stock loader was used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    capsys.readouterr()
    zoo("enjoy", "--algo", "ppo", "--env", "CartPole-v1", "-f", str(tmp_path), "--no-render", "-n", "20", "--exp-id", "1")
    out = capsys.readouterr().out
    assert f"Loading {run / 'CartPole-v1.zip'}" in out and "Loading running average" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "-i", "agent.zip"], "-i agent.zip: no such file"),
        (["train", "--optimize-hyperparameters"], "hyperparameter optimization is not supported"),
        (["fly"], "unknown command 'fly'"),
        (["push", "--algo", "ppo"], "the following arguments are required: --env, --repo-id"),
        (
            ["push", "--algo", "ppo", "--env", "CartPole-v1", "--repo-id", "me/x", "--n-eval-episodes", "-1"],
            "--n-eval-episodes -1: give 0 (no evaluation) or more",
        ),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from sb3_safe_save.zoo import main

    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_continue_training_needs_our_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sb3_safe_save.zoo import main

    stock = tmp_path / "CartPole-v1.zip"
    stock.write_bytes(b"PK")
    assert main(["train", f"--trained-agent={stock}"]) == 2
    assert "convert a trusted stock zip once: sb3-safe-save convert" in capsys.readouterr().err


def test_other_rl_zoo3_versions_are_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    from sb3_safe_save._zoo import ZooUsageError, check_version
    from sb3_safe_save.zoo import main

    check_version("2.9.2")
    with pytest.raises(ZooUsageError, match=r"supports rl_zoo3 2\.9\.x, but rl_zoo3 2\.10\.0 is installed"):
        check_version("2.10.0")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.8.1")
    assert main(["train"]) == 2
    assert "rl_zoo3 2.8.1 is installed" in capsys.readouterr().err


def test_model_paths_name_our_files(tmp_path: Path) -> None:
    from sb3_safe_save._zoo import get_model_path

    run = tmp_path / "ppo" / "CartPole-v1_2"
    run.mkdir(parents=True)
    for name in ("CartPole-v1", "best_model", "rl_model_64_steps", "rl_model_128_steps", "rl_model_1024_steps"):
        (run / f"{name}.safetensors").touch()
    assert get_model_path(0, str(tmp_path), "ppo", "CartPole-v1")[1:] == (str(run / "CartPole-v1.safetensors"), str(run))
    assert get_model_path(2, str(tmp_path), "ppo", "CartPole-v1", load_best=True)[1] == str(run / "best_model.safetensors")
    assert get_model_path(2, str(tmp_path), "ppo", "CartPole-v1", load_checkpoint="64")[1] == str(
        run / "rl_model_64_steps.safetensors"
    )
    last = get_model_path(2, str(tmp_path), "ppo", "CartPole-v1", load_last_checkpoint=True)
    assert last[0] == "checkpoint-1024-ppo-CartPole-v1" and last[1] == str(run / "rl_model_1024_steps.safetensors")


@pytest.mark.parametrize(
    "argv",
    [
        ["-i", "a.safetensors", "--algo", "sac"],
        ["-ia.safetensors", "--algo", "sac"],
        ["--trained-agent", "a.safetensors", "--algo", "sac"],
        ["--trained-agent=a.safetensors", "--algo", "sac"],
        ["--trained", "a.safetensors", "--algo", "sac"],
    ],
)
def test_trained_agent_is_taken_out_of_rl_zoo3s_args(argv: list[str]) -> None:
    from sb3_safe_save._zoo import _split_args

    assert _split_args([*argv, "--trust", "pkg.*", "--trust=x.Y"], take_agent=True) == (
        ["--algo", "sac"],
        "a.safetensors",
        ["pkg.*", "x.Y"],
    )
    assert _split_args(["--track", "--truncate-last-trajectory", "1"], take_agent=True) == (
        ["--track", "--truncate-last-trajectory", "1"],
        "",
        [],
    )


def test_configs_are_written_as_plain_yaml() -> None:
    import io

    import torch as th

    from sb3_safe_save._zoo import dump_config, load_config

    out = io.StringIO()
    config = collections.OrderedDict(
        [("policy_kwargs", {"activation_fn": th.nn.ReLU, "net_arch": [8]}), ("train_freq", (1, "episode")), ("gamma", 0.9)]
    )
    dump_config(config, out)
    text = out.getvalue()
    assert "!!" not in text
    assert yaml.safe_load(text) == {
        "policy_kwargs": {"activation_fn": "torch.nn.modules.activation.ReLU", "net_arch": [8]},
        "train_freq": [1, "episode"],
        "gamma": 0.9,
    }
    assert list(load_config(text)) == ["policy_kwargs", "train_freq", "gamma"]  # the order rl-zoo3 sorted them in


def test_checkpoints_of_vecnormalize_and_replay_buffer_are_ours(tmp_path: Path, no_pickle: None) -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_safe_save._zoo import SafeCheckpointCallback

    env = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    model = safe(SAC)("MlpPolicy", env, buffer_size=100, learning_starts=100, policy_kwargs={"net_arch": [8]})
    callback = SafeCheckpointCallback(4, str(tmp_path), "rl_model", save_replay_buffer=True, save_vecnormalize=True)
    model.learn(4, callback=callback)
    assert files_under(tmp_path) == [
        "rl_model_4_steps.safetensors",
        "rl_model_replay_buffer_4_steps.safetensors",
        "rl_model_vecnormalize_4_steps.safetensors",
    ]
    stats = load_vecnormalize(
        tmp_path / "rl_model_vecnormalize_4_steps.safetensors", DummyVecEnv([lambda: gym.make("Pendulum-v1")])
    )
    np.testing.assert_array_equal(stats.obs_rms.mean, env.obs_rms.mean)
    assert callback.save_vecnormalize is True  # put back after each step


def test_python_dash_m_entry_point() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sb3_safe_save.zoo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "usage: python -m sb3_safe_save.zoo {train,enjoy}" in done.stderr
    assert "python -m sb3_safe_save.zoo push" in done.stderr
