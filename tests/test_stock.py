"""Stock SB3 files read without running their pickles (issue 25): zips, VecNormalize and replay-buffer pickles.

The corpus is written at test time by the installed SB3 (tiny nets, a few updates so the optimizers hold
state); committed files written by older SB3 releases live in ``tests/data/stock`` (``make_stock_corpus.py``).
Each file must convert without ``--trust-pickle`` and give the agent stock SB3's own load gives: parameters
and optimizer state equal, deterministic predictions identical.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import sys
import warnings
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import ARS, QRDQN, TQC, TRPO, CrossQ, RecurrentPPO
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _compare import assert_same_model
from sb3_safe_save import StockPickleRefusedError, UnresolvedResourceError, load_vecnormalize, safe
from sb3_safe_save._cli import main
from sb3_safe_save._stock import read_stock, scan_stock

DATA = pathlib.Path(__file__).parent / "data" / "stock"
ON_POLICY = {PPO, A2C, TRPO, RecurrentPPO}
CASES: dict[str, tuple[type[Any], str, dict[str, Any]]] = {
    "PPO-defaults": (PPO, "CartPole-v1", {"n_steps": 16, "batch_size": 16, "n_epochs": 1}),
    "PPO": (PPO, "CartPole-v1", {"n_steps": 16, "batch_size": 16, "n_epochs": 1}),
    "A2C": (A2C, "CartPole-v1", {"n_steps": 8}),
    "DQN": (DQN, "CartPole-v1", {"target_update_interval": 8}),
    "SAC": (SAC, "Pendulum-v1", {}),
    "SAC-fixed-ent": (SAC, "Pendulum-v1", {"ent_coef": 0.1}),
    "TD3": (TD3, "Pendulum-v1", {}),
    "DDPG": (DDPG, "Pendulum-v1", {}),
    "QRDQN": (QRDQN, "CartPole-v1", {}),
    "TQC": (TQC, "Pendulum-v1", {}),
    "CrossQ": (CrossQ, "Pendulum-v1", {}),
    "TRPO": (TRPO, "CartPole-v1", {"n_steps": 32, "batch_size": 32}),
    "RecurrentPPO": (RecurrentPPO, "CartPole-v1", {"n_steps": 16, "batch_size": 16, "n_epochs": 1}),
    "ARS": (ARS, "CartPole-v1", {"n_delta": 2}),
}


def _stock_model(case: str) -> Any:
    algo, env, kwargs = CASES[case]
    kwargs = {**kwargs, "seed": 0}
    if algo not in ON_POLICY and algo is not ARS:
        kwargs.update(buffer_size=200, learning_starts=16)  # 8 updates: the optimizers hold state
    if case != "PPO-defaults":
        kwargs["policy_kwargs"] = {"net_arch": [8], "activation_fn": th.nn.Tanh}
    policy = "MlpLstmPolicy" if algo is RecurrentPPO else "MlpPolicy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = algo(policy, env, **kwargs)
        model.learn(24 if algo is not ARS else 40)
    return model


def refuse_stock_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the loaders SB3 uses (``pickle.load(s)``, ``cloudpickle.loads``, ``torch.load``) raise."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a stock loader was used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "loads"), (th, "load")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_stock_zip_converts_and_loads_as_stock_sb3_does(
    case: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    algo = CASES[case][0]
    _stock_model(case).save(tmp_path / "agent.zip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = algo.load(tmp_path / "agent.zip", device="cpu")
    refuse_stock_loaders(monkeypatch)
    assert main(["convert", str(tmp_path / "agent.zip"), str(tmp_path / "agent.safetensors")]) == 0
    assert_same_model(reference, safe(algo).load(tmp_path / "agent.safetensors", device="cpu"))
    assert_same_model(reference, safe(algo).load(tmp_path / "agent.zip", device="cpu", stock=True))


def test_unreadable_schedules_become_placeholders(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user lambda (or SB3 < 2.7's closures) is never built: the model predicts, training asks for the value."""

    def linear(value: float) -> Any:
        return lambda progress: progress * value

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, learning_rate=linear(3e-4), clip_range=linear(0.2))
    model.save(tmp_path / "agent.zip")
    stock = read_stock(tmp_path / "agent.zip")
    assert stock.unreadable == ["learning_rate", "clip_range"] and "lr_schedule" not in stock.data
    loaded = safe(PPO).load(tmp_path / "agent.zip", stock=True, device="cpu")
    with pytest.raises(UnresolvedResourceError, match=r"custom_objects=\{'clip_range'"):
        loaded.clip_range(1.0)
    with pytest.raises(UnresolvedResourceError, match=r"custom_objects=\{'learning_rate'"):
        loaded.lr_schedule(1.0)
    given = safe(PPO).load(tmp_path / "agent.zip", stock=True, device="cpu", custom_objects={"clip_range": 0.1})
    assert given.clip_range(1.0) == 0.1
    assert main(["convert", str(tmp_path / "agent.zip"), str(tmp_path / "out.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "placeholder 'learning_rate'" in err and "placeholder 'clip_range'" in err
    converted = safe(PPO).load(
        tmp_path / "out.safetensors",
        custom_objects={"learning_rate": 1e-4, "lr_schedule": lambda _: 1e-4, "clip_range": 0.2},
    )
    obs = np.stack([model.observation_space.sample() for _ in range(16)])
    assert np.array_equal(model.predict(obs, deterministic=True)[0], converted.predict(obs, deterministic=True)[0])


def test_untrusted_class_is_named_and_nothing_is_imported(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs={"activation_fn": th.nn.Tanh})
    path, out = tmp_path / "agent.zip", tmp_path / "out.safetensors"
    model.save(path)
    _rewrite_pickle(path, "policy_kwargs", b"torch.nn.modules.activation", b"sb3ss_canary_not_imported_x")
    with pytest.raises(
        StockPickleRefusedError, match=r"sb3ss_canary_not_imported_x:Tanh  \(used at policy_kwargs.activation_fn"
    ):
        read_stock(path)
    assert main(["convert", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "sb3ss_canary_not_imported_x:Tanh (at policy_kwargs.activation_fn)" in err
    assert "--trust sb3ss_canary_not_imported_x:Tanh" in err and "--trust-pickle" in err and not out.exists()
    assert "sb3ss_canary_not_imported_x" not in sys.modules


def _rewrite_pickle(path: pathlib.Path, key: str, old: bytes, new: bytes) -> None:
    """Replace bytes inside one ``:serialized:`` entry of a stock zip (a forged reference of the same length)."""
    import base64
    import zipfile

    assert len(old) == len(new)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    data = json.loads(members["data"])
    blob = base64.b64decode(data[key][":serialized:"])
    assert old in blob
    data[key][":serialized:"] = base64.b64encode(blob.replace(old, new)).decode()
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)


def test_vecnormalize_pickle_loads_like_stock(tmp_path: pathlib.Path) -> None:
    def env() -> DummyVecEnv:
        return DummyVecEnv([lambda: gym.make("Pendulum-v1")] * 2)

    vn = VecNormalize(env(), gamma=0.95, clip_obs=5.0)
    vn.reset()
    for _ in range(5):
        vn.step(np.zeros((2, 1), dtype=np.float32))
    vn.save(str(tmp_path / "vecnormalize.pkl"))
    stock = VecNormalize.load(str(tmp_path / "vecnormalize.pkl"), env())
    ours = load_vecnormalize(tmp_path / "vecnormalize.pkl", env())
    for a, b in ((stock.obs_rms, ours.obs_rms), (stock.ret_rms, ours.ret_rms)):
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.var, b.var) and a.count == b.count
    for name in ("training", "norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon"):
        assert getattr(stock, name) == getattr(ours, name), name
    assert np.array_equal(stock.old_obs, ours.old_obs) and np.array_equal(stock.old_reward, ours.old_reward)


def test_audit_of_a_stock_zip_lists_imports_and_the_verdict(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _stock_model("DQN").save(tmp_path / "agent.zip")
    scans = {s.where: s for s in scan_stock(tmp_path / "agent.zip")}
    assert scans["data.policy_class"].globals == ["stable_baselines3.dqn.policies:DQNPolicy"]
    assert "stable_baselines3.common.type_aliases:TrainFrequencyUnit" in scans["data.train_freq"].globals
    assert scans["policy.pth"].globals == sorted(
        ["collections:OrderedDict", "torch:FloatStorage", "torch._utils:_rebuild_tensor_v2"]
    )
    assert main(["audit", str(tmp_path / "agent.zip")]) == 0
    out = capsys.readouterr().out
    assert "accepted by the safe reader" in out and "stable_baselines3.dqn.policies:DQNPolicy" in out


@pytest.mark.parametrize("path", sorted(DATA.glob("*.zip")), ids=lambda p: p.stem)
def test_committed_stock_zips_of_older_releases(path: pathlib.Path) -> None:
    """Files written by older SB3 releases in their own venvs (``make_stock_corpus.py``): the predictions and
    parameters that release computed (stored next to each file), and the installed SB3's own load of it."""
    expected = json.loads(path.with_suffix(".json").read_text())
    algo = {c.__name__: c for c in (PPO, A2C, DQN, SAC, TD3, DDPG, QRDQN, TQC, TRPO, RecurrentPPO, ARS)}[expected["algo"]]
    model = safe(algo).load(path, stock=True, device="cpu")
    obs = np.asarray(expected["obs"], dtype=np.float32)
    actions, _ = model.predict(obs, deterministic=True)
    assert np.array_equal(actions, np.asarray(expected["actions"], dtype=actions.dtype))
    params = {k: v.flatten()[:4].tolist() for k, v in model.policy.state_dict().items()}
    assert params == expected["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = algo.load(path, device="cpu")  # the installed SB3's own load (it unpickles our own test data)
    assert_same_model(reference, model)
