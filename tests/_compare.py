"""Exactness checks shared by the tests: two models are the same agent, bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm


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
