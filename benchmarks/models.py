"""The benchmark models: PPO and SAC of a given parameter count with Adam state, and the core-scenario DQN."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save import safe

OBS_DIM = 256
ACT_DIM = 4


class BoxEnv(gym.Env[np.ndarray, np.ndarray]):
    """Box(256) observations, Box(4) actions, deterministic dynamics: enough for one optimiser step."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)

    def __init__(self) -> None:
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(OBS_DIM, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._t += 1
        obs = np.full(OBS_DIM, (self._t % 7) / 7.0, np.float32)
        return obs, float(np.sum(action)), False, self._t >= 50, {}


def _linear(a: int, b: int) -> int:
    return a * b + b


def ppo_params(w: int) -> int:
    return 2 * (_linear(OBS_DIM, w) + _linear(w, w)) + _linear(w, ACT_DIM) + _linear(w, 1) + ACT_DIM


def sac_params(w: int) -> int:
    actor = _linear(OBS_DIM, w) + _linear(w, w) + 2 * _linear(w, ACT_DIM)
    qnet = _linear(OBS_DIM + ACT_DIM, w) + _linear(w, w) + _linear(w, 1)
    return actor + 4 * qnet  # critic (2 Q-nets) + critic_target (2 Q-nets)


def width_for(algo: str, n_params: int) -> int:
    count = ppo_params if algo == "PPO" else sac_params
    lo, hi = 1, int(math.sqrt(n_params)) + 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < n_params:
            lo = mid + 1
        else:
            hi = mid
    return lo


def make_rl_model(algo: str, n_params: int) -> BaseAlgorithm:
    """A ``safe(PPO)`` / ``safe(SAC)`` with about ``n_params`` parameters, after one Adam step."""
    w = width_for(algo, n_params)
    th.manual_seed(0)
    if algo == "PPO":
        model: BaseAlgorithm = safe(PPO)(
            "MlpPolicy", BoxEnv(), n_steps=8, batch_size=8, n_epochs=1,
            policy_kwargs={"net_arch": {"pi": [w, w], "vf": [w, w]}}, seed=0, device="cpu",
        )  # fmt: skip
        model.learn(8)
    else:
        model = safe(SAC)(
            "MlpPolicy", BoxEnv(), buffer_size=64, learning_starts=0, batch_size=4, train_freq=1, gradient_steps=1,
            policy_kwargs={"net_arch": [w, w]}, seed=0, device="cpu",
        )  # fmt: skip
        model.learn(2)
    return model


def make_expert(kind: str) -> th.nn.Module | None:
    """``none``, ``200MB`` (12 x Linear(2048, 2048), fp32) or ``7B`` (on ``meta``, no memory)."""
    from lang_dqn import ModuleExpert

    if kind == "none":
        return None
    if kind == "200MB":
        th.manual_seed(0)
        return ModuleExpert(width=2048, depth=12)
    return ModuleExpert(width=8192, depth=104, device="meta")


def make_dqn(expert: th.nn.Module | None) -> BaseAlgorithm:
    """The core scenario: ``examples/lang_dqn.make_model`` after a short ``learn`` (Adam state exists)."""
    from lang_dqn import make_model

    model = make_model(expert, device="cpu")
    model.learn(80)
    return model


def n_parameters(model: BaseAlgorithm) -> int:
    return sum(p.numel() for p in model.policy.parameters() if not p.is_meta)
