"""Bounded cost (issue 10, point 7): hostile text costs time and memory in proportion to its size.

Time is bounded through CPU time (``resource.getrusage``) with bounds far above what the checks
need and far below what the old backtracking or error formatting took; memory through
``tracemalloc`` peaks.
"""

from __future__ import annotations

import io
import json
import resource
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from stable_baselines3 import PPO

from _hostile import edit_manifest, manifest_of, saved_bytes
from sb3_safe_save import FormatError, safe
from sb3_safe_save._manifest import MAX_JSON_DEPTH, MAX_JSON_VALUES, check_path, check_ref, parse_manifest

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
