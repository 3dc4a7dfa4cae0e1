"""The attacker's toolkit for the tests in ``tests/security``: forge real saved files, then check what a load did.

An attacker holds a real file written by ``save`` and rewrites it freely: the manifest JSON (or the
replay-buffer / VecNormalize header JSON), the tensors (added, dropped, changed), and every XXH3
checksum, which detects corruption but is no signature. ``forge`` does exactly that.

``Guard`` records the process-wide state a hostile file must never change (attributes of torch, SB3,
``os``, ``subprocess``, ``builtins`` and gymnasium's env registry; the top-level packages imported)
and ``refused`` runs one hostile call and asserts the outcome: only a ``SafeSaveError``, nothing of
the above changed, no marker file written, no canary module imported.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import safetensors.torch
import stable_baselines3.common.logger as sb3_logger
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy

from _hostile import saved_bytes
from sb3_safe_save import SafeSaveError, audit, safe
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._weights import checksum, to_blob, write_stream

Edit = Callable[[dict[str, Any]], Any]
TensorEdit = Callable[[dict[str, th.Tensor]], Any]

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ forging
def base() -> bytes:
    """A tiny trained PPO on CartPole, saved once per process: the file every attack starts from."""
    return saved_bytes("PPO")


def forge(
    data: bytes,
    edit: Edit | None = None,
    tensors: TensorEdit | None = None,
    *,
    meta_key: str = META_MANIFEST,
    checksum_key: str = META_CHECKSUM,
) -> bytes:
    """Rewrite a whole file: ``edit`` the JSON under ``meta_key``, ``tensors`` the tensor dict, re-seal every checksum.

    Either callback edits in place or returns a replacement. The JSON's ``tensors`` table (dtype,
    shape, XXH3) is recomputed from the final tensors when the JSON has one.
    """
    (n,) = np.frombuffer(data[:8], dtype="<u8")
    metadata = dict(json.loads(data[8 : 8 + int(n)])["__metadata__"])
    doc = json.loads(metadata[meta_key])
    found = safetensors.torch.load(data)
    if tensors is not None:
        found = tensors(found) or found
    if edit is not None:
        doc = edit(doc) or doc
    blobs = {k: to_blob(v) for k, v in found.items()}
    if isinstance(doc, dict) and isinstance(doc.get("tensors"), dict):
        doc["tensors"] = {k: {"dtype": b.dtype, "shape": list(b.shape), "xxh3": checksum(b.data)} for k, b in blobs.items()}
    text = json.dumps(doc)
    metadata[meta_key] = text
    metadata[checksum_key] = checksum(text.encode("utf-8", "surrogatepass"))
    out = io.BytesIO()
    write_stream(out, blobs, metadata)
    return out.getvalue()


def manifest(data: bytes, meta_key: str = META_MANIFEST) -> dict[str, Any]:
    (n,) = np.frombuffer(data[:8], dtype="<u8")
    return json.loads(json.loads(data[8 : 8 + int(n)])["__metadata__"][meta_key])  # type: ignore[no-any-return]


def placeholder(key: str, paths: list[str], **extra: Any) -> dict[str, Any]:
    return {"key": key, "paths": paths, "type": "builtins.object", "reason": "declared", **extra}


def with_placeholder(m: dict[str, Any], attr: str, ph: dict[str, Any]) -> None:
    """Add a placeholder described by ``ph`` and put it at data attribute ``attr``."""
    m["placeholders"].append(ph)
    m["data"][attr] = {"kind": "placeholder", "key": ph["key"]}


def write(tmp_path: Path, data: bytes, name: str = "forged.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------- canaries
@dataclass
class Canary:
    """A module on ``sys.path`` whose import writes ``marker``; ``ref`` names a class in it."""

    module: str
    marker: Path
    directory: Path

    @property
    def ref(self) -> str:
        return f"{self.module}:Thing"

    def assert_untouched(self) -> None:
        assert not self.marker.exists(), f"{self.module} was imported (its marker file exists)"
        assert self.module not in sys.modules, f"{self.module} was imported"


def make_canary(directory: Path) -> Canary:
    name = f"sb3ss_canary_{uuid.uuid4().hex[:12]}"
    marker = directory / f"{name}.imported"
    (directory / f"{name}.py").write_text(
        textwrap.dedent(f"""\
            import pathlib
            pathlib.Path({str(marker)!r}).touch()

            class Thing:
                def __init__(self, *args, **kwargs):
                    pathlib.Path({str(marker)!r}).write_text("called")
            """)
    )
    return Canary(name, marker, directory)


# --------------------------------------------------------------------------------- process-wide state
WATCHED: tuple[Any, ...] = (
    th.optim.Adam,
    th.optim.SGD,
    th.optim.RMSprop,
    th.optim.Optimizer,
    th.nn.Module,
    th.nn.ReLU,
    th.nn.Tanh,
    th.nn.Linear,
    th.nn.init,
    th.Tensor,
    BasePolicy,
    ActorCriticPolicy,
    BaseAlgorithm,
    PPO,
    sb3_logger,
    sb3_logger.HumanOutputFormat,
    gymnasium.spaces.Box,
    os,
    subprocess,
    subprocess.Popen,
    builtins,
)


def _attrs(obj: Any) -> dict[str, Any]:
    return dict(vars(obj))


@dataclass
class Guard:
    """What a hostile load must leave as it was."""

    attrs: list[dict[str, Any]] = field(default_factory=list)
    roots: set[str] = field(default_factory=set)
    envs: set[str] = field(default_factory=set)
    cwd_files: set[str] = field(default_factory=set)
    rng: tuple[Any, ...] = ()

    @classmethod
    def take(cls) -> Guard:
        return cls(
            attrs=[_attrs(o) for o in WATCHED],
            roots={n.split(".")[0] for n in list(sys.modules)},
            envs=set(gymnasium.envs.registry),
            cwd_files=set(os.listdir(".")),
            rng=_rng_state(),
        )

    def check(self) -> None:
        for obj, before in zip(WATCHED, self.attrs, strict=True):
            after = _attrs(obj)
            changed = sorted(k for k in set(before) | set(after) if before.get(k, _GONE) is not after.get(k, _GONE))
            assert not changed, f"{getattr(obj, '__qualname__', obj)}: attributes changed: {changed[:10]}"
        new_roots = {n.split(".")[0] for n in list(sys.modules)} - self.roots
        assert not new_roots, f"new top-level packages imported: {sorted(new_roots)}"
        assert set(gymnasium.envs.registry) == self.envs, "gymnasium's env registry changed"
        assert set(os.listdir(".")) == self.cwd_files, "files appeared in the working directory"

    def check_rng(self) -> None:
        """After a refused load: the process's random state (torch, numpy, random) is as it was."""
        torch_state, np_state, py_state = _rng_state()
        assert th.equal(torch_state, self.rng[0]), "a refused load changed torch's random state"
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(np_state, self.rng[1], strict=True))
        assert py_state == self.rng[2], "a refused load changed random's state"

    def restore(self) -> None:
        """Put back what an attack changed (so one hole does not spoil the tests after it)."""
        for obj, before in zip(WATCHED, self.attrs, strict=True):
            for k in set(vars(obj)) - set(before):
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(obj, k)
            for k, v in before.items():
                if vars(obj).get(k, _GONE) is not v:
                    with contextlib.suppress(AttributeError, TypeError):
                        setattr(obj, k, v)


_GONE = object()


def _rng_state() -> tuple[Any, ...]:
    return th.get_rng_state(), np.random.get_state(), random.getstate()


def warm_up(tmp_path: Path) -> None:
    """Import what legitimate loads, audits and resource lookups import, so ``Guard`` sees only what an attack adds."""
    from importlib import metadata

    metadata.entry_points(group="sb3_safe_save.resources")
    path = write(tmp_path, base(), "warm.safetensors")
    safe(PPO).load(path)
    audit(path)
    try:
        import fsspec  # noqa: F401  (URLs go through it)
    except ImportError:
        pass


def refused(call: Callable[[], Any], *canaries: Canary, markers: tuple[Path, ...] = ()) -> SafeSaveError:
    """Run a hostile call: it must raise a ``SafeSaveError`` (nothing else) and change nothing process-wide."""
    guard = Guard.take()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                call()
            except SafeSaveError as e:
                error: SafeSaveError | None = e
            else:
                error = None
        guard.check()
        guard.check_rng()
    finally:
        guard.restore()
    for canary in canaries:
        canary.assert_untouched()
    for marker in markers:
        assert not marker.exists(), f"the attack wrote {marker}"
    assert error is not None, "the hostile file was accepted"
    return error


def make_thing(size: int) -> list[int]:
    """A factory a caller may trust (``trusted=["_attack:make_thing"]``)."""
    return [0] * size


# --------------------------------------------------------------------------------------- subprocesses
@dataclass
class Outcome:
    error: str | None  # the exception class name, or None when the call returned
    safe_error: bool  # the exception is a SafeSaveError
    seconds: float
    extra_rss_mb: float  # peak RSS during the call minus the peak before it
    modules: list[str]  # modules imported by the call
    stdout: str


_RUNNER = """
import io, json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from stable_baselines3 import PPO
from sb3_safe_save import SafeSaveError, safe, audit
path = sys.argv[1]
safe(PPO).load(sys.argv[2]); audit(sys.argv[2])  # warm: lazy imports of a normal load
before_mods = set(sys.modules)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
error, is_safe = None, False
try:
    CALL
except BaseException as e:
    error, is_safe = type(e).__name__, isinstance(e, SafeSaveError)
seconds = time.monotonic() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("@@" + json.dumps({"error": error, "safe_error": is_safe, "seconds": seconds,
                  "extra_rss_mb": (after - before) / 1024, "modules": sorted(set(sys.modules) - before_mods)}))
"""


def run_isolated(path: Path, call: str = "safe(PPO).load(path)", timeout: float = 120) -> Outcome:
    """Run ``call`` on ``path`` in a fresh interpreter and measure it (a hang or a blow-up cannot hurt pytest)."""
    clean = path.parent / "clean.safetensors"
    if not clean.exists():
        clean.write_bytes(base())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUNNER.replace("CALL", call), str(path), str(clean)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=path.parent,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{call} on a hostile file ran over {timeout} s") from None
    line = next((x for x in done.stdout.splitlines() if x.startswith("@@")), None)
    assert line is not None, f"the runner died (exit {done.returncode}): {done.stderr[-3000:]}"
    return Outcome(**json.loads(line[2:]), stdout=done.stdout)


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sb3_safe_save", *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
