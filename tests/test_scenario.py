"""The scenario of issue 2 (examples/lang_dqn.py): a DQN whose Q-network consults a live expert.

For both kinds of expert (one that refuses pickling like vLLM's ``LLM``, and an ``nn.Module``), with
the default and a custom ``net_arch``: save with the expert attached, the file holds no expert bytes,
load with ``resources=``, identity is preserved, predictions are equal with and without the expert,
and ``learn()`` continues. Plus a weightless multi-billion-parameter expert and a fresh process.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest
import torch as th

import sb3_safe_save
from _compare import assert_same_model
from lang_dqn import CustomDQN, ModuleExpert, UnpicklableExpert, make_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERT_SEED = 9  # its log-probabilities favour action 1 by ~1.05 nats: enough to flip some greedy actions
EXPERT_PATHS = {"policy_kwargs.vlm_model", "policy.q_net.vlm_model", "policy.q_net_target.vlm_model"}


def _make_expert(kind: str) -> Any:
    if kind == "unpicklable":
        return UnpicklableExpert(seed=EXPERT_SEED)
    th.manual_seed(1234)
    return ModuleExpert(width=256)  # ~67k parameters (270 kB): big enough to show up in a file size


def _strong_weights(expert: Any) -> None:
    """Give a module expert large weights, so that ``use_expert=True`` really changes predictions."""
    if isinstance(expert, th.nn.Module):
        g = th.Generator().manual_seed(7)
        with th.no_grad():
            for p in expert.parameters():
                p.copy_(th.randn(p.shape, generator=g) * 2.0)


def _obs(n: int = 256) -> np.ndarray:
    rng = np.random.default_rng(42)
    return (rng.normal(size=(n, 4)) * np.array([1.0, 1.0, 0.1, 1.0])).astype(np.float32)


def _predict(model: CustomDQN, obs: np.ndarray, use_expert: bool) -> np.ndarray:
    model.policy.set_use_expert(use_expert)
    try:
        actions, _ = model.predict(obs, deterministic=True)
    finally:
        model.policy.set_use_expert(False)
    return actions


def _tensor_bytes(model: CustomDQN) -> int:
    """Bytes of the policy's own weights and of the optimizer state: what the file must hold."""
    own = sum(v.numel() * v.element_size() for k, v in model.policy.state_dict().items() if "vlm_model" not in k)
    opt = model.policy.optimizer.state_dict()["state"]
    return own + sum(t.numel() * t.element_size() for s in opt.values() for t in s.values() if isinstance(t, th.Tensor))


def _header_len(path: pathlib.Path) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<Q", f.read(8))[0])


@pytest.mark.parametrize("net_arch", [None, [256, 256]], ids=["default-arch", "net_arch-256-256"])
@pytest.mark.parametrize("kind", ["unpicklable", "module"])
def test_scenario_roundtrip(kind: str, net_arch: list[int] | None, tmp_path: pathlib.Path) -> None:
    expert = _make_expert(kind)
    model = make_model(expert, net_arch=net_arch)
    model.learn(100)
    assert model._n_updates > 0
    _strong_weights(expert)
    if net_arch is not None:
        assert model.policy.net_arch == net_arch

    path = tmp_path / "agent.safetensors"
    model.save(path)

    # ---- the file: one placeholder, no expert bytes
    manifest = sb3_safe_save.read_manifest(path)
    (ph,) = manifest.placeholders
    assert ph.key == "vlm_model"
    assert EXPERT_PATHS <= set(ph.paths), ph.paths
    assert len(ph.paths) == len(set(ph.paths))
    assert ph.type == f"lang_dqn.{type(expert).__qualname__}"
    assert ph.reason == "external"  # lang_dqn's Q-network holds it through external()
    assert set(ph.external_paths) == {"policy.q_net.vlm_model", "policy.q_net_target.vlm_model"}
    if kind == "module":
        n_params = sum(p.numel() for p in expert.parameters())
        assert ph.hint["num_parameters"] == n_params
        assert ph.size_bytes == n_params * 4
        assert ph.hint["name_or_path"] == expert.name_or_path
    else:
        assert ph.hint["model"] == expert.model
    assert not any("vlm_model" in k for k in manifest.tensors)

    size = path.stat().st_size
    tensors = _tensor_bytes(model)
    body = size - 8 - _header_len(path)
    # the body is the policy and optimizer tensors, a few observation-sized arrays and the random state
    rng = sum(int(np.prod(m.shape)) for k, m in manifest.tensors.items() if k.startswith("rng/"))  # uint8 tensors
    assert 0 < rng < 12 * 1024  # torch's CPU generator (5 KB), numpy's and random's Mersenne Twisters (2.5 KB each)
    assert tensors <= body <= tensors * 1.01 + 1024 + rng, (body, tensors, rng)
    assert _header_len(path) < 64 * 1024
    if net_arch is not None:  # a realistic policy: the whole file within a few percent of the tensors
        assert size - rng <= tensors * 1.03, (size, tensors, rng)
    if kind == "module":
        expert_bytes = ph.size_bytes
        assert expert_bytes is not None and expert_bytes > 200_000
        # the same agent without the expert has the same size, up to the placeholder's description
        plain = make_model(None, net_arch=net_arch)
        plain.learn(100)
        plain.save(tmp_path / "plain.safetensors")
        assert abs(size - (tmp_path / "plain.safetensors").stat().st_size) < 4096

    # ---- load: identity, exactness, predictions with and without the expert
    loaded = CustomDQN.load(path, env=model.get_env(), device="cpu", resources={"vlm_model": expert})
    # identity: the wrapped paths hold a wrapper of the very same object, policy_kwargs the object itself
    assert sb3_safe_save.unwrap(loaded.policy.q_net.vlm_model) is expert
    assert loaded.policy.q_net.vlm_model is not expert and isinstance(loaded.policy.q_net.vlm_model, sb3_safe_save.External)
    assert sb3_safe_save.unwrap(loaded.policy.q_net_target.vlm_model) is expert
    assert loaded.policy_kwargs["vlm_model"] is expert
    assert loaded.policy_kwargs["vlm_model_name"] == model.policy_kwargs["vlm_model_name"]
    if net_arch is not None:
        assert loaded.policy_kwargs["net_arch"] == net_arch and loaded.policy.net_arch == net_arch
    assert_same_model(model, loaded)

    obs = _obs()
    calls = getattr(expert, "calls", 0)
    plain_a = _predict(model, obs, use_expert=False)
    plain_b = _predict(loaded, obs, use_expert=False)
    expert_a = _predict(model, obs, use_expert=True)
    expert_b = _predict(loaded, obs, use_expert=True)
    np.testing.assert_array_equal(plain_a, plain_b)
    np.testing.assert_array_equal(expert_a, expert_b)
    assert not np.array_equal(plain_a, expert_a), "the expert should change some decisions"
    if kind == "unpicklable":
        assert expert.calls == calls + 2  # consulted once per expert prediction, by both agents

    # ---- learning continues; the expert stays the very same object
    before = loaded.num_timesteps
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.num_timesteps == before + 64
    assert sb3_safe_save.unwrap(loaded.policy.q_net.vlm_model) is expert


def test_meta_expert_with_billions_of_parameters(tmp_path: pathlib.Path) -> None:
    t0 = time.perf_counter()
    expert = ModuleExpert(width=50_000, depth=3, device="meta")
    n_params = sum(p.numel() for p in expert.parameters())
    assert n_params > 5_000_000_000
    assert all(p.is_meta for p in expert.parameters())  # no data anywhere: reading a weight would fail
    model = make_model(expert, net_arch=[64, 64])
    model.learn(64)

    path = tmp_path / "giant.safetensors"
    t1 = time.perf_counter()
    model.save(path)
    save_s = time.perf_counter() - t1
    assert save_s < 5.0, f"save took {save_s:.1f}s: the walk must not depend on the expert's size"

    manifest = sb3_safe_save.read_manifest(path)
    (ph,) = manifest.placeholders
    assert EXPERT_PATHS <= set(ph.paths)
    assert ph.reason == "external"
    assert ph.hint["num_parameters"] == n_params
    assert ph.size_bytes == n_params * 4  # ~20 GB, estimated from shapes only
    assert ph.hint["device"] == "meta"
    assert path.stat().st_size < 300_000  # a 20 GB expert, a file of the policy's size
    assert path.stat().st_size <= _tensor_bytes(model) + 64 * 1024

    loaded = CustomDQN.load(path, env=model.get_env(), device="cpu", resources={"vlm_model": expert})
    assert sb3_safe_save.unwrap(loaded.policy.q_net.vlm_model) is expert
    assert sb3_safe_save.unwrap(loaded.policy.q_net_target.vlm_model) is expert
    assert loaded.policy_kwargs["vlm_model"] is expert
    assert_same_model(model, loaded)
    loaded.learn(32, reset_num_timesteps=False)
    assert time.perf_counter() - t0 < 60


def test_placeholder_dedupe_one_placeholder_three_paths(tmp_path: pathlib.Path) -> None:
    expert = UnpicklableExpert()
    model = make_model(expert, net_arch=[16])
    model.save(tmp_path / "m")
    manifest = sb3_safe_save.read_manifest(tmp_path / "m.safetensors")
    assert len(manifest.placeholders) == 1
    ph = manifest.placeholders[0]
    assert EXPERT_PATHS <= set(ph.paths)
    # every other path is where the example's policy keeps its own reference to the same object
    assert set(ph.paths) - EXPERT_PATHS <= {"policy._vlm_model"}
    # the unpicklable expert sits in policy_kwargs: the stored dict holds a placeholder node there
    pk = manifest.data["policy_kwargs"]
    assert pk.items["vlm_model"].kind == "placeholder" and pk.items["vlm_model"].key == ph.key  # type: ignore[union-attr]
    assert pk.items["vlm_model_name"] == "stub-llm-7b"  # type: ignore[union-attr]


_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from lang_dqn import CustomDQN, UnpicklableExpert
    from sb3_safe_save import unwrap
    path, obs = sys.argv[1], np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
    expert = UnpicklableExpert(seed=int(sys.argv[3]))
    model = CustomDQN.load(path, device="cpu", resources={"vlm_model": expert})
    assert unwrap(model.policy.q_net.vlm_model) is expert and unwrap(model.policy.q_net_target.vlm_model) is expert
    out = {}
    for flag in (False, True):
        model.policy.set_use_expert(flag)
        out[str(flag)] = model.predict(obs, deterministic=True)[0].tolist()
    out["num_timesteps"] = model.num_timesteps
    out["calls"] = expert.calls
    print("RESULT " + json.dumps(out))
    """
)


def test_fresh_process_load(tmp_path: pathlib.Path) -> None:
    """A process that never saw the model loads it with only the file, the classes and the expert."""
    expert = UnpicklableExpert(seed=EXPERT_SEED)
    model = make_model(expert, net_arch=[64, 64])
    model.learn(100)
    path = tmp_path / "agent.safetensors"
    model.save(path)
    obs = _obs(128)
    expected = {str(flag): _predict(model, obs, flag).tolist() for flag in (False, True)}

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests"), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), json.dumps(obs.tolist()), str(EXPERT_SEED)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["False"] == expected["False"]
    assert result["True"] == expected["True"]
    assert result["False"] != result["True"]
    assert result["num_timesteps"] == model.num_timesteps
    assert result["calls"] == 1
