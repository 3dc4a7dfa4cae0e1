"""Issue 12 with a real transformers model: a tiny GPT-2 (built from a config) as the DQN's expert.

Registered naively (``self.vlm_model = vlm_model``), DQN's hard target update would zero it: building
the model warns, ``learn()`` refuses to start before any change, and the audit reports it. Held through
``external()``, it is bitwise unchanged after several target updates, the file stays small, the audit is
clean, and a fresh process that loads the file with ``resources=`` computes bitwise-equal Q-values.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest
import torch as th

pytest.importorskip("transformers")

import sb3_safe_save
from _gpt2_expert import make_gpt2_model, q_values, tiny_gpt2
from sb3_safe_save import HazardError, HazardWarning, audit, external, unwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 220  # hard target updates at steps 50, 100, 150, 200; gradient steps from step 50 on
EXPERT_SEED = 3


def _obs(n: int = 64) -> np.ndarray:
    return (np.random.default_rng(5).normal(size=(n, 4)) * [1.0, 1.0, 0.1, 1.0]).astype(np.float32)


def _weights(module: th.nn.Module) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _optimizer_params(model: Any) -> set[int]:
    return {id(p) for g in model.policy.optimizer.param_groups for p in g["params"]}


def _policy_tensor_bytes(model: Any) -> int:
    own = sum(v.numel() * v.element_size() for k, v in model.policy.state_dict().items() if "vlm_model" not in k)
    state = model.policy.optimizer.state_dict()["state"]
    return own + sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if isinstance(t, th.Tensor))


def test_naive_registration_is_stopped_before_training_changes_the_expert(tmp_path: pathlib.Path) -> None:
    expert = tiny_gpt2(EXPERT_SEED)
    before = _weights(expert)
    assert len([k for k, v in before.items() if bool(v.any())]) == 16  # weights and embeddings (GPT-2 biases start at 0)
    with pytest.warns(HazardWarning) as caught:  # said when the model is built, before anything trains
        model = make_gpt2_model(expert, naive=True)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("shared_with_target (found when the model was built)") for m in messages), messages
    assert any(m.startswith("external_in_optimizer (found when the model was built)") for m in messages), messages
    # the facts behind the hazard: registered in both networks, its parameters in Adam
    assert dict(model.policy.q_net.named_modules())["vlm_model"] is expert
    assert dict(model.policy.q_net_target.named_modules())["vlm_model"] is expert
    assert {id(p) for p in expert.parameters()} <= _optimizer_params(model)

    fix = r"self\.vlm_model = sb3_safe_save\.external\(vlm_model\)"
    with pytest.raises(HazardError, match=r"learn\(\) refused to start.*" + fix):
        model.learn(STEPS)
    assert model.num_timesteps == 0 and model._n_updates == 0
    after = expert.state_dict()
    assert all(th.equal(before[k], after[k]) for k in before), "the expert must be bitwise unchanged"

    report = audit(model)
    codes = {f.code: f for f in report.findings}
    shared = codes["shared_with_target"]
    assert shared.severity == "error" and "sb3_safe_save.external(vlm_model)" in shared.message
    assert {"policy.q_net.vlm_model", "policy.q_net_target.vlm_model"} <= set(shared.paths)
    assert codes["external_in_optimizer"].severity == "warning"
    assert not report.ok

    with warnings.catch_warnings():
        warnings.simplefilter("error", HazardWarning)  # warned once per model: at the build, not again at save
        model.save(tmp_path / "naive.safetensors")
    manifest = sb3_safe_save.read_manifest(tmp_path / "naive.safetensors")
    assert {h.code for h in manifest.hazards} == {"shared_with_target", "external_in_optimizer"}
    assert not any("vlm_model" in k for k in manifest.tensors)  # never written, even registered


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch as th
    th.set_num_threads(1)
    from _gpt2_expert import q_values, tiny_gpt2
    from lang_dqn import CustomDQN
    from sb3_safe_save import External, unwrap
    path, obs_path, out_path, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    expert = tiny_gpt2(seed)
    model = CustomDQN.load(path, device="cpu", resources={"vlm_model": expert}, trusted=["_gpt2_expert.*"])
    assert isinstance(model.policy.q_net.vlm_model, External) and unwrap(model.policy.q_net.vlm_model) is expert
    assert "vlm_model" not in dict(model.policy.named_modules()) and model.policy_kwargs["vlm_model"] is expert
    np.save(out_path, q_values(model, np.load(obs_path)).numpy())
    print("OK")
    """
)


def test_guarded_expert_survives_training_saves_small_and_reloads_exactly(tmp_path: pathlib.Path) -> None:
    expert = tiny_gpt2(EXPERT_SEED)
    before = _weights(expert)
    model = make_gpt2_model(expert)
    assert "vlm_model" not in dict(model.policy.named_modules())
    assert not any(id(p) in _optimizer_params(model) for p in expert.parameters())
    assert all("vlm_model" not in k for k in model.policy.state_dict())

    model.learn(STEPS)
    assert model._n_updates > 0 and model._n_calls >= 200  # four hard target updates happened
    after = expert.state_dict()
    assert after.keys() == before.keys()
    assert all(th.equal(before[k], after[k]) for k in before), "the guarded expert must be bitwise unchanged"
    assert not expert.training  # set_training_mode(True) during train() did not reach it

    report = audit(model, allow_placeholders=["vlm_model"])
    assert [f for f in report.findings if f.severity == "error"] == []
    assert report.ok
    (placeholder,) = [f for f in report.findings if f.code == "placeholder"]
    assert placeholder.reason == "external" and placeholder.type.endswith("GPT2LMHeadModel")
    expert_bytes = sum(p.numel() * p.element_size() for p in expert.parameters())
    assert placeholder.size_bytes == expert_bytes

    path = tmp_path / "guarded.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", HazardWarning)
        model.save(path)
    manifest = sb3_safe_save.read_manifest(path)
    assert manifest.hazards == []
    assert not any("vlm_model" in k for k in manifest.tensors)
    size = path.stat().st_size
    tensors = _policy_tensor_bytes(model)
    assert size <= tensors + 64 * 1024, (size, tensors)  # the policy and optimizer only, plus the header
    assert size < expert_bytes / 2, (size, expert_bytes)

    obs = _obs()
    np.save(tmp_path / "obs.npy", obs)
    expected = q_values(model, obs).numpy()
    assert not np.array_equal(expected, q_values_without_expert(model, obs)), "the expert must contribute"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests"), str(ROOT / "src")]),
    }
    out = tmp_path / "q.npy"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(tmp_path / "obs.npy"), str(out), str(EXPERT_SEED)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.load(out)
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()  # bitwise


def q_values_without_expert(model: Any, obs: np.ndarray) -> np.ndarray:
    with th.no_grad():
        return model.policy.q_net(th.as_tensor(obs)).numpy()  # type: ignore[no-any-return]


def test_resources_takes_the_object_or_its_wrapper(tmp_path: pathlib.Path) -> None:
    expert = tiny_gpt2(EXPERT_SEED)
    model = make_gpt2_model(expert)
    path = tmp_path / "m.safetensors"
    model.save(path)
    obs = _obs(8)
    for given in (expert, external(expert)):
        loaded = type(model).load(path, device="cpu", resources={"vlm_model": given}, trusted=["_gpt2_expert.*"])
        assert unwrap(loaded.policy.q_net.vlm_model) is expert and unwrap(loaded.policy.q_net_target.vlm_model) is expert
        assert loaded.policy_kwargs["vlm_model"] is expert  # saved as the object there: the object comes back
        assert q_values(loaded, obs).numpy().tobytes() == q_values(model, obs).numpy().tobytes()
