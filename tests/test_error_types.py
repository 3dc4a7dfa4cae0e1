"""Every failure is a ``SafeSaveError`` (issue 10, point 8).

Each case is a file forged as an attacker would (``_hostile``: manifest edited, checksum recomputed)
that used to escape as a ``UnicodeEncodeError``, ``ValueError``, ``TypeError``, ``KeyError``,
``AttributeError`` or a gymnasium error, or to load into a wrong model.
"""

from __future__ import annotations

import io
import json
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _hostile import drop_tensors, edit_manifest, join, manifest_of, saved_bytes, split, with_manifest_text
from lang_dqn import CustomDQN, UnpicklableExpert, make_model
from sb3_safe_save import (
    FormatError,
    ResourceSpec,
    SafeSaveError,
    StateMismatchError,
    load_vecnormalize,
    read_manifest,
    safe,
    save_vecnormalize,
)
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._vecnormalize import META_VEC_NORMALIZE, META_VEC_NORMALIZE_CHECKSUM
from sb3_safe_save._weights import checksum


def load_ppo(data: bytes, **kwargs: Any) -> Any:
    return safe(PPO).load(io.BytesIO(data), **kwargs)


# ------------------------------------------------------------------------------------ text and URLs
def test_lone_surrogate_in_the_header_is_a_format_error() -> None:
    header, body = split(saved_bytes("PPO"))
    text = header["__metadata__"][META_MANIFEST][:-1] + ',"x":"\ud800"}'  # json.dumps writes it as an escape
    header["__metadata__"][META_MANIFEST] = text
    header["__metadata__"][META_CHECKSUM] = "0" * 32  # cannot even be computed: the text has no UTF-8 form
    with pytest.raises(FormatError, match="surrogate"):
        read_manifest(io.BytesIO(join(header, body)))


def test_lone_surrogate_escape_in_the_manifest_is_a_format_error() -> None:
    text = json.dumps(manifest_of(saved_bytes("PPO"))).replace('"python": "', '"python": "\\udfff', 1)
    assert "\\udfff" in text
    with pytest.raises(FormatError, match="surrogate"):
        load_ppo(with_manifest_text(saved_bytes("PPO"), text))


@pytest.mark.parametrize("url", ["nosuchprotocol://bucket/agent.safetensors", "zz9://x"])
def test_unknown_url_protocol_is_a_safe_save_error(url: str) -> None:
    with pytest.raises(SafeSaveError, match="cannot open this URL"):
        read_manifest(url)
    with pytest.raises(SafeSaveError):
        safe(PPO).load(url)


# ------------------------------------------------------------------------------------------ resources
def test_spec_factory_with_wrong_kwargs_is_a_format_error(tmp_path: Any) -> None:
    spec = ResourceSpec(factory="lang_dqn:build_expert", kwargs={"no_such_argument": 1})
    make_model(UnpicklableExpert(), net_arch=[8]).save(tmp_path / "agent", specs={"vlm_model": spec})
    with pytest.raises(FormatError, match="no_such_argument"):
        CustomDQN.load(tmp_path / "agent.safetensors", trusted=["lang_dqn:build_expert", "lang_dqn:CustomDQNPolicy"])


# ------------------------------------------------------------------------------------- construction
def test_an_env_id_in_the_file_never_escapes_as_a_gymnasium_error() -> None:
    data = edit_manifest(saved_bytes("PPO"), lambda m: m["data"].update(env="NoSuchEnvAnywhere-v0"))
    with pytest.raises(SafeSaveError):
        load_ppo(data)


def test_stored_verbose_that_is_not_a_number_is_a_safe_save_error() -> None:
    data = edit_manifest(saved_bytes("PPO"), lambda m: m["data"].update(verbose="loud"))
    with pytest.raises(SafeSaveError):
        load_ppo(data, env=gym.make("CartPole-v1"))


def test_torch_variable_the_model_does_not_have_is_a_state_mismatch() -> None:
    def forge(m: dict[str, Any]) -> None:
        m["torch_variables"]["no_such_variable"] = m["torch_variables"]["log_ent_coef"]

    with pytest.raises(StateMismatchError, match="no_such_variable"):
        safe(SAC).load(io.BytesIO(edit_manifest(saved_bytes("SAC"), forge)))


def test_torch_variable_of_another_dtype_is_a_state_mismatch() -> None:
    data = saved_bytes("SAC")
    key = manifest_of(data)["torch_variables"]["log_ent_coef"]["tensor"]
    header, body = split(data)
    start, end = header[key]["data_offsets"]
    as_f64 = np.frombuffer(body[start:end], dtype=np.float32).astype(np.float64).tobytes()
    forged = drop_tensors(data, {key})  # re-add it as float64 at the end
    header, body = split(forged)
    header[key] = {"dtype": "F64", "shape": [1], "data_offsets": [len(body), len(body) + 8]}
    forged = join(header, body + as_f64)

    def fix(m: dict[str, Any]) -> None:
        m["tensors"][key] = {"dtype": "F64", "shape": [1], "xxh3": checksum(as_f64)}

    with pytest.raises(StateMismatchError, match="log_ent_coef"):
        safe(SAC).load(io.BytesIO(edit_manifest(forged, fix)))


@pytest.mark.parametrize("name", ["learning_rate", "policy.optimizer", "policy.no_such_module", "policy[0]"])
def test_module_state_aimed_at_something_else_is_refused(name: str) -> None:
    def forge(m: dict[str, Any]) -> None:
        m["state_dicts"][0]["name"] = name

    with pytest.raises((StateMismatchError, FormatError)):  # FormatError: refused in phase 2 already
        load_ppo(edit_manifest(saved_bytes("PPO"), forge))


def test_alias_of_another_shape_is_refused_not_broadcast() -> None:
    data = saved_bytes("PPO")

    def forge(m: dict[str, Any]) -> None:
        entry = m["state_dicts"][0]
        entry["keys"].remove("action_net.weight")
        entry["aliases"]["action_net.weight"] = "value_net.bias"  # [2, 16] <- [1]: copy_ would broadcast
        del m["tensors"]["policy/action_net.weight"]

    forged = drop_tensors(edit_manifest(data, forge), {"policy/action_net.weight"})
    with pytest.raises(StateMismatchError, match="alias"):
        load_ppo(forged)


# --------------------------------------------------------------------------------------- VecNormalize
def test_vecnormalize_file_with_a_tensor_missing_from_its_table_is_a_format_error() -> None:
    venv = VecNormalize(DummyVecEnv([lambda: gym.make("CartPole-v1")]))
    buf = io.BytesIO()
    save_vecnormalize(venv, buf)
    header, body = split(buf.getvalue())
    state = json.loads(header["__metadata__"][META_VEC_NORMALIZE])
    del state["tensors"]["vec_normalize/obs_rms/mean"]  # still in the safetensors header, no checksum
    text = json.dumps(state)
    header["__metadata__"][META_VEC_NORMALIZE] = text
    header["__metadata__"][META_VEC_NORMALIZE_CHECKSUM] = checksum(text.encode())
    with pytest.raises(FormatError, match="different tensors"):
        load_vecnormalize(io.BytesIO(join(header, body)), DummyVecEnv([lambda: gym.make("CartPole-v1")]))


# ------------------------------------------------------------------------- unhashable JSON where a name goes
def test_a_header_dtype_that_is_not_a_string_is_a_format_error() -> None:
    header, body = split(saved_bytes("PPO"))
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = ["F32"]
    with pytest.raises(FormatError, match="dtype"):
        read_manifest(io.BytesIO(join(header, body)))


def test_a_bit_generator_name_that_is_not_a_string_is_a_format_error() -> None:
    def forge(m: dict[str, Any]) -> None:
        m["data"]["action_space"]["rng"] = {"bit_generator": {"kind": "device"}, "state": {}}

    with pytest.raises(FormatError, match="bit generator"):
        load_ppo(edit_manifest(saved_bytes("PPO"), forge))


def test_a_random_state_bit_generator_that_is_not_a_string_is_a_format_error() -> None:
    def forge(m: dict[str, Any]) -> None:
        m["random_state"]["spaces"]["action_space"]["bit_generator"] = {"kind": "device"}

    with pytest.raises(FormatError, match="bit generator"):
        load_ppo(edit_manifest(saved_bytes("PPO"), forge))
