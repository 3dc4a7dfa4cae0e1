"""Linear cost (issue 22, point 7): rebind-path checks and resource look-ups grow with the manifest, not its square.

The rebind checks once compared every placeholder path with every stored state-dict key (8,000 of each:
15 s, about two days at the manifest's limits), and the entry points of the resource group were scanned
again for every placeholder. The first two tests count operations (keys read, scans made); the last loads
and audits such a file under a CPU-time bound far above what the linear checks need, as
``tests/test_bounds.py`` does.
"""

from __future__ import annotations

import resource
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch as th
from stable_baselines3 import PPO

from _attack import base, forge, placeholder, write
from sb3_safe_save import SafeSaveError, _resources, audit, read_manifest, safe
from sb3_safe_save._manifest import ModuleState, Placeholder
from sb3_safe_save._persist import rebind_problems
from sb3_safe_save._trust import TrustList

N = 8_000


class CountingList(list[str]):
    """A list that counts the items read from it (every ``for``, ``*`` and ``sorted`` goes through ``__iter__``)."""

    reads = 0

    def __iter__(self) -> Iterator[str]:
        for item in super().__iter__():
            CountingList.reads += 1
            yield item


def test_rebind_checks_read_each_stored_key_a_bounded_number_of_times(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    manifest = read_manifest(path)
    keys = CountingList(f"block{i}.weight" for i in range(N))
    entry = ModuleState.model_construct(kind="module", name="policy", keys=keys, aliases={}, external_prefixes=[])
    paths = [f"policy.h{i}" for i in range(N)] + ["policy.block7", "policy.block8.weight"]
    ph = Placeholder.model_construct(key="x", paths=paths, type="builtins.object", reason="declared", optional=True)
    forged = manifest.model_copy(update={"state_dicts": [entry], "placeholders": [ph]})
    CountingList.reads = 0
    problems = rebind_problems(forged, PPO)
    assert CountingList.reads <= 2 * N, f"{CountingList.reads} key reads for {len(paths)} paths x {N} keys"
    assert [(p, why) for _, p, why in problems] == [
        ("policy.block7", "the file stores 'policy/block7.weight' there (a resource would replace what was just loaded)"),
        (
            "policy.block8.weight",
            "the file stores 'policy/block8.weight' there (a resource would replace what was just loaded)",
        ),
    ]


@pytest.mark.parametrize("installed", [False, True])
def test_entry_points_are_scanned_once_per_resolve(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    """Once, whether the group is empty (it was then scanned again for every placeholder) or not."""
    scans: list[int] = []
    original = _resources._entry_points

    def counted() -> dict[str, Any]:
        scans.append(1)
        return {k: v for k, v in original().items() if k not in {f"k{i}" for i in range(1000)}} if installed else {}

    monkeypatch.setattr(_resources, "_entry_points", counted)
    phs = [
        Placeholder(key=f"k{i}", paths=[f"expert{i}"], type="builtins.object", reason="declared", optional=True)
        for i in range(1000)
    ]
    bound = _resources.resolve(phs, {}, TrustList(None))
    assert len(scans) == 1
    assert sorted(bound) == sorted(p.key for p in phs) and not any(bound.values())  # each an Unbound stand-in


def _cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _many_paths_and_keys(m: dict[str, Any]) -> None:
    """1,000 optional placeholders with 8 module paths each; 8,000 more keys in the policy's state dict."""
    m["placeholders"] += [placeholder(f"k{i}", [f"policy.h{i}_{j}" for j in range(8)], optional=True) for i in range(N // 8)]
    m["state_dicts"][0]["keys"] += [f"extra{i}.w" for i in range(N)]


def _extra_tensors(tensors: dict[str, th.Tensor]) -> None:
    tensors.update({f"policy/extra{i}.w": th.zeros(1) for i in range(N)})


def test_a_file_of_8000_paths_and_8000_keys_is_refused_in_linear_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, forge(base(), _many_paths_and_keys, _extra_tensors))
    scans: list[int] = []
    monkeypatch.setattr(_resources, "_entry_points", lambda: scans.append(1) or {})  # an empty group
    start = _cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SafeSaveError):  # the policy has none of the extra keys
            safe(PPO).load(path)
        audit(path, fail_on="warning")
    spent = _cpu() - start
    assert len(scans) <= 1
    assert spent < 10, f"load and audit took {spent:.1f} CPU seconds"  # the quadratic checks alone took 30
