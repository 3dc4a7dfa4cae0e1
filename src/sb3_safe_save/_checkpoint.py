"""Checkpoints for resuming: everything a run needs to continue exactly, written atomically as one directory.

A checkpoint directory holds

* ``model.safetensors``: the model, its random state and (if the env has one) the VecNormalize statistics;
* ``replay_buffer.safetensors``: the replay buffer of an off-policy algorithm;
* ``checkpoint.json``: the files, ``num_timesteps`` and the callbacks' counters.

``save_checkpoint`` writes into a hidden temporary directory beside the target and renames it into
place, so a reader sees the old checkpoint or the new one, never a mix. ``ResumeCheckpointCallback``
takes one periodically and keeps the last ``keep_last``. With ``blocking=False`` the training thread
only stages a copy and one background thread writes the directory the same way (``_background``).
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import Field, StrictFloat, StrictInt, ValidationError
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import GymEnv

from sb3_safe_save import _background, _weights
from sb3_safe_save._errors import FormatError, StateMismatchError
from sb3_safe_save._manifest import _Model, items_field, list_field

SelfAlgo = TypeVar("SelfAlgo", bound=BaseAlgorithm)
MODEL_FILE = "model.safetensors"
BUFFER_FILE = "replay_buffer.safetensors"
INDEX_FILE = "checkpoint.json"


class CallbackState(_Model):
    """A callback's counters: its class name and its int and float attributes that are not settings.

    Settings are attributes named like a parameter of the callback's ``__init__`` (``save_freq``,
    ``eval_freq``, ``verbose``): the callback given at resume keeps its own.
    """

    type: str = Field(max_length=500)
    counters: dict[str, StrictInt | StrictFloat] = items_field(max_length=1000)


class CheckpointIndex(_Model):
    """``checkpoint.json``."""

    format: Literal["sb3_safe_save.checkpoint"] = "sb3_safe_save.checkpoint"
    version: Literal[1] = 1
    num_timesteps: int = Field(ge=0)
    replay_buffer: bool
    callbacks: list[CallbackState] = list_field(default_factory=list, max_length=1000)


# =============================================================================================== save
def save_checkpoint(
    model: BaseAlgorithm,
    path: str | os.PathLike[str],
    *,
    callbacks: Sequence[BaseCallback] = (),
    replay_buffer: bool = True,
    vec_normalize: bool = True,
    blocking: bool = True,
) -> pathlib.Path:
    """Write everything a resume needs into the directory ``path``, atomically.

    With ``blocking=False`` the checkpoint is staged (its tensors and the replay buffer's filled rows
    copied into memory kept for the next checkpoints) and written by a background thread; training may
    go on at once. At most one checkpoint is in flight: the next ``save_checkpoint``, ``wait_for_checkpoint()``
    and process exit wait for it. A failed background write raises ``CheckpointWriteError`` from the
    next of these. Until the write has finished, ``path`` is the previous checkpoint of that name, or nothing.

    :param model: the model (its class must come from ``safe()`` or use ``SafeSaveMixin``)
    :param path: the checkpoint directory; an existing one is replaced as a whole
    :param callbacks: callbacks whose counters to store (``n_calls``, ``best_mean_reward``, ...)
    :param replay_buffer: store the replay buffer of an off-policy model
    :param vec_normalize: store the env's VecNormalize statistics, if it has one
    :param blocking: False: return once the checkpoint is staged, write it in the background
    :return: the checkpoint directory (with ``blocking=False``, where it will be once written)
    :raises CheckpointWriteError: the previous checkpoint, written in the background, failed
        (this one is then not taken)
    """
    return _save(model, path, callbacks, replay_buffer, vec_normalize, blocking)


def _save(
    model: BaseAlgorithm,
    path: str | os.PathLike[str],
    callbacks: Sequence[BaseCallback],
    replay_buffer: bool,
    vec_normalize: bool,
    blocking: bool,
    then: Callable[[], None] | None = None,
) -> pathlib.Path:
    """``save_checkpoint``; ``then`` runs once the checkpoint is in place (in the writer thread if not blocking)."""
    from sb3_safe_save._buffers import save_buffer, stage_buffer
    from sb3_safe_save._persist import save_model, stage_model

    _background.wait()  # the previous checkpoint first: it raises its failure here
    target = pathlib.Path(path)
    buffer = getattr(model, "replay_buffer", None) if replay_buffer else None
    index = CheckpointIndex(
        num_timesteps=model.num_timesteps,
        replay_buffer=buffer is not None,
        callbacks=[_callback_state(cb) for cb in callbacks],
    )
    venv = model.get_vec_normalize_env() if vec_normalize else None
    if blocking:

        def write(tmp: pathlib.Path) -> None:
            save_model(model, tmp / MODEL_FILE, vec_normalize=venv)
            if buffer is not None:
                save_buffer(buffer, tmp / BUFFER_FILE)

        _write_directory(target, index, write)
        if then is not None:
            then()
        return target
    files = {MODEL_FILE: stage_model(model, vec_normalize=venv)}
    if buffer is not None:
        files[BUFFER_FILE] = stage_buffer(buffer)
    staged = _background.stager_for(model).stage(files)  # from here on training may change the model

    def write_staged(tmp: pathlib.Path) -> None:
        for name, file in staged.items():
            file.write(tmp / name)

    def job() -> None:
        _write_directory(target, index, write_staged)
        if then is not None:
            then()

    _background.submit(target, job)
    return target


def wait_for_checkpoint() -> pathlib.Path | None:
    """Wait until the checkpoint being written in the background (``blocking=False``) is complete.

    :return: its directory, or None if no checkpoint was in flight
    :raises CheckpointWriteError: its write failed (raised once: by this call or by the next checkpoint)
    """
    return _background.wait()


def _write_directory(target: pathlib.Path, index: CheckpointIndex, write: Callable[[pathlib.Path], None]) -> None:
    """Write the files (``write(tmp)``) and the index into a hidden temporary directory, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        _write_synced(tmp / INDEX_FILE, json.dumps(index.model_dump(), indent=2).encode())  # json: keeps -inf
        _weights._fsync_dir(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _counters(callback: BaseCallback) -> dict[str, int | float]:
    settings = set(inspect.signature(type(callback).__init__).parameters)
    return {k: v for k, v in vars(callback).items() if type(v) in (int, float) and k not in settings}


def _callback_state(callback: BaseCallback) -> CallbackState:
    return CallbackState(type=type(callback).__qualname__, counters=_counters(callback))


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
    os.rename(tmp, target)
    _weights._fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# =============================================================================================== load
def load_checkpoint(
    cls: type[SelfAlgo],
    path: str | os.PathLike[str],
    env: GymEnv | None = None,
    *,
    callbacks: Sequence[BaseCallback] = (),
    **load_kwargs: Any,
) -> SelfAlgo:
    """Load a checkpoint written by ``save_checkpoint``: model, random state, replay buffer, VecNormalize, counters.

    To continue a run exactly, pass the env the run was using with ``force_reset=False`` and go on
    with ``model.learn(remaining_steps, reset_num_timesteps=False, callback=callbacks)``.

    :param cls: the algorithm class (from ``safe()`` or using ``SafeSaveMixin``)
    :param path: the checkpoint directory
    :param env: the environment to continue on (its VecNormalize, if stored, is restored)
    :param callbacks: the same callbacks, in the same order, as given to ``save_checkpoint``;
        their stored counters are put back
    :param load_kwargs: passed on to ``cls.load`` (``device``, ``force_reset``, ``resources``, ``trusted`` ...)
    :return: the loaded model
    """
    directory = pathlib.Path(path)
    index = _read_index(directory)
    if len(callbacks) != len(index.callbacks):
        raise StateMismatchError(
            f"{directory / INDEX_FILE}: the checkpoint stores {len(index.callbacks)} callbacks"
            f" ({[c.type for c in index.callbacks]}), {len(callbacks)} were given; pass the same callbacks in the same order"
        )
    updates = [_callback_updates(cb, stored, i) for i, (cb, stored) in enumerate(zip(callbacks, index.callbacks, strict=True))]
    model: Any = cls.load(directory / MODEL_FILE, env=env, **load_kwargs)
    if index.replay_buffer:
        model.load_replay_buffer(directory / BUFFER_FILE, truncate_last_traj=False)
    for callback, values in zip(callbacks, updates, strict=True):
        for name, value in values.items():
            setattr(callback, name, value)
    return model  # type: ignore[no-any-return]


def _read_index(directory: pathlib.Path) -> CheckpointIndex:
    try:
        text = (directory / INDEX_FILE).read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{directory} is not a checkpoint directory: it has no {INDEX_FILE}") from None
    if len(text) > 1 << 20:
        raise FormatError(f"{directory / INDEX_FILE} is {len(text)} bytes; a checkpoint index is a few KB")
    try:
        return CheckpointIndex.model_validate(json.loads(text))
    except (ValueError, RecursionError) as e:  # ValidationError is a ValueError
        if not isinstance(e, ValidationError):
            raise FormatError(f"{directory / INDEX_FILE} is not valid JSON: {e}") from None
        raise FormatError(
            f"{directory / INDEX_FILE} is malformed: {e.error_count()} error(s), first: {e.errors()[0]['msg']}"
        ) from None


def _callback_updates(callback: BaseCallback, stored: CallbackState, i: int) -> dict[str, Any]:
    """The counters to set on ``callback``: only ones it has as counters itself."""
    if type(callback).__qualname__ != stored.type:
        raise StateMismatchError(
            f"callbacks[{i}]: the checkpoint stores a {stored.type}, a {type(callback).__qualname__} was given"
        )
    own = _counters(callback)
    return {name: value for name, value in stored.counters.items() if name in own}


# ============================================================================================= callback
class ResumeCheckpointCallback(BaseCallback):
    """Take a resume checkpoint (``save_checkpoint``) every ``save_freq`` steps and keep the last ``keep_last``.

    Checkpoints are taken at the start of a rollout, where the previous update has finished and no
    partial rollout is pending, into ``save_path/{name_prefix}_{num_timesteps}_steps``.

    With ``blocking=False`` each checkpoint is staged in the training thread and written in the
    background (``save_checkpoint(..., blocking=False)``); old checkpoints are deleted only once the new
    one is in place. The end of ``learn()`` waits for the last write, so ``learn`` returns with every
    checkpoint on disk, or raises ``CheckpointWriteError``.

    :param save_freq: take a checkpoint once at least this many environment steps (summed over envs)
        passed since the last one
    :param save_path: the directory holding the checkpoints
    :param keep_last: how many checkpoints to keep (older ones are deleted); None keeps all
    :param name_prefix: checkpoint directory name prefix
    :param callbacks: other callbacks whose counters to store with each checkpoint
    :param save_replay_buffer: store the replay buffer of an off-policy model
    :param save_vecnormalize: store the VecNormalize statistics
    :param verbose: 1 prints a line per checkpoint
    :param blocking: False: write each checkpoint in the background while training goes on
    """

    def __init__(
        self,
        save_freq: int,
        save_path: str | os.PathLike[str],
        keep_last: int | None = 3,
        name_prefix: str = "checkpoint",
        callbacks: Sequence[BaseCallback] = (),
        save_replay_buffer: bool = True,
        save_vecnormalize: bool = True,
        verbose: int = 0,
        blocking: bool = True,
    ) -> None:
        super().__init__(verbose)
        if save_freq < 1 or (keep_last is not None and keep_last < 1):
            raise ValueError(f"save_freq ({save_freq}) and keep_last ({keep_last}) must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name_prefix):
            raise ValueError(f"name_prefix {name_prefix!r} must be 1-100 letters, digits, '_', '.' or '-'")
        self.save_freq = save_freq
        self.save_path = str(save_path)
        self.keep_last = keep_last
        self.name_prefix = name_prefix
        self.other_callbacks = list(callbacks)
        self.save_replay_buffer = save_replay_buffer
        self.save_vecnormalize = save_vecnormalize
        self.blocking = blocking
        self.last_checkpoint_timesteps = 0

    def _on_rollout_start(self) -> None:
        steps = self.model.num_timesteps
        if steps == 0 or steps - self.last_checkpoint_timesteps < self.save_freq:
            return
        self.last_checkpoint_timesteps = steps
        path = pathlib.Path(self.save_path) / f"{self.name_prefix}_{steps}_steps"
        callbacks = [self, *self.other_callbacks]
        _save(self.model, path, callbacks, self.save_replay_buffer, self.save_vecnormalize, self.blocking, self._rotate)
        if self.verbose >= 1:
            print(f"Saving resume checkpoint to {path}")

    def _rotate(self) -> None:
        if self.keep_last is not None:
            for old in list_checkpoints(self.save_path, self.name_prefix)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if not self.blocking:
            self.wait()

    def wait(self) -> pathlib.Path | None:
        """Wait for the checkpoint being written in the background (``wait_for_checkpoint()``).

        :return: its directory, or None if none was in flight
        :raises CheckpointWriteError: its write failed
        """
        return wait_for_checkpoint()


def list_checkpoints(save_path: str | os.PathLike[str], name_prefix: str = "checkpoint") -> list[pathlib.Path]:
    """The complete checkpoints in ``save_path``, oldest first (by step count).

    :param save_path: the directory given to ``ResumeCheckpointCallback``
    :param name_prefix: its ``name_prefix``
    :return: checkpoint directories; ``[-1]`` is the latest
    """
    pattern = re.compile(re.escape(name_prefix) + r"_(\d{1,20})_steps")
    root = pathlib.Path(save_path)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and (entry / INDEX_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]
