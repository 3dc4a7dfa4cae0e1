"""VecNormalize in the safe format: standalone files and bundled in the model file; exact and pickle-free."""

from __future__ import annotations

import pathlib
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_safe_save import FormatError, StateMismatchError, load_vecnormalize, read_manifest, safe, save_vecnormalize


def pendulum(n: int = 2) -> DummyVecEnv:
    return DummyVecEnv([lambda: gym.make("Pendulum-v1")] * n)


def multi_obs(n: int = 2) -> DummyVecEnv:
    return DummyVecEnv([lambda: SimpleMultiObsEnv(random_start=False)] * n)


def stepped(venv_norm: VecNormalize, steps: int = 20) -> VecNormalize:
    venv_norm.seed(0)
    venv_norm.action_space.seed(0)
    venv_norm.reset()
    for _ in range(steps):
        venv_norm.step(np.stack([venv_norm.action_space.sample() for _ in range(venv_norm.num_envs)]))
    return venv_norm


def state_of(vn: VecNormalize) -> dict[str, Any]:
    """What VecNormalize.save would pickle, with RunningMeanStd objects opened up."""
    state = vn.__getstate__()
    for name in ("obs_rms", "ret_rms"):
        rms = state.get(name)
        if isinstance(rms, RunningMeanStd):
            state[name] = vars(rms)
        elif isinstance(rms, dict):
            state[name] = {k: vars(v) for k, v in rms.items()}
    return state


def assert_same_state(a: VecNormalize, b: VecNormalize) -> None:
    x, y = state_of(a), state_of(b)
    assert sorted(x) == sorted(y)
    for key in x:
        if key in ("observation_space", "action_space", "obs_spaces"):
            assert x[key] == y[key], key
        else:
            _same(x[key], y[key], key)


def _same(a: Any, b: Any, path: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def test_standalone_round_trip_is_exact(tmp_path: pathlib.Path, no_pickle: None) -> None:
    vn = stepped(VecNormalize(pendulum(), gamma=0.95, clip_obs=5.0, clip_reward=np.inf))
    save_vecnormalize(vn, tmp_path / "vecnormalize")  # suffix added
    loaded = load_vecnormalize(tmp_path / "vecnormalize.safetensors", pendulum())
    assert_same_state(vn, loaded)
    assert np.array_equal(loaded.returns, vn.returns) and np.any(loaded.returns != 0)  # SB3's set_venv zeros them
    obs = vn.get_original_obs()
    assert np.array_equal(vn.normalize_obs(obs), loaded.normalize_obs(obs))


def test_matches_stock_pickle_load(tmp_path: pathlib.Path) -> None:
    vn = stepped(VecNormalize(pendulum()))
    vn.save(str(tmp_path / "stock.pkl"))
    save_vecnormalize(vn, tmp_path / "ours.safetensors")
    assert_same_state(
        VecNormalize.load(str(tmp_path / "stock.pkl"), pendulum()),
        load_vecnormalize(tmp_path / "ours.safetensors", pendulum()),
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(norm_obs_keys=["vec"]), dict(norm_obs=False), dict(training=False, norm_reward=False)],
    ids=["dict-keys", "no-obs-norm", "eval-settings"],
)
def test_dict_spaces_and_settings(tmp_path: pathlib.Path, kwargs: dict[str, Any], no_pickle: None) -> None:
    vn = stepped(VecNormalize(multi_obs(), **kwargs), steps=5)
    save_vecnormalize(vn, tmp_path / "vn.safetensors")
    loaded = load_vecnormalize(tmp_path / "vn.safetensors", multi_obs())
    assert_same_state(vn, loaded)


def test_unstepped_wrapper_round_trips(tmp_path: pathlib.Path) -> None:
    vn = VecNormalize(pendulum())  # no old_obs yet
    save_vecnormalize(vn, tmp_path / "vn.safetensors")
    assert_same_state(vn, load_vecnormalize(tmp_path / "vn.safetensors", pendulum()))


def test_wrong_env_is_refused(tmp_path: pathlib.Path) -> None:
    save_vecnormalize(stepped(VecNormalize(pendulum())), tmp_path / "vn.safetensors")
    cartpole = DummyVecEnv([lambda: gym.make("CartPole-v1")])
    with pytest.raises(StateMismatchError, match=r"obs_rms.*shape \[3\].*shape \[4\]"):
        load_vecnormalize(tmp_path / "vn.safetensors", cartpole)


def test_bundled_in_model_file_restores_the_whole_agent(tmp_path: pathlib.Path, no_pickle: None) -> None:
    venv = VecNormalize(pendulum(1))
    model = safe(PPO)("MlpPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=dict(net_arch=[8]), seed=0)
    model.learn(64)
    path = tmp_path / "agent.safetensors"
    model.save(path, vec_normalize=model.get_vec_normalize_env())
    assert read_manifest(path).vec_normalize is not None

    loaded = safe(PPO).load(path, env=pendulum(1))
    vn = loaded.get_vec_normalize_env()
    assert isinstance(vn, VecNormalize) and loaded.get_env() is vn
    assert_same_state(venv, vn)
    obs = venv.get_original_obs()
    a, _ = model.predict(venv.normalize_obs(obs), deterministic=True)
    b, _ = loaded.predict(vn.normalize_obs(obs), deterministic=True)
    assert np.array_equal(a, b)
    loaded.learn(32)  # training goes on through the restored wrapper

    # the same file gives the statistics to load_vecnormalize, and loads without an env
    assert_same_state(venv, load_vecnormalize(path, pendulum(1)))
    assert safe(PPO).load(path).get_vec_normalize_env() is None


def test_bundled_stats_go_into_an_existing_wrapper(tmp_path: pathlib.Path) -> None:
    venv = stepped(VecNormalize(pendulum(1)))
    model = safe(PPO)("MlpPolicy", venv, n_steps=32, batch_size=32, policy_kwargs=dict(net_arch=[8]))
    model.save(tmp_path / "agent.safetensors", vec_normalize=venv)
    fresh = VecNormalize(pendulum(1), training=True)
    loaded = safe(PPO).load(tmp_path / "agent.safetensors", env=fresh)
    assert loaded.get_vec_normalize_env() is fresh
    assert_same_state(venv, fresh)


def test_model_file_without_stats(tmp_path: pathlib.Path) -> None:
    model = safe(PPO)("MlpPolicy", "Pendulum-v1", n_steps=32, batch_size=32, policy_kwargs=dict(net_arch=[8]))
    model.save(tmp_path / "agent.safetensors")
    with pytest.raises(FormatError, match="no VecNormalize statistics"):
        load_vecnormalize(tmp_path / "agent.safetensors", pendulum())
