"""Every SB3 and sb3-contrib algorithm round-trips exactly through ``safe()``, with zero pickle.

Tiny models (8-unit layers, a few dozen steps) so the whole matrix runs in well under a minute.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3

from _compare import assert_same_model, assert_same_tree
from sb3_safe_save import read_manifest, safe
from sb3_safe_save._manifest import PickleNode, iter_nodes

sb3_contrib = pytest.importorskip("sb3_contrib")
from sb3_contrib import ARS, QRDQN, TQC, TRPO, CrossQ, MaskablePPO, RecurrentPPO  # noqa: E402
from sb3_contrib.common.envs import InvalidActionEnvDiscrete  # noqa: E402

OFF = dict(learning_starts=16, buffer_size=256, batch_size=8, train_freq=8, gradient_steps=1)
ON = dict(n_steps=16, batch_size=16)
CASES: dict[str, tuple[type, str, str | None, dict[str, Any]]] = {
    # name: (algorithm, policy, env id (None: an action-masked env), kwargs)
    "A2C": (A2C, "MlpPolicy", "CartPole-v1", dict(n_steps=8, policy_kwargs=dict(net_arch=[8]))),
    "PPO": (PPO, "MlpPolicy", "CartPole-v1", dict(**ON, n_epochs=1, policy_kwargs=dict(net_arch=[8]))),
    "DQN": (DQN, "MlpPolicy", "CartPole-v1", dict(**OFF, policy_kwargs=dict(net_arch=[8]))),
    "SAC": (SAC, "MlpPolicy", "Pendulum-v1", dict(**OFF, policy_kwargs=dict(net_arch=[8]))),
    "TD3": (TD3, "MlpPolicy", "Pendulum-v1", dict(**OFF, policy_kwargs=dict(net_arch=[8]))),
    "DDPG": (DDPG, "MlpPolicy", "Pendulum-v1", dict(**OFF, policy_kwargs=dict(net_arch=[8]))),
    "ARS": (ARS, "LinearPolicy", "Pendulum-v1", dict(n_delta=2, n_top=1)),
    "CrossQ": (CrossQ, "MlpPolicy", "Pendulum-v1", dict(**OFF, policy_kwargs=dict(net_arch=dict(pi=[8], qf=[8])))),
    "MaskablePPO": (MaskablePPO, "MlpPolicy", None, dict(**ON, n_epochs=1, policy_kwargs=dict(net_arch=[8]))),
    "QRDQN": (QRDQN, "MlpPolicy", "CartPole-v1", dict(**OFF, policy_kwargs=dict(net_arch=[8], n_quantiles=5))),
    "RecurrentPPO": (
        RecurrentPPO,
        "MlpLstmPolicy",
        "CartPole-v1",
        dict(**ON, n_epochs=1, policy_kwargs=dict(net_arch=[8], lstm_hidden_size=8)),
    ),
    "TQC": (TQC, "MlpPolicy", "Pendulum-v1", dict(**OFF, policy_kwargs=dict(net_arch=[8], n_quantiles=5))),
    "TRPO": (
        TRPO,
        "MlpPolicy",
        "Pendulum-v1",
        dict(**ON, n_critic_updates=1, cg_max_steps=2, policy_kwargs=dict(net_arch=[8])),
    ),
}


def _forbid_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("save pickled something")

    # (the walker's size probe may still pickle into a byte-counting sink; nothing of it is written)
    for mod, name in ((cloudpickle, "dumps"), (pickle, "dumps")):
        monkeypatch.setattr(mod, name, refuse)


def make_env(env_id: str | None) -> Any:
    return InvalidActionEnvDiscrete(dim=10, n_invalid_actions=3) if env_id is None else env_id


def make_model(name: str) -> Any:
    algo, policy, env_id, kwargs = CASES[name]
    model = safe(algo)(policy, make_env(env_id), seed=0, **kwargs)
    model.learn(48)
    return model


def assert_same_data(a: Any, b: Any, names: list[str]) -> None:
    """Every attribute the file stored has the same value after loading (objects compared by state)."""
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        _same_value(x, y, name)


def _same_value(x: Any, y: Any, path: str) -> None:
    if isinstance(x, (th.Tensor, np.ndarray, dict, list)) or type(x) is tuple:
        assert_same_tree(x, y, path)
    elif isinstance(x, tuple):  # named tuple
        assert type(x) is type(y), path
        for field in x._fields:
            _same_value(getattr(x, field), getattr(y, field), f"{path}.{field}")
    elif hasattr(x, "__dict__") and not isinstance(x, (type, gym.spaces.Space)) and not callable(x):
        assert type(x) is type(y), path
        for k in vars(x):
            _same_value(vars(x)[k], vars(y)[k], f"{path}.{k}")
    elif callable(x) and not isinstance(x, type):
        assert type(x) is type(y), path  # schedules: same class; compared by their outputs below
        for p in (1.0, 0.5, 0.0):
            assert x(p) == y(p), path
    else:
        assert x == y or (x != x and y != y), f"{path}: {x!r} != {y!r}"
    # (space RNG states are not compared: _setup_model reseeds action_space from model.seed, as in SB3)


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_exact_and_pickle_free(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(name)
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        _forbid_pickle(m)
        model.save(buf)
    manifest = read_manifest(buf)
    roots = [*manifest.data.values(), *manifest.torch_variables.values()]
    roots += [e.state for e in manifest.state_dicts if e.kind == "optimizer"]
    assert not [n for r in roots for n in iter_nodes(r) if isinstance(n, PickleNode)]
    assert manifest.algorithm.startswith(CASES[name][0].__module__)

    loaded = type(model).load(buf)  # default trust list only
    assert type(loaded) is type(model)
    assert_same_data(model, loaded, list(manifest.data))
    assert_same_model(model, loaded)


def test_recurrent_ppo_lstm_states_round_trip() -> None:
    model = make_model("RecurrentPPO")
    buf = io.BytesIO()
    model.save(buf)
    node = read_manifest(buf).data["_last_lstm_states"]
    assert node.kind == "namedtuple" and node.cls.endswith(":RNNStates")
    loaded = type(model).load(buf)
    a, b = model._last_lstm_states, loaded._last_lstm_states
    assert type(b) is type(a)
    for part in ("pi", "vf"):
        assert_same_tree(tuple(getattr(a, part)), tuple(getattr(b, part)), part)
    # predicting with the recurrent state continues identically
    obs = np.stack([model.observation_space.sample() for _ in range(4)])
    starts = np.zeros(4, dtype=bool)
    state = None
    for _ in range(3):
        pa, sa = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        pb, sb = loaded.predict(obs, state=state, episode_start=starts, deterministic=True)
        assert np.array_equal(pa, pb)
        assert all(np.array_equal(x, y) for x, y in zip(sa, sb, strict=True))
        state = sa


def test_maskable_ppo_respects_masks_after_load() -> None:
    model = make_model("MaskablePPO")
    buf = io.BytesIO()
    model.save(buf)
    env = make_env(None)
    loaded = type(model).load(buf, env=env)
    obs, _ = env.reset(seed=0)
    masks = env.action_masks()
    for _ in range(5):
        a, _ = model.predict(obs, action_masks=masks, deterministic=True)
        b, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
        assert a == b and masks[int(b)]
    loaded.learn(16)  # training goes on with the mask-aware rollout buffer
