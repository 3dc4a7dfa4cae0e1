"""Resume exactly: a run saved and loaded mid-training continues bitwise as if it had never stopped (issue 14).

The uninterrupted run is ``learn(N); learn(N, reset_num_timesteps=False)`` on one object. The resumed
run is ``learn(N)``, ``save`` (and ``save_replay_buffer``), ``load(env=same_env, force_reset=False)``,
``load_replay_buffer``, ``learn(N, reset_num_timesteps=False)``. Any bit of difference fails.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO, SAC, TD3
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.noise import OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _compare import assert_same_model, assert_same_tree
from _hostile import edit_manifest
from _resume_env import ContinuousNoiseBandit, NoiseBandit
from sb3_safe_save import (
    FormatError,
    ResumeCheckpointCallback,
    StateMismatchError,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    safe,
    save_checkpoint,
)
from test_contrib import CASES, make_env

N = 48
OFF = dict(learning_starts=16, buffer_size=256, batch_size=8, train_freq=8, policy_kwargs=dict(net_arch=[8]))
EXTRA: dict[str, tuple[type, str, str | None, dict[str, Any]]] = {
    "PPO-gSDE": (
        PPO,
        "MlpPolicy",
        "Pendulum-v1",
        dict(n_steps=16, batch_size=16, n_epochs=1, use_sde=True, sde_sample_freq=4, policy_kwargs=dict(net_arch=[8])),
    ),
    "SAC-gSDE": (SAC, "MlpPolicy", "Pendulum-v1", dict(**OFF, use_sde=True)),
    "TD3-OU": (
        TD3,
        "MlpPolicy",
        "Pendulum-v1",
        dict(**OFF, action_noise=OrnsteinUhlenbeckActionNoise(np.zeros(1), 0.3 * np.ones(1))),
    ),
}
ALL = {**CASES, **EXTRA}


def build(name: str, n_envs: int = 1) -> Any:
    algo, policy, env_id, kwargs = ALL[name]
    kwargs = copy.deepcopy(kwargs)  # each run gets its own action-noise object
    env = make_vec_env(lambda: make_env(env_id) if env_id is None else make_env_id(env_id), n_envs=n_envs, seed=0)
    return safe(algo)(policy, env, seed=0, **kwargs)


def make_env_id(env_id: str) -> Any:
    import gymnasium as gym

    return gym.make(env_id)


def random_state() -> tuple[Any, ...]:
    return th.get_rng_state(), np.random.get_state(legacy=False), random.getstate()


def assert_same_random_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert th.equal(a[0], b[0]), "torch generator"
    assert_same_tree(a[1], b[1], "numpy generator")
    assert a[2] == b[2], "python random"


def uninterrupted(name: str, n_envs: int = 1) -> tuple[Any, tuple[Any, ...]]:
    model = build(name, n_envs)
    model.learn(N)
    model.learn(N, reset_num_timesteps=False)
    return model, random_state()


def resumed(name: str, tmp_path: Path, n_envs: int = 1, **load_kwargs: Any) -> tuple[Any, tuple[Any, ...]]:
    model = build(name, n_envs)
    model.learn(N)
    model.save(tmp_path / "model.safetensors")
    off_policy = getattr(model, "replay_buffer", None) is not None
    if off_policy:
        model.save_replay_buffer(tmp_path / "buffer.safetensors")
    loaded = type(model).load(tmp_path / "model.safetensors", env=model.get_env(), force_reset=False, **load_kwargs)
    if off_policy:
        loaded.load_replay_buffer(tmp_path / "buffer.safetensors")
    loaded.learn(N, reset_num_timesteps=False)
    return loaded, random_state()


def assert_same_run(a: Any, b: Any) -> None:
    # the action space the model samples from, and the spaces of the env (which some envs sample from)
    for name, x, y in (
        ("action_space", a.action_space, b.action_space),
        ("env.observation_space", a.get_env().observation_space, b.get_env().observation_space),
        ("env.action_space", a.get_env().action_space, b.get_env().action_space),
    ):
        rng_a, rng_b = x._np_random, y._np_random
        assert (rng_a is None) == (rng_b is None), name
        if rng_a is not None:
            assert_same_tree(rng_a.bit_generator.state, rng_b.bit_generator.state, name)
    gens_a, gens_b = a.get_env().get_attr("_np_random"), b.get_env().get_attr("_np_random")
    assert [g.bit_generator.state for g in gens_a] == [g.bit_generator.state for g in gens_b], "env generators"
    if getattr(a, "replay_buffer", None) is not None:
        for field in ("observations", "actions", "rewards", "dones"):
            assert np.array_equal(getattr(a.replay_buffer, field), getattr(b.replay_buffer, field)), field
    assert_same_model(a, b)  # last: it seeds a's observation space to sample observations


@pytest.mark.parametrize("name", list(ALL))
def test_resumed_run_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    a, state_a = uninterrupted(name)
    b, state_b = resumed(name, tmp_path)
    assert_same_run(a, b)
    assert_same_random_state(state_a, state_b)


@pytest.mark.parametrize("name", ["PPO", "SAC", "DQN"])
def test_without_restoring_the_run_diverges(name: str, tmp_path: Path) -> None:
    """The control: SB3's reseeding at load (restore_random_state=False) takes another path."""
    a, _ = uninterrupted(name)
    b, _ = resumed(name, tmp_path, restore_random_state=False)
    params_a, params_b = a.policy.state_dict(), b.policy.state_dict()
    assert any(not th.equal(params_a[k], params_b[k]) for k in params_a)


@pytest.mark.parametrize("name", ["PPO", "SAC"])
def test_several_envs_resume_exactly(name: str, tmp_path: Path) -> None:
    a, state_a = uninterrupted(name, n_envs=2)
    b, state_b = resumed(name, tmp_path, n_envs=2)
    assert_same_run(a, b)
    assert_same_random_state(state_a, state_b)


def test_env_generators_are_restored_into_a_fresh_env(tmp_path: Path) -> None:
    model = safe(PPO)("MlpPolicy", DummyVecEnv([NoiseBandit, NoiseBandit]), n_steps=16, batch_size=16, seed=3)
    model.learn(32)
    model.save(tmp_path / "m")
    expected = [g.bit_generator.state for g in model.get_env().get_attr("np_random")]
    fresh = DummyVecEnv([NoiseBandit, NoiseBandit])
    type(model).load(tmp_path / "m", env=fresh, force_reset=False)
    assert [g.bit_generator.state for g in fresh.get_attr("np_random")] == expected
    assert fresh._seeds == [None, None]  # SB3's env.seed(model.seed) at load is undone, as in the running env


def test_load_failure_leaves_random_state_alone(tmp_path: Path) -> None:
    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, seed=0)
    model.learn(16)
    model.save(tmp_path / "m")

    def bad_gsde(m: dict[str, Any]) -> None:  # valid JSON; fails in phase 3, after SB3 reseeded everything
        m["random_state"]["gsde"] = {"policy": ["exploration_mat"]}

    edited = tmp_path / "bad.safetensors"
    edited.write_bytes(edit_manifest((tmp_path / "m.safetensors").read_bytes(), bad_gsde))
    th.manual_seed(7), np.random.seed(7), random.seed(7)
    before = random_state()
    with pytest.raises(FormatError, match=r"rng/gsde/policy/exploration_mat"):
        type(model).load(edited)
    assert_same_random_state(before, random_state())


def test_the_manifest_records_the_random_state(tmp_path: Path) -> None:
    model = build("SAC-gSDE")
    model.learn(32)
    model.save(tmp_path / "m")
    state = read_manifest(tmp_path / "m.safetensors").random_state
    assert state is not None
    assert set(state.spaces) == {"action_space"} or set(state.spaces) == {"observation_space", "action_space"}
    assert state.gsde == {"policy.actor": ["exploration_mat", "exploration_matrices"]}
    assert state.envs is not None and len(state.envs) == 1 and state.envs[0] is not None


# --------------------------------------------------------------------------------------- fresh process
FRESH = textwrap.dedent(
    """
    import json, sys
    import torch as th
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.vec_env import DummyVecEnv
    from sb3_safe_save import safe
    sys.path.insert(0, sys.argv[2])
    from _resume_env import NoiseBandit, ContinuousNoiseBandit
    out = {}
    for name, algo, env_cls in (("PPO", PPO, NoiseBandit), ("SAC", SAC, ContinuousNoiseBandit)):
        folder = sys.argv[1] + "/" + name
        model = safe(algo).load(folder + "/model.safetensors", env=DummyVecEnv([env_cls]), force_reset=False)
        if name == "SAC":
            model.load_replay_buffer(folder + "/buffer.safetensors")
        model.learn(48, reset_num_timesteps=False)
        th.save({k: v for k, v in model.policy.state_dict().items()}, folder + "/params.pt")
        out[name] = model.num_timesteps
    print(json.dumps(out))
    """
)


def test_fresh_process_resume_is_exact(tmp_path: Path) -> None:
    """A new process, a new env object: exact when the env's only state is its generator (as here)."""
    finals = {}
    for name, algo, env_cls, kwargs in (
        ("PPO", PPO, NoiseBandit, dict(n_steps=16, batch_size=16, n_epochs=2)),
        ("SAC", SAC, ContinuousNoiseBandit, dict(learning_starts=16, buffer_size=256, batch_size=8, train_freq=8)),
    ):
        cls = safe(algo)
        a = cls("MlpPolicy", DummyVecEnv([env_cls]), seed=0, policy_kwargs=dict(net_arch=[8]), **kwargs)
        a.learn(48)
        a.learn(48, reset_num_timesteps=False)
        finals[name] = a.policy.state_dict()
        b = cls("MlpPolicy", DummyVecEnv([env_cls]), seed=0, policy_kwargs=dict(net_arch=[8]), **kwargs)
        b.learn(48)
        (tmp_path / name).mkdir()
        b.save(tmp_path / name / "model.safetensors")
        if name == "SAC":
            b.save_replay_buffer(tmp_path / name / "buffer.safetensors")
    tests_dir = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(tmp_path), tests_dir],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"PPO": 96, "SAC": 96}
    for name, expected in finals.items():
        got = th.load(tmp_path / name / "params.pt", weights_only=True)
        assert_same_tree(expected, got, name)


# ------------------------------------------------------------------------------------------ checkpoints
class Counter(BaseCallback):
    def __init__(self, label: str = "c") -> None:
        super().__init__()
        self.label = label
        self.seen = 0
        self.best = float("-inf")

    def _on_step(self) -> bool:
        self.seen += 1
        self.best = max(self.best, float(self.seen))
        return True


def bandit_model(name: str) -> Any:
    """PPO, DQN or SAC on a bandit whose only state is its generator: a fresh env resumes it exactly."""
    algo, _, _, kwargs = ALL[name]
    env = DummyVecEnv([ContinuousNoiseBandit if name == "SAC" else NoiseBandit])
    return safe(algo)("MlpPolicy", env, seed=0, **copy.deepcopy(kwargs))


@pytest.mark.parametrize("name", ["PPO", "DQN", "SAC"])
def test_periodic_checkpoints_resume_exactly_and_keep_the_last_k(name: str, tmp_path: Path) -> None:
    total = 96
    a = bandit_model(name)
    a.learn(total, callback=ResumeCheckpointCallback(save_freq=16, save_path=tmp_path / "a", keep_last=2))
    assert len(list_checkpoints(tmp_path / "a")) == 2

    b = bandit_model(name)  # the same run, keeping every checkpoint
    counter = Counter()
    b.learn(total, callback=[ResumeCheckpointCallback(16, tmp_path / "b", keep_last=None, callbacks=[counter]), counter])
    kept = list_checkpoints(tmp_path / "b")
    assert len(kept) >= 3
    middle = kept[len(kept) // 2]
    steps = int(middle.name.split("_")[1])

    saver, counter2 = ResumeCheckpointCallback(16, tmp_path / "c", keep_last=None), Counter()
    fresh_env = bandit_model(name).get_env()
    c = load_checkpoint(type(b), middle, env=fresh_env, callbacks=[saver, counter2], force_reset=False)
    assert c.num_timesteps == steps == saver.last_checkpoint_timesteps
    assert counter2.seen == saver.n_calls == steps and counter2.best == float(steps)
    c.learn(total - steps, reset_num_timesteps=False, callback=[saver, counter2])
    assert_same_run(a, c)
    assert counter2.seen == counter.seen


def test_checkpoint_holds_vecnormalize_and_buffer(tmp_path: Path) -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=0))
    model = safe(SAC)(
        "MlpPolicy", env, seed=0, learning_starts=16, buffer_size=256, batch_size=8, policy_kwargs=dict(net_arch=[8])
    )
    model.learn(32)
    path = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "model.safetensors", "replay_buffer.safetensors"]
    loaded = load_checkpoint(type(model), path, env=make_vec_env("Pendulum-v1", n_envs=1, seed=0))
    venv = loaded.get_vec_normalize_env()
    assert venv is not None
    assert np.array_equal(venv.obs_rms.mean, env.obs_rms.mean) and venv.obs_rms.count == env.obs_rms.count
    assert loaded.replay_buffer.pos == model.replay_buffer.pos
    assert np.array_equal(loaded.replay_buffer.observations, model.replay_buffer.observations)


def test_failed_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("DQN")
    model.learn(32)
    path = save_checkpoint(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model.learn(32, reset_num_timesteps=False)

    import sb3_safe_save._buffers as buffers

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(buffers, "save_buffer", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_checkpoint_refuses_other_callbacks_and_bad_index(tmp_path: Path) -> None:
    model = build("PPO")
    model.learn(16)
    path = save_checkpoint(model, tmp_path / "ckpt", callbacks=[Counter()])
    with pytest.raises(StateMismatchError, match="stores 1 callbacks"):
        load_checkpoint(type(model), path)
    with pytest.raises(StateMismatchError, match="stores a Counter"):
        load_checkpoint(type(model), path, callbacks=[ResumeCheckpointCallback(1, tmp_path)])
    (path / "checkpoint.json").write_text('{"format": "sb3_safe_save.checkpoint", "version": 1, "num_timesteps": -1}')
    with pytest.raises(FormatError, match="malformed"):
        load_checkpoint(type(model), path, callbacks=[Counter()])
    with pytest.raises(FormatError, match="not a checkpoint directory"):
        load_checkpoint(type(model), tmp_path)
