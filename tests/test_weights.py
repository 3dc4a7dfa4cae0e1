"""The container: a standard safetensors file, checked strictly when read."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import struct
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch as th
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from stable_baselines3 import DQN, PPO

import sb3_safe_save
from _stfile import read_raw, write_raw
from sb3_safe_save import FormatError, IntegrityError, SafeSaveError, _weights, safe
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._weights import Body, checksum, read_header, to_blob, write_atomic, write_stream


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, pathlib.Path]:
    model = safe(PPO)(
        "MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, n_epochs=1, policy_kwargs={"net_arch": [8]}, device="cpu"
    )
    model.learn(16)
    path = tmp_path_factory.mktemp("weights") / "ppo.safetensors"
    model.save(path)
    return model, path


# ------------------------------------------------------------------------------------- interop
def test_our_file_is_a_standard_safetensors_file(saved: tuple[Any, pathlib.Path]) -> None:
    model, path = saved
    manifest = sb3_safe_save.read_manifest(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(manifest.tensors)
        state = model.policy.state_dict()
        for key in manifest.tensors:
            t = f.get_tensor(key)
            assert str(list(t.shape)) == str(manifest.tensors[key].shape)
            if key.startswith("policy/"):
                assert th.equal(t, state[key.removeprefix("policy/")]), key
    assert meta["format"] == "pt"
    assert json.loads(meta[META_MANIFEST])["format"] == "sb3_safe_save"
    assert meta[META_CHECKSUM] == checksum(meta[META_MANIFEST].encode())
    # the safetensors loader reads every tensor, with the checksums recorded in the manifest
    loaded = load_file(str(path))
    for key, t in loaded.items():
        assert checksum(t.contiguous().view(-1).view(th.uint8).numpy()) == manifest.tensors[key].xxh3, key


def test_header_is_aligned_and_json(saved: tuple[Any, pathlib.Path]) -> None:
    _, path = saved
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    json.loads(data[8 : 8 + n])


def test_files_written_by_safetensors_parse(tmp_path: pathlib.Path) -> None:
    """Our reader accepts what the reference writer produces (the other direction of interop)."""
    tensors = {
        "f32": th.randn(3, 4),
        "bf16": th.randn(5).to(th.bfloat16),
        "i64": th.arange(7),
        "u8": th.arange(9, dtype=th.uint8),
        "bool": th.tensor([True, False, True]),
        "empty": th.zeros(0, 3),
        "scalar": th.tensor(2.5, dtype=th.float64),
    }
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    with open(path, "rb") as f:
        header = read_header(f, path.stat().st_size)
        assert header.metadata == {"k": "v"}
        assert set(header.tensors) == set(tensors)
        body = Body(f, header, {}, verify=False)
        for key, expected in tensors.items():
            got = body.read_tensor(key)
            assert got.dtype == expected.dtype and got.shape == expected.shape and th.equal(got, expected), key


# ------------------------------------------------------------------------------- dtype round trip
@pytest.mark.parametrize(
    "tensor",
    [
        th.randn(4, 3).to(th.bfloat16),
        th.tensor([[True, False], [False, True]]),
        th.arange(256, dtype=th.uint8).reshape(16, 16),
        th.tensor([-(2**62), 0, 2**62 + 1], dtype=th.int64),
        th.randn(3, dtype=th.float16),
        th.randn(2, 2, dtype=th.float64),
        th.tensor(7, dtype=th.int32),  # 0-d
        th.zeros(0, 5),  # empty
        th.randn(4, 6).t(),  # not contiguous
        th.randn(10)[::3],  # strided view
    ],
    ids=["bf16", "bool", "uint8", "int64", "f16", "f64", "scalar", "empty", "transposed", "strided"],
)
def test_tensor_roundtrip_through_the_container(tensor: th.Tensor, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.safetensors"
    blob = to_blob(tensor)
    write_atomic(path, {"x": blob}, {"m": "1"}, fsync=False)
    with safe_open(str(path), framework="pt") as f:
        ref = f.get_tensor("x")
    assert ref.dtype == tensor.dtype and ref.shape == tensor.shape and th.equal(ref, tensor)
    with open(path, "rb", buffering=0) as f:
        header = read_header(f, path.stat().st_size)
        body = Body(f, header, {"x": checksum(blob.data)})
        got = body.read_tensor("x")
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and th.equal(got, tensor)
        dest = th.empty_like(tensor, memory_format=th.contiguous_format)
        body.read_into_tensor("x", dest)
        assert th.equal(dest, tensor)


def test_tensor_and_array_attributes_roundtrip_through_a_model(tmp_path: pathlib.Path) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, device="cpu")
    model.extra = {  # type: ignore[attr-defined]
        "bf16": th.randn(3, 2).to(th.bfloat16),
        "mask": th.tensor([True, False]),
        "img": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "ids": np.array([1, 2**40], dtype=np.int64),
        "flags": np.array([True, False, True]),
        "f16": np.ones(2, dtype=np.float16),
    }
    model.save(tmp_path / "m")
    extra = safe(DQN).load(tmp_path / "m.safetensors").extra
    assert set(extra) == set(model.extra)  # type: ignore[attr-defined]
    for key, value in model.extra.items():  # type: ignore[attr-defined]
        got = extra[key]
        assert type(got) is type(value), key
        if isinstance(value, th.Tensor):
            assert got.dtype == value.dtype and th.equal(got, value), key
        else:
            assert got.dtype == value.dtype and np.array_equal(got, value), key


def test_unsupported_dtype_is_a_clear_error() -> None:
    with pytest.raises(FormatError, match="complex64"):
        to_blob(th.zeros(2, dtype=th.complex64))


def test_write_stream_equals_write_atomic(tmp_path: pathlib.Path) -> None:
    blobs = {"a": to_blob(th.arange(5)), "b": to_blob(th.ones(2, 2))}
    write_atomic(tmp_path / "x", blobs, {"m": "v"}, fsync=False)
    buf = io.BytesIO()
    write_stream(buf, blobs, {"m": "v"})
    assert buf.getvalue() == (tmp_path / "x").read_bytes()


# ------------------------------------------------------------------------------------ bad headers
def _good() -> tuple[dict[str, Any], bytes]:
    body = np.arange(6, dtype=np.float32).tobytes()
    header = {"__metadata__": {"k": "v"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    return header, body


def _read(path: pathlib.Path) -> Any:
    with open(path, "rb") as f:
        return read_header(f, path.stat().st_size)


def test_good_forged_header_parses(tmp_path: pathlib.Path) -> None:
    header, body = _good()
    write_raw(tmp_path / "ok", header, body)
    assert _read(tmp_path / "ok").tensors["a"].shape == (2, 3)


BAD_HEADERS: dict[str, tuple[Any, type[Exception], str]] = {
    "unknown-dtype": (lambda h: h["a"].update(dtype="F128"), FormatError, "unsupported dtype"),
    "shape-vs-offsets": (lambda h: h["a"].update(shape=[3, 3]), FormatError, "needs 36 bytes"),
    "negative-shape": (lambda h: h["a"].update(shape=[-2, -3]), FormatError, "non-negative"),
    "float-shape": (lambda h: h["a"].update(shape=[2.0, 3]), FormatError, "non-negative integers"),
    "offsets-not-pair": (lambda h: h["a"].update(data_offsets=[0]), FormatError, "two non-negative integers"),
    "extra-field": (lambda h: h["a"].update(extra=1), FormatError, "exactly dtype, shape and data_offsets"),
    "entry-not-dict": (lambda h: h.update(a=[1, 2]), FormatError, "exactly dtype"),
    "metadata-not-str": (lambda h: h["__metadata__"].update(k=1), FormatError, "strings to strings"),
    "hole": (
        lambda h: h.update(
            a={"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, b={"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}
        ),
        FormatError,
        "hole or overlap",
    ),
    "overlap": (
        lambda h: h.update(b={"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}),
        FormatError,
        "hole or overlap",
    ),
    "past-end": (lambda h: h["a"].update(shape=[3, 3], data_offsets=[0, 36]), IntegrityError, "truncated"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_are_rejected(case: str, tmp_path: pathlib.Path) -> None:
    edit, error, needle = BAD_HEADERS[case]
    header, body = _good()
    edit(header)
    write_raw(tmp_path / "bad", header, body)
    with pytest.raises(error, match=needle):
        _read(tmp_path / "bad")


@pytest.mark.parametrize(
    "raw, error, needle",
    [
        (struct.pack("<Q", 10**12) + b"{}", FormatError, "header length"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", FormatError, "UTF-8 JSON"),
        (struct.pack("<Q", 8) + b"[1,2,3] ", FormatError, "not a JSON object"),
        (struct.pack("<Q", 8) + b'{"a":   ', FormatError, "not valid UTF-8 JSON"),
        (b"\x01\x02", FormatError, "8-byte header length"),
        (struct.pack("<Q", 2) + b"{}" + b"trailing", IntegrityError, "trailing data"),
    ],
    ids=["huge-length", "not-utf8", "json-list", "bad-json", "short", "trailing"],
)
def test_malformed_raw_files(raw: bytes, error: type[Exception], needle: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "raw"
    path.write_bytes(raw)
    with pytest.raises(error, match=needle):
        _read(path)
    with pytest.raises(SafeSaveError):
        sb3_safe_save.read_manifest(path)


def test_deeply_nested_header_json(tmp_path: pathlib.Path) -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(FormatError):
        _read(path)


# -------------------------------------------------------------------------------- damaged files
def test_truncated_file(saved: tuple[Any, pathlib.Path], tmp_path: pathlib.Path) -> None:
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 12):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises((FormatError, IntegrityError)):
            safe(PPO).load(bad)


def test_flipped_tensor_byte_is_caught_by_the_checksum(saved: tuple[Any, pathlib.Path], tmp_path: pathlib.Path) -> None:
    model, path = saved
    header, body = read_raw(path)
    key = "policy/action_net.weight"
    start, _ = header[key]["data_offsets"]
    damaged = bytearray(body)
    damaged[start] ^= 0x01
    bad = tmp_path / "flip.safetensors"
    write_raw(bad, header, bytes(damaged), pad=False)
    with pytest.raises(IntegrityError, match=r"action_net\.weight.*checksum"):
        safe(PPO).load(bad)
    # verify=False skips the check (trusted storage): the model loads, with the damaged value
    loaded = safe(PPO).load(bad, verify=False)
    assert not th.equal(loaded.policy.action_net.weight, model.policy.action_net.weight)


def test_header_tensors_must_match_the_manifest(saved: tuple[Any, pathlib.Path], tmp_path: pathlib.Path) -> None:
    _, path = saved
    header, body = read_raw(path)
    header["extra"] = {"dtype": "U8", "shape": [4], "data_offsets": [len(body), len(body) + 4]}
    bad = tmp_path / "extra.safetensors"
    write_raw(bad, header, body + b"\0" * 4)
    with pytest.raises(IntegrityError, match="different tensors"):
        safe(PPO).load(bad)


def test_expected_sha256(saved: tuple[Any, pathlib.Path]) -> None:
    model, path = saved
    digest = sb3_safe_save.file_sha256(path)
    assert safe(PPO).load(path, expected_sha256=digest.upper()).num_timesteps == model.num_timesteps
    with pytest.raises(IntegrityError, match="SHA-256"):
        safe(PPO).load(path, expected_sha256="0" * 64)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.safetensors"
    write_atomic(path, {"a": to_blob(th.ones(3))}, {}, fsync=False)
    before = path.read_bytes()

    class Boom:  # a blob that fails while its bytes are being written, after the header
        dtype, shape, nbytes = "F32", (3,), 12

        @property
        def data(self) -> np.ndarray:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(path, {"a": to_blob(th.ones(3)), "b": Boom()}, {}, fsync=False)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ------------------------------------------------------------------------------ parallel reads
@pytest.fixture
def small_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send tensors of 64 KiB and up through the threaded reader, in 4 KiB pieces, with 3 threads."""
    monkeypatch.setattr(_weights, "PARALLEL_MIN", 1 << 16)
    monkeypatch.setattr(_weights, "CHUNK", 1 << 12)
    monkeypatch.setattr(_weights, "read_workers", lambda: 3)


def _big_file(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, th.Tensor], dict[str, str]]:
    g = th.Generator().manual_seed(0)
    tensors = {
        "big": th.randn(70_001, generator=g),  # 280,004 bytes: 68 whole pieces and a short one
        "exact": th.randn(1 << 14, generator=g),  # exactly 16 pieces
        "small": th.randn(100, generator=g),  # below PARALLEL_MIN: the sequential path
    }
    blobs = {k: to_blob(v) for k, v in tensors.items()}
    path = tmp_path / "big.safetensors"
    write_atomic(path, blobs, {"m": "1"}, fsync=False)
    return path, tensors, {k: checksum(b.data) for k, b in blobs.items()}


@pytest.mark.usefixtures("small_parallel")
def test_threaded_read_is_bitwise_and_hashes_the_whole_tensor(tmp_path: pathlib.Path) -> None:
    path, tensors, sums = _big_file(tmp_path)
    with open(path, "rb", buffering=0) as f:
        body = Body(f, read_header(f, path.stat().st_size), sums)
        for key, tensor in tensors.items():
            assert th.equal(body.read_tensor(key), tensor), key
    assert body.read_keys == set(tensors)


@pytest.mark.usefixtures("small_parallel")
@pytest.mark.parametrize("at", [0, 4096 * 33 + 7, 280_003])  # first piece, a middle one, the last byte
def test_threaded_read_catches_a_flipped_byte_in_any_piece(tmp_path: pathlib.Path, at: int) -> None:
    path, tensors, sums = _big_file(tmp_path)
    with open(path, "rb", buffering=0) as f:
        header = read_header(f, path.stat().st_size)
    raw = bytearray(path.read_bytes())
    raw[header.tensors["big"].start + at] ^= 0x01
    path.write_bytes(bytes(raw))
    with open(path, "rb", buffering=0) as f:
        body = Body(f, read_header(f, path.stat().st_size), sums)
        with pytest.raises(IntegrityError, match="'big': checksum mismatch"):
            body.read_tensor("big")
        assert th.equal(body.read_tensor("exact"), tensors["exact"])  # the reader is still usable


@pytest.mark.usefixtures("small_parallel")
def test_threaded_read_stops_every_thread_before_raising(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Piece 5 fails while piece 6 is still being read: read_into raises only after piece 6 is done."""
    path, _, sums = _big_file(tmp_path)
    real = _weights._pread_exact
    started, finished = threading.Event(), threading.Event()

    def pread(fd: int, view: memoryview, offset: int, key: str, at: int) -> None:
        if at == 4096 * 5:
            assert started.wait(5)
            raise IntegrityError(f"tensor {key!r}: unexpected end of file")
        if at == 4096 * 6:
            started.set()
            time.sleep(0.3)  # still writing when piece 5 fails
            real(fd, view, offset, key, at)
            finished.set()
            return
        real(fd, view, offset, key, at)

    monkeypatch.setattr(_weights, "_pread_exact", pread)
    dest = np.zeros(280_004, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        body = Body(f, read_header(f, path.stat().st_size), sums)
        with pytest.raises(IntegrityError, match="unexpected end of file"):
            body.read_into("big", dest)
    assert finished.is_set()
    assert "big" not in body.read_keys


def test_buffered_and_in_memory_files_read_sequentially(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_weights, "PARALLEL_MIN", 1 << 16)
    monkeypatch.setattr(_weights, "_read_parallel", None)  # calling it would raise TypeError
    path, tensors, sums = _big_file(tmp_path)
    for f in (io.BytesIO(path.read_bytes()), open(path, "rb")):  # closed by the with below
        with f:
            body = Body(f, read_header(f, path.stat().st_size), sums)
            assert th.equal(body.read_tensor("big"), tensors["big"])


def test_device_bound_tensors_go_through_two_host_buffers(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging used for CUDA, run on CPU tensors: alternating buffers, grown when a tensor is larger."""
    monkeypatch.setattr(_weights, "staged", lambda device: True)
    path, tensors, sums = _big_file(tmp_path)
    order = ["small", "big", "exact", "small", "big"]
    with open(path, "rb", buffering=0) as f:
        body = Body(f, read_header(f, path.stat().st_size), sums)
        dests = [th.empty_like(tensors[key]) for key in order]
        buffers = []
        for key, dest in zip(order, dests, strict=True):
            body.read_into_tensor(key, dest)
            buffers.append([b.data_ptr() if b is not None else None for b in body._staging])
        body.finish()
    for key, dest in zip(order, dests, strict=True):
        assert th.equal(dest, tensors[key]), key
    assert buffers[0][1] is None and buffers[1][1] is not None  # the second tensor used the second buffer
    assert buffers[2][0] != buffers[1][0]  # buffer 0 grew for "exact" (64 KiB > 400 bytes)
    assert buffers[3][1] == buffers[2][1]  # buffer 1 was large enough for "small": reused


def test_staging_checks_the_checksum_on_host_bytes(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_weights, "staged", lambda device: True)
    path, tensors, sums = _big_file(tmp_path)
    dest = th.zeros_like(tensors["exact"])
    with open(path, "rb", buffering=0) as f:
        body = Body(f, read_header(f, path.stat().st_size), {**sums, "exact": sums["big"]})
        with pytest.raises(IntegrityError, match="'exact': checksum mismatch"):
            body.read_into_tensor("exact", dest)
    assert not dest.any()  # nothing was copied to the destination


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.usefixtures("small_parallel")
def test_a_forked_child_reads_with_threads_of_its_own(tmp_path: pathlib.Path) -> None:
    """The reader threads are kept between loads; a fork (SubprocVecEnv's default) must not wait on the parent's."""
    path, tensors, sums = _big_file(tmp_path)

    def read_all() -> bool:
        with open(path, "rb", buffering=0) as f:
            body = Body(f, read_header(f, path.stat().st_size), sums)
            return all(th.equal(body.read_tensor(k), v) for k, v in tensors.items())

    assert read_all()  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if read_all() else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung reading with the parent's (absent) reader threads")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_dtype_tables_agree_with_torch() -> None:
    """The torch-free size table that reading a header uses is torch's own itemsize, for every dtype both ways."""
    assert set(_weights.DTYPE_SIZES) == {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32",
                                         "U64", "F8_E4M3", "F8_E5M2"}  # fmt: skip
    for name, size in _weights.DTYPE_SIZES.items():
        dtype = _weights.torch_dtype(name)
        assert isinstance(dtype, th.dtype) and th.empty(0, dtype=dtype).element_size() == size, name
        assert _weights.st_dtype(dtype) == name
    with pytest.raises(FormatError, match="cannot be stored"):
        _weights.st_dtype(th.complex64)
