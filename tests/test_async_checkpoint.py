"""Checkpoints written in the background (issue 23, part 3): ``save_checkpoint(..., blocking=False)``.

What is written is the state at the call (staged copies), the run resumed from it stays bitwise, a
failed write is raised by ``wait_for_checkpoint()`` or the next checkpoint, a kill mid-write leaves the
previous checkpoint complete, and process exit waits for the write.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th

import sb3_safe_save._persist as persist
import sb3_safe_save._weights as _weights
from sb3_safe_save import (
    CheckpointWriteError,
    FormatError,
    ResumeCheckpointCallback,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    wait_for_checkpoint,
)
from sb3_safe_save._background import _wait_at_exit
from test_resume import Counter, assert_same_run, bandit_model

TESTS = str(Path(__file__).parent)


@pytest.fixture(autouse=True)
def _nothing_left_in_flight() -> Iterator[None]:
    yield
    assert wait_for_checkpoint() is None, "a test left a checkpoint in flight"


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def same_model_file(a: Path, b: Path) -> bool:
    """The same tensor bytes and manifest, except ``start_time`` (when ``learn`` started: two runs differ)."""
    (ma, body_a), (mb, body_b) = (split(p) for p in (a, b))
    return ma == mb and body_a == body_b


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    header = _weights.read_header(io.BytesIO(data), len(data))
    manifest = read_manifest(path).model_dump()
    del manifest["data"]["start_time"]
    return manifest, data[header.body_start :]


def disk_full(path: Any, *args: Any, **kwargs: Any) -> None:
    raise OSError(28, "No space left on device")


# ------------------------------------------------------------------------------------------ exactness
def test_the_checkpoint_holds_the_state_at_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training changes weights, optimizer, random state and buffer rows while the write waits: none of it is written."""
    model = bandit_model("SAC")
    model.learn(32)
    reference = contents(save_checkpoint(model, tmp_path / "sync"))
    gate = threading.Event()
    write_file = persist.write_file

    def gated(*args: Any, **kwargs: Any) -> None:
        assert gate.wait(60)
        write_file(*args, **kwargs)

    monkeypatch.setattr(persist, "write_file", gated)
    target = save_checkpoint(model, tmp_path / "async", blocking=False)
    model.learn(32, reset_num_timesteps=False)
    model.replay_buffer.observations[:8] += 1.0  # rows that are in the checkpoint
    with th.no_grad():
        next(model.policy.parameters()).add_(1.0)
    assert not target.exists()
    gate.set()
    assert wait_for_checkpoint() == target
    assert contents(target) == reference


def test_async_checkpoints_equal_blocking_ones_and_resume_exactly(tmp_path: Path) -> None:
    total = 96
    a = bandit_model("SAC")
    a.learn(total, callback=ResumeCheckpointCallback(16, tmp_path / "sync", keep_last=None))
    b = bandit_model("SAC")
    counter = Counter()
    saver = ResumeCheckpointCallback(16, tmp_path / "async", keep_last=None, callbacks=[counter], blocking=False)
    b.learn(total, callback=[saver, counter])  # learn() returns once the last write is done
    sync, written = list_checkpoints(tmp_path / "sync"), list_checkpoints(tmp_path / "async")
    assert [p.name for p in written] == [p.name for p in sync] and len(written) >= 3
    for p, q in zip(sync, written, strict=True):
        assert same_model_file(p / "model.safetensors", q / "model.safetensors"), q.name
        assert (p / "replay_buffer.safetensors").read_bytes() == (q / "replay_buffer.safetensors").read_bytes(), q.name

    middle = written[len(written) // 2]
    steps = int(middle.name.split("_")[1])
    saver2, counter2 = ResumeCheckpointCallback(16, tmp_path / "c", keep_last=None, blocking=False), Counter()
    c = load_checkpoint(type(b), middle, env=bandit_model("SAC").get_env(), callbacks=[saver2, counter2], force_reset=False)
    assert c.num_timesteps == steps and counter2.seen == steps
    c.learn(total - steps, reset_num_timesteps=False, callback=[saver2, counter2])
    assert_same_run(a, c)
    assert_same_run(b, c)


def test_keep_last_deletes_old_checkpoints_once_the_new_one_is_in_place(tmp_path: Path) -> None:
    model = bandit_model("DQN")
    model.learn(96, callback=ResumeCheckpointCallback(16, tmp_path, keep_last=2, blocking=False))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_64_steps", "checkpoint_80_steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_64_steps", "checkpoint_80_steps"]


# ------------------------------------------------------------------------------------------- failures
def message(path: Path) -> str:
    return (
        f"the checkpoint {path} was not written: its background write failed with OSError: [Errno 28] No space left"
        " on device.\nNo part of it was left under that name and the earlier checkpoints are unchanged. Fix the cause"
        " (disk space, permissions, the path) and take the checkpoint again."
    )


def test_a_failed_write_is_raised_by_wait_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = bandit_model("SAC")
    model.learn(32)
    previous = save_checkpoint(model, tmp_path / "checkpoint_32_steps")
    before = contents(previous)
    model.learn(32, reset_num_timesteps=False)
    monkeypatch.setattr(persist, "write_file", disk_full)
    target = save_checkpoint(model, tmp_path / "checkpoint_64_steps", blocking=False)
    with pytest.raises(CheckpointWriteError) as info:
        wait_for_checkpoint()
    assert str(info.value) == message(target)
    assert info.value.path == target and isinstance(info.value.__cause__, OSError) and info.value.cause.errno == 28
    assert wait_for_checkpoint() is None  # raised once
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_32_steps"]  # no temporary directory left
    assert list_checkpoints(tmp_path) == [previous] and contents(previous) == before


def test_a_failed_write_is_raised_by_the_next_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = bandit_model("SAC")
    model.learn(32)
    failed = threading.Event()

    def fails(path: Any, *args: Any, **kwargs: Any) -> None:
        failed.set()
        disk_full(path)

    monkeypatch.setattr(persist, "write_file", fails)
    first = save_checkpoint(model, tmp_path / "first", blocking=False)
    assert failed.wait(60)
    monkeypatch.undo()  # the next checkpoint would be written
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(model, tmp_path / "second")
    assert str(info.value) == message(first)
    assert list(tmp_path.iterdir()) == []  # the second checkpoint was not taken either
    save_checkpoint(model, tmp_path / "second")
    assert load_checkpoint(type(model), tmp_path / "second").num_timesteps == 32


def test_a_failed_write_stops_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the callback: the next checkpoint, or the end of ``learn()``, raises it."""
    monkeypatch.setattr(persist, "write_file", disk_full)
    model = bandit_model("SAC")
    with pytest.raises(CheckpointWriteError) as info:
        model.learn(64, callback=ResumeCheckpointCallback(16, tmp_path, blocking=False))
    assert str(info.value) == message(tmp_path / "checkpoint_16_steps")
    assert model.num_timesteps == 32  # raised by the second checkpoint, at 32 steps
    model = bandit_model("SAC")
    with pytest.raises(CheckpointWriteError) as info:
        model.learn(24, callback=ResumeCheckpointCallback(16, tmp_path, blocking=False))  # one checkpoint, at 16
    assert str(info.value) == message(tmp_path / "checkpoint_16_steps")  # raised by the end of learn()
    assert model.num_timesteps == 24
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_at_exit_is_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    model = bandit_model("PPO")
    monkeypatch.setattr(persist, "write_file", disk_full)
    target = save_checkpoint(model, tmp_path / "ckpt", blocking=False)
    _wait_at_exit()
    assert capsys.readouterr().err == f"sb3_safe_save: {message(target)}\n"


# ---------------------------------------------------------------------------------------- processes
CHILD = textwrap.dedent(
    """
    import json, pathlib, sys, threading, time
    sys.path.insert(0, sys.argv[2])
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv
    import sb3_safe_save._persist as persist
    import sb3_safe_save._weights as weights
    from sb3_safe_save import safe, save_checkpoint
    from _resume_env import ContinuousNoiseBandit

    root, mode = pathlib.Path(sys.argv[1]), sys.argv[3]
    model = safe(SAC)("MlpPolicy", DummyVecEnv([ContinuousNoiseBandit]), seed=0, learning_starts=16, buffer_size=256,
                      batch_size=8, train_freq=8, policy_kwargs=dict(net_arch=[8]))
    model.learn(32)
    save_checkpoint(model, root / "checkpoint_32_steps")
    model.learn(32, reset_num_timesteps=False)
    write_file, write_all = persist.write_file, weights._write_all

    def stall(f, view):  # write half of the first tensor, then hang
        write_all(f, view[: view.nbytes // 2])
        print("mid-write", flush=True)
        time.sleep(600)

    def slow(path, *args, **kwargs):
        if mode == "kill" and path.name == "replay_buffer.safetensors":
            weights._write_all = stall
        if mode == "exit":
            time.sleep(0.5)
        write_file(path, *args, **kwargs)

    persist.write_file = slow
    target = save_checkpoint(model, root / "checkpoint_64_steps", blocking=False)
    print(json.dumps({"returned": True, "exists": target.exists()}), flush=True)
    if mode == "kill":
        time.sleep(600)
    """
)


def child(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), TESTS, mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def test_a_kill_during_the_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    with child(tmp_path, "kill") as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline(), proc.stdout.readline()]
            assert "mid-write\n" in lines, (lines, proc.stderr.read() if proc.stderr else "")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    previous = tmp_path / "checkpoint_32_steps"
    assert list_checkpoints(tmp_path) == [previous]
    [partial] = [p for p in tmp_path.iterdir() if p != previous]
    assert partial.name.startswith(".checkpoint_64_steps.tmp-")  # the kill landed in the buffer file's write
    assert {p.name for p in partial.iterdir()} >= {"model.safetensors"} and "checkpoint.json" not in os.listdir(partial)
    with pytest.raises(FormatError, match="not a checkpoint directory"):
        load_checkpoint(type(bandit_model("SAC")), tmp_path / "checkpoint_64_steps")
    loaded = load_checkpoint(type(bandit_model("SAC")), previous)  # every checksum verified
    assert loaded.num_timesteps == 32 and loaded.replay_buffer.pos == 32


def test_process_exit_waits_for_the_write(tmp_path: Path) -> None:
    with child(tmp_path, "exit") as proc:
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == '{"returned": true, "exists": false}'  # the process ended with the write in flight
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint_32_steps", tmp_path / "checkpoint_64_steps"]
    loaded = load_checkpoint(type(bandit_model("SAC")), tmp_path / "checkpoint_64_steps")
    assert loaded.num_timesteps == 64 and loaded.replay_buffer.pos == 64
    assert np.array_equal(loaded.replay_buffer.observations[64:], np.zeros_like(loaded.replay_buffer.observations[64:]))
