"""Every supported SB3 algorithm round-trips exactly: parameters bitwise, optimizer state, counters,
predictions; and ``learn()`` continues on the loaded model (issue 2, "Done when")."""

from __future__ import annotations

import functools
import io
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch as th
from safetensors import safe_open
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3, HerReplayBuffer
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.envs import BitFlippingEnv, FakeImageEnv

import sb3_safe_save
from _compare import assert_same_model, assert_same_tree
from sb3_safe_save import SafeSaveMixin, safe
from sb3_safe_save._manifest import ModuleState, OptimizerState, PickleNode, iter_nodes


# Mixin subclasses, the way a user writes them (module level: importable by name).
class MixinPPO(SafeSaveMixin, PPO):
    pass


class MixinDQN(SafeSaveMixin, DQN):
    pass


class MixinSAC(SafeSaveMixin, SAC):
    pass


def _bitflip(continuous: bool) -> Callable[[], BitFlippingEnv]:
    return lambda: BitFlippingEnv(n_bits=4, continuous=continuous, max_steps=4)


def _her_kwargs() -> dict[str, Any]:
    return {
        "replay_buffer_class": HerReplayBuffer,
        "replay_buffer_kwargs": {"n_sampled_goal": 2, "goal_selection_strategy": "future"},
        "learning_starts": 40,
        "batch_size": 32,
        "buffer_size": 1000,
    }


def small() -> dict[str, Any]:
    return {"net_arch": [16]}  # a fresh dict each time: SB3 writes into policy_kwargs (e.g. use_sde)


# id -> (algorithm class, env factory, policy, constructor kwargs, timesteps)
CASES: dict[str, tuple[type[BaseAlgorithm], Callable[[], Any], str, dict[str, Any], int]] = {
    "a2c": (safe(A2C), lambda: "CartPole-v1", "MlpPolicy", {"n_steps": 8, "policy_kwargs": small()}, 64),
    "ppo": (
        safe(PPO),
        lambda: "CartPole-v1",
        "MlpPolicy",
        {"n_steps": 32, "batch_size": 16, "n_epochs": 2, "policy_kwargs": small()},
        64,
    ),
    "ppo-mixin": (
        MixinPPO,
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"n_steps": 32, "batch_size": 16, "n_epochs": 2, "policy_kwargs": small()},
        64,
    ),
    "dqn": (
        safe(DQN),
        lambda: "CartPole-v1",
        "MlpPolicy",
        {"learning_starts": 32, "buffer_size": 500, "target_update_interval": 20, "policy_kwargs": small()},
        100,
    ),
    "dqn-mixin": (
        MixinDQN,
        lambda: "CartPole-v1",
        "MlpPolicy",
        {"learning_starts": 32, "batch_size": 32, "buffer_size": 500, "policy_kwargs": small()},
        48,
    ),
    "sac-auto": (
        safe(SAC),
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"learning_starts": 32, "batch_size": 32, "buffer_size": 500, "policy_kwargs": small()},
        48,
    ),
    "sac-fixed": (
        MixinSAC,
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"ent_coef": 0.1, "learning_starts": 32, "batch_size": 32, "buffer_size": 500, "policy_kwargs": small()},
        48,
    ),
    "td3": (
        safe(TD3),
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"learning_starts": 32, "batch_size": 32, "buffer_size": 500, "policy_kwargs": small()},
        48,
    ),
    "ddpg": (
        safe(DDPG),
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"learning_starts": 32, "batch_size": 32, "buffer_size": 500, "policy_kwargs": small()},
        48,
    ),
    "dqn-her": (safe(DQN), _bitflip(False), "MultiInputPolicy", {**_her_kwargs(), "policy_kwargs": small()}, 80),
    "sac-her": (safe(SAC), _bitflip(True), "MultiInputPolicy", {**_her_kwargs(), "policy_kwargs": small()}, 80),
    "sac-sde": (
        safe(SAC),
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"use_sde": True, "learning_starts": 32, "batch_size": 32, "buffer_size": 500, "policy_kwargs": small()},
        48,
    ),
    "ppo-sde": (
        safe(PPO),
        lambda: "Pendulum-v1",
        "MlpPolicy",
        {"use_sde": True, "n_steps": 32, "batch_size": 16, "n_epochs": 2, "policy_kwargs": small()},
        64,
    ),
    "ppo-cnn": (
        safe(PPO),
        lambda: FakeImageEnv(action_dim=3, screen_height=36, screen_width=36, n_channels=1),
        "CnnPolicy",
        {
            "n_steps": 16,
            "batch_size": 16,
            "n_epochs": 1,
            "policy_kwargs": {"net_arch": [16], "features_extractor_kwargs": {"features_dim": 16}},
        },
        32,
    ),
}


@functools.cache
def _train(case: str) -> BaseAlgorithm:
    """A trained model per case, shared by the tests of this module (saving never changes a model)."""
    cls, make_env, policy, kwargs, steps = CASES[case]
    model = cls(policy, make_env(), seed=0, device="cpu", **kwargs)
    model.learn(steps)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_exact_and_learn_continues(case: str, tmp_path: pathlib.Path) -> None:
    cls = CASES[case][0]
    model = _train(case)
    assert model.num_timesteps > 0
    path = tmp_path / "agent.safetensors"
    model.save(path)
    manifest = sb3_safe_save.read_manifest(path)
    assert manifest.placeholders == []  # plain agents hold no live resources
    assert manifest.format_version == sb3_safe_save.FORMAT_VERSION
    base = next(c for c in cls.__mro__ if c.__module__.startswith("stable_baselines3."))
    assert manifest.base_algorithm == f"{base.__module__}:{base.__qualname__}"

    loaded = cls.load(path, env=model.get_env(), device="cpu")
    assert type(loaded) is cls
    assert_same_model(model, loaded)
    # the action space, gamma and the like come back as well
    assert loaded.observation_space == model.observation_space and loaded.action_space == model.action_space
    assert loaded.gamma == model.gamma and loaded.learning_rate == model.learning_rate
    if getattr(model, "use_sde", False):
        actor = getattr(loaded, "actor", loaded.policy)  # SAC keeps use_sde on its actor
        assert loaded.use_sde and actor.use_sde
        assert th.equal(actor.log_std, getattr(model, "actor", model.policy).log_std)

    if "her" in case:
        # the replay buffer is not part of the agent file (as in SB3): the new, empty HER buffer needs a
        # finished episode before it can be sampled
        loaded.learning_starts = loaded.num_timesteps + 8
    before = loaded.num_timesteps
    loaded.learn(16, reset_num_timesteps=False)
    assert loaded.num_timesteps > before


def test_sac_entropy_variants(tmp_path: pathlib.Path) -> None:
    """Learned ent_coef stores log_ent_coef + its optimizer; fixed ent_coef stores ent_coef_tensor."""
    auto = _train("sac-auto")
    auto.save(tmp_path / "auto")
    m = sb3_safe_save.read_manifest(tmp_path / "auto.safetensors")
    assert set(m.torch_variables) == {"log_ent_coef"}
    assert "ent_coef_optimizer" in {e.name for e in m.state_dicts}
    loaded = safe(SAC).load(tmp_path / "auto.safetensors", device="cpu")
    assert th.equal(loaded.log_ent_coef, auto.log_ent_coef) and loaded.log_ent_coef.requires_grad
    # the optimizer must still hold the very tensor that is the model's log_ent_coef (SB3 #391)
    assert loaded.ent_coef_optimizer.param_groups[0]["params"][0] is loaded.log_ent_coef

    fixed = _train("sac-fixed")
    fixed.save(tmp_path / "fixed")
    m = sb3_safe_save.read_manifest(tmp_path / "fixed.safetensors")
    assert set(m.torch_variables) == {"ent_coef_tensor"}
    loaded = MixinSAC.load(tmp_path / "fixed.safetensors", device="cpu")
    assert float(loaded.ent_coef_tensor) == pytest.approx(0.1)


def test_suffix_handling(tmp_path: pathlib.Path) -> None:
    model = _train("a2c")
    model.save(tmp_path / "noext")
    assert (tmp_path / "noext.safetensors").is_file()
    model.save(tmp_path / "custom.bin")
    assert (tmp_path / "custom.bin").is_file() and not (tmp_path / "custom.bin.safetensors").exists()
    # load finds the file without the suffix too, and both files are the same agent
    assert_same_model(model, safe(A2C).load(tmp_path / "noext", device="cpu"))
    assert_same_model(model, safe(A2C).load(tmp_path / "custom.bin", device="cpu"))
    # str paths and file objects work like pathlib paths
    assert_same_model(model, safe(A2C).load(str(tmp_path / "noext.safetensors"), device="cpu"))
    with open(tmp_path / "custom.bin", "rb") as f:
        assert_same_model(model, safe(A2C).load(f, device="cpu"))
    # in-memory streams both ways, byte-identical to the file
    buf = io.BytesIO()
    model.save(buf)
    model.save(tmp_path / "again.safetensors")
    assert buf.getvalue() == (tmp_path / "again.safetensors").read_bytes()
    assert_same_model(model, safe(A2C).load(io.BytesIO(buf.getvalue()), device="cpu"))


def test_dqn_file_has_no_pickle_and_tensors_equal_state_dict(tmp_path: pathlib.Path) -> None:
    model = _train("dqn")
    path = tmp_path / "dqn.safetensors"
    model.save(path)
    manifest = sb3_safe_save.read_manifest(path)
    roots = [*manifest.data.values(), *manifest.torch_variables.values()]
    roots += [e.state for e in manifest.state_dicts if isinstance(e, OptimizerState)]
    for root in roots:
        for node in iter_nodes(root):
            assert not isinstance(node, PickleNode), node
    assert not any(k.endswith("#pickle") for k in manifest.tensors)
    assert manifest.hazards == []

    # q_net and q_net_target are separate tensors in DQN (not aliases): both stored, both exact
    (policy_entry,) = [e for e in manifest.state_dicts if isinstance(e, ModuleState) and e.name == "policy"]
    state = model.policy.state_dict()
    assert set(policy_entry.keys) | set(policy_entry.aliases) == set(state)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(manifest.tensors)
        for key in policy_entry.keys:
            assert th.equal(f.get_tensor(f"policy/{key}"), state[key]), key
        for key, canonical in policy_entry.aliases.items():
            assert th.equal(f.get_tensor(f"policy/{canonical}"), state[key])
        # the optimizer state's tensors are in the body too, equal to the live ones
        opt_state = model.policy.optimizer.state_dict()["state"]
        assert opt_state, "DQN trained: Adam must have state"
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith("policy.optimizer")}
        live = [t for s in opt_state.values() for t in s.values() if isinstance(t, th.Tensor)]
        assert len(stored) == len(live)


def test_shared_features_extractor_is_stored_once(tmp_path: pathlib.Path) -> None:
    model = _train("ppo-cnn")
    assert model.policy.share_features_extractor
    path = tmp_path / "cnn.safetensors"
    model.save(path)
    manifest = sb3_safe_save.read_manifest(path)
    (entry,) = [e for e in manifest.state_dicts if isinstance(e, ModuleState) and e.name == "policy"]
    # pi_features_extractor / vf_features_extractor are the same module as features_extractor
    assert entry.aliases
    for alias, canonical in entry.aliases.items():
        assert alias.startswith(("pi_features_extractor.", "vf_features_extractor.")), alias
        assert canonical.startswith("features_extractor."), canonical
    assert not any(k.startswith(("pi_features_extractor.", "vf_features_extractor.")) for k in entry.keys)
    size = path.stat().st_size
    stored = sum(int(np.prod(m.shape)) * 4 for m in manifest.tensors.values() if m.dtype == "F32")
    params = sum(t.numel() * 4 for t in model.policy.parameters())  # parameters() dedupes shared tensors
    assert stored < 3 * params + 10_000  # weights + 2 Adam moments, not 3 copies of the CNN weights
    assert size < stored + 200_000

    loaded = safe(PPO).load(path, env=model.get_env(), device="cpu")
    assert_same_model(model, loaded)
    p = loaded.policy
    # the alias structure is rebuilt by the constructor, the optimizer sees each tensor once
    assert p.pi_features_extractor is p.features_extractor and p.vf_features_extractor is p.features_extractor
    opt_params = [q for g in p.optimizer.param_groups for q in g["params"]]
    assert len({id(q) for q in opt_params}) == len(opt_params)
    loaded.learn(16, reset_num_timesteps=False)


def test_optimizer_state_after_load_matches_exactly(tmp_path: pathlib.Path) -> None:
    """Stronger than equality of the state dict: the optimizer is bound to the loaded parameters."""
    model = _train("td3")
    model.save(tmp_path / "td3")
    loaded = safe(TD3).load(tmp_path / "td3.safetensors", device="cpu")
    for name in ("actor", "critic"):
        opt = getattr(loaded, name).optimizer
        assert_same_tree(getattr(model, name).optimizer.state_dict(), opt.state_dict(), name)
        own = {id(q) for q in getattr(loaded, name).parameters()}
        assert all(id(q) in own for g in opt.param_groups for q in g["params"])


def test_fresh_loads_are_independent(tmp_path: pathlib.Path) -> None:
    """Two loads of one file share no tensors with each other or the original."""
    model = _train("dqn-mixin")
    model.save(tmp_path / "m")
    a = MixinDQN.load(tmp_path / "m.safetensors", device="cpu")
    b = MixinDQN.load(tmp_path / "m.safetensors", device="cpu")
    pa = {t.data_ptr() for t in a.policy.parameters()}
    pb = {t.data_ptr() for t in b.policy.parameters()}
    po = {t.data_ptr() for t in model.policy.parameters()}
    assert not (pa & pb) and not (pa & po)


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
def test_load_on_cuda(tmp_path: pathlib.Path) -> None:
    model = _train("sac-auto")
    model.save(tmp_path / "sac")
    loaded = safe(SAC).load(tmp_path / "sac.safetensors", device="cuda")
    assert loaded.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in loaded.policy.parameters())
    assert loaded.log_ent_coef.device.type == "cuda"
    assert_same_model(model, loaded)
    loaded.learn(32, reset_num_timesteps=False)
    # and back: saved from CUDA, loaded on CPU
    loaded.save(tmp_path / "sac_cuda")
    back = safe(SAC).load(tmp_path / "sac_cuda.safetensors", device="cpu")
    assert_same_model(loaded, back)


def _without_space_rng(tree: Any) -> Any:
    """Drop the RNG state of stored spaces: load reseeds them from ``seed`` in ``_setup_model``, as SB3's load does."""
    if isinstance(tree, dict):
        return {k: _without_space_rng(v) for k, v in tree.items() if not (k == "rng" and tree.get("kind") == "space")}
    if isinstance(tree, list):
        return [_without_space_rng(v) for v in tree]
    return tree


@pytest.mark.parametrize("case", ["dqn", "sac-auto", "ppo-cnn", "dqn-her"])
def test_resave_is_identical(case: str, tmp_path: pathlib.Path) -> None:
    """load then save gives back the same manifest and the same tensor bytes: nothing is lost or changed."""
    cls = CASES[case][0]
    model = _train(case)
    model.save(tmp_path / "a")
    first = sb3_safe_save.read_manifest(tmp_path / "a.safetensors").model_dump()
    loaded = cls.load(tmp_path / "a.safetensors", env=model.get_env(), force_reset=False, device="cpu")
    loaded.save(tmp_path / "b")
    second = sb3_safe_save.read_manifest(tmp_path / "b.safetensors").model_dump()
    for part in ("data", "state_dicts", "torch_variables", "placeholders", "hazards"):
        assert _without_space_rng(second[part]) == _without_space_rng(first[part]), part
    assert second["tensors"] == first["tensors"]  # dtype, shape and checksum of every tensor
