"""The load path's performance properties that can be checked without timing anything (issue 6).

* Loading builds no weights that are then overwritten: no ``torch.nn.init`` function runs during a load,
  while building the same model normally does run them (so the check can fail).
* Loaded tensors are the model's own memory, not views of a memory-mapped file: changing or training the
  loaded model never changes the file.

Timings belong in ``python -m benchmarks``, never in pytest.
"""

from __future__ import annotations

import pathlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm

from _compare import assert_same_model
from sb3_safe_save import file_sha256, safe, unwrap

INIT_FUNCTIONS = (
    "orthogonal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "uniform_",
    "normal_",
    "trunc_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Wrap the ``torch.nn.init`` functions with call counters (they still initialise)."""
    calls: Counter[str] = Counter()

    def counting(name: str, fn: Callable[..., th.Tensor]) -> Callable[..., th.Tensor]:
        def wrapper(*args: Any, **kwargs: Any) -> th.Tensor:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in INIT_FUNCTIONS:
        monkeypatch.setattr(th.nn.init, name, counting(name, getattr(th.nn.init, name)))
    yield calls


def _ppo() -> BaseAlgorithm:
    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, n_epochs=1, seed=0)
    return model.learn(16)


def _sac() -> BaseAlgorithm:
    model = safe(SAC)("MlpPolicy", "Pendulum-v1", buffer_size=100, learning_starts=0, batch_size=8, seed=0)
    return model.learn(4)


def _dqn() -> BaseAlgorithm:
    return safe(DQN)("MlpPolicy", "CartPole-v1", learning_starts=8, buffer_size=100, batch_size=8, seed=0).learn(16)


BUILDERS: dict[str, Callable[[], BaseAlgorithm]] = {"PPO": _ppo, "SAC": _sac, "DQN": _dqn}


@pytest.mark.parametrize("algo", sorted(BUILDERS))
def test_load_runs_no_weight_init(algo: str, tmp_path: pathlib.Path, init_calls: Counter[str]) -> None:
    model = BUILDERS[algo]()
    assert sum(init_calls.values()) > 0, "building the model normally runs torch.nn.init: the counters must see it"
    path = tmp_path / "model.safetensors"
    model.save(path)
    init_calls.clear()

    loaded = type(model).load(path)

    assert dict(init_calls) == {}, f"load ran weight initialisation whose result it then overwrote: {dict(init_calls)}"
    assert_same_model(model, loaded)


def test_init_functions_are_restored_after_load(tmp_path: pathlib.Path) -> None:
    before = {name: getattr(th.nn.init, name) for name in INIT_FUNCTIONS}
    model = _ppo()
    model.save(tmp_path / "m.safetensors")
    type(model).load(tmp_path / "m.safetensors")
    assert {name: getattr(th.nn.init, name) for name in INIT_FUNCTIONS} == before
    layer = th.nn.Linear(8, 8)
    assert layer.weight.abs().sum() > 0, "weight initialisation must work again after a load"


def test_core_scenario_load_runs_no_weight_init(tmp_path: pathlib.Path, init_calls: Counter[str]) -> None:
    from lang_dqn import ModuleExpert, make_model

    expert = ModuleExpert()
    model = make_model(expert).learn(60)
    model.save(tmp_path / "dqn.safetensors")
    init_calls.clear()

    loaded = type(model).load(tmp_path / "dqn.safetensors", resources={"vlm_model": expert})

    assert dict(init_calls) == {}
    assert unwrap(loaded.policy.q_net.vlm_model) is expert
    assert_same_model(model, loaded)


@pytest.mark.parametrize("algo", sorted(BUILDERS))
def test_loaded_tensors_do_not_write_back_to_the_file(algo: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.safetensors"
    BUILDERS[algo]().save(path)
    digest = file_sha256(path)

    loaded = _load_same(algo, path)
    with th.no_grad():
        for p in loaded.policy.parameters():
            p.add_(1.0)
    loaded.learn(32)
    for opt in _optimizers(loaded):
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, th.Tensor) and value.is_floating_point():
                    value.mul_(2.0)

    assert file_sha256(path) == digest, "changing the loaded model changed the file: its tensors are views of the file"


def _load_same(algo: str, path: pathlib.Path) -> BaseAlgorithm:
    env = gym.make("Pendulum-v1" if algo == "SAC" else "CartPole-v1")
    return safe({"PPO": PPO, "SAC": SAC, "DQN": DQN}[algo]).load(path, env=env)


def _optimizers(model: BaseAlgorithm) -> list[th.optim.Optimizer]:
    names, _ = model._get_torch_save_params()
    out = []
    for name in names:
        obj: Any = model
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, th.optim.Optimizer):
            out.append(obj)
    return out
