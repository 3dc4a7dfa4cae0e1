"""A save taken while training runs in another thread writes a file that loads (issue 23, part 2).

The tensors a save writes are the model's own memory, which the training thread keeps changing. Each
tensor is copied piece by piece into a staging buffer and hashed and written from there, and the header
(with those checksums) is written last: the checksums are always of the bytes in the file.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_util import make_vec_env

from sb3_safe_save import _weights, safe

SAVES = 20
SETTINGS: dict[str, tuple[type, dict[str, Any]]] = {
    "SAC": (SAC, dict(learning_starts=0, buffer_size=500, batch_size=32, policy_kwargs=dict(net_arch=[64, 64]))),
    "PPO": (PPO, dict(n_steps=16, batch_size=16, n_epochs=2, policy_kwargs=dict(net_arch=[64, 64]))),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_saves_from_another_thread_during_learn_always_load(name: str, tmp_path: Path) -> None:
    algo, kwargs = SETTINGS[name]
    model = safe(algo)("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), seed=0, **kwargs)
    model.learn(32)  # optimizer state exists from here on
    written: list[bytes] = []
    errors: list[BaseException] = []
    started, done = threading.Event(), threading.Event()

    def saver() -> None:
        try:
            started.wait()
            for i in range(SAVES):
                path = tmp_path / f"rotating_{i % 3}.safetensors"  # the atomic replace of a good file each time
                model.save(path)
                written.append(path.read_bytes())
                time.sleep(0.002)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=saver)
    thread.start()
    steps_before = model.num_timesteps
    started.set()
    while not done.is_set():
        model.learn(32, reset_num_timesteps=False)
    thread.join()
    assert errors == []
    assert len(written) == SAVES
    assert model.num_timesteps > steps_before  # the saves did overlap training
    for i, data in enumerate(written):
        loaded = safe(algo).load(io.BytesIO(data), verify=True)
        assert steps_before <= loaded.num_timesteps <= model.num_timesteps, f"save {i}"


class MutatingStream(io.BytesIO):
    """A file that lets 'training' change the model between every two writes of the save."""

    def __init__(self, params: list[th.Tensor]) -> None:
        super().__init__()
        self.params = params
        self.writes = 0

    def write(self, data: Any, /) -> int:
        n = super().write(data)
        self.writes += 1
        with th.no_grad():
            for p in self.params:
                p.add_(1.0)
        return n


def test_a_tensor_changed_during_the_save_is_hashed_as_written() -> None:
    model = safe(PPO)("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, policy_kwargs=dict(net_arch=[256]), seed=0)
    params = list(model.policy.parameters())
    with th.no_grad():
        for p in params:
            p.zero_()  # after k writes every parameter holds exactly k
    stream = MutatingStream(params)
    model.save(stream)
    loaded = safe(PPO).load(io.BytesIO(stream.getvalue()), verify=True)
    moments = set()
    for saved in loaded.policy.parameters():
        assert saved.numel() * saved.element_size() <= _weights.STAGE
        moment = saved.flatten()[0].item()
        assert th.all(saved == moment)  # a tensor smaller than the staging buffer is copied at once: one moment
        assert moment == int(moment) and 1 <= moment < stream.writes
        moments.add(moment)
    assert len(moments) > 1  # the tensors were written at different moments, and each loads


class PipeLike(io.RawIOBase):
    """A write-only stream that cannot seek (a pipe, a socket)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        self.chunks.append(bytes(data))
        return len(self.chunks[-1])


def test_unseekable_streams_get_the_same_bytes() -> None:
    blobs = {"a": _weights.to_blob(th.arange(100_000, dtype=th.float32)), "b": _weights.to_blob(np.ones((3, 2)))}
    seekable = io.BytesIO()
    _weights.write_stream(seekable, blobs, {"m": "v"})
    pipe = PipeLike()
    _weights.write_stream(pipe, blobs, {"m": "v"})  # type: ignore[arg-type]
    assert b"".join(pipe.chunks) == seekable.getvalue() == bytes(_weights.file_bytes(blobs, {"m": "v"}))
    assert len(pipe.chunks) == 1  # built in memory, then written at once
