"""In-place loading (``set_parameters``) from our files, stock SB3 zips and dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch as th
from stable_baselines3 import DQN, PPO

from _compare import assert_same_tree
from sb3_safe_save import AlgorithmMismatchError, StateMismatchError, safe


def _dqn(seed: int, net_arch: list[int] | None = None) -> DQN:
    model = safe(DQN)(
        "MlpPolicy",
        "CartPole-v1",
        policy_kwargs={"net_arch": net_arch or [16]},
        learning_starts=20,
        buffer_size=500,
        seed=seed,
    )
    model.learn(80)
    return model


def _assert_same_parameters(a: DQN, b: DQN) -> None:
    assert_same_tree(a.policy.state_dict(), b.policy.state_dict(), "policy")
    assert_same_tree(a.policy.optimizer.state_dict(), b.policy.optimizer.state_dict(), "policy.optimizer")


def test_set_parameters_from_our_file_is_exact_and_in_place(tmp_path: Path) -> None:
    source, target = _dqn(0), _dqn(1)
    assert not th.equal(source.policy.q_net.q_net[0].weight, target.policy.q_net.q_net[0].weight)
    weight_before = target.policy.q_net.q_net[0].weight
    source.save(tmp_path / "a.safetensors")
    target.set_parameters(tmp_path / "a.safetensors")
    _assert_same_parameters(source, target)
    assert target.policy.q_net.q_net[0].weight is weight_before  # in place: the optimizer still holds it
    assert any(p is weight_before for g in target.policy.optimizer.param_groups for p in g["params"])
    target.learn(20)


def test_set_parameters_refuses_a_different_architecture_or_algorithm(tmp_path: Path) -> None:
    _dqn(0).save(tmp_path / "a.safetensors")
    with pytest.raises(StateMismatchError, match=r"stored as F32 \[16, 4\] but the model has torch.float32 \[32, 4\]"):
        _dqn(1, net_arch=[32]).set_parameters(tmp_path / "a.safetensors")
    ppo = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16)
    with pytest.raises(AlgorithmMismatchError, match="DQN"):
        ppo.set_parameters(tmp_path / "a.safetensors")


def test_set_parameters_exact_match_false_loads_what_fits(tmp_path: Path) -> None:
    source, target = _dqn(0), _dqn(1)
    source.save(tmp_path / "a.safetensors")
    target.set_parameters(tmp_path / "a.safetensors", exact_match=False)
    _assert_same_parameters(source, target)


def test_set_parameters_still_takes_dicts_and_stock_zips(tmp_path: Path) -> None:
    source, target = _dqn(0), _dqn(1)
    target.set_parameters(source.get_parameters())
    assert_same_tree(source.policy.state_dict(), target.policy.state_dict(), "policy")
    other = _dqn(2)
    DQN.save(other, tmp_path / "stock.zip")  # SB3's own save
    target.set_parameters(tmp_path / "stock.zip")
    assert_same_tree(other.policy.state_dict(), target.policy.state_dict(), "policy")
