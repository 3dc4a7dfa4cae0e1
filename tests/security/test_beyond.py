"""Attacks beyond the issue's list: every string, key, shape or reference a file carries, asked what it makes load do.

Outcome for each: a ``SafeSaveError`` (nothing else), or — where the file is merely odd, not hostile —
a model that is exactly what the file says; never a command, an import, a process-wide change or a
write, and never a model that disagrees with what ``read_manifest``/``audit`` saw.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO

from _attack import Canary, base, forge, manifest, refused, write
from _hostile import join, split, tiny_kwargs
from sb3_safe_save import PickleRefusedError, SafeSaveError, audit, read_manifest, safe
from sb3_safe_save._weights import checksum


class Payload:
    """Runs a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


def _payload_tensor(marker: Path) -> th.Tensor:
    return th.frombuffer(bytearray(pickle.dumps(Payload(marker))), dtype=th.uint8)


def _pickle_node(key: str = "payload#pickle") -> dict[str, Any]:
    return {"kind": "pickle", "tensor": key, "type": "builtins.object"}


def _lr_inner(m: dict[str, Any]) -> dict[str, Any]:
    """The values inside the lr_schedule: its object state (SB3 >= 2.7), or its schedule node's args (older SB3)."""
    node = m["data"]["lr_schedule"]
    return node["state"] if node["kind"] == "object" else node["args"]


def _lr_object(m: dict[str, Any]) -> dict[str, Any]:
    node = m["data"]["lr_schedule"]
    if node["kind"] != "object":
        pytest.skip("before SB3 2.7 the lr_schedule is a schedule node, not an object of a trusted class")
    return node


def _opt_entry(m: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in m["state_dicts"] if e["kind"] == "optimizer")


HIDING_PLACES = {
    "optimizer state": lambda m: _opt_entry(m)["state"]["items"].update(extra=_pickle_node()),
    "optimizer state under a replaced name": lambda m: _opt_entry(m)["state"]["items"].update(payload=_pickle_node()),
    "torch variable": lambda m: m["torch_variables"].update(payload=_pickle_node()),
    "space argument": lambda m: m["data"]["observation_space"]["args"].update(low=_pickle_node()),
    "object state": lambda m: _lr_inner(m).update(value_schedule=_pickle_node()),
    "namedtuple field": lambda m: m["data"].update(
        extra={
            "kind": "namedtuple",
            "cls": "stable_baselines3.common.type_aliases:TrainFreq",
            "fields": {"frequency": _pickle_node(), "unit": 1},
        }
    ),
    "dict key that looks like a path": lambda m: m["data"]["policy_kwargs"]["items"].update({"payload": _pickle_node()}),
    "deque item": lambda m: m["data"]["ep_info_buffer"]["items"].append(_pickle_node()),
}


@pytest.mark.parametrize("where", list(HIDING_PLACES))
@pytest.mark.parametrize("custom", [None, {"payload": None}])
def test_pickles_hidden_outside_data_are_refused(tmp_path: Path, where: str, custom: Any) -> None:
    marker = tmp_path / "pwned"

    def add(t: dict[str, th.Tensor]) -> None:
        t["payload#pickle"] = _payload_tensor(marker)

    path = write(tmp_path, forge(base(), HIDING_PLACES[where], add))
    if custom is not None and where == "torch variable":  # the caller replaced exactly that value: never decoded
        try:
            safe(PPO).load(path, custom_objects=custom)
        except SafeSaveError:
            pass
        assert not marker.exists()
    else:
        error = refused(lambda: safe(PPO).load(path, custom_objects=custom), markers=(marker,))
        assert isinstance(error, PickleRefusedError), error
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **tiny_kwargs("PPO"))
    try:  # set_parameters decodes only the optimizer state: it may ignore the rest, never unpickle it
        model.set_parameters(path)
    except SafeSaveError:
        pass
    assert not marker.exists()
    report = audit(path, fail_on="warning")
    assert not report.ok


# ------------------------------------------------------------------------------ ambiguous headers
def _duplicate_manifest_key(data: bytes) -> bytes:
    """The manifest JSON says gamma twice; a parser keeping the first sees 0.5, one keeping the last 0.7."""
    header, body = split(data)
    text = header["__metadata__"]["sb3_safe_save"].replace('"gamma":0.99', '"gamma":0.5,"gamma":0.7')
    assert text != header["__metadata__"]["sb3_safe_save"]

    header["__metadata__"]["sb3_safe_save"] = text
    header["__metadata__"]["sb3_safe_save.xxh3_128"] = checksum(text.encode())
    return join(header, body)


def _duplicate_metadata(data: bytes) -> bytes:
    """The safetensors header holds ``__metadata__`` twice (different manifests)."""
    other = forge(data, lambda m: m["data"].update(gamma=0.7))
    first, body = split(data)
    second, _ = split(other)
    raw = json.dumps(first, separators=(",", ":"))
    raw = raw[:-1] + ',"__metadata__":' + json.dumps(second["__metadata__"], separators=(",", ":")) + "}"
    enc = raw.encode() + b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(enc)) + enc + body


@pytest.mark.parametrize("make", [_duplicate_manifest_key, _duplicate_metadata], ids=["manifest key", "__metadata__"])
def test_duplicate_keys_never_let_load_and_audit_disagree(tmp_path: Path, make: Any) -> None:
    path = write(tmp_path, make(base()))
    try:
        seen = read_manifest(path).data["gamma"]
    except SafeSaveError:
        refused(lambda: safe(PPO).load(path))
        return
    model = safe(PPO).load(path)
    assert model.gamma == seen, "load and read_manifest/audit read different manifests from one file"


# -------------------------------------------------------------------------------- odd JSON values
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_json_non_finite_literals(tmp_path: Path, literal: str) -> None:
    header, body = split(base())
    text = header["__metadata__"]["sb3_safe_save"].replace('"gamma":0.99', f'"gamma":{literal}')
    assert text != header["__metadata__"]["sb3_safe_save"]

    header["__metadata__"]["sb3_safe_save"] = text
    header["__metadata__"]["sb3_safe_save.xxh3_128"] = checksum(text.encode())
    path = write(tmp_path, join(header, body))
    try:
        model = safe(PPO).load(path)
    except SafeSaveError:
        return
    expected = float(literal.replace("Infinity", "inf"))
    assert model.gamma == expected or (np.isnan(model.gamma) and np.isnan(expected))


# --------------------------------------------------------------------------------- dtypes and kinds
BAD_DTYPES = ["|O", "O", "<U4", "|V8", "<M8[s]", "[('a','<f4')]", "('<f4', (2,))", "<c8", "f4,f4", ">f4" * 30]


@pytest.mark.parametrize("dtype", BAD_DTYPES)
@pytest.mark.parametrize("node", ["ndarray", "np_scalar", "np_dtype", "box dtype"])
def test_numpy_dtype_strings_are_refused(tmp_path: Path, dtype: str, node: str) -> None:
    def edit(m: dict[str, Any]) -> None:
        if node == "ndarray":
            m["data"]["observation_space"]["args"]["low"]["dtype"] = dtype
        elif node == "np_scalar":
            m["data"]["extra"] = {"kind": "np_scalar", "dtype": dtype, "value": 1}
        elif node == "np_dtype":
            m["data"]["extra"] = {"kind": "np_dtype", "value": dtype[:64]}
        else:
            m["data"]["observation_space"]["args"]["dtype"] = {"kind": "np_dtype", "value": dtype[:64]}

    path = write(tmp_path, forge(base(), edit))
    refused(lambda: safe(PPO).load(path))


@pytest.mark.parametrize("name", ["complex64", "float8_e4m3fn", "quint8", "uint16", "torch.float32", "", "float32 "])
def test_torch_dtype_names_are_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, forge(base(), lambda m: m["data"].update(extra={"kind": "torch_dtype", "name": name})))
    refused(lambda: safe(PPO).load(path))


@pytest.mark.parametrize("value", ["meta", "cuda:99", "xla", "mps", "cpu:99", "privateuseone"])
def test_stored_devices_never_decide_where_the_model_lives(tmp_path: Path, value: str) -> None:
    """``device`` in data, and a device node inside policy_kwargs: refused, or ignored in favour of the caller's."""
    for edit in (
        lambda m: m["data"].update(device={"kind": "device", "value": value}),
        lambda m: m["data"]["policy_kwargs"]["items"].update(device={"kind": "device", "value": value}),
    ):
        path = write(tmp_path, forge(base(), edit))
        try:
            model = safe(PPO).load(path)
        except SafeSaveError:
            continue
        assert model.device.type == "cpu"
        assert all(p.device.type == "cpu" for p in model.policy.parameters())
        model.predict(model.observation_space.sample())


# --------------------------------------------------------------------------------- trusted classes
OBJECTS = {
    "Box object with a huge shape": lambda m: m["data"].update(
        observation_space={
            "kind": "object",
            "cls": "gymnasium.spaces.box:Box",
            "state": {"_shape": {"kind": "tuple", "items": [2**31, 2**31]}, "dtype": {"kind": "np_dtype", "value": "<f4"}},
        }
    ),
    "Discrete object with a huge n": lambda m: m["data"].update(
        action_space={"kind": "object", "cls": "gymnasium.spaces.discrete:Discrete", "state": {"n": 2**62, "start": 0}}
    ),
    "enum with an unknown value": lambda m: m["data"].update(
        extra={"kind": "enum", "cls": "stable_baselines3.common.type_aliases:TrainFrequencyUnit", "value": "forever"}
    ),
    "namedtuple with an extra field": lambda m: m["data"].update(
        extra={
            "kind": "namedtuple",
            "cls": "stable_baselines3.common.type_aliases:TrainFreq",
            "fields": {"frequency": 1, "unit": 1, "_asdict": 1},
        }
    ),
    "schedule object with a module-chain inner ref": lambda m: _lr_inner(m).update(
        value_schedule={"kind": "ref", "ref": "stable_baselines3.common.utils:th.os.getpid"}
    ),
    "object state naming a method": lambda m: _lr_object(m).update(
        state={"__call__": 1, "value_schedule": m["data"]["lr_schedule"]["state"]["value_schedule"]}
    ),
    "space rng of an unknown bit generator": lambda m: m["data"]["observation_space"].update(
        rng={"bit_generator": "os.system", "state": {}}
    ),
    "space rng with an object array": lambda m: m["data"]["observation_space"].update(
        rng={"bit_generator": "PCG64", "state": {"state": {"__array__": [1], "dtype": "|O"}, "inc": 1}}
    ),
    "space rng nested deep": lambda m: m["data"]["observation_space"].update(
        rng={"bit_generator": "PCG64", "state": json.loads('{"a":' * 400 + "1" + "}" * 400)}
    ),
}


@pytest.mark.parametrize("edit", list(OBJECTS.values()), ids=list(OBJECTS))
def test_trusted_classes_with_hostile_state(tmp_path: Path, edit: Any) -> None:
    path = write(tmp_path, forge(base(), edit))
    refused(lambda: safe(PPO).load(path))


# ------------------------------------------------------------------------------- tensors and offsets
def _raw(data: bytes, change: Any) -> bytes:
    header, body = split(data)
    change(header)
    return join(header, body)


def _first(h: dict[str, Any]) -> str:
    return next(k for k in h if k != "__metadata__")


def _second(h: dict[str, Any]) -> str:
    return [k for k in h if k != "__metadata__"][1]


def _size(entry: dict[str, Any]) -> int:
    start, end = entry["data_offsets"]
    return int(end - start)


HEADER_EDITS = {
    "overlapping ranges": lambda h: h[_second(h)].update(
        data_offsets=[h[_first(h)]["data_offsets"][0], h[_first(h)]["data_offsets"][0] + _size(h[_second(h)])]
    ),
    "negative offset": lambda h: h[_first(h)].update(data_offsets=[-8, h[_first(h)]["data_offsets"][1]]),
    "offset past 2**64": lambda h: h[_first(h)].update(data_offsets=[0, 2**64 + 8]),
    "negative dim": lambda h: h[_first(h)].update(shape=[-1, -4]),
    "dims overflowing int64": lambda h: h[_first(h)].update(shape=[2**32, 2**32, 0]),
    "float dim": lambda h: h[_first(h)].update(shape=[4.0]),
    "bool dim": lambda h: h[_first(h)].update(shape=[True]),
    "object dtype": lambda h: h[_first(h)].update(dtype="O"),
    "unknown dtype": lambda h: h[_first(h)].update(dtype="F8_E4M3"),
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS.values()), ids=list(HEADER_EDITS))
def test_hostile_tensor_tables(tmp_path: Path, edit: Any) -> None:
    path = write(tmp_path, _raw(base(), edit))
    refused(lambda: safe(PPO).load(path))
    refused(lambda: read_manifest(path))
    refused(lambda: audit(path))


def test_zero_sized_tensor_with_huge_dims(tmp_path: Path) -> None:
    """[2**40, 0] is 0 bytes: legal safetensors. Loaded into a policy weight it must be a mismatch, not a model."""
    key = next(k for k in manifest(base())["tensors"] if k.startswith("policy/") and k.endswith("weight"))

    def shrink(t: dict[str, th.Tensor]) -> None:
        t[key] = th.empty((2**40, 0))

    path = write(tmp_path, forge(base(), None, shrink))
    refused(lambda: safe(PPO).load(path))


@pytest.mark.parametrize("dtype", [th.float64, th.float16, th.int32, th.uint8, th.bool])
def test_policy_tensor_of_another_dtype(tmp_path: Path, dtype: th.dtype) -> None:
    """A weight stored in another dtype: refused, or converted as ``load_state_dict`` would (never bytes reinterpreted)."""
    key = next(k for k in manifest(base())["tensors"] if k.startswith("policy/") and k.endswith("weight"))
    stored: dict[str, th.Tensor] = {}

    def convert(t: dict[str, th.Tensor]) -> None:
        t[key] = stored["v"] = t[key].to(dtype)

    path = write(tmp_path, forge(base(), None, convert))
    try:
        model = safe(PPO).load(path)
    except SafeSaveError:
        return
    loaded = model.policy.state_dict()[key.removeprefix("policy/")]
    assert th.equal(loaded, stored["v"].to(loaded.dtype))


# ------------------------------------------------------------------------------- custom_objects
def test_custom_objects_idiom_does_not_skip_auditing_the_rest(tmp_path: Path, canary: Canary) -> None:
    """SB3's documented ``custom_objects`` for schedules must not let refs elsewhere in the file through."""

    def edit(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"]["activation_fn"] = {"kind": "ref", "ref": canary.ref}
        m["data"]["learning_rate"] = {"kind": "ref", "ref": "os:system"}

    path = write(tmp_path, forge(base(), edit))
    custom = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    refused(lambda: safe(PPO).load(path, custom_objects=custom), canary)


@pytest.mark.parametrize("key", ["__class__", "policy.__dict__", "policy_kwargs[activation_fn]", "", "a" + "[0]" * 40 + "-"])
def test_odd_custom_objects_keys(tmp_path: Path, canary: Canary, key: str) -> None:
    """A caller's odd ``custom_objects`` key changes nothing about what a hostile file may do."""
    path = write(
        tmp_path,
        forge(base(), lambda m: m["data"]["policy_kwargs"]["items"].update(activation_fn={"kind": "ref", "ref": canary.ref})),
    )
    refused(lambda: safe(PPO).load(path, custom_objects={key: 1}), canary)


def test_loaded_model_is_independent_of_the_file_object(tmp_path: Path) -> None:
    """Control for the tests above: the base file itself loads, and exactly."""
    data = base()
    model = safe(PPO).load(io.BytesIO(data))
    stored = manifest(data)
    assert model.gamma == stored["data"]["gamma"]
