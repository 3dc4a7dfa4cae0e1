"""Phase 1 of every read: open a saved file (a path, a URL or a file object) and read its header and manifest.

Reading, checking and validating the header imports neither torch nor Stable-Baselines3, so ``read_manifest``,
``sb3-safe-save inspect`` and the first step of ``audit`` and ``load`` stay cheap; what the file names is imported
only later (``_trust``), by the steps that need it.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import IO, Any

from sb3_safe_save import _remote, _weights
from sb3_safe_save._errors import FormatError, IntegrityError
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST, Manifest, parse_manifest

PathLike = str | os.PathLike[str] | io.BufferedIOBase


@contextlib.contextmanager
def _open(path: PathLike) -> Iterator[tuple[IO[bytes], int]]:
    if isinstance(path, (io.BufferedIOBase, io.RawIOBase)):
        f: Any = path
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        yield f, size
        return
    if _remote.is_url(path):
        with _remote.open_read(path) as (f, size):
            yield f, size
        return
    target = _weights.find_file(_remote.local(path))
    with open(target, "rb", buffering=0) as raw:
        yield raw, os.fstat(raw.fileno()).st_size


def read_manifest(path: PathLike) -> Manifest:
    """Read and validate the manifest of a saved agent without building a model or reading tensors.

    :param path: the file, a URL such as ``s3://bucket/key`` (the ``remote`` extra), or a seekable binary file object
    :return: the ``Manifest``
    :raises FormatError: not an sb3_safe_save file, or malformed
    :raises IntegrityError: the header does not match its checksum
    """
    with _open(path) as (f, size):
        return _parse(f, size)[1]


def _parse(f: IO[bytes], size: int) -> tuple[_weights.Header, Manifest]:
    """Phase 1: header + manifest, validated; imports nothing."""
    start = f.read(9)
    f.seek(0)
    name = getattr(f, "name", None)
    name = name if isinstance(name, str) else "the file"
    if size == 0:
        raise FormatError(
            f"{name} is empty (0 bytes): what a save that crashed leaves behind (stock SB3 truncates the file first)."
            " Load an earlier checkpoint; sb3_safe_save's own saves are atomic and never leave an empty file"
        )
    if start[:4] == b"PK\x03\x04":
        ours = _weights.saved_name(name)
        sibling = f" ({ours} next to it is an sb3_safe_save file: load that)" if ours != name and os.path.exists(ours) else ""
        raise FormatError(
            f"{name} is a zip file, probably a stock SB3 save{sibling}. Read it without running its pickles:"
            " Algo.load(path, stock=True), or convert it once: sb3-safe-save convert MODEL.zip OUT.safetensors"
            " (--trust-pickle unpickles it, only for a file the safe reader refuses and whose author you trust)"
        )
    if len(start) < 9 or start[8:9] != b"{":  # a safetensors file starts with its u64 header length, then "{"
        raise FormatError(
            f"{name} is neither a zip file nor an sb3_safe_save file: it wasn't a zip-file (a stock SB3 save)"
            " and it is not a safetensors file (no 8-byte header length followed by a JSON header)"
        )
    header = _weights.read_header(f, size)
    text = _weights.checked_metadata(header, META_MANIFEST, META_CHECKSUM, "the manifest")
    if text is None:
        raise FormatError("this safetensors file has no sb3_safe_save manifest: it was not written by sb3_safe_save")
    manifest = parse_manifest(text)
    if set(manifest.tensors) != set(header.tensors):
        extra = sorted(set(header.tensors) ^ set(manifest.tensors))[:5]
        raise IntegrityError(f"the manifest and the safetensors header list different tensors (e.g. {extra})")
    for key, meta in manifest.tensors.items():
        info = header.tensors[key]
        if meta.dtype != info.dtype or tuple(meta.shape) != info.shape:
            raise IntegrityError(
                f"tensor {key!r}: the manifest says {meta.dtype} {meta.shape}, the header {info.dtype} {list(info.shape)}"
            )
    return header, manifest
