"""Replay buffers in safetensors: only the filled rows, streamed, no pickle.

SB3's ``save_replay_buffer`` pickles the whole buffer at full capacity (28 GB for 1e6 Atari frames,
however few were collected) and ``load_replay_buffer`` unpickles it. Here:

* **save** writes the filled rows only (``[:pos]``, or everything once ``full``), plus ``pos``,
  ``full``, the settings, and for ``HerReplayBuffer`` its episode bookkeeping (``ep_start``,
  ``ep_length``, ``_current_ep_start``). Each tensor is a view of the buffer's own memory
  (``arr[:n]`` of a C-contiguous array is contiguous), written straight to the file: no copy, so
  peak memory stays near the size of the buffer itself.
* **load** fills the model's own buffer: fresh zeroed arrays of the model's shapes (the pages stay
  unallocated until written), the stored rows read straight into them. The buffer class, size,
  ``n_envs`` and ``optimize_memory_usage`` must match the model's.
* with ``optimize_memory_usage`` the next observation of row ``pos - 1`` lives at row ``pos``, so one
  extra observation row is kept while the buffer is not full.
* ``HerReplayBuffer.infos`` is not stored: SB3 only reads it with ``copy_info_dict=True`` (arbitrary
  objects), which is refused with a clear error.

Files are recognised by content, not by suffix. SB3's ``CheckpointCallback`` asks for
``..._replay_buffer_N_steps.pkl``; the file is written as ``..._replay_buffer_N_steps.safetensors``
(named for what it is), and loading the ``.pkl`` name finds it. SB3's pickled buffers are read by the
restricted reader of stock files (``_stock.read_buffer``: nothing in them runs), or with ``allow_pickle=True``
by SB3's own loader.
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch as th
from pydantic import Field, ValidationError
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.her.goal_selection_strategy import GoalSelectionStrategy
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from sb3_safe_save import _remote, _weights
from sb3_safe_save._errors import FormatError, StateMismatchError, UnsupportedObjectError
from sb3_safe_save._manifest import TensorMeta, Versions, _Model, _short, items_field, list_field, load_json
from sb3_safe_save._trust import ref_of

if TYPE_CHECKING:
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

    from sb3_safe_save._persist import StagedFile

META_BUFFER = "sb3_safe_save.replay_buffer"
META_BUFFER_CHECKSUM = "sb3_safe_save.replay_buffer.xxh3_128"
_PER_ROW = ("actions", "rewards", "dones", "timeouts")
_HER_ROWS = ("ep_start", "ep_length")


class HerState(_Model):
    n_sampled_goal: int
    her_ratio: float
    goal_selection_strategy: int
    copy_info_dict: bool


class ReplayBufferFile(_Model):
    """The header of a replay-buffer file (tensors: ``observations[/key]``, ``actions``, ...)."""

    format: Literal["sb3_safe_save.replay_buffer"] = "sb3_safe_save.replay_buffer"
    format_version: Literal[1] = 1
    versions: Versions
    buffer_class: str
    buffer_size: int = Field(ge=1)
    n_envs: int = Field(ge=1)
    pos: int = Field(ge=0)
    full: bool
    optimize_memory_usage: bool
    handle_timeout_termination: bool
    obs_keys: list[str] | None = list_field(default=None, max_length=1000)
    her: HerState | None = None
    tensors: dict[str, TensorMeta] = items_field(max_length=1000)

    @property
    def rows(self) -> int:
        return self.buffer_size if self.full else self.pos


# ---------------------------------------------------------------------------------------------- save
def _arrays(buffer: ReplayBuffer, rows: int) -> dict[str, np.ndarray]:
    """Views (no copies) of the filled rows of every array the file stores."""
    obs_rows = rows + 1 if buffer.optimize_memory_usage and not buffer.full else rows
    out: dict[str, np.ndarray] = {}
    for name in ("observations", "next_observations"):
        if name == "next_observations" and buffer.optimize_memory_usage:
            continue
        value: Any = getattr(buffer, name)
        n = obs_rows if name == "observations" else rows
        if isinstance(value, dict):
            out.update({f"{name}/{k}": v[:n] for k, v in value.items()})
        else:
            out[name] = value[:n]
    out.update({name: getattr(buffer, name)[:rows] for name in _PER_ROW})
    if isinstance(buffer, HerReplayBuffer):
        out.update({name: getattr(buffer, name)[:rows] for name in _HER_ROWS})
        out["_current_ep_start"] = buffer._current_ep_start
    return out


def save_buffer(buffer: ReplayBuffer, path: str | os.PathLike[str] | io.BufferedIOBase, *, fsync: bool = True) -> None:
    """Write the filled part of ``buffer`` to one safetensors file (atomic for paths). See the module docstring."""
    stage_buffer(buffer).write(path, fsync=fsync)  # creates folders, as SB3's save_to_pkl does


def stage_buffer(buffer: ReplayBuffer) -> StagedFile:
    """What ``save_buffer`` writes, not yet written: views of the filled rows, the header's values.

    ``capacity`` gives each array's full size, so a stager can keep one copy for every later checkpoint.
    """
    from sb3_safe_save._persist import StagedFile, current_versions, header_metadata  # local: keeps import cheap

    if not isinstance(buffer, ReplayBuffer):
        raise UnsupportedObjectError(
            [("replay_buffer", f"{type(buffer).__module__}.{type(buffer).__qualname__}", "not a ReplayBuffer")]
        )
    her = None
    if isinstance(buffer, HerReplayBuffer):
        if buffer.copy_info_dict:
            raise UnsupportedObjectError(
                [
                    (
                        "replay_buffer.infos",
                        "numpy object array",
                        "HerReplayBuffer(copy_info_dict=True) keeps arbitrary info dicts",
                    )
                ]
            )
        her = HerState(
            n_sampled_goal=buffer.n_sampled_goal,
            her_ratio=buffer.her_ratio,
            goal_selection_strategy=int(buffer.goal_selection_strategy.value),
            copy_info_dict=buffer.copy_info_dict,
        )
    rows = buffer.buffer_size if buffer.full else buffer.pos
    blobs = {key: _weights.to_blob(value) for key, value in _arrays(buffer, rows).items()}
    header = ReplayBufferFile(
        versions=current_versions(),
        buffer_class=ref_of(type(buffer)),
        buffer_size=buffer.buffer_size,
        n_envs=buffer.n_envs,
        pos=buffer.pos,
        full=buffer.full,
        optimize_memory_usage=buffer.optimize_memory_usage,
        handle_timeout_termination=buffer.handle_timeout_termination,
        obs_keys=list(buffer.observations) if isinstance(buffer, DictReplayBuffer) else None,
        her=her,
        tensors={},
    )
    metadata = header_metadata(header, blobs, META_BUFFER, META_BUFFER_CHECKSUM)
    return StagedFile(blobs, metadata, {key: _get(buffer, key).nbytes for key in blobs})


# ---------------------------------------------------------------------------------------------- load
def is_pickle(path: str | os.PathLike[str] | io.BufferedIOBase) -> bool:
    """True for a pickle (protocol 2+ starts with ``0x80``) that is not a safetensors file (u64 length, then ``{``)."""
    from sb3_safe_save._file import _open

    with _open(_existing(path)) as (f, size):
        head = f.read(9)
        f.seek(0)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return False
    return head[:1] == b"\x80"


def _existing(path: Any) -> Any:
    if isinstance(path, (str, os.PathLike)) and not _remote.is_url(path):
        target = pathlib.Path(_remote.local(path))
        for candidate in (target, pathlib.Path(_weights.saved_name(str(target))), target.with_suffix(".pkl")):
            if candidate.exists():
                return candidate
    return path


def read_buffer_header(path: str | os.PathLike[str] | io.BufferedIOBase) -> ReplayBufferFile:
    """The header of a replay-buffer file (settings, ``pos``, tensor table); reads no rows."""
    from sb3_safe_save._file import _open

    with _open(_existing(path)) as (f, size):
        return _parse(_weights.read_header(f, size))


_SETTINGS = ("buffer_size", "n_envs", "optimize_memory_usage")


def buffer_for(model: OffPolicyAlgorithm, meta: ReplayBufferFile) -> ReplayBuffer:
    """The buffer a load fills: the model's own if its settings match the file's, else a new one built
    from the file's settings, as SB3's ``load_replay_buffer`` replaces the model's buffer by the file's.

    The new buffer is of the model's ``replay_buffer_class`` (nothing named in the file is imported),
    built the way SB3's ``_setup_model`` builds it, with the file's ``buffer_size``, ``n_envs`` and
    ``optimize_memory_usage``.
    """
    buffer: ReplayBuffer | None = getattr(model, "replay_buffer", None)
    if buffer is not None and all(getattr(buffer, name) == getattr(meta, name) for name in _SETTINGS):
        return buffer
    buffer_class = getattr(model, "replay_buffer_class", None)
    if buffer_class is None:
        raise StateMismatchError(
            f"{type(model).__qualname__} has no replay buffer class (only off-policy algorithms have one)"
        )
    if ref_of(buffer_class) != meta.buffer_class:
        raise StateMismatchError(
            f"the file holds a {meta.buffer_class}, but the model's replay_buffer_class is a {ref_of(buffer_class)}"
        )
    kwargs = dict(model.replay_buffer_kwargs)
    if issubclass(buffer_class, HerReplayBuffer):
        if model.env is None:
            raise StateMismatchError("loading a HerReplayBuffer needs an env: Algo.load(path, env=env) or model.set_env(env)")
        kwargs["env"] = model.env
    try:
        built: ReplayBuffer = buffer_class(
            meta.buffer_size,
            model.observation_space,
            model.action_space,
            device=model.device,
            n_envs=meta.n_envs,
            optimize_memory_usage=meta.optimize_memory_usage,
            **kwargs,
        )
    except (MemoryError, ValueError) as e:  # a file that claims a buffer of 10**12 rows
        raise StateMismatchError(
            f"a replay buffer of buffer_size={meta.buffer_size}, n_envs={meta.n_envs} (as the file says)"
            f" cannot be built: {type(e).__name__}: {e}"
        ) from None
    return built


def load_buffer_into(buffer: ReplayBuffer, path: str | os.PathLike[str] | io.BufferedIOBase, *, verify: bool = True) -> None:
    """Fill ``buffer`` (the model's own) with a file written by ``save_buffer``. See the module docstring."""
    from sb3_safe_save._file import _open

    with _open(_existing(path)) as (f, size):
        header = _weights.read_header(f, size)
        meta = _parse(header)
        _check_fits(buffer, meta)
        body = _weights.Body(f, header, {k: m.xxh3 for k, m in meta.tensors.items()}, verify=verify)
        expected = set(_arrays(buffer, 0))
        if set(meta.tensors) != expected:
            raise FormatError(f"the replay-buffer file has tensors {sorted(meta.tensors)}, expected {sorted(expected)}")
        fresh: dict[str, np.ndarray] = {}
        for key in sorted(expected):
            current = _get(buffer, key)
            info = body.info(key)
            if info.shape[1:] != current.shape[1:] or info.shape[0] > current.shape[0]:
                raise StateMismatchError(
                    f"replay buffer {key!r}: the file has shape {list(info.shape)}, the model's buffer {list(current.shape)}"
                )
            if info.dtype != _weights.st_dtype(th.from_numpy(current[:0]).dtype):
                raise StateMismatchError(
                    f"replay buffer {key!r}: the file has {info.dtype}, the model's buffer {current.dtype}"
                )
            array = _weights.fresh_zeros(current.shape, current.dtype)  # rows past the stored ones stay unallocated
            if info.nbytes:
                body.read_into(key, array[: info.shape[0]])
            else:
                body.read_keys.add(key)
            fresh[key] = array
    strategy = _check_her(buffer, meta, fresh)
    # every read and check passed: now replace the arrays
    for key, array in fresh.items():
        _set(buffer, key, array)
    buffer.pos, buffer.full = meta.pos, meta.full
    buffer.handle_timeout_termination = meta.handle_timeout_termination
    if isinstance(buffer, HerReplayBuffer) and meta.her is not None and strategy is not None:
        buffer.n_sampled_goal = meta.her.n_sampled_goal
        buffer.her_ratio = meta.her.her_ratio
        buffer.goal_selection_strategy = strategy
        buffer.infos = np.array([[{} for _ in range(buffer.n_envs)] for _ in range(buffer.buffer_size)])


def _check_her(buffer: ReplayBuffer, meta: ReplayBufferFile, fresh: dict[str, np.ndarray]) -> GoalSelectionStrategy | None:
    """Check HerReplayBuffer settings and episode bookkeeping before anything is replaced (all or nothing).

    Episode starts and lengths index the buffer when SB3 samples or truncates: out-of-range values
    would load and then fail (or sample wrong transitions) later.
    """
    if not isinstance(buffer, HerReplayBuffer):
        return None
    her = meta.her
    if her is None or her.copy_info_dict or her.n_sampled_goal < 0 or not 0.0 <= her.her_ratio <= 1.0:
        raise FormatError("the replay-buffer file has no valid HerReplayBuffer settings (her)")
    if her.goal_selection_strategy not in {s.value for s in GoalSelectionStrategy}:
        raise FormatError(f"the replay-buffer file has an unknown goal selection strategy {her.goal_selection_strategy}")
    strategy = GoalSelectionStrategy(her.goal_selection_strategy)
    size, rows = buffer.buffer_size, meta.rows
    starts, lengths, current = fresh["ep_start"][:rows], fresh["ep_length"][:rows], fresh["_current_ep_start"]
    if (
        current.shape != (buffer.n_envs,)
        or ((starts < 0) | (starts >= size)).any()
        or ((lengths < 0) | (lengths > size)).any()
        or ((current < 0) | (current >= size)).any()
    ):
        raise FormatError(
            f"the replay-buffer file's episode bookkeeping (ep_start, ep_length, _current_ep_start) is out of range"
            f" for a buffer of {size} rows"
        )
    problem = _episodes_problem(starts, lengths, current, meta.pos, meta.full, size)
    if problem is not None:
        raise FormatError(f"the replay-buffer file's episode bookkeeping is inconsistent: {problem}")
    return strategy


def _episodes_problem(
    starts: np.ndarray, lengths: np.ndarray, current: np.ndarray, pos: int, full: bool, size: int
) -> str | None:
    """What HerReplayBuffer's ``add``/``sample`` would trip over in (in-range) episode bookkeeping, per row and env.

    As ``add`` and ``_compute_episode_length`` write it: a finished episode (``ep_length > 0``) is a run
    of stored rows from its ``ep_start`` (wrapping only once full), each row holding the same start and
    length; the running episode's rows, from ``_current_ep_start`` up to ``pos``, hold that start and
    length 0. Otherwise ``sample`` draws goals outside the episode, or fails (``randint(low >= high)``).
    """
    rows = np.arange(len(starts))[:, None]
    finished = lengths > 0
    offset = (rows - starts) % size  # the row's place in its episode
    if (finished & (offset >= lengths)).any():
        return "ep_length is positive at a row that lies outside its episode (ep_start .. ep_start + ep_length - 1)"
    if not full and (finished & (starts + lengths > pos)).any():
        return f"an episode runs past pos={pos}, into rows never written"
    for shift, inside in ((1, offset > 0), (-1, offset < lengths - 1)):  # the row before / after, in the same episode
        same = (np.roll(starts, shift, axis=0) == starts) & (np.roll(lengths, shift, axis=0) == lengths)
        if (finished & inside & ~same).any():
            return "consecutive rows of one episode disagree on its ep_start or ep_length"
    if not full and (current > pos).any():
        return f"_current_ep_start {current.tolist()} lies beyond pos={pos}"
    running = (rows - current) % size < (pos - current) % size
    if (running & ((starts != current) | finished)).any():
        return "a row of the running episode (_current_ep_start .. pos - 1) has another ep_start or a positive ep_length"
    return None


def _parse(header: _weights.Header) -> ReplayBufferFile:
    text = _weights.checked_metadata(header, META_BUFFER, META_BUFFER_CHECKSUM, "the replay-buffer header")
    if text is None:
        raise FormatError(
            "this file holds no replay buffer (no sb3_safe_save.replay_buffer header);"
            " write one with model.save_replay_buffer(path)"
        )
    raw = load_json(text, "the replay-buffer header")
    try:
        meta = ReplayBufferFile.model_validate(raw)
    except ValidationError as e:
        raise FormatError(f"the replay-buffer header is malformed: {_short(e)}") from None
    if meta.pos >= meta.buffer_size or set(meta.tensors) != set(header.tensors):
        raise FormatError("the replay-buffer header is inconsistent (pos beyond buffer_size, or tensors not as listed)")
    for key, m in meta.tensors.items():
        info = header.tensors[key]
        if m.dtype != info.dtype or tuple(m.shape) != info.shape:
            raise FormatError(
                f"replay buffer {key!r}: the header says {m.dtype} {m.shape},"
                f" the safetensors entry {info.dtype} {list(info.shape)}"
            )
        rows = meta.rows + (1 if key.startswith("observations") and meta.optimize_memory_usage and not meta.full else 0)
        if key != "_current_ep_start" and info.shape[:1] != (rows,):
            raise FormatError(
                f"replay buffer {key!r} has {info.shape[:1]} rows; pos={meta.pos}, full={meta.full} means {rows}"
            )
    return meta


def _check_fits(buffer: ReplayBuffer, meta: ReplayBufferFile) -> None:
    found = ref_of(type(buffer))
    if found != meta.buffer_class:
        raise StateMismatchError(f"the file holds a {meta.buffer_class}, but the model's replay buffer is a {found}")
    for name in ("buffer_size", "n_envs", "optimize_memory_usage"):
        if getattr(buffer, name) != getattr(meta, name):
            raise StateMismatchError(
                f"replay buffer {name}: the file has {getattr(meta, name)}, the model's buffer {getattr(buffer, name)};"
                f" create or load the model with the same {name} (e.g. Algo.load(path, {name}=...))"
            )
    keys = list(buffer.observations) if isinstance(buffer, DictReplayBuffer) else None
    if keys != meta.obs_keys:
        raise StateMismatchError(f"replay buffer observation keys: the file has {meta.obs_keys}, the model's buffer {keys}")


def _get(buffer: ReplayBuffer, key: str) -> np.ndarray:
    name, _, sub = key.partition("/")
    value = getattr(buffer, name)
    return value[sub] if sub else value  # type: ignore[no-any-return]


def _set(buffer: ReplayBuffer, key: str, array: np.ndarray) -> None:
    name, _, sub = key.partition("/")
    if sub:
        getattr(buffer, name)[sub] = array
    else:
        setattr(buffer, name, array)
