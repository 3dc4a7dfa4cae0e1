"""All or nothing (issue 10, point 6): a failed load leaves every caller object bitwise unchanged.

Files are forged as an attacker would (``_hostile.edit_manifest`` recomputes the manifest checksum);
corrupted tensors are plain bit flips. Each test snapshots the caller's objects as bytes, makes the
call fail, and compares.
"""

from __future__ import annotations

import copy
import io
import json
import struct
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _compare import assert_same_tree, buffer_state, her_model
from _hostile import drop_tensors, edit_manifest, join, manifest_of, saved_bytes, split, tiny_kwargs, tiny_model
from sb3_safe_save import FormatError, IntegrityError, SafeSaveError, StateMismatchError, safe
from sb3_safe_save._buffers import META_BUFFER, META_BUFFER_CHECKSUM
from sb3_safe_save._weights import checksum, read_header


# ------------------------------------------------------------------------------------------ helpers
def tensor_bytes(t: th.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(th.uint8).numpy().tobytes()


def model_state(model: Any) -> dict[str, Any]:
    """Every module and optimizer tensor of a model as bytes, plus the optimizers' param_groups."""
    out: dict[str, Any] = {}
    names, _ = model._get_torch_save_params()
    for name in names:
        obj = model
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, th.nn.Module):
            out.update({f"{name}/{k}": tensor_bytes(v) for k, v in obj.state_dict().items()})
        else:
            sd = obj.state_dict()
            for i, s in sd["state"].items():
                out.update({f"{name}/{i}/{k}": tensor_bytes(v) if isinstance(v, th.Tensor) else v for k, v in s.items()})
            out[f"{name}/param_groups"] = repr(sd["param_groups"])
    return out


def flip_tensor(data: bytes, key: str) -> bytes:
    """Flip one bit in the middle of tensor ``key``'s bytes."""
    info = read_header(io.BytesIO(data), len(data)).tensors[key]
    pos = (info.start + info.end) // 2
    return data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :]


def last_tensor(data: bytes, prefix: str) -> str:
    """The key of the tensor under ``prefix`` stored last in the file (read last by a load)."""
    tensors = read_header(io.BytesIO(data), len(data)).tensors
    return max((k for k in tensors if k.startswith(prefix)), key=lambda k: tensors[k].start)


# ------------------------------------------------------------------------------------ set_parameters
def other_ppo() -> Any:
    model = tiny_model("PPO", steps=32)
    model.policy.optimizer.step()  # some optimizer state of its own
    return model


def test_set_parameters_verifies_every_checksum_before_copying() -> None:
    data = saved_bytes("PPO")
    bad = flip_tensor(data, last_tensor(data, "policy/"))  # read last: a copy-as-you-go load has changed the rest
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **{**tiny_kwargs("PPO"), "seed": 1})
    before = model_state(model)
    with pytest.raises(IntegrityError, match="checksum"):
        model.set_parameters(io.BytesIO(bad))
    assert model_state(model) == before
    model.set_parameters(io.BytesIO(data))  # the intact file still loads, and changes the model
    assert model_state(model) != before


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda sd: sd["param_groups"]["items"][0]["items"].update(lr="fast"), id="lr-is-a-string"),
        pytest.param(lambda sd: sd["param_groups"]["items"].append(sd["param_groups"]["items"][0]), id="extra-group"),
        pytest.param(lambda sd: sd["state"]["items"].update({"99": sd["state"]["items"]["0"]}), id="state-for-no-param"),
        pytest.param(
            lambda sd: sd["state"]["items"].update({"0": sd["state"]["items"][max(sd["state"]["items"], key=int)]}),
            id="exp-avg-of-another-shape",
        ),
    ],
)
def test_set_parameters_refuses_optimizer_state_that_does_not_fit_before_any_change(edit: Any) -> None:
    def forge(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["kind"] == "optimizer")
        edit(entry["state"]["items"])

    bad = edit_manifest(saved_bytes("PPO"), forge)
    model = other_ppo()
    before = model_state(model)
    with pytest.raises(StateMismatchError, match="optimizer state does not fit"):
        model.set_parameters(io.BytesIO(bad))
    assert model_state(model) == before


def test_set_parameters_refuses_a_state_dict_that_names_a_non_module() -> None:
    def forge(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["kind"] == "module")
        entry["name"] = "policy.optimizer"  # a module entry aimed at the optimizer

    model = other_ppo()
    before = model_state(model)
    with pytest.raises(StateMismatchError):
        model.set_parameters(io.BytesIO(edit_manifest(saved_bytes("PPO"), forge)), exact_match=False)
    assert model_state(model) == before


# ------------------------------------------------------------------------------------- VecNormalize
def vec_env(seed: int) -> VecNormalize:
    venv = VecNormalize(DummyVecEnv([lambda: gym.make("CartPole-v1")]))
    venv.seed(seed)
    venv.reset()
    for _ in range(5):
        venv.step(np.array([venv.action_space.sample()]))
    return venv


def vn_state(venv: VecNormalize) -> dict[str, Any]:
    return {
        "obs_rms": (venv.obs_rms.mean.tobytes(), venv.obs_rms.var.tobytes(), venv.obs_rms.count),
        "ret_rms": (np.asarray(venv.ret_rms.mean).tobytes(), np.asarray(venv.ret_rms.var).tobytes(), venv.ret_rms.count),
        "settings": (venv.training, venv.norm_obs, venv.norm_reward, venv.clip_obs, venv.clip_reward, venv.gamma),
        "returns": venv.returns.tobytes(),
        "old_obs": np.asarray(venv.old_obs).tobytes(),
        "seeds": copy.copy(venv.venv._seeds),
    }


@pytest.fixture(scope="module")
def vn_file() -> bytes:
    venv = vec_env(0)
    model = safe(PPO)("MlpPolicy", venv, **tiny_kwargs("PPO"))
    model.learn(32)
    venv.clip_obs = 7.0  # differs from the caller's below
    buf = io.BytesIO()
    model.save(buf, vec_normalize=venv)
    return buf.getvalue()


@pytest.mark.parametrize("where", ["policy/", "policy.optimizer"])
def test_failed_load_leaves_the_callers_vecnormalize_unchanged(vn_file: bytes, where: str) -> None:
    bad = flip_tensor(vn_file, last_tensor(vn_file, where))
    caller = vec_env(1)
    before = vn_state(caller)
    with pytest.raises(IntegrityError):
        safe(PPO).load(io.BytesIO(bad), env=caller)
    assert vn_state(caller) == before
    model = safe(PPO).load(io.BytesIO(vn_file), env=caller)  # the intact file: now the statistics change
    assert model.get_vec_normalize_env() is caller and caller.clip_obs == 7.0
    assert vn_state(caller) != before


# ---------------------------------------------------------------------------------------- HER buffer
def forge_buffer(data: bytes, edit: Any) -> bytes:
    header, body = split(data)
    meta = json.loads(header["__metadata__"][META_BUFFER])
    edit(meta)
    text = json.dumps(meta)
    header["__metadata__"][META_BUFFER] = text
    header["__metadata__"][META_BUFFER_CHECKSUM] = checksum(text.encode())
    return join(header, body)


@pytest.fixture(scope="module")
def her_file() -> bytes:
    model = her_model()
    model.learn(23)
    buf = io.BytesIO()
    model.save_replay_buffer(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m["her"].update(goal_selection_strategy=99), id="unknown-strategy"),
        pytest.param(lambda m: m["her"].update(n_sampled_goal=-3), id="negative-n-sampled-goal"),
        pytest.param(lambda m: m.update(her=None), id="no-her-settings"),
    ],
)
def test_her_buffer_is_validated_before_it_is_filled(her_file: bytes, edit: Any) -> None:
    model = her_model()
    model.learn(7)
    before = buffer_state(model.replay_buffer)
    with pytest.raises(FormatError):
        model.load_replay_buffer(io.BytesIO(forge_buffer(her_file, edit)))
    assert_same_tree(before, buffer_state(model.replay_buffer))


def test_her_episode_bookkeeping_out_of_range_is_refused_before_filling(her_file: bytes) -> None:
    info = read_header(io.BytesIO(her_file), len(her_file)).tensors["ep_start"]
    assert info.dtype == "I64" and info.nbytes >= 8
    forged = bytearray(her_file)
    forged[info.start : info.start + 8] = struct.pack("<q", 10**6)  # an episode starting past the buffer's end

    def fix(m: dict[str, Any]) -> None:
        m["tensors"]["ep_start"]["xxh3"] = checksum(bytes(forged[info.start : info.end]))

    model = her_model()
    model.learn(7)
    before = buffer_state(model.replay_buffer)
    with pytest.raises(FormatError, match="out of range"):
        model.load_replay_buffer(io.BytesIO(forge_buffer(bytes(forged), fix)))
    assert_same_tree(before, buffer_state(model.replay_buffer))


# ------------------------------------------------------------------------- every parameter is filled
def test_external_prefix_without_a_placeholder_is_refused() -> None:
    """The uninitialised-memory attack: mark a module external, drop its tensors, no placeholder."""
    data = saved_bytes("PPO")
    dropped = {k for k in manifest_of(data)["tensors"] if k.startswith("policy/mlp_extractor.")}
    assert dropped

    def forge(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["name"] == "policy")
        entry["keys"] = [k for k in entry["keys"] if not k.startswith("mlp_extractor.")]
        entry["external_prefixes"] = ["mlp_extractor."]
        for key in dropped:
            del m["tensors"][key]

    bad = drop_tensors(edit_manifest(data, forge), dropped)
    with pytest.raises(FormatError, match="records no resource"):
        safe(PPO).load(io.BytesIO(bad))
    model = other_ppo()
    before = model_state(model)
    with pytest.raises(FormatError, match="records no resource"):
        model.set_parameters(io.BytesIO(bad))
    assert model_state(model) == before


def test_external_prefix_with_an_optional_unbound_placeholder_is_refused() -> None:
    """A placeholder that binds nothing cannot stand for weights: they would be uninitialised."""
    data = saved_bytes("PPO")
    dropped = {k for k in manifest_of(data)["tensors"] if k.startswith("policy/mlp_extractor.")}

    def forge(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["name"] == "policy")
        entry["keys"] = [k for k in entry["keys"] if not k.startswith("mlp_extractor.")]
        entry["external_prefixes"] = ["mlp_extractor."]
        for key in dropped:
            del m["tensors"][key]
        m["placeholders"].append(
            {
                "key": "x",
                "paths": ["policy.mlp_extractor"],
                "type": "torch.nn.Module",
                "reason": "external_module",
                "optional": True,
            }
        )

    with pytest.raises(SafeSaveError):
        safe(PPO).load(io.BytesIO(drop_tensors(edit_manifest(data, forge), dropped)))
