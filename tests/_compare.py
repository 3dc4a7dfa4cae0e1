"""Exactness checks shared by the tests: two models are the same agent, bit for bit; a buffer is unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from sb3_safe_save import safe


def assert_same_tree(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality for optimizer state dicts and similar nested values (tensors bitwise)."""
    if isinstance(a, th.Tensor):
        assert isinstance(b, th.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert th.equal(a.cpu(), b.cpu()), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), path
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def assert_same_model(a: BaseAlgorithm, b: BaseAlgorithm, n_obs: int = 64) -> None:
    """Parameters bitwise equal, optimizer state equal, counters equal, deterministic predictions identical."""
    for name in a._get_torch_save_params()[0]:
        x = _resolve(a, name).state_dict()
        y = _resolve(b, name).state_dict()
        assert_same_tree(x, y, name)
    for name in a._get_torch_save_params()[1]:
        assert_same_tree(_resolve(a, name), _resolve(b, name), name)
    for attr in ("num_timesteps", "_n_updates", "_episode_num", "exploration_rate", "_n_calls", "_current_progress_remaining"):
        if hasattr(a, attr):
            assert getattr(a, attr) == getattr(b, attr), attr
    obs = _sample_obs(a, n_obs)
    pa, _ = a.predict(obs, deterministic=True)
    pb, _ = b.predict(obs, deterministic=True)
    assert np.array_equal(pa, pb)


def _resolve(model: Any, name: str) -> Any:
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _sample_obs(model: BaseAlgorithm, n: int) -> Any:
    space = model.observation_space
    space.seed(123)
    samples = [space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    return np.stack(samples)


def her_model() -> Any:
    """A tiny ``safe(DQN)`` with a ``HerReplayBuffer`` on a 4-bit BitFlippingEnv."""
    return safe(DQN)(
        "MultiInputPolicy",
        BitFlippingEnv(n_bits=4, continuous=False, max_steps=5),
        buffer_size=64,
        learning_starts=1000,
        replay_buffer_class=HerReplayBuffer,
        replay_buffer_kwargs=dict(n_sampled_goal=2, goal_selection_strategy="future"),
        policy_kwargs=dict(net_arch=[8]),
        seed=0,
    )


def buffer_state(buffer: Any) -> dict[str, Any]:
    """A copy of every array, dict of arrays and scalar of a replay buffer (compare with ``assert_same_tree``)."""
    out: dict[str, Any] = {}
    for name, value in vars(buffer).items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            out[name] = value.copy()
        elif isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            out[name] = {k: v.copy() for k, v in value.items()}
        elif isinstance(value, (int, float, bool, str)) or value is None:
            out[name] = value
    out["goal_selection_strategy"] = getattr(buffer, "goal_selection_strategy", None)
    return out
