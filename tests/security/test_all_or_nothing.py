"""All-or-nothing (issue 10, point 6): a refused file leaves every caller object bitwise unchanged.

The forged files fail as late as possible (the last tensor read is corrupted, or the last field
checked is out of range), so a loader that mutates before it has checked everything is caught.
A file must also fill every parameter of every module it describes: marking a module "external"
without a placeholder must not hand back a model of uninitialised memory.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _attack import base, forge, manifest, refused, write
from _compare import assert_same_tree, buffer_state, her_model
from _hostile import split, tiny_kwargs
from sb3_safe_save import load_vecnormalize, safe, save_vecnormalize
from sb3_safe_save._buffers import META_BUFFER, META_BUFFER_CHECKSUM
from sb3_safe_save._vecnormalize import META_VEC_NORMALIZE, META_VEC_NORMALIZE_CHECKSUM


def _corrupt_tensor(data: bytes, key: str) -> bytes:
    """Flip one byte of tensor ``key`` in the body, leaving its recorded checksum as it was."""
    header, body = split(data)
    start, end = header[key]["data_offsets"]
    assert end > start, key
    raw = bytearray(body)
    raw[end - 1] ^= 0xFF
    return data[: len(data) - len(body)] + bytes(raw)


def _last_policy_key(data: bytes) -> str:
    entry = next(e for e in manifest(data)["state_dicts"] if e["kind"] == "module")
    return f"{entry['name']}/{entry['keys'][-1]}"


def _state(model: Any) -> dict[str, Any]:
    return {
        "policy": {k: v.detach().clone() for k, v in model.policy.state_dict().items()},
        "optimizer": copy.deepcopy(model.policy.optimizer.state_dict()),
    }


def _other_ppo() -> Any:
    """A PPO of the same shape as the base file but with other weights (seed 1)."""
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **{**tiny_kwargs("PPO"), "seed": 1})
    model.learn(32)
    return model


# ----------------------------------------------------------------------------------- set_parameters
@pytest.mark.parametrize("where", ["last policy tensor", "optimizer state"])
def test_set_parameters_verifies_before_copying(tmp_path: Path, where: str) -> None:
    data = base()
    key = (
        _last_policy_key(data)
        if where == "last policy tensor"
        else next(k for k in manifest(data)["tensors"] if "exp_avg_sq" in k)
    )
    path = write(tmp_path, _corrupt_tensor(data, key))
    model = _other_ppo()
    before = _state(model)
    stored = safe(PPO).load(io.BytesIO(data)).policy.state_dict()
    assert any(not th.equal(stored[k], v) for k, v in before["policy"].items()), "the file must differ from the model"
    refused(lambda: model.set_parameters(path))
    assert_same_tree(before, _state(model))


def test_set_parameters_refuses_a_file_that_leaves_parameters_unset(tmp_path: Path) -> None:
    """A file that marks part of the policy external (no placeholder) must not half-update the model."""

    def edit(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["kind"] == "module")
        entry["external_prefixes"] = ["action_net."]
        entry["keys"] = [k for k in entry["keys"] if not k.startswith("action_net.")]

    def drop(t: dict[str, th.Tensor]) -> None:
        for k in [k for k in t if k.startswith("policy/action_net.")]:
            del t[k]

    path = write(tmp_path, forge(base(), edit, drop))
    model = _other_ppo()
    before = _state(model)
    refused(lambda: model.set_parameters(path))
    assert_same_tree(before, _state(model))


# ------------------------------------------------------------------------------- external modules
@pytest.mark.parametrize("prefix", ["action_net.", "mlp_extractor.", "value_net.weight", ""])
def test_module_marked_external_without_a_placeholder_is_refused(tmp_path: Path, prefix: str) -> None:
    """init is off during load: parameters the file does not fill would be uninitialised memory."""

    def edit(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["kind"] == "module")
        entry["external_prefixes"] = [prefix]
        entry["keys"] = [k for k in entry["keys"] if not k.startswith(prefix)]
        entry["aliases"] = {a: c for a, c in entry["aliases"].items() if not a.startswith(prefix)}

    def drop(t: dict[str, th.Tensor]) -> None:
        for k in [k for k in t if k.startswith("policy/" + prefix)]:
            del t[k]

    path = write(tmp_path, forge(base(), edit, drop))
    refused(lambda: safe(PPO).load(path))


# --------------------------------------------------------------------------------- VecNormalize
def _venv() -> DummyVecEnv:
    return DummyVecEnv([lambda: gym.make("CartPole-v1")])


def _vn_state(vn: VecNormalize) -> dict[str, Any]:
    out = {
        k: copy.deepcopy(getattr(vn, k))
        for k in ("training", "norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon")
    }
    out.update(
        obs=(vn.obs_rms.mean.copy(), vn.obs_rms.var.copy(), float(vn.obs_rms.count)),
        ret=(vn.ret_rms.mean.copy(), vn.ret_rms.var.copy(), float(vn.ret_rms.count)),
        old_reward=np.array(vn.old_reward, copy=True),
        returns=np.array(vn.returns, copy=True),
    )
    return out


def _caller_vecnormalize() -> VecNormalize:
    """The caller's own VecNormalize, with statistics of its own (different from the file's)."""
    vn = VecNormalize(_venv(), clip_obs=7.0, gamma=0.9)
    vn.reset()
    for _ in range(20):
        vn.step(np.array([1]))
    return vn


@pytest.fixture(scope="module")
def vn_model_bytes() -> bytes:
    model = safe(PPO)("MlpPolicy", VecNormalize(_venv()), **tiny_kwargs("PPO"))
    model.learn(64)
    buf = io.BytesIO()
    model.save(buf, vec_normalize=model.get_vec_normalize_env())
    return buf.getvalue()


def _assert_same_vn(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple):
            assert all(np.array_equal(u, v) for u, v in zip(x, y, strict=True)), k
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), k
        else:
            assert x == y, k


@pytest.mark.parametrize("failure", ["corrupt last policy tensor", "net_arch mismatch", "bad optimizer state"])
def test_failed_load_leaves_the_callers_vecnormalize_unchanged(tmp_path: Path, vn_model_bytes: bytes, failure: str) -> None:
    data = vn_model_bytes
    if failure == "corrupt last policy tensor":
        forged = _corrupt_tensor(data, _last_policy_key(data))
    elif failure == "net_arch mismatch":
        forged = forge(data, lambda m: m["data"]["policy_kwargs"]["items"].update(net_arch={"kind": "list", "items": [17]}))
    else:
        forged = forge(
            data,
            lambda m: next(e for e in m["state_dicts"] if e["kind"] == "optimizer").update(
                state={"kind": "dict", "items": {}}
            ),
        )
    path = write(tmp_path, forged)
    vn = _caller_vecnormalize()
    before = _vn_state(vn)
    refused(lambda: safe(PPO).load(path, env=vn))
    _assert_same_vn(before, _vn_state(vn))


@pytest.mark.parametrize("damage", ["missing tensor", "corrupt last tensor", "wrong shape"])
def test_load_vecnormalize_failure_leaves_the_callers_vecnormalize_unchanged(tmp_path: Path, damage: str) -> None:
    source = VecNormalize(_venv())
    source.reset()
    for _ in range(10):
        source.step(np.array([0]))
    save_vecnormalize(source, tmp_path / "vn.safetensors")
    data = (tmp_path / "vn.safetensors").read_bytes()
    keys = sorted(k for k in split(data)[0] if k != "__metadata__")
    if damage == "corrupt last tensor":
        forged = _corrupt_tensor(data, max(keys, key=lambda k: split(data)[0][k]["data_offsets"][1]))
    else:

        def tensors(t: dict[str, th.Tensor]) -> None:
            if damage == "missing tensor":
                del t[next(k for k in t if k.endswith("ret_rms/count"))]
            else:
                k = next(k for k in t if k.endswith("obs_rms/var"))
                t[k] = th.ones(7, dtype=t[k].dtype)

        forged = forge(data, None, tensors, meta_key=META_VEC_NORMALIZE, checksum_key=META_VEC_NORMALIZE_CHECKSUM)
    path = write(tmp_path, forged)
    vn = _caller_vecnormalize()
    before = _vn_state(vn)
    refused(lambda: load_vecnormalize(path, vn))
    _assert_same_vn(before, _vn_state(vn))


# --------------------------------------------------------------------------------- replay buffers
@pytest.fixture(scope="module")
def her_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    model = her_model()
    model.learn(23)
    path = tmp_path_factory.mktemp("her") / "her.safetensors"
    model.save_replay_buffer(path)
    return path.read_bytes()


HER_EDITS = {
    "goal_selection_strategy out of range": lambda m: m["her"].update(goal_selection_strategy=99),
    "buffer_class of another buffer": lambda m: m.update(buffer_class="stable_baselines3.common.buffers:DictReplayBuffer"),
}


@pytest.mark.parametrize("edit", list(HER_EDITS.values()), ids=list(HER_EDITS))
def test_her_buffer_is_not_filled_and_then_rejected(tmp_path: Path, her_bytes: bytes, edit: Any) -> None:
    forged = forge(her_bytes, edit, meta_key=META_BUFFER, checksum_key=META_BUFFER_CHECKSUM)
    path = write(tmp_path, forged)
    model = her_model()
    model.learn(7)
    before = buffer_state(model.replay_buffer)
    refused(lambda: model.load_replay_buffer(path))
    assert_same_tree(before, buffer_state(model.replay_buffer))


def test_corrupt_replay_buffer_leaves_the_buffer_unchanged(tmp_path: Path, her_bytes: bytes) -> None:
    header, _ = split(her_bytes)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path = write(tmp_path, _corrupt_tensor(her_bytes, last))
    model = her_model()
    model.learn(7)
    before = buffer_state(model.replay_buffer)
    refused(lambda: model.load_replay_buffer(path))
    assert_same_tree(before, buffer_state(model.replay_buffer))
