"""Drop-in: SB3 code that does not depend on pickle runs unchanged with ``safe(Algo)`` (issue 11)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.dqn.policies import DQNPolicy

from _compare import assert_same_tree
from lang_dqn import CustomDQN, UnpicklableExpert, make_model
from sb3_safe_save import (
    FormatError,
    SafeSaveError,
    SafeSaveMixin,
    SafeVecNormalize,
    UntrustedTypeError,
    audit,
    read_manifest,
    safe,
    unwrap,
)

TINY_PPO = dict(n_steps=32, batch_size=16, n_epochs=1, policy_kwargs=dict(net_arch=[8]), seed=0)
TINY_DQN = dict(buffer_size=100, learning_starts=1000, policy_kwargs=dict(net_arch=[8]), seed=0)


# ----------------------------------------------------------------------------- 1. local classes
def test_algorithm_class_defined_in_a_function(tmp_path: pathlib.Path, no_pickle: None) -> None:
    class MyDQN(SafeSaveMixin, DQN):
        pass

    model = MyDQN("MlpPolicy", "CartPole-v1", **TINY_DQN)
    assert audit(model).ok
    model.save(tmp_path / "agent")
    manifest = read_manifest(tmp_path / "agent.safetensors")
    assert manifest.algorithm == f"{__name__}:test_algorithm_class_defined_in_a_function.<locals>.MyDQN"
    assert manifest.base_algorithm == "stable_baselines3.dqn.dqn:DQN"
    assert audit(tmp_path / "agent.safetensors").ok
    loaded = MyDQN.load(tmp_path / "agent.safetensors")
    assert type(loaded) is MyDQN
    assert_same_tree(model.policy.state_dict(), loaded.policy.state_dict())


def test_policy_class_defined_in_a_function(tmp_path: pathlib.Path, no_pickle: None) -> None:
    class MyPolicy(DQNPolicy):
        pass

    model = safe(DQN)(MyPolicy, "CartPole-v1", **TINY_DQN)
    model.save(tmp_path / "agent")
    report = audit(tmp_path / "agent.safetensors")
    (finding,) = [f for f in report.findings if f.code == "untrusted_reference"]
    assert "trusted=[MyPolicy (the class object" in finding.message
    # the class cannot be imported by name: the file alone is refused, with the fix
    with pytest.raises(UntrustedTypeError) as info:
        safe(DQN).load(tmp_path / "agent.safetensors")
    assert "<locals>.MyPolicy" in str(info.value) and "trusted=[MyPolicy]" in str(info.value)
    # the caller hands the class over: it is used as is, nothing is imported
    loaded = safe(DQN).load(tmp_path / "agent.safetensors", trusted=[MyPolicy])
    assert type(loaded.policy) is MyPolicy and loaded.policy_class is MyPolicy
    assert_same_tree(model.policy.state_dict(), loaded.policy.state_dict())

    # or declared on the algorithm class, as a pytest test would write it
    class MyDQN(SafeSaveMixin, DQN):
        safe_save_trusted = (MyPolicy,)

    assert type(MyDQN.load(tmp_path / "agent.safetensors").policy) is MyPolicy
    # or through custom_objects, as in SB3
    assert type(safe(DQN).load(tmp_path / "agent.safetensors", custom_objects={"policy_class": MyPolicy}).policy) is MyPolicy
    # a different class of the same name is not the one the file names
    with pytest.raises(UntrustedTypeError):
        safe(DQN).load(tmp_path / "agent.safetensors", trusted=[_module_level_policy()])


def _module_level_policy() -> type:
    class MyPolicy(DQNPolicy):  # same name, other qualname (_module_level_policy.<locals>.MyPolicy)
        pass

    return MyPolicy


# ----------------------------------------------------------------------------- 3. custom_objects by dotted path
def test_custom_objects_dotted_path_supplies_the_resource(tmp_path: pathlib.Path, no_pickle: None) -> None:
    expert = UnpicklableExpert()
    model = make_model(expert, net_arch=[16])
    model.save(tmp_path / "agent")
    other = UnpicklableExpert(name="other")
    loaded = CustomDQN.load(tmp_path / "agent.safetensors", custom_objects={"policy_kwargs.vlm_model": other})
    for where in (loaded.policy_kwargs["vlm_model"], loaded.policy.q_net.vlm_model, loaded.policy.q_net_target.vlm_model):
        assert unwrap(where) is other  # the very object given, at every path the saved one was (in its external())
    obs = np.zeros((1, 4), np.float32)
    loaded.policy.set_use_expert(True)
    model.policy.set_use_expert(True)
    assert np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


# ----------------------------------------------------------------------------- 4. missing directories
def test_save_creates_missing_directories(tmp_path: pathlib.Path) -> None:
    model = safe(SAC)("MlpPolicy", "Pendulum-v1", buffer_size=50, learning_starts=1000, policy_kwargs=dict(net_arch=[8]))
    model.learn(5)
    model.save(tmp_path / "a" / "b" / "sac")
    model.save_replay_buffer(tmp_path / "c" / "buffer")
    assert (tmp_path / "a" / "b" / "sac.safetensors").is_file() and (tmp_path / "c" / "buffer.safetensors").is_file()
    assert safe(SAC).load(tmp_path / "a" / "b" / "sac").num_timesteps == 5


# ----------------------------------------------------------------------------- 5. the .zip name
def test_the_zip_name_sb3_users_write(tmp_path: pathlib.Path, no_pickle: None) -> None:
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **TINY_PPO)
    model.save(tmp_path / "runs" / "ppo")  # SB3 would write runs/ppo.zip
    loaded = safe(PPO).load(tmp_path / "runs" / "ppo.zip")  # ... and its users load that name
    assert_same_tree(model.policy.state_dict(), loaded.policy.state_dict())
    loaded.set_parameters(str(tmp_path / "runs" / "ppo.zip"))
    # a .zip (or .pkl) name is not what the file is: it is written as .safetensors
    model.save(tmp_path / "ppo.zip")
    assert not (tmp_path / "ppo.zip").exists() and (tmp_path / "ppo.safetensors").is_file()
    # neither name exists: both are named in the error
    with pytest.raises(FileNotFoundError, match=r"missing\.zip.*missing\.safetensors"):
        safe(PPO).load(tmp_path / "missing.zip")


def test_a_real_zip_next_to_ours_is_named(tmp_path: pathlib.Path) -> None:
    PPO("MlpPolicy", "CartPole-v1", **TINY_PPO).save(tmp_path / "ppo.zip")  # stock SB3: a pickle inside a zip
    safe(PPO)("MlpPolicy", "CartPole-v1", **TINY_PPO).save(tmp_path / "ppo")
    with pytest.raises(FormatError, match=r"zip file.*ppo\.safetensors next to it"):
        safe(PPO).load(tmp_path / "ppo.zip")
    assert safe(PPO).load(tmp_path / "ppo.safetensors").n_steps == 32


# ----------------------------------------------------------------------------- 8. neither format
def test_a_file_that_is_neither_format(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "not_a_zip.zip"
    path.write_bytes(b"this is not a model file at all\n" * 4)
    with pytest.raises(ValueError, match="wasn't a zip-file") as stock:
        PPO.load(path)
    with pytest.raises(ValueError, match="wasn't a zip-file") as ours:
        safe(PPO).load(path)
    assert isinstance(ours.value, SafeSaveError) and isinstance(ours.value, FormatError)
    assert "neither a zip file nor an sb3_safe_save file" in str(ours.value)
    assert "wasn't a zip-file" in str(stock.value)


# ----------------------------------------------------------------------------- SB3's own examples, algorithm swapped
# The patterns of SB3's docs (guide/examples.rst, guide/callbacks.rst) and rl-zoo3's enjoy.py, on tiny models,
# with ``DQN``/``PPO``/``SAC`` replaced by ``safe(...)`` and nothing else changed.
def test_example_train_save_delete_load_evaluate(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = gym.make("CartPole-v1")
    model = safe(DQN)("MlpPolicy", env, verbose=0, **TINY_DQN)
    model.learn(total_timesteps=48)
    model.save("dqn_cartpole")
    del model
    model = safe(DQN).load("dqn_cartpole", env=env, print_system_info=True)
    mean_reward, _ = evaluate_policy(model, model.get_env(), n_eval_episodes=1)
    assert mean_reward > 0
    model.learn(total_timesteps=20, reset_num_timesteps=False)  # continue training (4 steps per rollout)
    assert model.num_timesteps == 68


def test_example_callback_saving_into_a_folder_of_its_name(tmp_path: pathlib.Path) -> None:
    """SB3's SaveOnBestTrainingRewardCallback creates the folder ``best_model`` and then saves to that name."""

    class SaveEvery(BaseCallback):
        def __init__(self, log_dir: str) -> None:
            super().__init__()
            self.save_path = os.path.join(log_dir, "best_model")

        def _init_callback(self) -> None:
            os.makedirs(self.save_path, exist_ok=True)

        def _on_step(self) -> bool:
            if self.n_calls % 16 == 0:
                self.model.save(self.save_path)
            return True

    model = safe(PPO)("MlpPolicy", "CartPole-v1", **TINY_PPO)
    model.learn(32, callback=SaveEvery(str(tmp_path)))
    assert (tmp_path / "best_model.safetensors").is_file()  # SB3 writes best_model.zip next to the folder
    for name in ("best_model", "best_model.zip"):
        assert safe(PPO).load(tmp_path / name).num_timesteps == 32


def test_example_advanced_saving_and_loading(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = safe(SAC)("MlpPolicy", "Pendulum-v1", learning_rate=1e-3, buffer_size=500, learning_starts=40)
    model.learn(60)
    model.save("sac_pendulum")
    loaded_model = safe(SAC).load("sac_pendulum")
    assert loaded_model.replay_buffer.size() == 0  # the saved model does not contain the replay buffer
    model.save_replay_buffer("sac_replay_buffer")
    loaded_model.load_replay_buffer("sac_replay_buffer")
    assert loaded_model.replay_buffer.size() == 60
    # parameters as dicts, in place
    loaded_model.set_parameters(model.get_parameters())
    assert_same_tree(model.policy.state_dict(), loaded_model.policy.state_dict())


def test_example_vecnormalize_statistics(tmp_path: pathlib.Path) -> None:
    """SB3's "Normalizing input features" example with ``SafeVecNormalize`` in place of ``VecNormalize``."""
    env = SafeVecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), norm_obs=True, norm_reward=True, clip_obs=10.0)
    model = safe(PPO)("MlpPolicy", env, **TINY_PPO)
    model.learn(total_timesteps=32)
    log_dir = str(tmp_path) + "/"
    model.save(log_dir + "ppo_pendulum")
    stats_path = os.path.join(log_dir, "vec_normalize.pkl")
    env.save(stats_path)
    mean = env.obs_rms.mean.copy()
    del model, env
    env = SafeVecNormalize.load(stats_path, DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    env.training = False
    env.norm_reward = False
    model = safe(PPO).load(log_dir + "ppo_pendulum", env=env)
    assert np.array_equal(model.get_vec_normalize_env().obs_rms.mean, mean)


def test_example_rl_zoo_enjoy_custom_objects(tmp_path: pathlib.Path) -> None:
    """rl-zoo3's enjoy.py replaces schedules it cannot (or need not) restore through custom_objects."""
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **TINY_PPO)
    model.save(tmp_path / "ppo")
    custom_objects = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    loaded = safe(PPO).load(tmp_path / "ppo.zip", custom_objects=custom_objects, device="cpu")
    assert loaded.learning_rate == 0.0 and loaded.clip_range(1.0) == 0.0


# ----------------------------------------------------------------------------- SB3's own save/load tests, swapped
# The situations of SB3's tests/test_save_load.py that do not depend on pickle or on the ".zip" file name.
def test_sb3_replay_buffer_into_a_model_without_one(tmp_path: pathlib.Path, no_pickle: None) -> None:
    path = tmp_path / "logs" / "replay_buffer.pkl"  # SB3's name; the folder does not exist yet
    model = safe(SAC)("MlpPolicy", "Pendulum-v1", buffer_size=100, policy_kwargs=dict(net_arch=[8]), learning_starts=1000)
    model.learn(30)
    old = model.replay_buffer
    model.save_replay_buffer(path)
    model.replay_buffer = None
    model.load_replay_buffer(path)
    assert model.replay_buffer is not old and model.replay_buffer.device == model.device
    for name in ("observations", "actions", "rewards", "dones", "timeouts"):
        assert np.array_equal(getattr(old, name), getattr(model.replay_buffer, name)), name
    assert (model.replay_buffer.pos, model.replay_buffer.full) == (old.pos, old.full)


@pytest.mark.filterwarnings("error")
def test_sb3_no_resource_warning(tmp_path: pathlib.Path) -> None:
    """Files are closed (SB3 #1751); an open file object stays open."""
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **TINY_PPO)
    for path in (tmp_path / "ppo", str(tmp_path / "ppo")):
        model.save(path)
        safe(PPO).load(path)
    with tempfile.TemporaryFile() as fp:
        model.save(fp)
        safe(PPO).load(fp)
        assert not fp.closed
    sac = safe(SAC)("MlpPolicy", "Pendulum-v1", buffer_size=200, policy_kwargs=dict(net_arch=[8]))
    for path in (tmp_path / "replay", str(tmp_path / "replay")):
        sac.save_replay_buffer(path)
        sac.load_replay_buffer(path)
    with tempfile.TemporaryFile() as fp:
        sac.save_replay_buffer(fp)
        fp.seek(0)
        sac.load_replay_buffer(fp)
        assert not fp.closed


def test_sb3_exclude_include_and_custom_objects(tmp_path: pathlib.Path) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", verbose=2, **TINY_DQN)
    model.save(tmp_path / "test_save", exclude=["verbose"])
    assert safe(DQN).load(str(tmp_path / "test_save.zip")).verbose != 2
    model.save(tmp_path / "test_save", exclude=["verbose"], include=["verbose"])
    loaded = safe(DQN).load(str(tmp_path / "test_save.zip"), custom_objects=dict(learning_rate=2e-5, dummy=1.0))
    assert loaded.verbose == 2 and loaded.learning_rate == 2e-5
    assert not hasattr(loaded, "dummy")  # only attributes the file has are replaced


def test_sb3_set_env_and_keep_timesteps(tmp_path: pathlib.Path) -> None:
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **TINY_PPO)
    model.learn(32)
    current_env = model.get_env()
    model.save(tmp_path / "test_save.zip")
    model = safe(PPO).load(tmp_path / "test_save.zip", env=current_env, force_reset=False)
    assert model._last_obs is not None
    model.learn(32, reset_num_timesteps=False)
    assert model.num_timesteps == 64
    with pytest.warns(UserWarning, match="env generators"):  # 1 stored, 2 now: the envs keep their own
        model = safe(PPO).load(tmp_path / "test_save.zip", env=DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2))
    assert model._last_obs is None and model.n_envs == 2
    model.learn(64, reset_num_timesteps=False)
    assert model.num_timesteps == 32 + 64


def test_a_buffer_the_file_claims_too_large_is_refused(tmp_path: pathlib.Path) -> None:
    """Building the file's buffer (no buffer in the model) is bounded by what can be allocated, with a clear error."""
    from _stfile import read_raw, write_raw
    from sb3_safe_save import StateMismatchError, _weights
    from sb3_safe_save._buffers import META_BUFFER, META_BUFFER_CHECKSUM

    model = safe(DQN)("MlpPolicy", "CartPole-v1", **TINY_DQN)
    model.learn(10)
    model.save_replay_buffer(tmp_path / "buffer")
    header, body = read_raw(tmp_path / "buffer.safetensors")
    text = json.dumps({**json.loads(header["__metadata__"][META_BUFFER]), "buffer_size": 10**12})
    header["__metadata__"].update({META_BUFFER: text, META_BUFFER_CHECKSUM: _weights.checksum(text.encode())})
    write_raw(tmp_path / "huge.safetensors", header, body)
    model.replay_buffer = None
    with pytest.raises(StateMismatchError, match="cannot be built"):
        model.load_replay_buffer(tmp_path / "huge.safetensors")
    assert model.replay_buffer is None


def test_load_keyword_overrides_a_stored_tensorboard_log(tmp_path: pathlib.Path) -> None:
    """SECURITY.md: a stored ``tensorboard_log`` is the file's choice; ``load(tensorboard_log=...)`` is the caller's."""
    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, tensorboard_log=str(tmp_path / "theirs"))
    model.save(tmp_path / "m")
    assert safe(PPO).load(tmp_path / "m").tensorboard_log == str(tmp_path / "theirs")  # kept, as SB3 does
    mine = str(tmp_path / "mine")
    assert safe(PPO).load(tmp_path / "m", tensorboard_log=mine).tensorboard_log == mine
