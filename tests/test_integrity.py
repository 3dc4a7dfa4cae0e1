"""Integrity: damaged or foreign files raise IntegrityError/FormatError, pinning works, saves are atomic.

Also the property test: hypothesis mutates bytes, headers and manifests of real saved agents, and
only ``SafeSaveError`` subclasses (or a successful load) may come out, each load within a time bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save
from stable_baselines3 import DQN, PPO

from _hostile import ALGOS, join, manifest_of, saved_bytes, split, tiny_model, with_manifest_text
from sb3_safe_save import FormatError, IntegrityError, SafeSaveError, UnsupportedObjectError, _weights, file_sha256, safe
from sb3_safe_save._manifest import FORMAT_VERSION

LOAD_SECONDS = 10.0  # a generous bound per load; typical loads of these files take ~30 ms


def _load(name: str, data: bytes, **kwargs: Any) -> Any:
    return safe(ALGOS[name]).load(io.BytesIO(data), **kwargs)


def _expect_refused(name: str, data: bytes, **kwargs: Any) -> SafeSaveError:
    """Load must raise IntegrityError or FormatError, quickly, and leave torch's init functions intact."""
    init_before = th.nn.init.orthogonal_
    start = time.monotonic()
    with pytest.raises((IntegrityError, FormatError)) as info:
        _load(name, data, **kwargs)
    assert time.monotonic() - start < LOAD_SECONDS
    assert th.nn.init.orthogonal_ is init_before, "a failed load left weight initialisation switched off"
    return info.value


# ------------------------------------------------------------------------------------ damaged files
def test_every_truncation_is_refused() -> None:
    data = saved_bytes("PPO")
    (n,) = struct.unpack("<Q", data[:8])
    cuts = {0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1, *range(0, len(data), 151)}
    for cut in sorted(c for c in cuts if c < len(data)):
        _expect_refused("PPO", data[:cut])


def test_trailing_data_is_refused() -> None:
    err = _expect_refused("PPO", saved_bytes("PPO") + b"\0" * 8)
    assert isinstance(err, IntegrityError) and "trailing" in str(err)


def test_bit_flips_in_the_body_are_integrity_errors() -> None:
    data = saved_bytes("DQN")
    (n,) = struct.unpack("<Q", data[:8])
    body_start = 8 + n
    for offset in range(body_start, len(data), 97):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            err = _expect_refused("DQN", bytes(flipped))
            assert isinstance(err, IntegrityError), (offset, err)
            assert "checksum" in str(err)


def test_bit_flips_in_the_header_are_refused() -> None:
    data = saved_bytes("DQN")
    (n,) = struct.unpack("<Q", data[:8])
    for offset in [*range(8), *range(8, 8 + n, 37)]:
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        if data[offset : offset + 1] == b" " and offset > 8 + n - 8:  # padding: changing a space may stay valid JSON
            continue
        _expect_refused("DQN", bytes(flipped))


def test_manifest_edit_without_checksum_fix_is_an_integrity_error() -> None:
    data = saved_bytes("DQN")
    text = json.dumps(manifest_of(data)).replace('"gamma": 0.99', '"gamma": 0.5')
    err = _expect_refused("DQN", with_manifest_text(data, text, fix_checksum=False))
    assert isinstance(err, IntegrityError) and "manifest" in str(err)


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data", "{}")
    return buf.getvalue()


WRONG_FORMATS = {
    "empty": b"",
    "short": b"\x01\x02",
    "zip": _zip_bytes(),
    "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    "json text": b'{"format": "sb3_safe_save"}\n',
    "huge header length": struct.pack("<Q", 2**63) + b"{}",
    "header length past the end": struct.pack("<Q", 100) + b"{}      ",
    "header not an object": struct.pack("<Q", 8) + b"[1,2]   ",
    "header not UTF-8": struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc    ",
    "metadata not strings": struct.pack("<Q", 24) + b'{"__metadata__":{"a":1}}',
    "plain safetensors": st_save({"w": np.zeros(3, np.float32)}),
    "safetensors with other metadata": st_save({"w": np.zeros(3, np.float32)}, metadata={"format": "pt"}),
    "bad dtype": join({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "shape disagrees": join({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlapping tensors": join(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "huge shape": join({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative offsets": join({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8),
    "extra entry fields": join({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8),
    "manifest not JSON": join(
        {"__metadata__": {"sb3_safe_save": "{", "sb3_safe_save.xxh3_128": _weights.checksum(b"{")}}, b""
    ),
    "manifest of another format": join(
        {"__metadata__": {"sb3_safe_save": "[]", "sb3_safe_save.xxh3_128": _weights.checksum(b"[]")}}, b""
    ),
}


@pytest.mark.parametrize("data", list(WRONG_FORMATS.values()), ids=list(WRONG_FORMATS))
def test_wrong_format_files_are_refused(data: bytes) -> None:
    _expect_refused("DQN", data)


def test_future_format_version_is_refused() -> None:
    from sb3_safe_save import UnsupportedVersionError

    data = saved_bytes("DQN")
    text = json.dumps({**manifest_of(data), "format_version": FORMAT_VERSION + 1})
    with pytest.raises(UnsupportedVersionError, match="upgrade"):
        _load("DQN", with_manifest_text(data, text))


def test_tensor_table_mismatch_between_header_and_manifest() -> None:
    data = saved_bytes("DQN")
    manifest = manifest_of(data)
    key = next(iter(manifest["tensors"]))
    manifest["tensors"][key]["shape"] = [*manifest["tensors"][key]["shape"], 1]
    _expect_refused("DQN", with_manifest_text(data, json.dumps(manifest)))
    del manifest["tensors"][key]
    _expect_refused("DQN", with_manifest_text(data, json.dumps(manifest)))


def test_failed_loads_return_no_model_and_restore_init(tmp_path: Path) -> None:
    """A checksum failure deep in phase 3 (after the model object exists) still returns nothing."""
    data = bytearray(saved_bytes("PPO"))
    data[-1] ^= 0xFF  # the last tensor: read after the policy has been built
    err = _expect_refused("PPO", bytes(data))
    assert isinstance(err, IntegrityError)


# ------------------------------------------------------------------------------ pinning and verify
def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(saved_bytes("DQN"))
    assert file_sha256(path) == hashlib.sha256(saved_bytes("DQN")).hexdigest()
    big = tmp_path / "big.bin"  # spans several read chunks
    big.write_bytes(os.urandom(9 << 20))
    assert file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()


def test_expected_sha256_pins_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(saved_bytes("DQN"))
    digest = file_sha256(path)
    safe(DQN).load(path, expected_sha256=digest)
    safe(DQN).load(path, expected_sha256=digest.upper())
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(IntegrityError, match="SHA-256") as info:
        safe(DQN).load(path, expected_sha256=wrong)
    assert digest in str(info.value) and wrong in str(info.value)
    # pinning catches edits that re-seal every internal checksum
    manifest = manifest_of(saved_bytes("DQN"))
    manifest["data"]["gamma"] = 0.5
    path.write_bytes(with_manifest_text(saved_bytes("DQN"), json.dumps(manifest)))
    assert safe(DQN).load(path).gamma == 0.5
    with pytest.raises(IntegrityError, match="SHA-256"):
        safe(DQN).load(path, expected_sha256=digest)


def test_verify_false_skips_tensor_checksums() -> None:
    data = bytearray(saved_bytes("DQN"))
    manifest = manifest_of(bytes(data))
    (n,) = struct.unpack("<Q", data[:8])
    header, _ = split(bytes(data))
    key = "policy/q_net.q_net.0.weight"
    start = 8 + n + header[key]["data_offsets"][0]
    data[start + 3] ^= 0x40  # a high exponent bit of the first weight
    with pytest.raises(IntegrityError, match="checksum"):
        _load("DQN", bytes(data))
    loaded = _load("DQN", bytes(data), verify=False)
    original = _load("DQN", saved_bytes("DQN"))
    w, w0 = loaded.policy.q_net.q_net[0].weight, original.policy.q_net.q_net[0].weight
    assert not th.equal(w, w0) and th.equal(w.flatten()[1:], w0.flatten()[1:])
    assert manifest["tensors"][key]["xxh3"] != _weights.checksum(bytes(data[start : 8 + n + header[key]["data_offsets"][1]]))


# ------------------------------------------------------------------------------- property tests
FILES = ("PPO", "DQN", "SAC")
# CI runs a fixed set of 2,000 cases; SB3SS_FUZZ_EXAMPLES=20000 SB3SS_FUZZ_RANDOM=1 explores further.
_SCALE = int(os.environ.get("SB3SS_FUZZ_EXAMPLES", "2000")) / 2000
FUZZ = settings(
    max_examples=max(1, int(500 * _SCALE)),
    deadline=timedelta(seconds=LOAD_SECONDS),
    derandomize=not os.environ.get("SB3SS_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True, scope="module")
def _saved_files() -> None:
    """Save the fuzzed agents before any timed example runs."""
    for name in FILES:
        saved_bytes(name)


def _fuzz_load(name: str, data: bytes) -> None:
    """The property: a load either succeeds or raises a SafeSaveError subclass, within the bound."""
    start = time.monotonic()
    with warnings.catch_warnings():  # warnings are not exceptions in production; SB3 warns about odd values
        warnings.simplefilter("ignore")
        try:
            _load(name, data)
        except SafeSaveError:
            pass
    assert time.monotonic() - start < LOAD_SECONDS


@FUZZ
@given(name=st.sampled_from(FILES), data=st.data())
def test_fuzz_raw_bytes(name: str, data: st.DataObject) -> None:
    """Flip, overwrite, insert and delete bytes anywhere; truncate; splice two files together."""
    raw = bytearray(saved_bytes(name))
    (n,) = struct.unpack("<Q", raw[:8])
    # half the positions in the first 8 + n bytes (length + header), where parsing decides
    position = st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(raw) - 1))
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]), label="op")
        at = min(data.draw(position, label="at"), len(raw) - 1)
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set":
            raw[at] = data.draw(st.sampled_from([0, 0x20, 0x22, 0x30, 0x5B, 0x7B, 0x7D, 0xFF]), label="byte")
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif op == "delete":
            del raw[at : at + data.draw(st.integers(1, 64), label="count")]
        elif op == "truncate":
            del raw[at:]
        else:
            other = saved_bytes(data.draw(st.sampled_from(FILES), label="other"))
            cut = data.draw(st.integers(0, len(other)), label="cut")
            raw = raw[:at] + other[cut:]
        if not raw:
            break
    _fuzz_load(name, bytes(raw))


def _json_values() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**12), 2**12),
        st.sampled_from([-1, 0, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(STRINGS),
        st.text(max_size=8),
        st.lists(st.integers(-3, 100), max_size=3),
        st.just({}),
    )


STRINGS = [
    "", "x", "__class__", "__dict__", "policy.__dict__", "a.b", "a[0]", "../x",
    "list", "tuple", "dict", "deque", "float", "ref", "ndarray", "np_scalar", "tensor", "device", "torch_dtype",
    "np_dtype", "space", "object", "enum", "namedtuple", "placeholder", "pickle", "module", "optimizer",
    "Box", "Discrete", "MultiDiscrete", "MultiBinary", "Dict", "Tuple",
    "<f4", "<f8", "<i8", "|b1", "|O", "<U4", ">f4", "F32", "I64", "BOOL", "bfloat16", "float32", "cpu", "cuda:7", "meta",
    "os:system", "subprocess:Popen", "builtins:eval", "numpy:float32", "numpy:load",
    "stable_baselines3.common.utils:ConstantSchedule", "stable_baselines3.common.utils:get_linear_fn",
    "stable_baselines3.common.torch_layers:FlattenExtractor", "stable_baselines3.dqn.policies:DQNPolicy",
    "stable_baselines3.common.type_aliases:TrainFreq", "stable_baselines3.common.type_aliases:TrainFrequencyUnit",
    "torch.nn.modules.activation:ReLU", "torch.optim.adam:Adam", "gymnasium.spaces.box:Box",
    "stable_baselines3.ppo.ppo:PPO", "stable_baselines3.dqn.dqn:DQN", "0" * 32, "nan", "inf", "-inf",
]  # fmt: skip


def _same_type(value: Any, strings: list[str]) -> st.SearchStrategy[Any]:
    """Another value of the same JSON type: nearby and extreme numbers, strings seen in the manifests."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(
            st.integers(-3, 3), st.integers(value - 2, value + 2), st.sampled_from([2**12, 2**31, 2**63, -(2**63) - 1])
        )
    if isinstance(value, float):
        return st.one_of(st.floats(), st.sampled_from([0.0, -1.0, 1e308]))
    if isinstance(value, str):
        return st.sampled_from(strings)
    if isinstance(value, list):
        return st.just(value[:-1]) if value else st.just([0])
    return st.just({} if isinstance(value, dict) else value)


def _locations(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in a JSON tree."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_locations(v, (*path, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_locations(v, (*path, i)))
    return out


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


@settings(FUZZ, max_examples=max(1, int(1000 * _SCALE)))
@given(name=st.sampled_from(FILES), data=st.data())
def test_fuzz_manifest(name: str, data: st.DataObject) -> None:
    """Mutate the manifest's JSON values and keys, then re-seal its checksum to reach deep validation."""
    original = saved_bytes(name)
    manifest = manifest_of(original)
    strings = sorted({v for loc in _locations(manifest) if isinstance(v := _get(manifest, loc), str)} | set(STRINGS))
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="seed"))  # uniform: sampled_from favours the first items
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = rnd.choice(_locations(manifest)[1:])
        parent, last = _get(manifest, path[:-1]), path[-1]
        op = data.draw(st.sampled_from(["same_type"] * 4 + ["value", "splice", "delete", "rename", "add"]), label="op")
        if op == "same_type":  # keeps the schema valid more often, so validation beyond pydantic is reached
            parent[last] = data.draw(_same_type(parent[last], strings), label="value")
        elif op == "value":
            parent[last] = data.draw(_json_values(), label="value")
        elif op == "splice":  # a subtree from elsewhere, possibly from another algorithm's file
            source = manifest_of(saved_bytes(data.draw(st.sampled_from(FILES), label="from")))
            parent[last] = json.loads(json.dumps(_get(source, data.draw(st.sampled_from(_locations(source)), label="sub"))))
        elif op == "delete":
            del parent[last]
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(STRINGS), label="key")] = parent.pop(last)
        elif op == "add":
            target = _get(manifest, path)
            if isinstance(target, dict):
                target[data.draw(st.sampled_from(STRINGS), label="key")] = data.draw(_json_values(), label="value")
            elif isinstance(target, list):
                target.append(data.draw(_json_values(), label="value"))
    try:
        text = json.dumps(manifest)
    except ValueError:  # only for ints json.dumps itself cannot write
        return
    _fuzz_load(name, with_manifest_text(original, text))


@FUZZ
@given(name=st.sampled_from(FILES), data=st.data())
def test_fuzz_safetensors_header(name: str, data: st.DataObject) -> None:
    """Mutate the safetensors header table (dtypes, shapes, offsets, keys) and the manifest checksum field."""
    header, body = split(saved_bytes(name))
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(keys), label="key")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "drop", "meta"]), label="field")
        if key not in header:
            continue
        if field == "dtype":
            header[key]["dtype"] = data.draw(st.sampled_from(["F32", "F64", "I64", "U8", "BOOL", "F16", "OBJ", ""]), label="v")
        elif field == "shape":
            header[key]["shape"] = data.draw(st.lists(st.integers(-1, 2**40), max_size=3), label="v")
        elif field == "data_offsets":
            header[key]["data_offsets"] = data.draw(
                st.lists(st.integers(-1, len(body) + 8), min_size=2, max_size=2), label="v"
            )
        elif field == "rename":
            header[data.draw(st.sampled_from(STRINGS), label="new")] = header.pop(key)
        elif field == "drop":
            del header[key]
        else:
            meta = header["__metadata__"]
            meta["sb3_safe_save.xxh3_128"] = data.draw(st.sampled_from(["", "0" * 32, meta["sb3_safe_save.xxh3_128"].upper()]))
    _fuzz_load(name, join(header, body))


# ------------------------------------------------------------------------------------ atomic saves
def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_exception_during_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    model = tiny_model("DQN", 40)
    model.save(path)
    before = path.read_bytes()

    model.unsupported = lambda x: x  # no codec, pickling not allowed: save fails while walking
    with pytest.raises(UnsupportedObjectError):
        model.save(path)
    assert path.read_bytes() == before and _temp_files(tmp_path) == []
    del model.unsupported

    calls = {"n": 0}
    original = _weights._write_all

    def failing_write(f: Any, view: memoryview) -> None:  # the disk fills up halfway through the body
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        original(f, view)

    monkeypatch.setattr(_weights, "_write_all", failing_write)
    model.num_timesteps += 1
    with pytest.raises(OSError, match="No space"):
        model.save(path)
    assert calls["n"] == 3
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


def test_saved_file_mode_is_what_open_would_give(tmp_path: Path) -> None:
    """The temporary file (created 0600) gets the umask mode, or the mode of the file it replaces."""
    model = tiny_model("DQN", 40)
    path = tmp_path / "model.safetensors"
    model.save(path)
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    path.chmod(0o640)
    model.save(path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_concurrent_saves_leave_one_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    model = tiny_model("PPO", 32)
    snapshots = []
    for i in range(4):  # four distinct versions of the file, one per thread
        model.num_timesteps = 1000 + i
        buf = io.BytesIO()
        model.save(buf)
        snapshots.append(buf.getvalue())
    versions = set(snapshots)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                _weights.write_atomic(path, *_blobs_and_metadata(snapshots[i]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in versions
    assert safe(PPO).load(path).num_timesteps in {1000, 1001, 1002, 1003}
    assert _temp_files(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_concurrent_model_saves_from_threads(tmp_path: Path) -> None:
    """The same through ``model.save`` (the walk included) on independent models."""
    path = tmp_path / "model.safetensors"
    models = [tiny_model("DQN", 40) for _ in range(3)]
    for i, m in enumerate(models):
        m.num_timesteps = 500 + i
    threads = [threading.Thread(target=m.save, args=(path,)) for m in models for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert safe(DQN).load(path).num_timesteps in {500, 501, 502}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _blobs_and_metadata(data: bytes) -> tuple[dict[str, _weights.Blob], dict[str, str]]:
    header = _weights.read_header(io.BytesIO(data), len(data))
    blobs = {}
    for key, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
        raw = np.frombuffer(data[info.start : info.end], dtype=np.uint8).copy()
        blobs[key] = _weights.Blob(data=raw, dtype=info.dtype, shape=info.shape)
    return blobs, header.metadata


SAVER = textwrap.dedent(
    """
    import sys
    from stable_baselines3 import PPO
    from sb3_safe_save import safe

    path = sys.argv[1]
    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs={"net_arch": [512, 512]}, seed=0)
    i = 0
    while True:
        model.num_timesteps = i
        model.save(path)
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.slow
def test_sigkill_during_save_keeps_a_loadable_file(tmp_path: Path) -> None:
    """Kill a process that saves a ~6 MB agent in a loop at random moments; the file always loads and verifies.

    At least three kills, and more (up to sixteen: on a fast, idle machine the write is a small part of a
    save, and eight tries once missed it) until one has landed while a temporary file was being written (a
    stray ``.tmp`` file shows it): SIGKILL leaves that file behind, the target stays whole.
    """
    path = tmp_path / "model.safetensors"
    rng = random.Random(1234)
    mid_write = 0
    for round_ in range(16):
        if round_ >= 3 and mid_write:
            break
        temps_before = set(_temp_files(tmp_path))
        with subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True) as proc:
            try:
                assert proc.stdout is not None
                first = proc.stdout.readline()  # one complete save (the first process also creates the file)
                assert first.strip().isdigit(), first
                save_time = _time_saves(proc)
                time.sleep(rng.uniform(0, 3 * save_time))
                proc.send_signal(signal.SIGKILL)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        mid_write += bool(set(_temp_files(tmp_path)) - temps_before)
        loaded = safe(PPO).load(path, expected_sha256=file_sha256(path))  # every tensor checksum verified too
        assert isinstance(loaded.num_timesteps, int) and loaded.num_timesteps >= 0
        assert path.stat().st_size > 2_000_000
    assert mid_write, "no kill landed during a write; the test did not exercise what it should"


def _time_saves(proc: subprocess.Popen[str]) -> float:
    """Seconds per save, measured over two saves (then the kill lands anywhere within a few saves)."""
    assert proc.stdout is not None
    start = time.monotonic()
    proc.stdout.readline()
    proc.stdout.readline()
    return max((time.monotonic() - start) / 2, 1e-3)
