"""Exact resume with VecNormalize, every setting (issue 23, part 1).

``norm_reward=True`` (VecNormalize's default, rl-zoo3's ``normalize: true``) updates ``ret_rms`` from
``returns``, the running discounted return of each env, at every step. SB3's pickle leaves ``returns``
out and zeros it at load; this library stores and restores it, so a run continued without a reset
normalizes rewards as if it had never stopped.

Each case compares three runs of PPO or SAC on two bandit envs (never done, so ``returns`` only grows):

* **uninterrupted**: ``learn(N)``, ``learn(N, reset_num_timesteps=False)`` with a ``ResumeCheckpointCallback``;
* **README recipe**: ``learn(N)``, ``save(vec_normalize=...)``, ``load(env=the same env, force_reset=False)``,
  ``learn(N, reset_num_timesteps=False)``;
* **checkpoint callback**: ``load_checkpoint`` of the uninterrupted run's checkpoint at step N into a fresh
  env, ``learn(N, reset_num_timesteps=False)``.

Weights, optimizer state, the last rollout's or the replay buffer's actions and rewards, and the
VecNormalize state (``returns`` included) must be equal bit for bit.
"""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _compare import assert_same_model
from _hostile import drop_tensors, edit_manifest
from _resume_env import ContinuousNoiseBandit, NoiseBandit
from sb3_safe_save import (
    FormatError,
    ResumeCheckpointCallback,
    list_checkpoints,
    load_checkpoint,
    load_vecnormalize,
    safe,
    save_vecnormalize,
)
from test_vecnormalize import assert_same_state

N = 32  # timesteps before and after the interruption (2 envs)
ALGOS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "PPO": (PPO, NoiseBandit, dict(n_steps=8, batch_size=16, n_epochs=1, policy_kwargs=dict(net_arch=[8]))),
    "SAC": (
        SAC,
        ContinuousNoiseBandit,
        dict(learning_starts=8, buffer_size=128, batch_size=8, train_freq=4, policy_kwargs=dict(net_arch=[8])),
    ),
}
SETTINGS = list(itertools.product([True, False], repeat=2))


def fresh_env(name: str) -> DummyVecEnv:
    return DummyVecEnv([ALGOS[name][1]] * 2)


def build(name: str, norm_obs: bool, norm_reward: bool) -> Any:
    algo, _, kwargs = ALGOS[name]
    env = VecNormalize(fresh_env(name), norm_obs=norm_obs, norm_reward=norm_reward)
    return safe(algo)("MlpPolicy", env, seed=0, **copy.deepcopy(kwargs))


def assert_same_run(a: Any, b: Any) -> None:
    va, vb = a.get_vec_normalize_env(), b.get_vec_normalize_env()
    assert va is not None and vb is not None
    assert va.returns.dtype == vb.returns.dtype == np.float64
    assert np.array_equal(va.returns, vb.returns), "VecNormalize.returns"
    assert_same_state(va, vb)  # settings, obs_rms, ret_rms, old_obs, old_reward
    buffer = "replay_buffer" if isinstance(a, SAC) else "rollout_buffer"
    for field in ("actions", "rewards", "observations"):
        x, y = getattr(getattr(a, buffer), field), getattr(getattr(b, buffer), field)
        assert np.array_equal(x, y), f"{buffer}.{field}"
    assert_same_model(a, b)


@pytest.mark.parametrize(("norm_obs", "norm_reward"), SETTINGS)
@pytest.mark.parametrize("name", list(ALGOS))
def test_every_vecnormalize_setting_resumes_exactly(name: str, norm_obs: bool, norm_reward: bool, tmp_path: Path) -> None:
    uninterrupted = build(name, norm_obs, norm_reward)
    saver = ResumeCheckpointCallback(save_freq=N, save_path=tmp_path / "checkpoints", keep_last=None)
    uninterrupted.learn(N, callback=saver)
    uninterrupted.learn(N, reset_num_timesteps=False, callback=saver)
    if norm_reward:
        assert np.all(uninterrupted.get_vec_normalize_env().returns != 0)  # what a zeroing load would lose

    # the README recipe: the same env object, not reset
    recipe = build(name, norm_obs, norm_reward)
    recipe.learn(N)
    env = recipe.get_env()
    recipe.save(tmp_path / "model", vec_normalize=recipe.get_vec_normalize_env())
    if name == "SAC":
        recipe.save_replay_buffer(tmp_path / "buffer")
    resumed = type(recipe).load(tmp_path / "model", env=env, force_reset=False)
    assert resumed.get_env() is env
    if name == "SAC":
        resumed.load_replay_buffer(tmp_path / "buffer")
    resumed.learn(N, reset_num_timesteps=False)
    assert_same_run(uninterrupted, resumed)

    # the checkpoint callback: its checkpoint at step N, into a fresh env
    first = list_checkpoints(tmp_path / "checkpoints")[0]
    assert first.name == f"checkpoint_{N}_steps"
    again = ResumeCheckpointCallback(save_freq=N, save_path=tmp_path / "again")
    continued = load_checkpoint(type(recipe), first, env=fresh_env(name), callbacks=[again], force_reset=False)
    continued.learn(N, reset_num_timesteps=False, callback=again)
    assert_same_run(uninterrupted, continued)


# ------------------------------------------------------------------------------------- the stored returns
def stepped_model() -> Any:
    model = build("PPO", True, True)
    model.learn(16)
    returns = model.get_vec_normalize_env().returns
    assert returns.shape == (2,) and np.all(returns != 0)
    return model


def saved(model: Any) -> bytes:
    buf = io.BytesIO()
    model.save(buf, vec_normalize=model.get_vec_normalize_env())
    return buf.getvalue()


def test_files_without_returns_load_zeros() -> None:
    """Files written before ``returns`` was stored: no tensor, no ``has_returns``; SB3's zeros, as before."""
    model = stepped_model()

    def old_format(manifest: dict[str, Any]) -> None:
        del manifest["vec_normalize"]["has_returns"]
        del manifest["tensors"]["vec_normalize/returns"]

    old = drop_tensors(edit_manifest(saved(model), old_format), {"vec_normalize/returns"})
    loaded = safe(PPO).load(io.BytesIO(old), env=fresh_env("PPO"))
    venv = loaded.get_vec_normalize_env()
    assert np.array_equal(venv.returns, np.zeros(2)) and venv.returns.dtype == np.float64
    assert np.array_equal(venv.ret_rms.var, model.get_vec_normalize_env().ret_rms.var)


def test_returns_go_only_into_as_many_envs() -> None:
    """Statistics loaded into an env with another number of envs (an evaluation env): returns start at zero."""
    model = stepped_model()
    data = saved(model)
    same = safe(PPO).load(io.BytesIO(data), env=fresh_env("PPO"))
    assert np.array_equal(same.get_vec_normalize_env().returns, model.get_vec_normalize_env().returns)
    one = load_vecnormalize(io.BytesIO(data), DummyVecEnv([NoiseBandit]))
    assert np.array_equal(one.returns, np.zeros(1))


def test_malformed_returns_are_refused_and_the_env_is_left_alone() -> None:
    model = stepped_model()
    model.get_vec_normalize_env().returns = np.zeros((2, 1))  # forged: not one value per env
    data = saved(model)
    target = VecNormalize(fresh_env("PPO"))
    before = target.returns.copy()
    with pytest.raises(
        FormatError, match=r"VecNormalize returns: expected one float64 value per env, the file holds float64 \[2, 1\]"
    ):
        safe(PPO).load(io.BytesIO(data), env=target)
    assert np.array_equal(target.returns, before) and target.ret_rms.count == 1e-4  # untouched


def test_a_wrapper_without_returns_saves_without_them(tmp_path: Path) -> None:
    """An unpickled stock VecNormalize has no ``returns`` until ``set_venv``: saved without, loaded as zeros."""
    vn = VecNormalize(fresh_env("PPO"))
    vn.reset()
    del vn.returns
    save_vecnormalize(vn, tmp_path / "vn")
    loaded = load_vecnormalize(tmp_path / "vn.safetensors", fresh_env("PPO"))
    assert np.array_equal(loaded.returns, np.zeros(2))
