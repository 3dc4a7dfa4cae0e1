"""Replay buffers in safetensors: exact, filled rows only, streamed, pickle-free; legacy pickles only with trust."""

from __future__ import annotations

import io
import pathlib
import tracemalloc
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN, SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from _compare import her_model
from sb3_safe_save import FormatError, StateMismatchError, safe
from sb3_safe_save._buffers import load_buffer_into, save_buffer

BUFFER_ARRAYS = (
    "observations",
    "next_observations",
    "actions",
    "rewards",
    "dones",
    "timeouts",
    "ep_start",
    "ep_length",
    "_current_ep_start",
)


def assert_same_buffer(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert type(a) is type(b)
    for name in ("pos", "full", "buffer_size", "n_envs", "optimize_memory_usage", "handle_timeout_termination"):
        assert getattr(a, name) == getattr(b, name), name
    for name in BUFFER_ARRAYS:
        x, y = getattr(a, name, None), getattr(b, name, None)
        if isinstance(x, dict):
            assert sorted(x) == sorted(y)
            pairs = [(x[k], y[k], f"{name}.{k}") for k in x]
        else:
            pairs = [(x, y, name)]
        for u, v, where in pairs:
            if u is None:
                assert v is None, where
                continue
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), where
    if isinstance(a, HerReplayBuffer):
        for name in ("n_sampled_goal", "her_ratio", "goal_selection_strategy", "copy_info_dict"):
            assert getattr(a, name) == getattr(b, name), name
    np.random.seed(0)
    s1 = a.sample(8)
    np.random.seed(0)
    s2 = b.sample(8)
    for u, v in zip(s1, s2, strict=True):
        if isinstance(u, dict):
            assert all(th.equal(u[k], v[k]) for k in u)
        elif u is None:  # e.g. discounts
            assert v is None
        else:
            assert th.equal(u, v)


CASES = {
    "dqn": (DQN, "MlpPolicy", "CartPole-v1", dict(buffer_size=100, learning_starts=1000)),
    "sac-omu": (
        SAC,
        "MlpPolicy",
        "Pendulum-v1",
        dict(
            buffer_size=100,
            learning_starts=1000,
            optimize_memory_usage=True,
            replay_buffer_kwargs=dict(handle_timeout_termination=False),
        ),
    ),
}


def make(case: str, **extra: Any) -> Any:
    algo, policy, env, kwargs = CASES[case]
    return safe(algo)(policy, env, seed=0, policy_kwargs=dict(net_arch=[8]), **{**kwargs, **extra})


@pytest.mark.parametrize("steps", [0, 37, 260], ids=["empty", "partial", "wrapped"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(case: str, steps: int, tmp_path: pathlib.Path, no_pickle: None) -> None:
    model = make(case)
    if steps:
        model.learn(steps)  # learning_starts > steps: fills the buffer without training
    path = tmp_path / "buffer.safetensors"
    model.save_replay_buffer(path)
    other = make(case)
    other.load_replay_buffer(path)
    assert other.replay_buffer.device == other.device
    if steps:
        assert_same_buffer(model.replay_buffer, other.replay_buffer)
    else:
        assert other.replay_buffer.pos == 0 and not other.replay_buffer.full


def test_only_filled_rows_are_written(tmp_path: pathlib.Path) -> None:
    model = make("dqn", buffer_size=10_000)
    model.learn(20)
    model.save_replay_buffer(tmp_path / "b.safetensors")
    arrays = sum(
        getattr(model.replay_buffer, n).nbytes
        for n in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
    )
    assert (tmp_path / "b.safetensors").stat().st_size < arrays * 20 / 10_000 + 4096


def test_omu_keeps_the_next_observation_row(tmp_path: pathlib.Path) -> None:
    model = make("sac-omu")
    model.learn(10)
    buf = io.BytesIO()
    model.save_replay_buffer(buf)
    other = make("sac-omu")
    other.load_replay_buffer(buf)
    rb = other.replay_buffer
    assert np.array_equal(rb.observations[10], model.replay_buffer.observations[10])  # next obs of row 9
    assert rb.observations[10].any()


def test_her_round_trip(tmp_path: pathlib.Path, no_pickle: None) -> None:
    model = her_model()
    model.learn(23)  # ends mid-episode
    model.save_replay_buffer(tmp_path / "her")
    assert (tmp_path / "her.safetensors").exists()

    other = her_model()
    other.load_replay_buffer(tmp_path / "her", truncate_last_traj=False)
    assert_same_buffer(model.replay_buffer, other.replay_buffer)
    assert other.replay_buffer.env is other.env

    truncated = her_model()
    with pytest.warns(UserWarning, match="truncated"):
        truncated.load_replay_buffer(tmp_path / "her")
    assert (truncated.replay_buffer._current_ep_start == truncated.replay_buffer.pos).all()

    rebuilt = her_model()  # no buffer at all: one is built from the file, with the model's env (issue 11)
    rebuilt.replay_buffer = None
    rebuilt.load_replay_buffer(tmp_path / "her", truncate_last_traj=False)
    assert_same_buffer(model.replay_buffer, rebuilt.replay_buffer)
    assert rebuilt.replay_buffer.env is rebuilt.env


def test_stock_pickle_is_read_without_running_it(tmp_path: pathlib.Path) -> None:
    """SB3's own pickle loads through the restricted reader (issue 25); allow_pickle=True still uses SB3's loader."""
    model = make("dqn")
    model.learn(30)
    path = tmp_path / "legacy.pkl"
    DQN.save_replay_buffer(model, path)  # SB3's own pickle
    other = make("dqn")
    other.load_replay_buffer(path)
    assert_same_buffer(model.replay_buffer, other.replay_buffer)
    trusting = make("dqn")
    trusting.load_replay_buffer(path, allow_pickle=True)
    assert_same_buffer(model.replay_buffer, trusting.replay_buffer)


def test_buffer_of_other_settings_replaces_the_models(tmp_path: pathlib.Path, no_pickle: None) -> None:
    """As in SB3, the model then holds the file's buffer: other size, or no buffer at all (issue 11)."""
    model = make("dqn")
    model.learn(30)
    model.save_replay_buffer(tmp_path / "b.safetensors")
    for other in (make("dqn", buffer_size=50), make("dqn")):
        if other.buffer_size == 100:
            other.replay_buffer = None  # e.g. freed after training, as SB3 users do before saving
        other.load_replay_buffer(tmp_path / "b.safetensors")
        assert other.replay_buffer.device == other.device
        assert_same_buffer(model.replay_buffer, other.replay_buffer)


def test_mismatched_buffer_is_refused(tmp_path: pathlib.Path) -> None:
    model = make("dqn")
    model.learn(30)
    model.save_replay_buffer(tmp_path / "b.safetensors")
    other = make("dqn")
    other.replay_buffer_class = HerReplayBuffer  # nothing named in the file is imported: the class must be the model's
    other.replay_buffer = None
    with pytest.raises(StateMismatchError, match="replay_buffer_class"):
        other.load_replay_buffer(tmp_path / "b.safetensors")
    model.save(tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="no replay buffer"):
        make("dqn").load_replay_buffer(tmp_path / "model.safetensors")


def test_save_and_load_do_not_copy_the_arrays(tmp_path: pathlib.Path) -> None:
    """An image buffer: saving and loading allocate a small fraction of the buffer's size."""
    space = gym.spaces.Box(0, 255, (84, 84, 1), np.uint8)
    rb = ReplayBuffer(2_000, space, gym.spaces.Discrete(4), device="cpu")
    rng = np.random.default_rng(0)
    rb.observations[:1500] = rng.integers(0, 255, rb.observations[:1500].shape, dtype=np.uint8)
    rb.next_observations[:1500] = rb.observations[:1500]
    rb.pos = 1500
    filled = 2 * rb.observations[:1500].nbytes  # ~21 MB

    tracemalloc.start()
    try:
        save_buffer(rb, tmp_path / "img.safetensors", fsync=False)
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        target = ReplayBuffer(2_000, space, gym.spaces.Discrete(4), device="cpu")
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        load_buffer_into(target, tmp_path / "img.safetensors")
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert save_peak < 0.05 * filled
    # load: one set of fresh (calloc'ed) arrays at the target's capacity, the rows read straight into them
    capacity = sum(
        getattr(target, n).nbytes for n in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
    )
    assert load_peak - base < 1.05 * capacity
    assert np.array_equal(target.observations, rb.observations) and target.pos == 1500


def _vm_flags(array: np.ndarray) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``array`` (Linux)."""
    address, current = array.ctypes.data, None
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = lo <= address < hi
        elif head == "VmFlags:" and current:
            return line.split()[1:]
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_loaded_buffer_arrays_are_not_hinted_for_huge_pages(tmp_path: pathlib.Path) -> None:
    """np.zeros asks for huge pages on large arrays (a 5.6x stall at 2 GB here); the loaded buffer does not."""
    env = gym.make("Pendulum-v1")
    model = safe(SAC)("MlpPolicy", env, buffer_size=400_000, policy_kwargs={"net_arch": [4]}, seed=0)
    rb = model.replay_buffer
    rb.observations[:] = np.random.default_rng(0).random(rb.observations.shape, dtype=np.float32)
    rb.pos, rb.full = 0, True
    model.save_replay_buffer(tmp_path / "rb")
    expected = rb.observations.copy()
    assert rb.observations.nbytes > 4 << 20  # large enough for numpy's hint
    other = safe(SAC)("MlpPolicy", env, buffer_size=400_000, policy_kwargs={"net_arch": [4]}, seed=0)
    other.load_replay_buffer(tmp_path / "rb.safetensors")
    loaded = other.replay_buffer.observations
    assert np.array_equal(loaded, expected) and loaded.flags.writeable
    assert "hg" not in _vm_flags(loaded)
    loaded[5] = 1.0  # SB3 writes into it as it trains
    assert (other.replay_buffer.observations[5] == 1.0).all()
    control = np.zeros_like(expected)
    if "hg" not in _vm_flags(control):
        pytest.skip("this numpy or kernel does not hint huge pages, so the check above proves nothing here")
