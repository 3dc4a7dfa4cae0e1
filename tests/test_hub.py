"""Sharing on the Hugging Face Hub: the packaged folder and model card, upload through HfApi, download offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("yaml")  # comes with rl-zoo3 / huggingface_hub; make test-min has neither

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch as th
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

from sb3_safe_save import (
    FormatError,
    IntegrityError,
    ResourceSpec,
    UntrustedTypeError,
    file_sha256,
    load_from_hub,
    load_vecnormalize,
    package_for_hub,
    push_to_hub,
    read_manifest,
    safe,
    save_vecnormalize,
)

huggingface_hub = pytest.importorskip("huggingface_hub")
# a submodule is not an attribute of the lazy package until something imports it: import it here, so the
# tests below do not depend on which other tests ran first in this worker
pytest.importorskip("huggingface_hub.constants")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: everything here is offline."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model() -> Any:
    agent = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, policy_kwargs={"net_arch": [8]})
    agent.learn(32)
    return agent


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    meta: dict[str, Any] = yaml.safe_load(card.split("---\n")[1])
    return meta


def test_package_writes_agent_card_and_config(model: Any, tmp_path: Path) -> None:
    folder = package_for_hub(model, tmp_path / "repo", tags=["my-tag"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "ppo-CartPole-v1.safetensors"]
    agent_file = folder / "ppo-CartPole-v1.safetensors"
    sha256 = file_sha256(agent_file)
    n_params = sum(p.numel() for p in model.policy.parameters())

    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "stable-baselines3"
    assert meta["tags"][:4] == ["CartPole-v1", "deep-reinforcement-learning", "reinforcement-learning", "stable-baselines3"]
    assert "my-tag" in meta["tags"]
    assert f"| SHA-256 | `{sha256}` |" in card
    assert "| algorithm | `stable_baselines3.ppo.ppo:PPO` |" in card  # module:QualName, as every reference
    assert f"| file | `ppo-CartPole-v1.safetensors`, {agent_file.stat().st_size:,} bytes |" in card
    assert f"| policy | {n_params:,} parameters, {4 * n_params:,} bytes |" in card
    assert f"stable-baselines3 {stable_baselines3.__version__}" in card
    assert "None: nothing was left out of the file." in card
    assert "| VecNormalize statistics | none |" in card
    assert "None beyond the default trust list" in card
    assert "| mean reward | not evaluated (package with `eval_env=` to evaluate) |" in card
    assert "| replay | none: no evaluation env was given |" in card
    assert "model-index" not in meta
    assert f'expected_sha256="{sha256}"' in card

    config = json.loads((folder / "config.json").read_text())
    assert config["sha256"] == sha256
    assert config["env_id"] == "CartPole-v1"
    assert config["filename"] == "ppo-CartPole-v1.safetensors"
    assert config["policy_parameters"] == n_params
    assert config["versions"]["stable_baselines3"] == stable_baselines3.__version__
    assert config["hyperparameters"]["n_steps"] == 32
    assert config["placeholders"] == []
    assert config["trusted"] == [] and config["vec_normalize_file"] is None


def test_card_lists_the_live_resources_an_agent_needs(tmp_path: Path) -> None:
    from lang_dqn import UnpicklableExpert, make_model

    agent = make_model(UnpicklableExpert(name="stub-llm-7b"), net_arch=[8])
    folder = package_for_hub(agent, tmp_path / "repo", env_id="CartPole-v1")
    card = (folder / "README.md").read_text()
    assert "- this agent needs a live `vlm_model` at load: `resources={'vlm_model': obj}`" in card
    assert "| `vlm_model` | `lang_dqn.UnpicklableExpert` |" in card
    assert "vlm_model = <your live lang_dqn.UnpicklableExpert>" in card  # the usage snippet asks for it
    assert '    resources={"vlm_model": vlm_model},' in card
    (placeholder,) = read_manifest(folder / "customdqn-CartPole-v1.safetensors").placeholders
    assert f"| {placeholder.reason} |" in card
    config = json.loads((folder / "config.json").read_text())
    assert [p["key"] for p in config["placeholders"]] == ["vlm_model"]
    assert config["placeholders"][0]["reason"] == placeholder.reason
    assert config["placeholders"][0]["paths"] == placeholder.paths


def test_package_a_saved_file_and_refuse_bad_names(model: Any, tmp_path: Path) -> None:
    model.save(tmp_path / "agent.safetensors")
    folder = package_for_hub(tmp_path / "agent.safetensors", tmp_path / "repo", env_id="ALE/Pong-v5")
    assert (folder / "ppo-ALE-Pong-v5.safetensors").read_bytes() == (tmp_path / "agent.safetensors").read_bytes()
    with pytest.raises(ValueError, match="env_id"):
        package_for_hub(tmp_path / "agent.safetensors", tmp_path / "repo2")
    with pytest.raises(ValueError, match=r"plain file name ending in \.safetensors"):
        package_for_hub(model, tmp_path / "repo3", filename="../agent.zip")
    with pytest.raises(TypeError, match="saves with pickle"):
        package_for_hub(PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32), tmp_path / "repo4")


def test_package_an_rl_zoo3_run_with_its_other_files(model: Any, tmp_path: Path) -> None:
    run = tmp_path / "logs" / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    model.save(run / "CartPole-v1.safetensors")
    (run / "CartPole-v1" / "config.yml").write_text("n_steps: 32\n")
    extra = [run / "CartPole-v1" / "config.yml"]
    folder = package_for_hub(run / "CartPole-v1.safetensors", tmp_path / "repo", env_id="CartPole-v1", extra_files=extra)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "config.yml",
        "ppo-CartPole-v1.safetensors",
    ]
    sha256 = file_sha256(folder / "config.yml")
    assert f"| `config.yml` | `{sha256}` |" in (folder / "README.md").read_text()
    assert json.loads((folder / "config.json").read_text())["extra_files"] == {"config.yml": sha256}
    (run / "CartPole-v1" / "vecnormalize.pkl").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="pickles"):
        package_for_hub(model, tmp_path / "repo2", extra_files=[run / "CartPole-v1" / "vecnormalize.pkl"])
    with pytest.raises(ValueError, match=r"already has a file named 'config\.json'"):
        package_for_hub(model, tmp_path / "repo3", extra_files=[folder / "config.json"])


def test_push_is_one_upload_folder_call(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> None:
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self: Any, **kwargs: Any) -> str:
        calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())}))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert push_to_hub(model, "me/ppo-cartpole", private=True) == "commit-info"
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/ppo-cartpole", "private": True, "exist_ok": True}
    upload = calls[1][1]
    assert upload["repo_id"] == "me/ppo-cartpole"
    assert upload["files"] == ["README.md", "config.json", "ppo-CartPole-v1.safetensors"]
    assert upload["revision"] is None
    assert upload["commit_message"] == "Upload agent (sb3_safe_save format)"


def test_card_usage_names_the_repo(model: Any, tmp_path: Path) -> None:
    card = (package_for_hub(model, tmp_path / "repo", repo_id="me/ppo-cartpole") / "README.md").read_text()
    assert 'model = load_from_hub(\n    "me/ppo-cartpole", "ppo-CartPole-v1.safetensors",\n' in card


@pytest.fixture
def hub_cache(model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A Hub cache, offline, holding me/ppo-cartpole at COMMIT (main points to it), laid out as hf_hub_download expects."""
    folder = package_for_hub(model, tmp_path / "repo")
    cache = tmp_path / "hf-home" / "hub"
    repo = cache / "models--me--ppo-cartpole"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf-home")), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these at import: set its constants too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    return cache, file_sha256(folder / "ppo-CartPole-v1.safetensors")


def test_load_from_hub_through_the_offline_cache(model: Any, hub_cache: tuple[Path, str], no_pickle: None) -> None:
    _, sha256 = hub_cache
    loaded = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors")  # main -> COMMIT, algorithm from the file
    assert type(loaded).__name__ == "SafePPO" and type(loaded) is safe(PPO, module=PPO.__module__)
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[name], tensor), name
    pinned = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors", revision=COMMIT, expected_sha256=sha256)
    assert pinned.num_timesteps == model.num_timesteps
    with pytest.raises(IntegrityError):
        load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors", revision=COMMIT, expected_sha256="0" * 64)


def test_load_from_hub_reads_stock_zips_without_running_them(model: Any, hub_cache: tuple[Path, str]) -> None:
    """A huggingface_sb3 repo's stock .zip loads through the restricted reader; no TRUST_REMOTE_CODE (issue 25)."""
    cache, _ = hub_cache
    stock = cache / "models--me--ppo-cartpole" / "snapshots" / COMMIT / "ppo-CartPole-v1.zip"
    PPO.save(model, stock)
    loaded = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.zip")  # algorithm guessed from the policy class
    assert type(loaded) is safe(PPO, module=PPO.__module__)  # the class load_from_hub loads with
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[name], tensor), name
    assert load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.zip", expected_sha256=file_sha256(stock)) is not None
    with pytest.raises(IntegrityError):
        load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.zip", expected_sha256="0" * 64)
    with pytest.raises(FormatError, match="loads sb3_safe_save files"):
        load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.pkl")


# ------------------------------------------------------------------------------ the card, as a visitor uses it
ROOT = Path(__file__).resolve().parents[1]


def offline_repo(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay ``folder`` out in the Hub cache ``cache`` as ``repo_id`` at COMMIT (main), as hf_hub_download expects."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)


def usage_snippet(card: str) -> str:
    (snippet,) = re.findall(r"^## Usage\n\n```python\n(.*?)^```", card, re.DOTALL | re.MULTILINE)
    return str(snippet)


def visitor_actions(card: str, folder: Path, repo_id: str, observations: np.ndarray, tmp_path: Path) -> np.ndarray:
    """Run the card's snippet as written in a fresh process, offline against ``folder``; act on ``observations``.

    The observations are raw env observations: the snippet's model normalizes them as its env would.
    """
    cache = tmp_path / "visitor-hf" / "hub"
    offline_repo(folder, cache, repo_id)
    np.save(tmp_path / "obs.npy", observations)
    probe = (
        "\nimport numpy as np\n"
        f"observations = np.load({str(tmp_path / 'obs.npy')!r})\n"
        "normalizer = model.get_vec_normalize_env()\n"
        "if normalizer is not None:\n"
        "    observations = normalizer.normalize_obs(observations)\n"
        f"np.save({str(tmp_path / 'actions.npy')!r}, model.predict(observations, deterministic=True)[0])\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples")]),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "visitor-hf"),
        "HF_HUB_CACHE": str(cache),
    }
    env.pop("TRUST_REMOTE_CODE", None)
    done = subprocess.run(
        [sys.executable, "-c", usage_snippet(card) + probe], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"the card's snippet failed:\n{done.stdout}\n{done.stderr}"
    return np.load(tmp_path / "actions.npy")


def cartpole_observations(n: int = 300) -> np.ndarray:
    return np.random.default_rng(0).normal(scale=[1.0, 1.5, 0.1, 1.5], size=(n, 4)).astype(np.float32)


def test_an_rl_zoo3_run_with_normalize_card_works_as_copied(tmp_path: Path) -> None:
    """The issue's case: statistics in their own vecnormalize.safetensors; the snippet must load them."""
    venv = VecNormalize(make_vec_env("CartPole-v1", seed=0))
    agent = safe(PPO)("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, policy_kwargs={"net_arch": [8]}, seed=0)
    agent.learn(128)
    run = tmp_path / "logs" / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    agent.save(run / "CartPole-v1.safetensors")  # rl-zoo3 keeps the statistics out of the model file
    save_vecnormalize(venv, run / "CartPole-v1" / "vecnormalize.safetensors")
    (run / "CartPole-v1" / "config.yml").write_text("normalize: true\n")
    extras = [run / "CartPole-v1" / "vecnormalize.safetensors", run / "CartPole-v1" / "config.yml"]

    folder = package_for_hub(
        run / "CartPole-v1.safetensors", tmp_path / "repo", env_id="CartPole-v1", repo_id="me/ppo-norm",
        extra_files=extras, eval_env=make_vec_env("CartPole-v1", seed=7), n_eval_episodes=3, video_length=0,
    )  # fmt: skip
    card = (folder / "README.md").read_text()
    assert "| VecNormalize statistics | in `vecnormalize.safetensors` |" in card
    assert "| replay | none: video_length=0 |" in card
    snippet = usage_snippet(card)
    assert 'statistics = hf_hub_download("me/ppo-norm", "vecnormalize.safetensors")' in snippet
    assert f'if file_sha256(statistics) != "{file_sha256(folder / "vecnormalize.safetensors")}":' in snippet

    # evaluated in the shipped statistics, frozen: the same episodes (seeded) give the same returns here
    expected_env = load_vecnormalize(folder / "vecnormalize.safetensors", make_vec_env("CartPole-v1", seed=7))
    expected_env.training = expected_env.norm_reward = False
    mean, std = evaluate_policy(agent, expected_env, n_eval_episodes=3, deterministic=True)
    results = json.loads((folder / "results.json").read_text())
    assert (results["mean_reward"], results["std_reward"], results["n_eval_episodes"]) == (mean, std, 3)
    (entry,) = front_matter(card)["model-index"]
    assert entry["name"] == "PPO"
    assert entry["results"][0]["dataset"] == {"name": "CartPole-v1", "type": "CartPole-v1"}
    assert entry["results"][0]["metrics"][0]["value"] == f"{mean:.2f} +/- {std:.2f}"
    assert f"| mean reward | {mean:.2f} +/- {std:.2f} over 3 episodes (deterministic actions" in card

    obs = cartpole_observations()
    trained = agent.predict(venv.normalize_obs(obs), deterministic=True)[0]
    assert (agent.predict(obs, deterministic=True)[0] != trained).any()  # the statistics matter for this agent
    np.testing.assert_array_equal(visitor_actions(card, folder, "me/ppo-norm", obs, tmp_path), trained)


def test_a_custom_policy_card_names_what_to_trust_and_works_as_copied(tmp_path: Path) -> None:
    """A custom policy class and a resource factory: the snippet passes trusted=[...]; statistics in the agent file."""
    from lang_dqn import CustomDQN, CustomDQNPolicy, UnpicklableExpert

    venv = VecNormalize(make_vec_env("CartPole-v1", seed=0))
    expert = UnpicklableExpert(name="stub-llm-7b", seed=3)
    agent = CustomDQN(
        CustomDQNPolicy, venv, learning_starts=32, buffer_size=500, seed=0,
        policy_kwargs={"vlm_model": expert, "vlm_model_name": "stub-llm-7b", "net_arch": [8]},
    )  # fmt: skip
    agent.learn(64)
    spec = ResourceSpec(factory="lang_dqn:build_expert", kwargs={"kind": "unpicklable", "name": "stub-llm-7b", "seed": 3})
    folder = package_for_hub(agent, tmp_path / "repo", repo_id="me/lang-dqn", save_kwargs={"specs": {"vlm_model": spec}})
    card = (folder / "README.md").read_text()
    assert "| VecNormalize statistics | in the agent file |" in card  # the model's own VecNormalize, by default
    assert "- `lang_dqn:CustomDQNPolicy`\n- `lang_dqn:build_expert`\n" in card
    assert '    trusted=["lang_dqn:CustomDQNPolicy", "lang_dqn:build_expert"],' in usage_snippet(card)
    assert "resources=" not in usage_snippet(card)  # the trusted factory rebuilds the expert
    assert json.loads((folder / "config.json").read_text())["trusted"] == ["lang_dqn:CustomDQNPolicy", "lang_dqn:build_expert"]

    obs = cartpole_observations()
    trained = agent.predict(venv.normalize_obs(obs), deterministic=True)[0]
    np.testing.assert_array_equal(visitor_actions(card, folder, "me/lang-dqn", obs, tmp_path), trained)


class FrameEnv(gym.Env[np.ndarray, int]):
    """A tiny env that renders 16x16 frames (``frames=False``: render raises as gymnasium does without pygame)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, frames: bool = True) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.render_mode = "rgb_array"
        self.frames = frames
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        return np.full(2, self.t / 10, np.float32), float(action), self.t >= 5, False, {}

    def render(self) -> np.ndarray:
        if not self.frames:
            raise gym.error.DependencyNotInstalled("pygame is not installed, run `pip install pygame`")
        return np.full((16, 16, 3), 20 * self.t, np.uint8)


@pytest.fixture(scope="module")
def frame_agent() -> Any:
    return safe(PPO)("MlpPolicy", FrameEnv(), n_steps=16, batch_size=16, policy_kwargs={"net_arch": [4]})


def test_a_replay_is_recorded_where_the_env_renders(frame_agent: Any, tmp_path: Path) -> None:
    pytest.importorskip("moviepy")
    folder = package_for_hub(
        frame_agent, tmp_path / "repo", env_id="Frame-v0", eval_env=FrameEnv(), n_eval_episodes=2, video_length=8
    )
    assert (folder / "replay.mp4").stat().st_size > 0
    assert "| replay | `replay.mp4` |" in (folder / "README.md").read_text()
    assert json.loads((folder / "results.json").read_text())["n_eval_episodes"] == 2


def test_no_replay_says_why(frame_agent: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = package_for_hub(
        frame_agent, tmp_path / "a", env_id="Frame-v0", eval_env=FrameEnv(frames=False), n_eval_episodes=1
    )
    assert not (folder / "replay.mp4").exists()
    reason = "the evaluation env cannot render here: pygame is not installed, run `pip install pygame`"
    assert f"| replay | none: {reason} |" in (folder / "README.md").read_text()
    monkeypatch.setitem(sys.modules, "moviepy.video.io.ImageSequenceClip", None)  # importing it raises ImportError
    card = (
        package_for_hub(frame_agent, tmp_path / "b", env_id="Frame-v0", eval_env=FrameEnv(), n_eval_episodes=1) / "README.md"
    ).read_text()
    assert "| replay | none: moviepy is not installed (pip install moviepy; it brings imageio and its ffmpeg) |" in card
    assert "model-index" in front_matter(card)  # the evaluation still ran


def test_evaluation_needs_an_episode_and_one_set_of_statistics(model: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_eval_episodes=0: evaluate on at least one episode"):
        package_for_hub(model, tmp_path / "a", eval_env=gym.make("CartPole-v1"), n_eval_episodes=0)
    venv = VecNormalize(make_vec_env("CartPole-v1"))
    save_vecnormalize(venv, tmp_path / "vecnormalize.safetensors")
    with pytest.raises(ValueError, match=r"VecNormalize statistics are in ppo-CartPole-v1\.safetensors and vecnormalize"):
        package_for_hub(model, tmp_path / "b", vec_normalize=venv, extra_files=[tmp_path / "vecnormalize.safetensors"])


def test_a_packaged_file_is_loaded_for_the_evaluation_with_load_kwargs(tmp_path: Path) -> None:
    from lang_dqn import UnpicklableExpert, make_model

    expert = UnpicklableExpert()
    make_model(expert, net_arch=[8]).save(tmp_path / "agent.safetensors")
    evaluation: dict[str, Any] = {"env_id": "CartPole-v1", "eval_env": gym.make("CartPole-v1"), "n_eval_episodes": 1}
    with pytest.raises(UntrustedTypeError, match="lang_dqn:CustomDQNPolicy"):  # the load decides, as for anyone
        package_for_hub(tmp_path / "agent.safetensors", tmp_path / "a", **evaluation)
    trusted = {"trusted": ["lang_dqn:CustomDQNPolicy"], "resources": {"vlm_model": expert}}
    folder = package_for_hub(tmp_path / "agent.safetensors", tmp_path / "b", load_kwargs=trusted, **evaluation)
    assert json.loads((folder / "results.json").read_text())["n_eval_episodes"] == 1
    assert "model-index" in front_matter((folder / "README.md").read_text())
