"""Deployment (issue 13): ``load_policy``, ``save_policy`` and the evaluation load ``load(..., training=False)``.

Outcomes checked: the loaded policy predicts bitwise like the full model; only the policy's bytes are
read (a corrupted optimizer tensor does not stop ``load_policy`` or the evaluation load, but stops
``load``); no optimizer is built and ``torch._dynamo`` is never imported (fresh process); trust,
placeholders and rebinding work as for ``load``; ``learn()`` after an evaluation load warns and trains
with a fresh optimizer. Timings live in ``benchmarks/deploy.py``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy

from _compare import assert_same_tree
from lang_dqn import CustomDQNPolicy, ModuleExpert, make_model
from sb3_safe_save import (
    FormatError,
    IntegrityError,
    MissingResourceError,
    PickleRefusedError,
    UntrustedTypeError,
    audit,
    load_policy,
    read_manifest,
    safe,
    save_policy,
    unwrap,
)
from sb3_safe_save._deferred import DeferredOptimizer
from sb3_safe_save._manifest import OptimizerState, iter_nodes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ppo() -> BaseAlgorithm:
    return safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, n_epochs=1, seed=0).learn(16)


def _a2c_sde() -> BaseAlgorithm:
    kwargs = {"net_arch": [16]}
    return safe(A2C)("MlpPolicy", "Pendulum-v1", n_steps=8, use_sde=True, policy_kwargs=kwargs, seed=0).learn(16)


def _sac() -> BaseAlgorithm:
    model = safe(SAC)("MlpPolicy", "Pendulum-v1", buffer_size=100, learning_starts=0, batch_size=8, seed=0)
    return model.learn(4)


def _td3() -> BaseAlgorithm:
    model = safe(TD3)("MlpPolicy", "Pendulum-v1", buffer_size=100, learning_starts=0, batch_size=8, seed=0)
    return model.learn(4)


def _dqn() -> BaseAlgorithm:
    return safe(DQN)("MlpPolicy", "CartPole-v1", learning_starts=8, buffer_size=100, batch_size=8, seed=0).learn(16)


BUILDERS: dict[str, Callable[[], BaseAlgorithm]] = {"PPO": _ppo, "A2C-sde": _a2c_sde, "SAC": _sac, "TD3": _td3, "DQN": _dqn}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseAlgorithm, pathlib.Path]:
    model = BUILDERS[request.param]()
    path = tmp_path_factory.mktemp("deploy") / "agent.safetensors"
    model.save(path)
    return model, path


def _obs(model: BaseAlgorithm | BasePolicy, n: int = 32) -> np.ndarray:
    space = model.observation_space
    space.seed(3)
    return np.stack([space.sample() for _ in range(n)])


def _same_policy(policy: BasePolicy, reference: BasePolicy) -> None:
    assert type(policy) is type(reference)
    assert_same_tree(policy.state_dict(), reference.state_dict(), "policy")
    obs = _obs(reference)
    expected, _ = reference.predict(obs, deterministic=True)
    got, _ = policy.predict(obs, deterministic=True)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def _corrupt_optimizer_tensor(path: pathlib.Path) -> str:
    """Flip one byte of an optimizer-state tensor (not of the header, whose checksum would then fail)."""
    manifest = read_manifest(path)
    keys = [
        node.tensor
        for entry in manifest.state_dicts
        if isinstance(entry, OptimizerState)
        for node in iter_nodes(entry.state)
        if getattr(node, "tensor", None) and manifest.tensors[node.tensor].shape
    ]
    key = keys[0]
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    start = 8 + header_len + header[key]["data_offsets"][0]
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))
    return key


# ------------------------------------------------------------------------------------------ load_policy
def test_load_policy_predicts_like_the_full_model_and_builds_no_optimizer(saved: tuple[BaseAlgorithm, pathlib.Path]) -> None:
    model, path = saved
    policy = load_policy(path, device="cpu")
    assert isinstance(policy, BasePolicy) and not policy.training
    _same_policy(policy, model.policy)
    full = type(model).load(path, device="cpu")
    obs = _obs(model)
    assert np.array_equal(policy.predict(obs, deterministic=True)[0], full.predict(obs, deterministic=True)[0])
    optimizers = [m.optimizer for m in policy.modules() if "optimizer" in m.__dict__]
    assert optimizers and all(isinstance(o, DeferredOptimizer) and o._real is None for o in optimizers)
    assert policy.optimizer_class is model.policy.optimizer_class  # the stored class, not the stand-in
    assert {o.deferred_class for o in optimizers} == {model.policy.optimizer_class}


def test_load_policy_and_evaluation_load_read_no_optimizer_bytes(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    key = _corrupt_optimizer_tensor(path)
    with pytest.raises(IntegrityError, match="checksum"):
        safe(PPO).load(path, device="cpu")
    _same_policy(load_policy(path, device="cpu"), model.policy)
    _same_policy(safe(PPO).load(path, device="cpu", training=False).policy, model.policy)
    assert key.startswith("policy.optimizer")


def test_load_policy_still_verifies_the_policy_bytes(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    key = next(k for k in header if k.startswith("policy/") and header[k]["shape"])
    raw[8 + header_len + header[key]["data_offsets"][0]] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=key):
        load_policy(path, device="cpu")
    assert load_policy(path, device="cpu", verify=False) is not None  # verify=False reads it unchecked, as load does


def test_load_policy_runs_no_weight_init(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    calls: Counter[str] = Counter()
    for name in ("orthogonal_", "zeros_", "uniform_", "normal_", "kaiming_uniform_", "constant_"):
        original = getattr(th.nn.init, name)
        monkeypatch.setattr(th.nn.init, name, lambda *a, _n=name, _f=original, **k: (calls.update([_n]), _f(*a, **k))[1])
    safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16)  # building normally calls them: the counter works
    assert sum(calls.values()) > 0
    calls.clear()
    load_policy(path, device="cpu")
    assert not calls


def test_unrelated_data_is_neither_decoded_nor_audited(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    model.run_note = lambda: "made by a closure"  # type: ignore[attr-defined]  # only pickle can store it
    path = tmp_path / "agent.safetensors"
    model.save(path, allow_pickle=True)
    with pytest.raises(PickleRefusedError):
        safe(PPO).load(path, device="cpu")
    _same_policy(load_policy(path, device="cpu"), model.policy)  # the pickle is never read, so never refused


def test_load_policy_needs_trust_for_a_custom_policy_class(tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert(width=8, depth=1)
    model = make_model(expert, net_arch=[16])
    model.learn(60)
    path = tmp_path / "agent.safetensors"
    model.save(path)
    with pytest.raises(UntrustedTypeError, match="CustomDQNPolicy"):
        load_policy(path, device="cpu", resources={"vlm_model": expert})
    key = read_manifest(path).placeholders[0].key
    with pytest.raises(MissingResourceError, match=key):
        load_policy(path, device="cpu", trusted=[CustomDQNPolicy])
    policy = load_policy(path, device="cpu", trusted=[CustomDQNPolicy], resources={key: expert})
    assert isinstance(policy, CustomDQNPolicy)
    assert unwrap(policy.q_net.vlm_model) is expert and unwrap(policy.q_net_target.vlm_model) is expert  # rebound by identity
    policy.set_use_expert(True)
    model.policy.set_use_expert(True)
    _same_policy(policy, model.policy)


def test_load_policy_refuses_what_is_not_a_policy(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path, exclude=["policy_class"])
    with pytest.raises(FormatError, match="policy_class"):
        load_policy(path, device="cpu")
    zip_path = tmp_path / "stock.zip"
    BaseAlgorithm.save(model, zip_path)
    with pytest.raises(FormatError, match="zip"):
        load_policy(zip_path)


def test_load_policy_from_a_stream_with_a_pinned_hash(tmp_path: pathlib.Path) -> None:
    from sb3_safe_save import file_sha256

    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    with pytest.raises(IntegrityError, match="SHA-256"):
        load_policy(path, expected_sha256="0" * 64)
    with open(path, "rb") as f:
        _same_policy(load_policy(f, device="cpu", expected_sha256=file_sha256(path)), model.policy)


# ------------------------------------------------------------------------------------------ save_policy
def test_save_policy_round_trip_without_pickle(
    saved: tuple[BaseAlgorithm, pathlib.Path], tmp_path: pathlib.Path, no_pickle: None
) -> None:
    model, _ = saved
    path = tmp_path / "policy"
    save_policy(model.policy, path)
    path = path.with_suffix(".safetensors")
    manifest = read_manifest(path)
    assert manifest.content == "policy" and [e.name for e in manifest.state_dicts] == ["policy"]
    assert set(manifest.data) == {"policy_class", "observation_space", "action_space", "policy_kwargs"}
    policy = load_policy(path, device="cpu")
    _same_policy(policy, model.policy)
    expected = {k: v for k, v in model.policy._get_constructor_parameters().items() if k != "lr_schedule"}
    got = {k: v for k, v in policy._get_constructor_parameters().items() if k != "lr_schedule"}
    assert got.keys() == expected.keys()
    assert all(got[k] == expected[k] for k in expected if k not in ("observation_space", "action_space"))


def test_policy_file_is_inspected_and_audited_and_refused_by_load(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    path = tmp_path / "policy.safetensors"
    save_policy(model.policy, path)
    report = audit(path)
    assert report.ok and report.algorithm == "stable_baselines3.common.policies:ActorCriticPolicy"
    out = subprocess.run(
        [sys.executable, "-m", "sb3_safe_save", "inspect", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "ActorCriticPolicy" in out.stdout
    with pytest.raises(FormatError, match="load_policy"):
        safe(PPO).load(path)
    assert read_manifest_json(tmp_path, model)["content"] == "agent"


def read_manifest_json(tmp_path: pathlib.Path, model: BaseAlgorithm) -> dict[str, Any]:
    path = tmp_path / "agent.safetensors"
    model.save(path)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    result: dict[str, Any] = json.loads(header["__metadata__"]["sb3_safe_save"])
    return result


class ReportingPolicy(CustomDQNPolicy):
    """Reports its extra constructor arguments, as SB3's ``policy.save`` needs (and so does ``save_policy``)."""

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "vlm_model": self._vlm_model, "vlm_model_name": "expert"}


def test_save_policy_keeps_external_modules_out(tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert(width=8, depth=1)
    model = safe(DQN)(ReportingPolicy, "CartPole-v1", policy_kwargs={"vlm_model": expert, "net_arch": [16]}, seed=0)
    path = tmp_path / "policy.safetensors"
    save_policy(model.policy, path)
    manifest = read_manifest(path)
    assert len(manifest.placeholders) == 1 and manifest.placeholders[0].reason.startswith("external")
    assert not any("vlm_model." in k for k in manifest.tensors)  # the expert's weights are not in the file
    key = manifest.placeholders[0].key
    with pytest.raises(MissingResourceError, match=key):
        load_policy(path, device="cpu", trusted=[ReportingPolicy])
    policy = load_policy(path, device="cpu", trusted=[ReportingPolicy], resources={key: expert})
    assert unwrap(policy.q_net.vlm_model) is expert and unwrap(policy.q_net_target.vlm_model) is expert
    policy.set_use_expert(True)
    model.policy.set_use_expert(True)
    _same_policy(policy, model.policy)


def test_save_policy_refuses_non_policies(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TypeError, match=r"model\.policy"):
        save_policy(_ppo(), tmp_path / "x.safetensors")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- evaluation load
def test_evaluation_load_then_learn_warns_and_trains(saved: tuple[BaseAlgorithm, pathlib.Path]) -> None:
    model, path = saved
    loaded = type(model).load(path, device="cpu", training=False, env=model.get_env())
    _same_policy(loaded.policy, model.policy)
    names = [n for n in loaded._get_torch_save_params()[0] if "optimizer" in n]
    deferred = [loaded.policy.optimizer if n == "policy.optimizer" else getattr(loaded, n.split(".")[0]) for n in names]
    assert names and all(_optimizer_at(loaded, n)._real is None for n in names), deferred
    before = {k: v.clone() for k, v in loaded.policy.state_dict().items()}
    with pytest.warns(UserWarning, match="training=False"):
        loaded.learn(32)
    real = _optimizer_at(loaded, names[0]).materialize()
    assert type(real) is _optimizer_at(model, names[0]).__class__
    assert any(not th.equal(before[k], v) for k, v in loaded.policy.state_dict().items())  # it trained


def _optimizer_at(model: BaseAlgorithm, name: str) -> Any:
    obj: Any = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def test_evaluation_load_saves_a_fresh_optimizer(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    loaded = safe(PPO).load(path, device="cpu", training=False)
    with pytest.warns(UserWarning, match="fresh Adam"):
        loaded.save(tmp_path / "again.safetensors")
    again = safe(PPO).load(tmp_path / "again.safetensors", device="cpu")
    _same_policy(again.policy, model.policy)
    assert again.policy.optimizer.state_dict()["state"] == {}  # fresh: no Adam moments


def test_fresh_process_imports_no_dynamo(tmp_path: pathlib.Path) -> None:
    model = _sac()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    script = (
        "import sys, numpy as np\n"
        "from stable_baselines3 import SAC\n"
        "from sb3_safe_save import load_policy, safe\n"
        f"p = load_policy({str(path)!r}, device='cpu')\n"
        "p.predict(np.zeros(3, np.float32))\n"
        f"m = safe(SAC).load({str(path)!r}, device='cpu', training=False)\n"
        "m.predict(np.zeros(3, np.float32))\n"
        "print('torch._dynamo' in sys.modules)\n"
        "m.actor.optimizer.param_groups\n"  # first use builds the real Adam
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"], out.stderr


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
def test_load_policy_to_cuda(saved: tuple[BaseAlgorithm, pathlib.Path]) -> None:
    model, path = saved
    policy = load_policy(path, device="cuda")
    assert all(p.device.type == "cuda" for p in policy.parameters())
    _same_policy(policy.to("cpu"), model.policy)


def test_evaluation_load_then_set_parameters_restores_the_optimizer_state(tmp_path: pathlib.Path) -> None:
    model = _ppo()
    path = tmp_path / "agent.safetensors"
    model.save(path)
    loaded = safe(PPO).load(path, device="cpu", training=False)
    with pytest.warns(UserWarning, match="training=False"):
        loaded.set_parameters(path)
    assert_same_tree(loaded.policy.optimizer.state_dict(), model.policy.optimizer.state_dict(), "optimizer")
