"""Checkpoints written in the background: a staged copy, one writer thread, at most one checkpoint in flight.

As PyTorch DCP's ``async_save`` with its stager, and Orbax's asynchronous checkpointer:

* **stage** (the training thread): the tensors of each file (policy, optimizer, random state, VecNormalize
  statistics, the replay buffer's filled rows) are copied into memory the ``Stager`` keeps for the model, so
  training may change them at once. The memory is reused by every later checkpoint of the model (first
  touches of fresh pages cost more than the copy itself), and a replay buffer's copy is reserved at the
  buffer's full size but only the filled rows' pages are ever touched.
* **write** (the one ``sb3_safe_save-checkpoint`` thread): checksums, manifest, files, fsync, and the rename
  of the finished directory into place (``_checkpoint``), so a kill leaves no partial checkpoint under the name.
* **wait**: the next checkpoint, ``wait_for_checkpoint()`` and process exit wait for the pending write; its
  failure is raised once, as ``CheckpointWriteError``, by whichever comes first (at exit it is printed).
"""

from __future__ import annotations

import atexit
import os
import pathlib
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from sb3_safe_save import _weights
from sb3_safe_save._errors import CheckpointWriteError

if TYPE_CHECKING:
    from sb3_safe_save._persist import StagedFile


class Stager:
    """Copies of files' tensors in memory that is kept and reused from one checkpoint to the next."""

    def __init__(self) -> None:
        self._memory: dict[str, np.ndarray] = {}

    def stage(self, files: dict[str, StagedFile]) -> dict[str, StagedFile]:
        """Copy the blobs of ``files`` (file name -> staged file); the copies stay valid until the next call."""
        from sb3_safe_save._persist import StagedFile

        memory: dict[str, np.ndarray] = {}
        out = {}
        for name, staged in files.items():
            blobs = {}
            for key, blob in staged.blobs.items():
                slot, n = f"{name}/{key}", blob.nbytes
                held = self._memory.get(slot)
                if held is None or held.nbytes < n:  # lazily zeroed: pages are allocated where rows are copied
                    held = _weights.fresh_zeros((max(n, staged.capacity.get(key, 0)),), np.dtype(np.uint8))
                np.copyto(held[:n], blob.data)
                memory[slot] = held
                blobs[key] = _weights.Blob(data=held[:n], dtype=blob.dtype, shape=blob.shape)
            out[name] = StagedFile(blobs, staged.metadata)
        self._memory = memory  # memory of tensors that are gone is freed
        return out


_stagers: weakref.WeakKeyDictionary[object, Stager] = weakref.WeakKeyDictionary()


def stager_for(owner: object) -> Stager:
    """The stager of ``owner`` (a model): its memory lives as long as the model."""
    stager = _stagers.get(owner)
    if stager is None:
        stager = _stagers[owner] = Stager()
    return stager


class _Writer:
    """One worker thread; at most one checkpoint in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[pathlib.Path, Future[None]] | None = None

    def submit(self, path: pathlib.Path, job: Callable[[], None]) -> None:
        """Run ``job`` (which writes checkpoint ``path``) in the background; ``wait()`` must have come first."""
        with self._lock:
            if self._pending is not None:
                raise RuntimeError(f"the checkpoint {self._pending[0]} is still in flight: wait for it first")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="sb3_safe_save-checkpoint")
                atexit.register(_wait_at_exit)
            self._pending = (path, self._executor.submit(job))

    def wait(self) -> pathlib.Path | None:
        """Block until the pending checkpoint is written; return its path (None if none was pending).

        :raises CheckpointWriteError: its write failed (raised once; the next call returns None)
        """
        with self._lock:
            pending = self._pending
        if pending is None:
            return None
        path, future = pending
        error = future.exception()
        with self._lock:
            if self._pending is pending:
                self._pending = None
        if error is not None:
            raise CheckpointWriteError(path, error) from error
        return path


_writer = _Writer()


def submit(path: pathlib.Path, job: Callable[[], None]) -> None:
    _writer.submit(path, job)


def wait() -> pathlib.Path | None:
    return _writer.wait()


def _wait_at_exit() -> None:
    try:
        _writer.wait()
    except CheckpointWriteError as e:
        print(f"sb3_safe_save: {e}", file=sys.stderr)


def _forget_writer() -> None:
    """In a forked child the parent's writer thread does not exist: the parent waits for its own checkpoint."""
    global _writer
    _writer = _Writer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer)
