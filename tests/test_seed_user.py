"""Issue 21: the seed user's own code, as they write it, with a real transformers expert.

Each test asserts the outcome: the expert's tensors are bitwise unchanged, or an error stopped training
before the first change and names the fix.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch as th

pytest.importorskip("transformers")

import _seed_user
from _gpt2_expert import tiny_gpt2
from _seed_user import CustomDQN, CustomDQNPolicy, ListDQNPolicy, ModuleListDQNPolicy, WorkaroundDQN, make
from sb3_safe_save import HazardError, HazardWarning, SaveWarning, StateMismatchError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = "self.vlm_model = sb3_safe_save.external(vlm_model)"


def _weights(module: th.nn.Module) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: th.nn.Module, before: dict[str, th.Tensor]) -> bool:
    after = module.state_dict()
    return after.keys() == before.keys() and all(th.equal(before[k], after[k]) for k in before)


def _obs() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(32, 4)).astype(np.float32)


def test_natural_registration_is_stopped_before_the_first_change() -> None:
    expert = tiny_gpt2(3)
    before = _weights(expert)
    with pytest.warns(HazardWarning) as caught:  # when the model is built, before anything trains
        model = make(CustomDQN, CustomDQNPolicy, expert)
    messages = [str(w.message) for w in caught]
    assert [m.split(" (")[0] for m in messages] == ["shared_with_target", "external_in_optimizer"], messages
    assert all(m.endswith(FIX) for m in messages) and "found when the model was built" in messages[0]
    assert {w.filename for w in caught} == {_seed_user.__file__}  # the user's line (make()'s algo(...)), not SB3's
    with pytest.raises(HazardError, match=r"CustomDQN\.learn\(\) refused to start") as info:
        model.learn(220)
    assert FIX in str(info.value) and "zeroes them at the first target update" in str(info.value)
    assert model.num_timesteps == 0
    assert _unchanged(expert, before)


def test_expert_in_a_plain_list_trains_untouched_and_round_trips(tmp_path: pathlib.Path) -> None:
    expert = tiny_gpt2(3)
    before = _weights(expert)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not registered: nothing to warn about
        model = make(CustomDQN, ListDQNPolicy, expert)
        model.learn(220)
        model.save(tmp_path / "agent")
    assert model._n_updates > 0 and _unchanged(expert, before)
    loaded = CustomDQN.load(tmp_path / "agent", resources={"vlm_model": expert})
    assert loaded.policy.q_net.experts[0] is expert
    obs = _obs()
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_expert_in_a_module_list_is_stopped_too() -> None:
    expert = tiny_gpt2(3)
    before = _weights(expert)
    with pytest.warns(HazardWarning) as caught:
        model = make(CustomDQN, ModuleListDQNPolicy, expert)
    assert str(caught[0].message).startswith("shared_with_target (found when the model was built)")
    with pytest.raises(HazardError, match=r"policy\.q_net\.experts is registered in both"):
        model.learn(220)
    assert _unchanged(expert, before)


def test_the_articles_workaround_says_so_at_save_and_loads_with_policy_kwargs(tmp_path: pathlib.Path) -> None:
    expert = tiny_gpt2(3)
    before = _weights(expert)
    model = make(WorkaroundDQN, ListDQNPolicy, expert)
    model.learn(120)
    with pytest.warns(SaveWarning) as caught:
        model.save(tmp_path / "agent")
    message = str(caught[0].message)
    assert "the file cannot rebuild the policy by itself" in message
    assert "WorkaroundDQN.load(path, policy_kwargs=" in message and "the exclusion is unnecessary" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save(tmp_path / "again")  # once per model

    with pytest.raises(StateMismatchError, match=r"saved without policy_kwargs.*WorkaroundDQN\.load\(path, policy_kwargs="):
        WorkaroundDQN.load(tmp_path / "agent")
    loaded = WorkaroundDQN.load(tmp_path / "agent", policy_kwargs={"vlm_model": expert, "net_arch": [16]})
    assert loaded.policy.q_net.experts[0] is expert  # the expert given in policy_kwargs, rebound in the module tree
    obs = _obs()
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    assert _unchanged(expert, before)


_CHILD = textwrap.dedent(
    """
    import sys, warnings
    import torch as th
    from _gpt2_expert import tiny_gpt2
    from _seed_user import CustomDQN
    from sb3_safe_save import HazardError, HazardWarning
    expert = tiny_gpt2(3)
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = CustomDQN.load(sys.argv[1], resources={"vlm_model": expert})
    assert any(issubclass(w.category, HazardWarning) and "found when the model was loaded" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    try:
        model.learn(300)
    except HazardError as e:
        assert "sb3_safe_save.external(vlm_model)" in str(e)
    else:
        raise SystemExit("learn() trained a model whose target update zeroes the expert")
    assert all(th.equal(before[k], v) for k, v in expert.state_dict().items()), "the expert changed"
    print("OK")
    """
)


def test_fresh_process_load_of_a_hazardous_file_then_learn(tmp_path: pathlib.Path) -> None:
    with pytest.warns(HazardWarning):
        model = make(CustomDQN, CustomDQNPolicy, tiny_gpt2(3))
    model.save(tmp_path / "hazardous")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests"), str(ROOT / "src")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "hazardous.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-4000:]
