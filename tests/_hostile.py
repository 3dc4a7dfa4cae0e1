"""Helpers for the hostile-input tests: tiny saved agents (cached per process) and file surgery.

``edit_manifest`` is how the security tests forge files: it takes the bytes of a real saved agent,
lets a function edit the manifest JSON, recomputes the manifest checksum and writes the header back
with the tensor body unchanged, so the file passes the checksum and reaches the deeper validation.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from collections.abc import Callable
from typing import Any

from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3

from sb3_safe_save import safe
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._weights import checksum, read_header

ALGOS = {"A2C": A2C, "PPO": PPO, "DQN": DQN, "SAC": SAC, "TD3": TD3, "DDPG": DDPG}
ENVS = {
    "A2C": "CartPole-v1",
    "PPO": "CartPole-v1",
    "DQN": "CartPole-v1",
    "SAC": "Pendulum-v1",
    "TD3": "Pendulum-v1",
    "DDPG": "Pendulum-v1",
}


def tiny_kwargs(name: str) -> dict[str, Any]:
    """Default arguments except for sizes: a 16-unit network, a small buffer, learning after 32 steps."""
    kwargs: dict[str, Any] = {"policy_kwargs": {"net_arch": [16]}, "seed": 0}
    if name in ("DQN", "SAC", "TD3", "DDPG"):
        kwargs.update(buffer_size=500, learning_starts=32)
    if name == "DQN":
        kwargs.update(target_update_interval=16)
    if name == "PPO":
        kwargs.update(n_steps=32, batch_size=16, n_epochs=1)
    if name == "A2C":
        kwargs.update(n_steps=8)
    return kwargs


def tiny_model(name: str, steps: int = 64) -> Any:
    model = safe(ALGOS[name])("MlpPolicy", ENVS[name], **tiny_kwargs(name))
    model.learn(steps)
    return model


@functools.cache
def saved_bytes(name: str) -> bytes:
    """The bytes of a tiny trained agent of algorithm ``name``, saved once per test process."""
    buf = io.BytesIO()
    tiny_model(name).save(buf)
    return buf.getvalue()


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header JSON as a dict, tensor body)`` of a well-formed file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def manifest_of(data: bytes) -> dict[str, Any]:
    header = read_header(io.BytesIO(data), len(data))
    return json.loads(header.metadata[META_MANIFEST])  # type: ignore[no-any-return]


def with_manifest_text(data: bytes, text: str, *, fix_checksum: bool = True) -> bytes:
    """Replace the manifest JSON text, recompute its checksum (unless told not to), keep the body."""
    header, body = split(data)
    header["__metadata__"][META_MANIFEST] = text
    if fix_checksum:
        header["__metadata__"][META_CHECKSUM] = checksum(text.encode())
    return join(header, body)


def edit_manifest(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """Apply ``edit`` to the parsed manifest (in place, or return a replacement) and re-seal the file."""
    manifest = manifest_of(data)
    result = edit(manifest)
    if result is not None:
        manifest = result
    return with_manifest_text(data, json.dumps(manifest))


def drop_tensors(data: bytes, drop: set[str]) -> bytes:
    """Remove tensors from the safetensors header and body (offsets recomputed), as a forger would."""
    header, body = split(data)
    out: dict[str, Any] = {"__metadata__": header["__metadata__"]}
    chunks, offset = [], 0
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    for key, entry in entries:
        if key in drop:
            continue
        start, end = entry["data_offsets"]
        chunks.append(body[start:end])
        out[key] = {**entry, "data_offsets": [offset, offset + end - start]}
        offset += end - start
    return join(out, b"".join(chunks))
