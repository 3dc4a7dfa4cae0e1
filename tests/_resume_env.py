"""Environments whose whole state is their random generator, so a resume in a new process can be exact."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class NoiseBandit(gym.Env[np.ndarray, np.int64]):
    """Observations are fresh noise; the reward says whether the action matched the sign of the next one. Never ends."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space: gym.spaces.Space[Any] = self._action_space()

    def _action_space(self) -> gym.spaces.Space[Any]:
        return gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs = self._obs()
        return obs, self._reward(action, obs), False, False, {}

    def _obs(self) -> np.ndarray:
        return self.np_random.normal(size=3).astype(np.float32)

    def _reward(self, action: Any, obs: np.ndarray) -> float:
        return float(int(action) == int(obs[0] > 0))


class ContinuousNoiseBandit(NoiseBandit):
    def _action_space(self) -> gym.spaces.Space[Any]:
        return gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _reward(self, action: Any, obs: np.ndarray) -> float:
        return -float((np.asarray(action, dtype=np.float64)[0] - np.tanh(obs[0])) ** 2)
