"""Schedules are saved as data, never as code (issue 11.6, issue 17).

* SB3's own schedule closures (``constant_fn``, ``get_linear_fn``, ``get_schedule_fn``: what every
  default model holds before SB3 2.7) are recognised by their code object and stored as parameters;
* any other schedule function (a lambda, rl-zoo3's ``linear_schedule`` closure, a callable object) is
  sampled and kept only if a piecewise-linear function through the samples reproduces it;
* anything else becomes a ``schedule`` placeholder that ``custom_objects`` or ``resources`` fills at load.
"""

from __future__ import annotations

import math
import types
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from stable_baselines3 import DQN, PPO
from stable_baselines3.common import utils as sb3_utils

from _stfile import edit_manifest
from sb3_safe_save import FormatError, MissingResourceError, UnsupportedObjectError, audit, read_manifest, safe
from sb3_safe_save._codecs import GRID, NotEncodable, PiecewiseLinearSchedule, sample_schedule
from sb3_safe_save._manifest import PickleNode, ScheduleNode, iter_nodes

PPO_KW: dict[str, Any] = {"n_steps": 16, "batch_size": 16, "n_epochs": 1, "policy_kwargs": {"net_arch": [8]}, "seed": 0}
DQN_KW: dict[str, Any] = {"learning_starts": 0, "buffer_size": 100, "policy_kwargs": {"net_arch": [8]}, "seed": 0}
PROGRESS = [1.0, 0.999, 0.75, 0.5, 0.3333, 0.123456789, 1e-9, 0.0, -0.01, -0.5, -1.0, -3.7]
SB3_CLASSES = hasattr(sb3_utils, "LinearSchedule")  # SB3 >= 2.7


def old_linear_schedule(initial_value: float) -> Any:
    """rl-zoo3's ``linear_schedule`` before it became a class: a closure."""

    def func(progress_remaining: float) -> float:
        return progress_remaining * initial_value

    return func


def sb3_closure(name: str, *args: Any) -> Any:
    """SB3's schedule functions (deprecated, with a warning, from SB3 2.7 on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return getattr(sb3_utils, name)(*args)


def schedule_nodes(path: Path) -> dict[str, ScheduleNode]:
    manifest = read_manifest(path)
    return {name: node for name, root in manifest.data.items() for node in iter_nodes(root) if isinstance(node, ScheduleNode)}


# ------------------------------------------------------------------------------ SB3's own closures
def test_sb3_schedule_closures_are_stored_as_their_parameters(tmp_path: Path) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", learning_rate=1e-3, **DQN_KW)
    # what SB3 2.4-2.6 put on every model: closures that no import path names (load rebuilds
    # lr_schedule from learning_rate, as SB3 does; exploration_schedule is read from the file)
    model.lr_schedule = sb3_closure("get_schedule_fn", 1e-3)
    model.exploration_schedule = sb3_closure("get_linear_fn", 1.0, 0.05, 0.1)
    originals = {"lr_schedule": model.lr_schedule, "exploration_schedule": model.exploration_schedule}
    model.save(tmp_path / "dqn")

    manifest = read_manifest(tmp_path / "dqn.safetensors")
    lr, explore = manifest.data["lr_schedule"], manifest.data["exploration_schedule"]
    assert isinstance(lr, ScheduleNode) and lr.schedule == "float"
    inner = lr.args["value_schedule"]
    assert isinstance(inner, ScheduleNode) and inner.schedule == "constant" and inner.args == {"val": 1e-3}
    assert isinstance(explore, ScheduleNode) and explore.schedule == "linear"
    assert explore.args == {"start": 1.0, "end": 0.05, "end_fraction": 0.1} and not explore.knots

    loaded = safe(DQN).load(tmp_path / "dqn")
    for name, original in originals.items():
        rebuilt = getattr(loaded, name)
        assert all(rebuilt(p) == original(p) for p in PROGRESS), name
    if SB3_CLASSES:  # rebuilt the way the installed SB3 builds schedules
        assert isinstance(loaded.exploration_schedule, sb3_utils.LinearSchedule)
    assert not any(f.code == "schedule" for f in audit(tmp_path / "dqn.safetensors").findings)


def test_sb3_wrappers_are_stored_once(tmp_path: Path) -> None:
    """SB3 < 2.7 wraps clip_range in another get_schedule_fn lambda at every load; float(float(x)) is stored as float(x)."""
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **PPO_KW)
    model.clip_range = sb3_closure("get_schedule_fn", sb3_closure("get_schedule_fn", sb3_closure("get_schedule_fn", 0.2)))
    model.save(tmp_path / "ppo")
    node = read_manifest(tmp_path / "ppo.safetensors").data["clip_range"]
    assert isinstance(node, ScheduleNode) and node.schedule == "float"
    assert node.args["value_schedule"] == ScheduleNode(schedule="constant", args={"val": 0.2})


@pytest.mark.skipif(not SB3_CLASSES, reason="needs SB3 >= 2.7 to write the file")
def test_file_from_newer_sb3_loads_with_sb3_before_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file saved with SB3 >= 2.7 holds LinearSchedule objects; an SB3 without the class gets its closure."""
    model = safe(DQN)("MlpPolicy", "CartPole-v1", **DQN_KW)
    model.annealing = sb3_utils.LinearSchedule(1.0, 0.05, 0.1)  # an attribute _setup_model does not rebuild
    model.save(tmp_path / "dqn")
    assert read_manifest(tmp_path / "dqn.safetensors").data["annealing"].kind == "object"  # type: ignore[union-attr]
    monkeypatch.delattr(sb3_utils, "LinearSchedule")  # as in SB3 2.4-2.6
    with pytest.warns(UserWarning, match="get_linear_fn"):  # SB3 >= 2.7 deprecates the function; older SB3 does not
        loaded = safe(DQN).load(tmp_path / "dqn")
    assert isinstance(loaded.annealing, types.FunctionType)  # get_linear_fn's closure
    assert all(loaded.annealing(p) == model.annealing(p) for p in PROGRESS)


def test_a_lookalike_closure_is_not_taken_for_sb3s(tmp_path: Path) -> None:
    """Only SB3's exact code objects are stored by their cells; same names and shape are not enough."""
    calls: list[float] = []

    def constant_fn(val: float) -> Any:
        def func(progress: float) -> float:
            calls.append(progress)
            return val

        return func

    model = safe(DQN)("MlpPolicy", "CartPole-v1", **DQN_KW)
    model.not_a_schedule = constant_fn(0.5)  # not under a schedule name: never called, never stored
    with pytest.raises(UnsupportedObjectError) as info:
        model.save(tmp_path / "x")
    assert "not_a_schedule" in str(info.value) and calls == []

    del model.not_a_schedule
    model.exploration_schedule = constant_fn(0.5)  # under a schedule name: sampled, as any user schedule
    model.save(tmp_path / "x")
    node = read_manifest(tmp_path / "x.safetensors").data["exploration_schedule"]
    assert isinstance(node, ScheduleNode) and node.schedule == "piecewise_linear" and node.args == {}
    assert "constant_fn.<locals>.func" in (node.source or "") and len(calls) > GRID


# ------------------------------------------------------------------------------ user schedules
def test_user_schedules_round_trip_without_pickle(tmp_path: Path, no_pickle: None) -> None:
    lr = old_linear_schedule(3e-4)
    model = safe(PPO)("MlpPolicy", "CartPole-v1", learning_rate=lr, clip_range=lambda p: 0.1 + 0.2 * p, **PPO_KW)
    model.learn(16)
    model.save(tmp_path / "ppo")
    nodes = schedule_nodes(tmp_path / "ppo.safetensors")
    assert {"learning_rate", "lr_schedule", "clip_range"} <= set(nodes)
    assert nodes["learning_rate"].schedule == "piecewise_linear" and nodes["learning_rate"].knots == [(0.0, 0.0), (1.0, 3e-4)]
    assert nodes["clip_range"].checked_points > 2 * GRID and nodes["clip_range"].max_error <= 1e-12 * 0.3
    manifest = read_manifest(tmp_path / "ppo.safetensors")
    assert not manifest.placeholders and not any(
        isinstance(n, PickleNode) for r in manifest.data.values() for n in iter_nodes(r)
    )

    loaded = safe(PPO).load(tmp_path / "ppo", env=gym.make("CartPole-v1"))
    for p in PROGRESS:
        assert loaded.learning_rate(p) == lr(p)  # bit for bit: the knots are 0 and 1
        assert loaded.lr_schedule(p) == model.lr_schedule(p)
        assert loaded.clip_range(p) == pytest.approx(model.clip_range(p), rel=1e-12, abs=1e-15)
    loaded.learn(16, reset_num_timesteps=False)  # training goes on with the rebuilt schedules
    assert loaded.num_timesteps == 32

    loaded.save(tmp_path / "again")  # a loaded schedule is saved as the same knots, not sampled again
    assert schedule_nodes(tmp_path / "again.safetensors")["learning_rate"].knots == nodes["learning_rate"].knots

    findings = [f for f in audit(tmp_path / "ppo.safetensors").findings if f.code == "schedule"]
    assert {f.paths[0] for f in findings} == {"learning_rate", "lr_schedule.value_schedule", "clip_range.value_schedule"}
    assert all(f.severity == "info" and "no code is stored" in f.message for f in findings)


def test_curved_schedule_becomes_a_placeholder_filled_at_load(tmp_path: Path) -> None:
    def cosine(p: float) -> float:
        return 1e-3 * (1 + math.cos(math.pi * (1 - p))) / 2

    model = safe(PPO)("MlpPolicy", "CartPole-v1", learning_rate=cosine, **PPO_KW)
    model.save(tmp_path / "cos")
    (ph,) = read_manifest(tmp_path / "cos.safetensors").placeholders
    assert ph.reason == "schedule" and ph.key == "learning_rate"
    assert set(ph.paths) == {"learning_rate", "lr_schedule.value_schedule"}
    assert "not piecewise linear" in str(ph.hint["detail"]) and "custom_objects" in str(ph.hint["detail"])
    report = audit(tmp_path / "cos.safetensors")
    assert any(f.code == "placeholder" and f.reason == "schedule" and "custom_objects" in f.message for f in report.findings)

    with pytest.raises(MissingResourceError) as info:
        safe(PPO).load(tmp_path / "cos")
    assert "learning_rate" in str(info.value) and "custom_objects" in str(info.value)

    # as rl-zoo3's enjoy script loads (it replaces the schedules it does not need)
    enjoy = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    assert safe(PPO).load(tmp_path / "cos", custom_objects=enjoy).learning_rate == 0.0
    # or the schedule itself, to go on training
    resumed = safe(PPO).load(tmp_path / "cos", resources={"learning_rate": cosine})
    assert resumed.learning_rate is cosine and resumed.lr_schedule(0.25) == cosine(0.25)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize(
    ("fn", "knots", "bitwise"),
    [
        (lambda p: 0.2, [(0.0, 0.2), (1.0, 0.2)], True),
        (lambda p: p * 7e-4, [(0.0, 0.0), (1.0, 7e-4)], True),
        (lambda p: max(p, 0.5) * 1e-3, [(0.0, 5e-4), (0.5, 5e-4), (1.0, 1e-3)], False),  # a kink on the grid
        (lambda p: max(p, 0.0) * 1e-3, [(-1.0, 0.0), (0.0, 0.0), (1.0, 1e-3)], True),  # flat below 0: -1 is kept
    ],
)
def test_exact_schedules_are_sampled(fn: Any, knots: list[tuple[float, float]], bitwise: bool) -> None:
    node = sample_schedule(fn, "f")
    assert node.knots == knots and node.max_error <= 1e-12 * 1e-3
    rebuilt = PiecewiseLinearSchedule(node.knots)
    for p in [*PROGRESS, 0.25, 0.5, 0.77]:
        assert rebuilt(p) == fn(p) if bitwise else rebuilt(p) == pytest.approx(fn(p), rel=1e-12, abs=1e-18)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p: 1e-3 * p**2,  # a curve
        lambda p: 1e-3 if p > 1 / 3 else 1e-4,  # a step off the grid
        lambda p: 1.0 if p > 0 else 0.0,  # a step at a grid point: interpolation across it is not a step
        lambda p: max(p, 1 / 3) * 1e-3,  # a kink off the grid
        lambda p: max(p, -0.5 - 1 / 3) * 1e-3,  # clamped below 0 (the last rollout can query there), off the grid
        lambda p: 1e-3 * p if p > -5 else 0.0,  # different far outside [-1, 1]
        lambda p: math.nan,
        lambda p: 1 / p,  # raises at 0
        lambda p: "fast",
    ],
)
def test_inexact_or_failing_schedules_are_refused(fn: Any) -> None:
    with pytest.raises(NotEncodable):
        sample_schedule(fn, "f")


# ------------------------------------------------------------------------------ hostile files
@pytest.mark.parametrize(
    "node",
    [
        {"kind": "schedule", "schedule": "piecewise_linear", "knots": [[1.0, 0.1], [0.0, 0.2]]},
        {"kind": "schedule", "schedule": "piecewise_linear", "knots": [[0.0, 0.1]]},
        {"kind": "schedule", "schedule": "piecewise_linear", "knots": [[0.0, 0.1], [0.0, 0.2]]},
        {"kind": "schedule", "schedule": "constant", "args": {"val": "os:system"}},
        {"kind": "schedule", "schedule": "constant", "args": {"value": 0.1}},
        {"kind": "schedule", "schedule": "linear", "args": {"start": 1.0, "end": 0.1}},
        {"kind": "schedule", "schedule": "float", "args": {"value_schedule": 0.5}},
        {"kind": "schedule", "schedule": "eval", "args": {}},
    ],
)
def test_malformed_schedule_nodes_are_format_errors(tmp_path: Path, node: dict[str, Any]) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", **DQN_KW)
    model.save(tmp_path / "ok")

    def edit(manifest: dict[str, Any]) -> None:
        manifest["data"]["exploration_schedule"] = node

    edit_manifest(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors", edit)
    with pytest.raises(FormatError):
        safe(DQN).load(tmp_path / "bad.safetensors")
