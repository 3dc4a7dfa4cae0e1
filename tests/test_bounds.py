"""Bounded cost (issue 10, point 7): hostile text costs time and memory in proportion to its size.

Time is bounded through CPU time (``resource.getrusage``) with bounds far above what the checks
need and far below what the old backtracking or error formatting took; memory through
``tracemalloc`` peaks.
"""

from __future__ import annotations

import io
import json
import re
import resource
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, field_validator
from stable_baselines3 import PPO

from _hostile import edit_manifest, manifest_of, saved_bytes
from sb3_safe_save import FormatError, safe
from sb3_safe_save._buffers import ReplayBufferFile
from sb3_safe_save._checkpoint import CallbackState, CheckpointIndex
from sb3_safe_save._manifest import (
    CONTAINER_FIELDS,
    DICT_FAIL_FAST,
    LIST_FAIL_FAST,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    ListNode,
    Manifest,
    Node,
    TaggedNode,
    _container,
    _kind,
    _Model,
    _one_item_at_a_time,
    check_path,
    check_ref,
    parse_manifest,
)
from sb3_safe_save._vecnormalize import VecNormalizeFile

MiB = 1 << 20


@contextmanager
def cost() -> Iterator[dict[str, float]]:
    """CPU seconds and peak traced bytes of the block."""
    out: dict[str, float] = {}
    tracemalloc.start()
    t0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    try:
        yield out
    finally:
        out["cpu_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_utime - t0
        out["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# ------------------------------------------------------------------------------------------ paths
#: Inputs that made the old ``[digits]`` / ``[anything]`` alternation backtrack exponentially.
BACKTRACKING_PATHS = [
    "a" + "[0]" * 40 + "!",
    "a" + "[1]" * 300 + "[",
    "p" + "[-1]" * 200 + "]",
    "a" + ".b" * 400 + ".",
    "a" + "[" + "x" * 199 + "]" + "[0]" * 30 + "[",
]


def test_path_and_ref_checks_take_linear_time() -> None:
    with cost() as c:
        for _ in range(20):
            for path in BACKTRACKING_PATHS:
                with pytest.raises(ValueError, match="invalid attribute path"):
                    check_path(path)
            for ref in ("a." * 240 + ":", "a:" + "b." * 240, "x" * 499 + ":"):
                with pytest.raises(ValueError, match="invalid import reference"):
                    check_ref(ref)
    assert c["cpu_s"] < 5  # the first path alone took hours before


@pytest.mark.parametrize(
    "path", ["policy", "policy.q_net.vlm_model", "policy_kwargs[net_arch][0]", "a[some key][-3].b", "x[" + "k" * 200 + "]"]
)
def test_valid_paths_still_pass(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["policy\n", "a..b", "a[]", "a[[0]]", "1a", ".a", "a[" + "k" * 201 + "]", "a.__class__"])
def test_invalid_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        check_path(path)


# -------------------------------------------------------------------------------- manifest errors
def test_a_megabyte_of_bad_nodes_fails_fast_with_a_short_message() -> None:
    manifest = manifest_of(saved_bytes("PPO"))
    manifest["data"]["gamma"] = {"kind": "list", "items": [{"kind": "bogus", "v": 1}] * 40_000}
    text = json.dumps(manifest)
    assert len(text) > 1 * MiB
    with cost() as c, pytest.raises(FormatError, match="malformed") as info:
        parse_manifest(text)
    message = str(info.value)
    assert len(message) < 1500 and "data.gamma" in message
    assert c["peak_bytes"] < 40 * len(text)  # 4.3 GB for 1.6 MB before (2700x): the error list and its text


#: Hostile containers with many bad items, one per kind of field: each must fail at its first bad item.
VEC_NORMALIZE = {"training": True, "norm_obs": True, "norm_reward": True, "clip_obs": 10.0, "clip_reward": 10.0}
MANY_BAD_ITEMS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "node-dict": (
        lambda m: m["data"].update(gamma={"kind": "dict", "items": {f"k{i}": {"kind": "bogus"} for i in range(40_000)}}),
        "data.gamma",
    ),
    "data-keys": (lambda m: m["data"].update({f"k{i}": {"kind": "bogus"} for i in range(40_000)}), "data.k"),
    "tensors": (lambda m: m["tensors"].update({f"t{i}": {"dtype": 1} for i in range(40_000)}), "tensors.t"),
    "placeholder-hint": (
        lambda m: m["placeholders"].append(
            {"key": "k", "paths": ["a"], "type": "t", "reason": "declared", "hint": {f"h{i}": [1] for i in range(1000)}}
        ),
        "placeholders.0.hint.h0",
    ),
    "vec-normalize-keys": (
        lambda m: m.update(vec_normalize={**VEC_NORMALIZE, "gamma": 0.99, "epsilon": 1e-8, "norm_obs_keys": [1] * 300_000}),
        "vec_normalize.norm_obs_keys.0",
    ),
    "schedule-knots": (
        lambda m: m["data"].update(gamma={"kind": "schedule", "schedule": "piecewise_linear", "knots": [[0.0, "x"]] * 10_000}),
        "data.gamma",
    ),
}


@pytest.mark.parametrize("edit", MANY_BAD_ITEMS.values(), ids=MANY_BAD_ITEMS.keys())
def test_every_kind_of_container_fails_at_its_first_bad_item(edit: tuple[Callable[[dict[str, Any]], None], str]) -> None:
    change, where = edit
    manifest = manifest_of(saved_bytes("PPO"))
    change(manifest)
    text = json.dumps(manifest)
    with cost() as c, pytest.raises(FormatError, match="malformed") as info:
        parse_manifest(text)
    message = str(info.value)
    assert where in message and len(message) < 1500
    assert int(re.search(r"(\d+) validation error", message)[1]) <= 10  # type: ignore[index]  # not one per item
    assert c["peak_bytes"] < 40 * len(text)  # 593 MB for the 3 MB vec-normalize-keys before, on pydantic 2.14


def nested_lists(depth: int, width: int, leaf: Any) -> dict[str, Any]:
    """``depth`` list nodes inside each other, each holding ``width`` numbers and then the next one (``leaf`` last)."""
    node = leaf
    for _ in range(depth):
        node = {"kind": "list", "items": [1] * width + [node]}
    return node


def json_objects(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return isinstance(value, dict) + sum(map(json_objects, children))


@pytest.mark.parametrize("leaf", [1, {"kind": "bogus"}], ids=["valid", "bad-leaf"])
def test_nested_nodes_are_validated_once(leaf: Any) -> None:
    """Each node is validated once, however deep: no union retried per mode or without its discriminator (pydantic
    2.5.3 took two minutes and 4 GB on ten levels of nested bad nodes), no item validated again."""
    manifest = manifest_of(saved_bytes("PPO"))
    manifest["data"]["gamma"] = nested_lists(60, 100, leaf)  # 60 levels: 123 JSON levels of the 128 allowed
    text = json.dumps(manifest)
    parse_manifest(json.dumps(manifest_of(saved_bytes("PPO"))))  # build the schema first
    calls = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call" and frame.f_code is _kind.__code__

    with cost() as c:
        sys.setprofile(profile)
        try:
            parse_manifest(text)
        except FormatError as e:
            message = str(e)  # the deepest error first: a long location keeps its start and its end
            assert "validation error(s): data.gamma.node.list.items.100.node." in message
            assert ".list.items.100.node: Input tag 'bogus'" in message and len(message) < 1500
        else:
            assert leaf == 1
        finally:
            sys.setprofile(None)
    assert 60 <= calls <= json_objects(manifest)  # a call per JSON object (and some), not 2 ** 60
    # 1.9 MiB (pydantic 2.14.3) to 3.4 MiB (2.5.3): the errors of a chain grow with its depth squared (each level
    # keeps its scalar alternatives, each location is as long as its depth), and MAX_JSON_DEPTH caps the depth
    assert c["peak_bytes"] < 4 * MiB


def test_the_one_item_at_a_time_fallback() -> None:
    """What ``_Model`` does where pydantic cannot fail fast (lists before 2.8, dicts before 2.14), on any pydantic."""

    class Probe(BaseModel):
        items: list[Node] = Field(default_factory=list, max_length=1000)
        named: dict[str, Node] = Field(default_factory=dict, max_length=1000)
        paths: list[str] = Field(default_factory=list, min_length=1, max_length=5)

        @field_validator("items", "named", "paths", mode="wrap")
        @classmethod
        def _first_bad(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
            assert info.field_name is not None
            return _one_item_at_a_time(value, handler, _container(cls, info.field_name))

    bad, good = {"kind": "float", "value": "x"}, {"kind": "list", "items": [1, "a"]}
    probe = Probe(items=[1, good, 2.5, None], named={"a": good, "b": 1}, paths=["a", "b"])
    assert (
        probe.items[1] == ListNode(items=[1, "a"])
        and probe.named["a"] == ListNode(items=[1, "a"])
        and probe.items[2:] == [2.5, None]
    )
    cases: list[tuple[dict[str, Any], list[tuple[Any, ...]], str]] = [
        ({"items": [1, good, bad, bad, {"kind": "bogus"}] * 100}, [("items", 2, "node", "float", "value")], "'nan', 'inf'"),
        (
            {"items": [good, {"kind": "list", "items": [1, 2, bad]}]},
            [("items", 1, "node", "list", "items", 2, "node", "float", "value")],
            "'nan'",
        ),
        ({"named": {"a": good, "b": bad, "c": bad}}, [("named", "b", "node", "float", "value")], "'nan'"),
        ({"items": [bad] * 1001}, [("items",)], "at most 1000 items"),
        ({"named": {str(i): bad for i in range(1001)}}, [("named",)], "at most 1000 items"),
        ({"paths": []}, [("paths",)], "at least 1 item"),
        ({"paths": ["a", "b", 3, 4]}, [("paths", 2)], "valid string"),
        ({"items": {"a": 1}}, [("items",)], "valid list"),
    ]
    for kwargs, locs, message in cases:  # only the first bad item, at its own index or key
        with pytest.raises(ValidationError) as info:
            Probe(**kwargs)
        errors = [
            (tuple("node" if str(p).startswith("tagged-union[") else p for p in e["loc"]), e["msg"])
            for e in info.value.errors()
        ]
        assert {loc[:2] for loc, _ in errors} == {locs[0][:2]}, kwargs  # there, with the scalar alternatives
        meant = [(loc, msg) for loc, msg in errors if loc[-1] not in ("bool", "int", "float", "str")]  # a bad node
        assert [loc for loc, _ in meant] == locs and message in meant[0][1], kwargs


def test_every_container_field_fails_fast() -> None:
    """Every list and dict field whose items can be bad fails fast: natively where this pydantic can, and through
    ``_Model``'s one-item-at-a-time validator (``CONTAINER_FIELDS``) where it cannot."""
    models = [Manifest, ReplayBufferFile, VecNormalizeFile, CallbackState, CheckpointIndex]
    seen, fields = set(models), []
    while models:
        model = models.pop()
        model.model_rebuild()
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if get_origin(annotation) in (Union, UnionType):
                annotation = next(a for a in get_args(annotation) if a is not type(None))
            kind = get_origin(annotation)
            models += [m for m in _models_in(annotation) if m not in seen]
            seen.update(models)
            if kind in (list, dict) and get_args(annotation)[-1] is not Any:
                fields.append((model, name, kind))
    assert len(fields) > 30
    unmarked = [f"{m.__name__}.{name}" for m, name, kind in fields if not fails_fast(m, name, kind)]
    assert unmarked == []
    assert {name for model, name, _ in fields if issubclass(model, _Model)} <= set(CONTAINER_FIELDS)


def fails_fast(model: type[BaseModel], name: str, kind: type) -> bool:
    if any(getattr(m, "fail_fast", False) for m in model.model_fields[name].metadata):
        return True  # natively
    native = LIST_FAIL_FAST if kind is list else DICT_FAIL_FAST  # then it must be used; else _Model's validator
    return not native and issubclass(model, _Model) and name in CONTAINER_FIELDS and _container(model, name) is not None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def test_node_tags_are_the_kinds() -> None:
    members = get_args(get_args(TaggedNode)[0])
    tags = {get_args(member)[1].tag: get_args(member)[0] for member in members}
    assert len(tags) == len(members) and all(model.model_fields["kind"].default == tag for tag, model in tags.items())


def test_deep_nesting_is_refused_before_validation() -> None:
    node: Any = 1
    for _ in range(MAX_JSON_DEPTH):
        node = {"kind": "list", "items": [node]}
    data = edit_manifest(saved_bytes("PPO"), lambda m: m["data"].update(gamma=node))
    with pytest.raises(FormatError, match="nests deeper"):
        safe(PPO).load(io.BytesIO(data))


def test_too_many_json_values_are_refused() -> None:
    manifest = manifest_of(saved_bytes("PPO"))
    manifest["data"]["gamma"] = {"kind": "list", "items": [0] * (MAX_JSON_VALUES + 1)}
    with pytest.raises(FormatError, match="more than"):  # before pydantic builds 2M nodes
        parse_manifest(json.dumps(manifest))


# ---------------------------------------------------------------------------------- decode budget
def box(shape: list[int]) -> dict[str, Any]:
    return {
        "kind": "space",
        "space": "Box",
        "args": {
            "low": -1.0,
            "high": 1.0,
            "shape": {"kind": "tuple", "items": shape},
            "dtype": {"kind": "np_dtype", "value": "<f8"},
        },
        "rng": None,
    }


def observation_space(space: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        m["data"]["observation_space"] = space

    return edit


@pytest.mark.parametrize(
    "space",
    [
        pytest.param(box([8192, 8192]), id="one-huge-box"),
        pytest.param(
            {
                "kind": "space",
                "space": "Dict",
                "args": {"spaces": {"kind": "dict", "items": {f"k{i}": box([1 << 21]) for i in range(40)}}},
                "rng": None,
            },
            id="forty-16MB-boxes",
        ),
    ],
)
def test_spaces_are_charged_against_the_decode_budget(space: dict[str, Any]) -> None:
    data = edit_manifest(saved_bytes("PPO"), observation_space(space))
    assert len(data) < 1 * MiB
    with cost() as c, pytest.raises(FormatError):
        safe(PPO).load(io.BytesIO(data))
    assert c["peak_bytes"] < 160 * MiB  # 1.2 GB per Box node before
