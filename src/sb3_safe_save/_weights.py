"""The container: one safetensors file, written atomically, read with checks.

Layout (the standard safetensors layout, readable by ``safetensors.safe_open``)::

    u64 little-endian N | N bytes of JSON header, space padded to 8 bytes | tensor bytes

The header maps each tensor key to ``{"dtype", "shape", "data_offsets"}`` and carries
``__metadata__`` (str -> str), where the manifest and its checksum live.

Why not ``safetensors.torch.save_file``/``load_file``: ``save_file`` first turns every tensor into a
Python ``bytes`` object (a second copy of all weights in memory), does not fsync and cannot hash as it
goes; ``load_file`` returns new tensors that must then be copied into the model. Here the writer streams
each tensor's own memory to disk and the reader reads bytes straight into the destination tensor, so
peak memory stays near one copy of the weights. The format is the same; ``tests/test_weights.py``
checks both directions against the safetensors library.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import mmap
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

import xxhash

from sb3_safe_save._errors import FormatError, IntegrityError, LoadSourceIsADirectoryError, LoadSourceNotFoundError
from sb3_safe_save._manifest import check_encodable

if TYPE_CHECKING:
    import numpy as np
    import torch as th

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_ALIGN = 8

SUFFIX = ".safetensors"
#: Suffixes of the formats SB3 itself writes (its zip, its pickles): our files never carry them.
SB3_SUFFIXES = (".zip", ".pkl")


def saved_name(name: str) -> str:
    """The name a save writes to: files are named for what they are.

    A name without a suffix, or with one of SB3's (``rl_model_N_steps.zip``, ``..._replay_buffer.pkl``,
    as SB3's callbacks pass them), gets ``.safetensors``; any other name is kept.
    """
    stem, ext = os.path.splitext(name)
    if not ext:
        return name + SUFFIX
    return stem + SUFFIX if ext.lower() in SB3_SUFFIXES else name


def find_file(path: str | os.PathLike[str]) -> Path:
    """The local file a load reads: ``path`` itself, else the file a save of ``path`` would have written.

    So ``load("runs/ppo")`` and ``load("runs/ppo.zip")`` find ``runs/ppo.safetensors`` (what
    ``save("runs/ppo")`` or ``save("runs/ppo.zip")`` wrote) when the name itself is not a file.

    :raises LoadSourceNotFoundError: neither exists (the message names both, and a stock SB3 zip beside them)
    :raises LoadSourceIsADirectoryError: ``path`` is a directory (a checkpoint folder?) and no file is beside it
    """
    target = Path(path)
    if target.is_file():
        return target
    ours = Path(saved_name(str(target)))
    if ours != target and ours.is_file():  # also past a folder of the same name ("best_model", as SB3's docs make)
        return ours
    if target.is_dir():
        raise LoadSourceIsADirectoryError(
            errno.EISDIR,
            f"{target} is a directory, not a saved file. A checkpoint folder (save_checkpoint, ResumeCheckpointCallback)"
            " is loaded with sb3_safe_save.load_checkpoint(folder, Algo, env=...); otherwise name the file inside it",
            str(target),
        )
    if target.exists():
        return target  # not a regular file: open() says what it is
    also = f" (nor {ours}, which save({str(target)!r}) would write)" if ours != target else ""
    stock = next((z for z in (target.with_name(target.name + ".zip"), target.with_suffix(".zip")) if z.is_file()), None)
    if stock is not None and stock != target:
        also += (
            f"; {stock} is there, a stock SB3 zip: read it without running its pickles with load('{stock}', stock=True),"
            f" or convert it once: sb3-safe-save convert {stock} {ours}"
        )
    raise LoadSourceNotFoundError(errno.ENOENT, f"No such file: {target}{also}", str(target))


#: safetensors dtype name -> (the torch dtype's name in ``torch``, bytes per element); reading a header needs no torch
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
#: safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {name: size for name, (_, size) in _DTYPES.items()}


@functools.cache
def _torch_dtypes() -> dict[str, th.dtype]:
    import torch

    return {name: getattr(torch, attr) for name, (attr, _) in _DTYPES.items()}


def torch_dtype(name: str) -> th.dtype:
    """The torch dtype of a safetensors dtype name (one that ``read_header`` accepted)."""
    return _torch_dtypes()[name]


@functools.cache
def _st_names() -> dict[th.dtype, str]:
    return {dtype: name for name, dtype in _torch_dtypes().items()}


def st_dtype(dtype: th.dtype) -> str:
    """The safetensors name of a torch dtype, or ``FormatError`` if safetensors cannot store it."""
    try:
        return _st_names()[dtype]
    except KeyError:
        raise FormatError(f"tensors of dtype {dtype} cannot be stored in safetensors") from None


class Writable(Protocol):
    """A binary file object opened for writing (``open(..., "wb")``, ``io.BytesIO``, ...)."""

    def write(self, data: Any, /) -> int | None: ...


class SeekableWritable(Writable, Protocol):
    """A ``Writable`` that can go back to its header (a file, ``io.BytesIO``)."""

    def tell(self) -> int: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...


@dataclass(frozen=True)
class Blob:
    """One tensor ready to write: its bytes as a flat uint8 array plus dtype and shape."""

    data: np.ndarray  # 1-D uint8 view of C-contiguous CPU memory
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def to_blob(value: th.Tensor | np.ndarray) -> Blob:
    """View a tensor or array as bytes without copying (unless it is not contiguous or not on the CPU)."""
    import numpy as np
    import torch as th

    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value).reshape(value.shape)  # ascontiguousarray makes 0-d arrays 1-d
        if not array.flags.writeable:  # torch warns on read-only arrays (e.g. pickled bytes); copy them
            array = array.copy()
        tensor = th.from_numpy(array)
    else:
        tensor = value.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    flat = tensor.reshape(-1).view(th.uint8) if tensor.numel() else th.empty(0, dtype=th.uint8)
    return Blob(data=flat.numpy(), dtype=st_dtype(tensor.dtype), shape=tuple(tensor.shape))


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
        raise FormatError("safetensors stores little-endian bytes; this big-endian machine is not supported")


def checksum(buf: Any) -> str:
    """XXH3-128 of a buffer, as 32 hex digits (a fast corruption check, not a signature)."""
    return xxhash.xxh3_128_hexdigest(buf)


# -------------------------------------------------------------------------------------------- write
def _header_bytes(blobs: Mapping[str, Blob], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, blob in blobs.items():
        header[key] = {"dtype": blob.dtype, "shape": list(blob.shape), "data_offsets": [offset, offset + blob.nbytes]}
        offset += blob.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    if len(raw) > MAX_HEADER_BYTES:
        raise FormatError(f"the header would be {len(raw)} bytes, over the safetensors limit of {MAX_HEADER_BYTES}")
    return raw


def write_atomic(path: Path, blobs: Mapping[str, Blob], metadata: Metadata, *, fsync: bool = True) -> None:
    """Write ``blobs`` and ``metadata`` to ``path`` atomically.

    The bytes go to a temporary file in the target directory, which is flushed, fsynced and then
    renamed over ``path`` (``os.replace``); the directory is fsynced last. Until the rename the old
    file is untouched, so an exception or a kill at any moment leaves either the old or the new file.
    The header is written last, from the checksums of the bytes written (``_write``), so the file
    renamed into place always matches its checksums, even if the tensors changed while it was written.
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        _chmod_like_open(fd, path)
        with os.fdopen(fd, "wb", buffering=0) as f:
            _write(f, blobs, metadata)
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(directory)


def _chmod_like_open(fd: int, path: Path) -> None:
    """mkstemp creates files as 0600: give the new file the mode ``open(path, "wb")`` would have left.

    That is the current file's mode when replacing one, else 0666 minus the umask.
    """
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    with contextlib.suppress(OSError, NotImplementedError):  # e.g. Windows, or file systems without modes
        os.fchmod(fd, mode)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:  # elsewhere os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_umask_lock = threading.Lock()


def write_stream(f: Writable, blobs: Mapping[str, Blob], metadata: Metadata) -> None:
    """Write to an open binary file object (no atomicity: the caller owns the stream).

    A stream that cannot seek back to its header (a pipe, a socket) gets the file built in memory first
    (``file_bytes``: one copy of the file); a seekable one is written as a local file is (``_write``).
    """
    seekable = getattr(f, "seekable", None)
    if callable(seekable) and seekable():
        _write(cast(SeekableWritable, f), blobs, metadata)
    else:
        with memoryview(file_bytes(blobs, metadata)) as data:
            _write_all(f, data)


def _write(f: SeekableWritable, blobs: Mapping[str, Blob], metadata: Metadata) -> None:
    """Write the file to a seekable ``f``: a header of the final length, the tensors through ``_copy_out``, the header.

    The checksums in the header are those of the bytes written, computed as they are written: a tensor
    that training changes meanwhile cannot make the file fail its own checks.
    """
    _check_byteorder()
    make = _metadata_function(metadata)
    draft = _header_bytes(blobs, make({key: _NO_CHECKSUM for key in blobs}))
    start = f.tell()
    _write_all(f, memoryview(struct.pack("<Q", len(draft)) + draft))  # a stand-in of the final header's length
    buffer = bytearray(max(1, min(STAGE, max((b.nbytes for b in blobs.values()), default=0))))
    with memoryview(buffer) as stage:
        sums = {key: _copy_out(blob, stage, functools.partial(_write_all, f)) for key, blob in blobs.items()}
    header = _final_header(blobs, make(sums), len(draft))
    end = f.tell()
    f.seek(start + 8)
    _write_all(f, memoryview(header))
    f.seek(end)


def file_bytes(blobs: Mapping[str, Blob], metadata: Metadata) -> bytearray:
    """The bytes ``write_stream`` writes, in one preallocated buffer (a single copy of the file).

    Each tensor is copied into the buffer first and its checksum computed from the copy.
    """
    _check_byteorder()
    make = _metadata_function(metadata)
    size = len(_header_bytes(blobs, make({key: _NO_CHECKSUM for key in blobs})))
    out = bytearray(8 + size + sum(b.nbytes for b in blobs.values()))
    with memoryview(out) as view:
        pos = 8 + size
        sums = {}
        for key, blob in blobs.items():
            n = blob.nbytes
            view[pos : pos + n] = _bytes_of(blob)
            sums[key] = checksum(view[pos : pos + n])
            pos += n
        view[:8] = struct.pack("<Q", size)
        view[8 : 8 + size] = _final_header(blobs, make(sums), size)
    return out


#: The bytes of a tensor copied, hashed and written at a time (``_copy_out``): the only extra memory a save needs
STAGE = 256 << 10
#: The checksum written in the stand-in header (``_write``): the real ones have the same length
_NO_CHECKSUM = "0" * 32

#: ``__metadata__`` of a file: the entries themselves, or the function that makes them from each
#: tensor's XXH3-128 (of the bytes written, ``_write``), for headers that record the checksums
Metadata = Mapping[str, str] | Callable[[Mapping[str, str]], Mapping[str, str]]


def _metadata_function(metadata: Metadata) -> Callable[[Mapping[str, str]], Mapping[str, str]]:
    if callable(metadata):
        return metadata
    return lambda _sums: metadata


def _bytes_of(blob: Blob) -> memoryview:
    return blob.data.data.cast("B")


def _copy_out(blob: Blob, stage: memoryview, write: Callable[[memoryview], None]) -> str:
    """Copy ``blob`` piece by piece into ``stage``, hash each piece there, ``write`` it; return the XXH3-128 written."""
    source = _bytes_of(blob)
    h = xxhash.xxh3_128()
    for lo in range(0, source.nbytes, stage.nbytes):
        piece = stage[: min(stage.nbytes, source.nbytes - lo)]
        piece[:] = source[lo : lo + piece.nbytes]
        h.update(piece)
        write(piece)
    return h.hexdigest()


def _final_header(blobs: Mapping[str, Blob], metadata: Mapping[str, str], size: int) -> bytes:
    header = _header_bytes(blobs, metadata)
    if len(header) != size:  # pragma: no cover - checksums are fixed-length hex; a guard against a future header field
        raise RuntimeError(f"internal error: the header changed length ({size} -> {len(header)} bytes) once checksummed")
    return header


def _write_all(f: Writable, view: memoryview) -> None:
    while view.nbytes:
        n = f.write(view)
        if n is None:  # pragma: no cover - non-blocking files only
            raise OSError("short write")
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- read
@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    body_start: int
    file_size: int


def read_header(f: IO[bytes], file_size: int) -> Header:
    """Read and check the safetensors header of an open file. Reads only the header bytes.

    Raises ``FormatError`` for anything that is not a well-formed safetensors header: a length
    that does not fit the file, bad JSON, unknown dtypes, sizes that disagree with shapes, or data
    offsets that leave holes, overlap or run past the end.
    """
    if file_size < 8:
        raise FormatError(f"the file is {file_size} bytes long; a safetensors file starts with an 8-byte header length")
    (n,) = struct.unpack("<Q", _read_exact(f, 8))
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise FormatError(
            f"the header length field says {n} bytes but the file has {file_size - 8} bytes after it"
            f" (limit {MAX_HEADER_BYTES}); this is not a safetensors file or it is truncated"
        )
    raw = _read_exact(f, n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"the safetensors header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError("the safetensors header is not a JSON object")
    if b"\\u" in raw:  # escapes may spell lone surrogates, which no later encode or print survives
        check_encodable(header, "the safetensors header")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("the safetensors __metadata__ must map strings to strings")
    body_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _tensor_info(key, entry, body_start)
    expected = 0
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start - body_start != expected:
            raise FormatError(
                f"tensor {key!r}: data offsets leave a hole or overlap"
                f" (starts at {info.start - body_start}, expected {expected})"
            )
        expected = info.end - body_start
    if body_start + expected != file_size:
        raise IntegrityError(
            f"the tensors end at byte {body_start + expected} but the file has {file_size} bytes;"
            " the file is truncated or has trailing data"
        )
    return Header(metadata=metadata, tensors=tensors, body_start=body_start, file_size=file_size)


def checked_metadata(header: Header, key: str, checksum_key: str, what: str) -> str | None:
    """The ``__metadata__`` entry ``key`` after checking it against its XXH3 checksum entry (None if absent).

    :param what: what the entry holds, for the messages ("the manifest", "the replay-buffer header")
    :raises FormatError: the entry has no checksum entry (it was not written by sb3_safe_save)
    :raises IntegrityError: the checksum does not match (the header is corrupted)
    """
    text = header.metadata.get(key)
    if text is None:
        return None
    expected = header.metadata.get(checksum_key)
    if expected is None:
        raise FormatError(f"this safetensors file has {what} but no checksum for it: it was not written by sb3_safe_save")
    if checksum(text.encode()) != expected:
        raise IntegrityError(f"{what} does not match its checksum: the header is corrupted")
    return text


def _tensor_info(key: str, entry: Any, body_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"tensor {key!r}: header entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"tensor {key!r}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= 64 and all(type(d) is int and 0 <= d < 2**48 for d in shape)):
        raise FormatError(f"tensor {key!r}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise FormatError(f"tensor {key!r}: data_offsets must be two non-negative integers, got {offsets!r}")
    start, end = offsets
    nbytes = DTYPE_SIZES[dtype] * math.prod(shape)
    if end - start != nbytes:
        raise FormatError(f"tensor {key!r}: {dtype} {shape} needs {nbytes} bytes but its data offsets span {end - start}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=body_start + start, end=body_start + end)


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IntegrityError(f"unexpected end of file: wanted {n} bytes, got {len(data)}")
    return data


class Body:
    """Reads tensor bytes from an open file into caller-provided memory, checking each checksum.

    :param f: the open file (binary, unbuffered is best)
    :param header: its parsed header
    :param checksums: expected XXH3-128 per tensor key (from the manifest)
    :param verify: compare checksums (on by default; off only for speed on trusted storage)
    """

    def __init__(self, f: IO[bytes], header: Header, checksums: Mapping[str, str], *, verify: bool = True) -> None:
        _check_byteorder()
        self._f = f
        self._header = header
        self._checksums = checksums
        self._verify = verify
        self.read_keys: set[str] = set()
        self._staging: list[th.Tensor | None] = [None, None]  # two host buffers for device-bound tensors
        self._copied: list[Any] = [None, None]  # the CUDA event of the last copy out of each buffer
        self._slot = 0

    def info(self, key: str) -> TensorInfo:
        try:
            return self._header.tensors[key]
        except KeyError:
            raise FormatError(f"the manifest refers to tensor {key!r}, which the file does not contain") from None

    def _check(self, key: str, found: str) -> None:
        expected = self._checksums.get(key)
        if expected is None:
            raise FormatError(f"tensor {key!r} has no checksum in the file's header; it was not written by sb3_safe_save")
        if found != expected:
            raise IntegrityError(
                f"tensor {key!r}: checksum mismatch (expected xxh3 {expected}, found {found}); the file is corrupted"
            )

    def verify(self, keys: Iterable[str], chunk: int = 1 << 22) -> None:
        """Check the checksums of tensors ``keys`` without keeping their bytes (memory: one ``chunk``).

        Lets an in-place load (``set_parameters``) refuse a corrupted file before it touches the model.
        """
        if not self._verify:
            return
        buf = bytearray(chunk)
        view = memoryview(buf)
        for key in keys:
            info = self.info(key)
            h = xxhash.xxh3_128()
            self._f.seek(info.start)
            left = info.nbytes
            while left:
                n = self._f.readinto(view[: min(left, chunk)])  # type: ignore[attr-defined]
                if not n:
                    raise IntegrityError(f"tensor {key!r}: unexpected end of file, {left} bytes short")
                h.update(view[:n])
                left -= n
            self._check(key, h.hexdigest())

    def read_into(self, key: str, dest: np.ndarray) -> None:
        """Fill ``dest`` (a writable, C-contiguous byte array of the right size) with tensor ``key``.

        Bytes go straight from the file into ``dest``, with no huge-page hint: on kernels where THP is
        ``madvise`` with ``defrag=madvise``, ``MADV_HUGEPAGE`` made first-touch page faults stall on
        compaction, up to 5x the whole load at 100M parameters (``benchmarks/SCALE.md``, issue 16).
        From a local file, a tensor of ``PARALLEL_MIN`` bytes or more is read in ``CHUNK``-sized pieces
        by ``read_workers()`` threads while this thread hashes the pieces in order (``_read_parallel``):
        the cost of a large load is first-touch page faults, which then run on every core.
        """
        info = self.info(key)
        view = dest.data.cast("B")
        if view.nbytes != info.nbytes:
            raise FormatError(f"tensor {key!r}: stored as {info.nbytes} bytes but the destination holds {view.nbytes}")
        workers = read_workers()
        if isinstance(self._f, io.FileIO) and info.nbytes >= PARALLEL_MIN and workers > 1:
            found = _read_parallel(self._f.fileno(), info.start, view, key, workers, verify=self._verify)
        else:
            self._f.seek(info.start)
            got = 0
            while got < info.nbytes:
                n = self._f.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:
                    raise IntegrityError(f"tensor {key!r}: unexpected end of file after {got} of {info.nbytes} bytes")
                got += n
            found = checksum(view) if self._verify else None
        if found is not None:
            self._check(key, found)
        self.read_keys.add(key)

    def read_tensor(self, key: str) -> th.Tensor:
        """A new CPU tensor holding tensor ``key``."""
        import torch as th

        info = self.info(key)
        out = th.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            self.read_into(key, out.reshape(-1).view(th.uint8).numpy())
        else:
            self.read_keys.add(key)
        return out

    def read_into_tensor(self, key: str, dest: th.Tensor) -> None:
        """Copy tensor ``key`` into the existing tensor ``dest`` (same dtype and shape), in place.

        CPU destinations are filled straight from the file; CUDA ones through ``_read_staged``.
        """
        import torch as th

        info = self.info(key)
        if dest.dtype != torch_dtype(info.dtype) or tuple(dest.shape) != info.shape:
            raise FormatError(
                f"tensor {key!r}: stored as {info.dtype} {list(info.shape)} but the model has {dest.dtype} {list(dest.shape)}"
            )
        direct = dest.is_contiguous() and dest.numel() > 0  # else through a new CPU tensor
        with th.no_grad():
            if direct and staged(dest.device):
                self._read_staged(key, info, dest)
            elif direct and dest.device.type == "cpu":
                self.read_into(key, dest.detach().reshape(-1).view(th.uint8).numpy())
            else:
                dest.copy_(self.read_tensor(key))

    def _read_staged(self, key: str, info: TensorInfo, dest: th.Tensor) -> None:
        """Read into one of two pinned host buffers, check the checksum there, start an asynchronous copy.

        The next tensor is read into the other buffer while this copy runs; a buffer is reused only
        after the copy out of it has finished (its CUDA event).
        """
        import torch as th

        slot, self._slot = self._slot, 1 - self._slot
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        buffer = self._staging[slot]
        if buffer is None or buffer.numel() < info.nbytes:
            pin = dest.device.type == "cuda"
            buffer = self._staging[slot] = th.empty(info.nbytes, dtype=th.uint8, pin_memory=pin)
        host = buffer[: info.nbytes]
        self.read_into(key, host.numpy())  # the checksum is checked on the host bytes, before any copy
        dest.detach().view(-1).view(th.uint8).copy_(host, non_blocking=True)
        if dest.device.type == "cuda":
            event = th.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(th.cuda.current_stream(dest.device))
            self._copied[slot] = event

    def finish(self) -> None:
        """Wait until every copy to a device has finished (call once all tensors are read)."""
        for event in self._copied:
            if event is not None:
                event.synchronize()


def staged(device: th.device) -> bool:
    """Whether tensors bound for ``device`` go through pinned staging buffers (CUDA: ``Body._read_staged``)."""
    return device.type == "cuda"


#: numpy asks for transparent huge pages on arrays of this size and more (``_madvise_hugepage``)
NUMPY_HUGE_MIN = 4 << 20


def fresh_zeros(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A zeroed array whose pages are allocated on first touch, like ``np.zeros``, without the huge-page hint.

    ``np.zeros`` of 4 MiB or more calls ``madvise(MADV_HUGEPAGE)``: where THP defrag is ``madvise``, the first
    write to each page can then stall on memory compaction (5.6x the plain read for a 2 GB replay buffer,
    ``benchmarks/SCALE.md``). An anonymous mapping gets the same lazily zeroed pages without asking.
    """
    import numpy as np

    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes < NUMPY_HUGE_MIN:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


#: Tensors of at least this many bytes are read by several threads (``Body.read_into``); measured with
#: ``benchmarks/deploy.py``: SAC-10M (8 MB layers) went from 1.53x to 1.44x the floor with 8 MiB instead of 32 MiB
PARALLEL_MIN = 8 << 20
#: The piece each thread reads at a time, and the unit hashed in order behind them
CHUNK = 4 << 20


def read_workers() -> int:
    """Threads for one large tensor: the cores this process may run on, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores) if hasattr(os, "preadv") else 1


def _pread_exact(fd: int, view: memoryview, offset: int, key: str, at: int) -> None:
    got = 0
    while got < view.nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            raise IntegrityError(f"tensor {key!r}: unexpected end of file after {at + got} bytes of the tensor")
        got += n


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _reader_pool(workers: int) -> ThreadPoolExecutor:
    """The process's reader threads: started on first use and kept (starting two threads per tensor cost ms)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="sb3_safe_save-read"))
        return _pool[1]


def _forget_pool() -> None:
    """In a forked child the parent's threads do not exist: start new ones when needed."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _read_parallel(fd: int, start: int, view: memoryview, key: str, workers: int, *, verify: bool) -> str | None:
    """Read ``view.nbytes`` bytes at file offset ``start`` into ``view`` with ``workers`` threads.

    The pieces are hashed in file order as they arrive, so the XXH3 is the one of the whole tensor.
    Every thread has stopped writing into ``view`` before this returns or raises.
    """
    h = xxhash.xxh3_128() if verify else None
    offsets = range(0, view.nbytes, CHUNK)
    pool = _reader_pool(workers)
    futures: list[Future[None]] = [pool.submit(_pread_exact, fd, view[lo : lo + CHUNK], start + lo, key, lo) for lo in offsets]
    try:
        for lo, future in zip(offsets, futures, strict=True):
            future.result()
            if h is not None:
                h.update(view[lo : lo + CHUNK])
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)  # the pieces already being read finish before this raises
        raise
    return None if h is None else h.hexdigest()


def iter_chunks(f: IO[bytes], size: int = 1 << 22) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(size):
        yield chunk


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a whole file, as hex: the hash to publish next to a model and pin at load."""
    with open(path, "rb", buffering=0) as f:
        return sha256_of(f)


def sha256_of(f: IO[bytes]) -> str:
    """SHA-256 of an open file's whole content, read from the start in chunks."""
    h = hashlib.sha256()
    for chunk in iter_chunks(f):
        h.update(chunk)
    return h.hexdigest()
