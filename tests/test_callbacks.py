"""SB3's CheckpointCallback and EvalCallback call ``model.save``: through the mixin they write our format."""

from __future__ import annotations

import pathlib

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _compare import assert_same_tree
from sb3_safe_save import SafeVecNormalize, load_vecnormalize, read_manifest, safe
from sb3_safe_save._buffers import is_pickle


def cartpole() -> DummyVecEnv:
    return DummyVecEnv([lambda: Monitor(gym.make("CartPole-v1"))])


def test_checkpoint_callback_writes_our_format(tmp_path: pathlib.Path) -> None:
    venv = VecNormalize(cartpole())
    kwargs = dict(buffer_size=200, learning_starts=1000, policy_kwargs=dict(net_arch=[8]), seed=0)
    model = safe(DQN)("MlpPolicy", venv, **kwargs)
    callback = CheckpointCallback(save_freq=20, save_path=str(tmp_path), save_replay_buffer=True, save_vecnormalize=True)
    with pytest.warns(UserWarning, match=r"with a stock VecNormalize writes its statistics as pickles.*SafeVecNormalize"):
        model.learn(40, callback=callback)  # said before the first pickle is written

    # the model: CheckpointCallback asks for .zip; the file is named for what it is, and the .zip name loads it
    path = tmp_path / "rl_model_40_steps.zip"
    assert not path.exists() and (tmp_path / "rl_model_40_steps.safetensors").exists()
    assert read_manifest(path).base_algorithm.endswith(":DQN")
    loaded = safe(DQN).load(path)  # learning_starts > 40: no training, the checkpoint's weights are final
    assert loaded.num_timesteps == 40
    assert_same_tree(model.policy.state_dict(), loaded.policy.state_dict())

    # the replay buffer: the callback asks for .pkl; it is written as .safetensors, the .pkl name loads it exactly
    buffer_path = tmp_path / "rl_model_replay_buffer_40_steps.pkl"
    assert not buffer_path.exists() and (tmp_path / "rl_model_replay_buffer_40_steps.safetensors").exists()
    assert not is_pickle(buffer_path)
    other = safe(DQN)("MlpPolicy", cartpole(), **kwargs)
    other.load_replay_buffer(buffer_path)
    assert other.replay_buffer.pos == 39  # the callback runs before the 40th transition is stored
    assert np.array_equal(other.replay_buffer.observations[:39], model.replay_buffer.observations[:39])

    # VecNormalize: a stock VecNormalize.save (which the callback calls itself) still pickles...
    assert is_pickle(tmp_path / "rl_model_vecnormalize_40_steps.pkl")
    # ... the bundled file does not
    model.save(tmp_path / "agent.safetensors", vec_normalize=model.get_vec_normalize_env())
    restored = load_vecnormalize(tmp_path / "agent.safetensors", cartpole())
    assert np.array_equal(restored.obs_rms.mean, venv.obs_rms.mean)


def test_checkpoint_callback_with_safe_vecnormalize_writes_no_pickle(tmp_path: pathlib.Path) -> None:
    venv = SafeVecNormalize(cartpole())
    model = safe(PPO)("MlpPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, policy_kwargs=dict(net_arch=[8]), seed=0)
    callback = CheckpointCallback(save_freq=16, save_path=str(tmp_path), save_vecnormalize=True)
    model.learn(32, callback=callback)
    path = tmp_path / "rl_model_vecnormalize_32_steps.pkl"  # the callback's name: written as .safetensors
    assert not path.exists() and (tmp_path / "rl_model_vecnormalize_32_steps.safetensors").exists()
    assert not is_pickle(path)
    for restored in (SafeVecNormalize.load(str(path), cartpole()), load_vecnormalize(path, cartpole())):
        assert np.array_equal(restored.obs_rms.mean, venv.obs_rms.mean)
        assert np.array_equal(restored.obs_rms.var, venv.obs_rms.var) and restored.obs_rms.count == venv.obs_rms.count
    assert isinstance(SafeVecNormalize.load(str(path), cartpole()), SafeVecNormalize)


def test_eval_callback_best_model_is_our_format(tmp_path: pathlib.Path) -> None:
    model = safe(PPO)("MlpPolicy", cartpole(), n_steps=16, batch_size=16, n_epochs=1, policy_kwargs=dict(net_arch=[8]), seed=0)
    callback = EvalCallback(cartpole(), eval_freq=16, n_eval_episodes=1, best_model_save_path=str(tmp_path), verbose=0)
    model.learn(32, callback=callback)
    # EvalCallback saves to "best_model" without a suffix: ours becomes best_model.safetensors
    assert (tmp_path / "best_model.safetensors").exists() and not (tmp_path / "best_model.zip").exists()
    loaded = safe(PPO).load(tmp_path / "best_model")
    assert read_manifest(tmp_path / "best_model.safetensors").base_algorithm.endswith(":PPO")
    assert loaded.num_timesteps in (16, 32)
