"""Helpers to read and rewrite the raw safetensors header of a file (for tests that forge files)."""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._weights import checksum


def read_raw(path: pathlib.Path) -> tuple[dict[str, Any], bytes]:
    """The header as a JSON object, and the body bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: pathlib.Path, header: dict[str, Any], body: bytes, pad: bool = True) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_manifest(path: pathlib.Path, out: pathlib.Path, edit: Any, *, fix_checksum: bool = True) -> None:
    """Copy ``path`` to ``out`` with ``edit(manifest_dict)`` applied (and a matching checksum)."""
    header, body = read_raw(path)
    manifest = json.loads(header["__metadata__"][META_MANIFEST])
    edit(manifest)
    text = json.dumps(manifest)
    header["__metadata__"][META_MANIFEST] = text
    if fix_checksum:
        header["__metadata__"][META_CHECKSUM] = checksum(text.encode())
    write_raw(out, header, body)
