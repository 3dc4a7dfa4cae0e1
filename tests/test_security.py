"""Security: stock models never touch pickle, pickle is an explicit opt-in, forged files run no code.

Forged files are made from real saved agents with ``_hostile.edit_manifest``: the manifest is edited
and its checksum recomputed, so the forgery passes the integrity check and meets the trust audit.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import torch as th
from stable_baselines3 import DQN, PPO

from _compare import assert_same_model
from _hostile import ALGOS, edit_manifest, manifest_of, saved_bytes, tiny_kwargs, tiny_model, with_manifest_text
from sb3_safe_save import (
    FormatError,
    PickleRefusedError,
    SafeSaveError,
    UntrustedTypeError,
    read_manifest,
    safe,
)
from sb3_safe_save._manifest import PickleNode, PlaceholderNode, iter_nodes


class PickleCalled(AssertionError):
    pass


def _forbid(monkeypatch: pytest.MonkeyPatch, targets: list[tuple[Any, str]]) -> list[str]:
    """Replace each ``(owner, name)`` by a function that records the call and raises."""
    calls: list[str] = []
    for owner, name in targets:
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def refuse(*args: Any, _label: str = label, **kwargs: Any) -> Any:
            calls.append(_label)
            raise PickleCalled(f"{_label} was called")

        monkeypatch.setattr(owner, name, refuse)
    return calls


SAVE_PICKLERS = [
    (pickle, "dumps"),
    (pickle, "dump"),
    (pickle, "Pickler"),
    (cloudpickle, "dumps"),
    (cloudpickle, "dump"),
    (cloudpickle.CloudPickler, "dump"),
    (th, "save"),
]
LOAD_UNPICKLERS = [
    (pickle, "loads"),
    (pickle, "load"),
    (pickle, "Unpickler"),
    (cloudpickle, "loads"),
    (cloudpickle, "load"),
    (th, "load"),
]


# ------------------------------------------------------------------------------ stock = pickle-free
@pytest.mark.parametrize("name", list(ALGOS))
def test_stock_models_are_pickle_free(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(name)
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        calls = _forbid(m, SAVE_PICKLERS)
        model.save(buf)
    assert calls == []
    manifest = read_manifest(io.BytesIO(buf.getvalue()))
    assert manifest.placeholders == [], "a stock model must not need placeholders (the pickle probe was not needed)"
    nodes = [n for root in manifest.data.values() for n in iter_nodes(root)]
    assert not any(isinstance(n, (PickleNode, PlaceholderNode)) for n in nodes)

    with monkeypatch.context() as m:
        calls = _forbid(m, LOAD_UNPICKLERS)
        loaded = safe(ALGOS[name]).load(io.BytesIO(buf.getvalue()))
    assert calls == []
    assert_same_model(model, loaded)


@pytest.mark.parametrize("name", ["DQN", "SAC"])
def test_untrained_default_models_are_pickle_free(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults exactly as a user writes them (no tweaks), before any learning."""
    env = "CartPole-v1" if name == "DQN" else "Pendulum-v1"
    model = safe(ALGOS[name])("MlpPolicy", env, buffer_size=100)  # only the buffer shrunk: it is not saved
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        calls = _forbid(m, SAVE_PICKLERS)
        model.save(buf)
    with monkeypatch.context() as m:
        calls += _forbid(m, LOAD_UNPICKLERS)
        safe(ALGOS[name]).load(io.BytesIO(buf.getvalue()))
    assert calls == []


def test_stock_sb3_zip_is_refused_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, policy_kwargs={"net_arch": [8]}).save(tmp_path / "stock.zip")
    calls = _forbid(monkeypatch, LOAD_UNPICKLERS)
    with pytest.raises(FormatError, match="zip"):
        safe(PPO).load(tmp_path / "stock.zip")
    assert calls == []


# ------------------------------------------------------------------------- pickle: explicit fallback
def schedule(progress: float) -> float:  # stands in for the user's lambda when supplied back at load
    return 1e-3 * progress


def test_curved_lambda_schedule_is_pickled_only_with_allow_pickle(tmp_path: Path) -> None:
    # a linear lambda is stored as data (test_schedules.py); a curve is not piecewise linear, so it
    # becomes a placeholder without allow_pickle, and a visible pickle with it
    path = tmp_path / "lambda.safetensors"
    model = safe(PPO)("MlpPolicy", "CartPole-v1", learning_rate=lambda p: 1e-3 * p * (2 - p), **tiny_kwargs("PPO"))
    model.learn(32)

    model.save(path)
    (placeholder,) = read_manifest(path).placeholders
    assert placeholder.reason == "schedule" and "learning_rate" in placeholder.paths

    model.save(path, allow_pickle=True)
    manifest = read_manifest(path)
    assert isinstance(manifest.data["learning_rate"], PickleNode)
    assert manifest.data["learning_rate"].tensor == "learning_rate#pickle"

    with pytest.raises(PickleRefusedError) as refused:
        safe(PPO).load(path)
    assert "learning_rate" in refused.value.paths
    assert "allow_pickle=True" in str(refused.value) and "custom_objects" in str(refused.value)

    loaded = safe(PPO).load(path, allow_pickle=True)
    assert loaded.learning_rate(0.5) == pytest.approx(7.5e-4)
    assert loaded.lr_schedule(0.5) == pytest.approx(7.5e-4)

    pickled = [p for p in refused.value.paths if p != "learning_rate"]
    by_name = safe(PPO).load(path, custom_objects={"learning_rate": schedule, "lr_schedule": schedule})
    assert by_name.learning_rate is schedule and by_name.lr_schedule(0.5) == pytest.approx(5e-4)
    by_path = safe(PPO).load(path, custom_objects={"learning_rate": schedule, **dict.fromkeys(pickled, schedule)})
    assert by_path.learning_rate is schedule and by_path.lr_schedule(0.25) == pytest.approx(2.5e-4)


class Payload:
    """Runs a shell command when unpickled: the classic malicious model file."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def malicious(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    model = tiny_model("DQN", 40)
    model.payload = Payload(marker)
    buf = io.BytesIO()
    model.save(buf, allow_pickle=True)
    assert not marker.exists()
    return buf.getvalue(), marker


def test_malicious_pickle_is_refused(malicious: tuple[bytes, Path]) -> None:
    data, marker = malicious
    manifest = manifest_of(data)
    assert manifest["data"]["payload"]["kind"] == "pickle"
    for kwargs in ({}, {"allow_pickle": False}, {"trusted": ["posix:system", "os:system"]}, {"verify": False}):
        with pytest.raises(PickleRefusedError, match="payload"):
            safe(DQN).load(io.BytesIO(data), **kwargs)
        assert not marker.exists()
    loaded = safe(DQN).load(io.BytesIO(data), custom_objects={"payload": None})
    assert loaded.payload is None and not marker.exists()


def test_malicious_pickle_moved_elsewhere_is_still_refused(malicious: tuple[bytes, Path]) -> None:
    """A forged file hides the pickle under another path but keeps its tensor name ``payload#pickle``.

    Supplying ``custom_objects={"payload": ...}`` (what the error suggested) must not let it run.
    """
    data, marker = malicious

    def hide(m: dict[str, Any]) -> None:
        node = m["data"].pop("payload")
        m["data"]["policy_kwargs"]["items"]["net_arch"] = {"kind": "list", "items": [16, node]}

    forged = edit_manifest(data, hide)
    for kwargs in ({}, {"custom_objects": {"payload": None}}):
        with pytest.raises(PickleRefusedError):
            safe(DQN).load(io.BytesIO(forged), **kwargs)
        assert not marker.exists()


def test_malicious_pickle_runs_only_when_allowed(malicious: tuple[bytes, Path]) -> None:
    """Control: the payload is live, so the refusals above are what kept the marker away."""
    data, marker = malicious
    safe(DQN).load(io.BytesIO(data), allow_pickle=True)
    assert marker.exists()
    marker.unlink()


# ------------------------------------------------------------------------- forged refs: trust audit
@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path whose import leaves a marker file: it must never be imported."""
    name = f"sb3ss_canary_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


def _forge_refs(data: bytes, canary_module: str) -> bytes:
    def edit(m: dict[str, Any]) -> None:
        m["data"]["policy_class"] = {"kind": "ref", "ref": "os:system"}
        m["data"]["extra"] = {"kind": "object", "cls": "subprocess:Popen", "state": {"args": "true"}}
        m["data"]["policy_kwargs"]["items"]["activation_fn"] = {"kind": "ref", "ref": f"{canary_module}:Thing"}
        m["data"]["exploration_schedule"] = {"kind": "enum", "cls": "xml.dom.minidom:Node", "value": 1}

    return edit_manifest(data, edit)


def test_untrusted_refs_are_listed_together_and_not_imported(
    canary: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, marker = canary
    monkeypatch.delitem(sys.modules, "xml.dom.minidom", raising=False)
    forged = _forge_refs(saved_bytes("DQN"), module)
    with pytest.raises(UntrustedTypeError) as info:
        safe(DQN).load(io.BytesIO(forged))
    assert info.value.refs == sorted(["os:system", "subprocess:Popen", f"{module}:Thing", "xml.dom.minidom:Node"])
    assert "trusted=[" in str(info.value) and "os:system" in str(info.value)
    assert module not in sys.modules and not marker.exists()
    assert "xml.dom.minidom" not in sys.modules

    # trusting some still reports the rest, still before importing anything
    with pytest.raises(UntrustedTypeError) as info:
        safe(DQN).load(io.BytesIO(forged), trusted=[f"{module}.Thing", "xml.dom.minidom:Node"])
    assert info.value.refs == ["os:system", "subprocess:Popen"]
    assert module not in sys.modules and not marker.exists()


@pytest.mark.parametrize("trusted", [True, False])
def test_trust_everything_is_refused(trusted: bool) -> None:
    with pytest.raises(TypeError, match="not accepted"):
        safe(DQN).load(io.BytesIO(saved_bytes("DQN")), trusted=trusted)


@pytest.mark.parametrize(
    ("ref", "where"),
    [
        ("stable_baselines3.common.save_util:load_from_pkl", "policy_class"),  # default-trusted package, but a function
        ("stable_baselines3.common.buffers:ReplayBuffer", "policy_class"),  # a trusted class, but not a policy
        ("stable_baselines3.common.save_util:open_path", "activation_fn"),
        ("numpy:load", "activation_fn"),  # numpy: only scalar types
    ],
)
def test_default_trust_covers_classes_not_functions(ref: str, where: str) -> None:
    def edit(m: dict[str, Any]) -> None:
        node = {"kind": "ref", "ref": ref}
        if where == "policy_class":
            m["data"]["policy_class"] = node
        else:
            m["data"]["policy_kwargs"]["items"][where] = node

    with pytest.raises(SafeSaveError):
        safe(DQN).load(io.BytesIO(edit_manifest(saved_bytes("DQN"), edit)))


# ------------------------------------------------------------------------- forged paths and sizes
def _set(path: list[Any], value: Any) -> Any:
    def edit(m: dict[str, Any]) -> None:
        target = m
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


def _first_optimizer(m: dict[str, Any]) -> int:
    return next(i for i, e in enumerate(m["state_dicts"]) if e["kind"] == "optimizer")


DUNDER_EDITS = {
    "data key __class__": _set(["data", "__class__"], 1),
    "data key __dict__": _set(["data", "__dict__"], {"kind": "dict", "items": {}}),
    "dotted data key": _set(["data", "policy.q_net"], 1),
    "data key shadows a method": _set(["data", "predict"], 1),
    "data key shadows a property": _set(["data", "logger"], None),
    "ref to a dunder": _set(["data", "policy_class"], {"kind": "ref", "ref": "builtins:__import__"}),
    "ref to dunder module": _set(["data", "policy_class"], {"kind": "ref", "ref": "os.__builtins__:eval"}),
    "object state __class__": _set(
        ["data", "exploration_schedule"],
        {"kind": "object", "cls": "stable_baselines3.common.utils:ConstantSchedule", "state": {"__class__": 1}},
    ),
    "object state __dict__": _set(
        ["data", "exploration_schedule"],
        {
            "kind": "object",
            "cls": "stable_baselines3.common.utils:ConstantSchedule",
            "state": {"__dict__": {"kind": "dict", "items": {}}},
        },
    ),
    "object state not an identifier": _set(
        ["data", "exploration_schedule"],
        {"kind": "object", "cls": "stable_baselines3.common.utils:ConstantSchedule", "state": {"a b": 1}},
    ),
    "module state name": lambda m: m["state_dicts"][0].update(name="policy.__dict__"),
    "optimizer name": lambda m: m["state_dicts"][_first_optimizer(m)].update(name="policy.optimizer.__class__"),
    "torch variable": _set(["torch_variables", "__dict__"], None),
    "placeholder path": _set(
        ["placeholders"], [{"key": "x", "paths": ["policy.__class__"], "type": "t", "reason": "declared"}]
    ),
    "placeholder path outside": _set(["placeholders"], [{"key": "x", "paths": ["../etc"], "type": "t", "reason": "declared"}]),
    "algorithm ref": _set(["algorithm"], "os:__getattr__"),
}


@pytest.mark.parametrize("edit", list(DUNDER_EDITS.values()), ids=list(DUNDER_EDITS))
def test_dunder_and_foreign_paths_are_format_errors(edit: Any) -> None:
    forged = edit_manifest(saved_bytes("DQN"), edit)
    with pytest.raises(FormatError):
        safe(DQN).load(io.BytesIO(forged))


def _deep(depth: int) -> str:
    return '{"kind":"list","items":[' * depth + "1" + "]}" * depth


SIZE_EDITS = {
    "tensor dim over 2**48": lambda m: next(iter(m["tensors"].values())).update(shape=[2**60]),
    "array shape mismatch": lambda m: m["data"]["observation_space"]["args"]["low"].update(shape=[2**40, 2**8]),
    "deque maxlen": _set(["data", "ep_info_buffer", "maxlen"], 10**12),
    "negative deque maxlen": _set(["data", "ep_info_buffer", "maxlen"], -1),
    "list over a million items": _set(["data", "extra"], {"kind": "list", "items": [0] * 1_000_001}),
    "placeholder with 10001 paths": _set(
        ["placeholders"], [{"key": "x", "paths": ["a"] * 10_001, "type": "t", "reason": "declared"}]
    ),
    "huge Box from a scalar bound": _set(
        ["data", "observation_space", "args"],
        {
            "low": -1.0,
            "high": 1.0,
            "shape": {"kind": "tuple", "items": [2**20, 2**20]},
            "dtype": {"kind": "np_dtype", "value": "<f4"},
        },
    ),
    "int64 overflow": _set(["data", "extra"], {"kind": "np_scalar", "dtype": "<i8", "value": 2**70}),
    "NaN as int64": _set(["data", "extra"], {"kind": "np_scalar", "dtype": "<i8", "value": "nan"}),
    "huge buffer size": _set(["data", "buffer_size"], 2**63),
    "object dtype": _set(["data", "extra"], {"kind": "np_dtype", "value": "|O"}),
    "huge JSON integer": "huge JSON integer",
}


@pytest.mark.parametrize("edit", list(SIZE_EDITS.values()), ids=list(SIZE_EDITS))
def test_absurd_sizes_and_values_are_format_errors(edit: Any) -> None:
    data = saved_bytes("DQN")
    if edit == "huge JSON integer":  # past Python's int max str digits (4300): written by hand
        forged = with_manifest_text(data, json.dumps(manifest_of(data)).replace('"gamma": 0.99', '"gamma": 1' + "0" * 5000))
    else:
        forged = edit_manifest(data, edit)
    with pytest.raises(FormatError):
        safe(DQN).load(io.BytesIO(forged))


@pytest.mark.parametrize("depth", [250, 300, 5000])
def test_deeply_nested_manifest(depth: int) -> None:
    data = saved_bytes("DQN")
    m = manifest_of(data)
    m["data"]["extra"] = "@@"
    forged = with_manifest_text(data, json.dumps(m).replace('"@@"', _deep(depth)))
    try:
        loaded = safe(DQN).load(io.BytesIO(forged))
    except FormatError as e:
        assert len(str(e)) < 5000
    else:
        assert depth < 255 and loaded.extra is not None


def test_a_value_replaced_by_a_dotted_custom_object_is_not_audited(tmp_path: Path) -> None:
    """``custom_objects`` replaces a value without decoding it, so its references need no trust."""
    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs={"net_arch": [8]})
    path = tmp_path / "ppo.safetensors"
    model.save(path)

    def forge(manifest: dict[str, Any]) -> None:
        manifest["data"]["policy_kwargs"]["items"]["activation_fn"] = {"kind": "ref", "ref": "os:system"}

    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(edit_manifest(path.read_bytes(), forge))
    with pytest.raises(UntrustedTypeError) as info:
        safe(PPO).load(forged)
    assert info.value.refs == ["os:system"] and "policy_kwargs.activation_fn" in str(info.value)
    loaded = safe(PPO).load(forged, custom_objects={"policy_kwargs.activation_fn": th.nn.Tanh})
    assert loaded.policy_kwargs["activation_fn"] is th.nn.Tanh
    assert loaded.policy_kwargs["net_arch"] == [8]
