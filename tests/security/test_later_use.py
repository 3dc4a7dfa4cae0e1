"""Nothing loads that a later call trips over (issue 22, point 5).

Each forged file below used to load and then break (or quietly poison) the first ``predict``,
``learn``, ``reset`` or ``sample``: a NaN cached Gaussian, a negative env seed, a gSDE matrix of
the wrong rank, ``norm_obs`` without statistics, inconsistent HER episode bookkeeping, an optimizer
state without (or with a string for) ``exp_avg``, a log standard deviation that gives no usable
standard deviation. Each is now refused at load with a ``SafeSaveError`` naming the key, and the
caller's objects (the env and its pending seeds, the VecNormalize, the replay buffer, the model
given to ``set_parameters``, the process's random state) are bitwise as they were. Next to each
kind, a valid file of the same kind still loads exactly.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _attack import base, forge, refused, write
from _compare import assert_same_tree, buffer_state, her_model
from _hostile import tiny_kwargs
from sb3_safe_save import (
    FormatError,
    StateMismatchError,
    load_policy,
    load_vecnormalize,
    safe,
    save_vecnormalize,
)
from sb3_safe_save._buffers import META_BUFFER, META_BUFFER_CHECKSUM
from sb3_safe_save._vecnormalize import META_VEC_NORMALIZE, META_VEC_NORMALIZE_CHECKSUM

Tensors = dict[str, th.Tensor]
NORMAL_Y, NORMAL_IS_VALID = 5024, 5040  # torch's CPU generator state: the cached float64 normal draw and its flag


# ------------------------------------------------------------------------------------ the caller's objects
def _caller_env(env_id: str = "CartPole-v1") -> DummyVecEnv:
    """The caller's env: stepped once, with generators of its own and seeds pending for its next reset."""
    env = DummyVecEnv([lambda: gym.make(env_id)])
    env.seed(11)
    env.reset()
    env.step(np.zeros((1, *env.action_space.shape), dtype=env.action_space.dtype))
    env.seed(123)
    return env


def _env_state(env: DummyVecEnv) -> dict[str, Any]:
    return {
        "seeds": copy.deepcopy(env._seeds),
        "options": copy.deepcopy(env._options),
        "generators": [copy.deepcopy(e.unwrapped.np_random.bit_generator.state) for e in env.envs],
        "buf_obs": {k: v.copy() for k, v in env.buf_obs.items()},
    }


def _vn_state(vn: VecNormalize) -> dict[str, Any]:
    rms = vn.obs_rms
    return {
        "settings": {k: getattr(vn, k) for k in ("training", "norm_obs", "norm_reward", "clip_obs", "gamma", "epsilon")},
        "obs_rms": (rms.mean.copy(), rms.var.copy(), rms.count),
        "ret_rms": (np.copy(vn.ret_rms.mean), np.copy(vn.ret_rms.var), vn.ret_rms.count),
        "old_reward": np.copy(vn.old_reward),
        "returns": np.copy(vn.returns),
    }


def _model_state(model: Any) -> dict[str, Any]:
    return {
        "policy": {k: v.detach().clone() for k, v in model.policy.state_dict().items()},
        "optimizer": copy.deepcopy(model.policy.optimizer.state_dict()),
    }


# -------------------------------------------------------------------------------------------- files
@functools.cache
def gsde_bytes() -> bytes:
    """A tiny PPO with gSDE on Pendulum (``policy/log_std`` and ``rng/gsde/...`` tensors)."""
    model = safe(PPO)("MlpPolicy", "Pendulum-v1", use_sde=True, **tiny_kwargs("PPO"))
    model.learn(32)
    buf = io.BytesIO()
    model.save(buf)
    return buf.getvalue()


def _torch_cache(value: float) -> Callable[[Tensors], None]:
    """Put ``value`` in the torch CPU state's cached normal draw (the next float64 ``randn``) and mark it valid."""

    def edit(t: Tensors) -> None:
        raw = t["rng/torch_cpu"].numpy().copy()
        raw[NORMAL_Y : NORMAL_Y + 8] = np.array([value], dtype="<f8").view(np.uint8)
        raw[NORMAL_IS_VALID : NORMAL_IS_VALID + 4] = np.array([1], dtype="<i4").view(np.uint8)
        t["rng/torch_cpu"] = th.from_numpy(raw)

    return edit


def _numpy_cache(value: float) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["random_state"].update(numpy_has_gauss=1, numpy_gauss=value)


def _python_cache(value: float) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["random_state"].update(python_gauss=value)


# ------------------------------------------------------------------------------------------ random state
CACHED = {
    "numpy": (lambda v: forge(base(), _numpy_cache(v)), "random_state.numpy_gauss", lambda: np.random.standard_normal()),
    "random": (lambda v: forge(base(), _python_cache(v)), "random_state.python_gauss", lambda: random.gauss(0.0, 1.0)),
    "torch": (
        lambda v: forge(base(), tensors=_torch_cache(v)),
        "random_state.torch_cpu",
        lambda: th.randn(1, dtype=th.float64).item(),
    ),
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("generator", list(CACHED))
def test_a_non_finite_cached_gaussian_is_refused(tmp_path: Path, generator: str, value: float) -> None:
    make, key, _ = CACHED[generator]
    path = write(tmp_path, make(value))
    env = _caller_env()
    before = _env_state(env)
    error = refused(lambda: safe(PPO).load(path, env=env))  # also: torch, numpy and random untouched
    assert isinstance(error, FormatError)
    assert key in str(error) and "finite" in str(error)
    assert_same_tree(before, _env_state(env))


@pytest.mark.parametrize("generator", list(CACHED))
def test_a_finite_cached_gaussian_is_restored_and_drawn_next(tmp_path: Path, generator: str) -> None:
    make, _, draw = CACHED[generator]
    safe(PPO).load(write(tmp_path, make(0.125)), env=_caller_env())
    assert draw() == 0.125


def test_a_negative_env_seed_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, forge(base(), lambda m: m["random_state"].update(env_seeds=[-1])))
    env = _caller_env()
    before = _env_state(env)
    error = refused(lambda: safe(PPO).load(path, env=env))
    assert isinstance(error, FormatError)
    assert "random_state.env_seeds.0" in str(error) and "greater than or equal to 0" in str(error)
    assert_same_tree(before, _env_state(env))


def test_a_stored_env_seed_is_what_the_next_reset_uses(tmp_path: Path) -> None:
    path = write(tmp_path, forge(base(), lambda m: m["random_state"].update(env_seeds=[5])))
    env = _caller_env()
    safe(PPO).load(path, env=env)
    assert env._seeds == [5]
    obs = env.reset()
    expected, _ = gym.make("CartPole-v1").reset(seed=5)
    np.testing.assert_array_equal(obs[0], expected)


# ---------------------------------------------------------------------------------------------- gSDE
def _gsde_key(t: Tensors, attr: str) -> str:
    return next(k for k in t if k.startswith("rng/gsde/") and k.endswith("/" + attr))


def _gsde(attr: str, change: Callable[[th.Tensor], th.Tensor]) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        key = _gsde_key(t, attr)
        t[key] = change(t[key].clone()).contiguous()

    return edit


GSDE_EDITS: dict[str, Callable[[Tensors], None]] = {
    "exploration_mat of rank 3": _gsde("exploration_mat", lambda x: x[None]),
    "exploration_mat of rank 1": _gsde("exploration_mat", lambda x: x.flatten()),
    "exploration_matrices of rank 2": _gsde("exploration_matrices", lambda x: x[0]),
    "exploration_mat transposed": _gsde("exploration_mat", lambda x: x.T),
    "exploration_mat in float64": _gsde("exploration_mat", lambda x: x.double()),
    "exploration_mat with a NaN": _gsde("exploration_mat", lambda x: x.masked_fill(th.rand_like(x) < 2, math.nan)),
}


@pytest.mark.parametrize("edit", list(GSDE_EDITS.values()), ids=list(GSDE_EDITS))
def test_gsde_noise_the_policy_cannot_use_is_refused(tmp_path: Path, edit: Callable[[Tensors], None]) -> None:
    path = write(tmp_path, forge(gsde_bytes(), tensors=edit))
    env = _caller_env("Pendulum-v1")
    before = _env_state(env)
    error = refused(lambda: safe(PPO).load(path, env=env))
    assert isinstance(error, StateMismatchError)
    assert "random_state.gsde: policy.action_dist.exploration_mat" in str(error)
    assert_same_tree(before, _env_state(env))


def test_stored_gsde_noise_is_restored_exactly(tmp_path: Path) -> None:
    data = gsde_bytes()
    model = safe(PPO).load(write(tmp_path, data))
    stored = {k: v for k, v in safe_tensors(data).items() if k.startswith("rng/gsde/policy/")}
    assert sorted(stored) == ["rng/gsde/policy/exploration_mat", "rng/gsde/policy/exploration_matrices"]
    assert th.equal(model.policy.action_dist.exploration_mat, stored["rng/gsde/policy/exploration_mat"])
    assert th.equal(model.policy.action_dist.exploration_matrices, stored["rng/gsde/policy/exploration_matrices"])


def safe_tensors(data: bytes) -> Tensors:
    import safetensors.torch

    return safetensors.torch.load(data)


# --------------------------------------------------------------------------------------- log_std
LOG_STD = {"nan": math.nan, "-inf": -math.inf, "inf": math.inf, "-200 (exp underflows to 0)": -200.0}


def _log_std(value: float) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t["policy/log_std"] = t["policy/log_std"].clone()
        t["policy/log_std"].view(-1)[-1] = value

    return edit


@pytest.mark.parametrize("value", list(LOG_STD.values()), ids=list(LOG_STD))
def test_a_log_std_that_gives_no_standard_deviation_is_refused(tmp_path: Path, value: float) -> None:
    path = write(tmp_path, forge(gsde_bytes(), tensors=_log_std(value)))
    env = _caller_env("Pendulum-v1")
    before = _env_state(env)
    for load in (lambda: load_policy(path), lambda: safe(PPO).load(path, env=env)):
        error = refused(load)  # load_policy used to let torch's ValueError escape from reset_noise
        assert isinstance(error, StateMismatchError)
        assert "tensor 'policy/log_std'" in str(error) and "positive, finite" in str(error)
    assert_same_tree(before, _env_state(env))
    model = safe(PPO)("MlpPolicy", "Pendulum-v1", use_sde=True, **tiny_kwargs("PPO"))
    before = _model_state(model)
    error = refused(lambda: model.set_parameters(str(path)))  # in place: the caller's model must stay as it was
    assert isinstance(error, StateMismatchError) and "policy/log_std" in str(error)
    assert_same_tree(before, _model_state(model))


def test_a_valid_log_std_loads_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, forge(gsde_bytes(), tensors=_log_std(-30.0)))  # tiny but positive: usable
    stored = safe_tensors(path.read_bytes())
    policy = load_policy(path)
    assert sorted(f"policy/{k}" for k in policy.state_dict()) == sorted(k for k in stored if k.startswith("policy/"))
    assert_same_tree({k: stored[f"policy/{k}"] for k in policy.state_dict()}, policy.state_dict())
    model = safe(PPO)("MlpPolicy", "Pendulum-v1", use_sde=True, **tiny_kwargs("PPO"))
    model.set_parameters(str(path))
    assert th.equal(model.policy.log_std.detach(), stored["policy/log_std"])


# --------------------------------------------------------------------------------------- VecNormalize
def _caller_vecnormalize() -> VecNormalize:
    vn = VecNormalize(DummyVecEnv([lambda: gym.make("CartPole-v1")]), clip_obs=7.0, gamma=0.9)
    vn.reset()
    for _ in range(5):
        vn.step(np.array([1]))
    return vn


@functools.cache
def vn_file() -> tuple[bytes, dict[str, Any]]:
    """A VecNormalize file of the caller's kind, and the state of the wrapper it was saved from."""
    vn = _caller_vecnormalize()
    buf = io.BytesIO()
    save_vecnormalize(vn, buf)
    return buf.getvalue(), _vn_state(vn)


def vn_bytes() -> bytes:
    return vn_file()[0]


def _drop_obs_rms(t: Tensors) -> None:
    for k in [k for k in t if "/obs_rms/" in k]:
        del t[k]


def _statistic(key: str, value: float) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[-1] = value

    return edit


VN_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None] | None, Callable[[Tensors], None] | None, str]] = {
    "norm_obs without obs_rms": (
        lambda h: h["state"].update(has_obs_rms=False),
        _drop_obs_rms,
        "state: Value error, norm_obs is true but there are no obs_rms statistics",
    ),
    "norm_obs_keys for a single obs_rms": (
        lambda h: h["state"].update(norm_obs_keys=["observation"]),
        None,
        "state: Value error, obs_keys and norm_obs_keys must both be given",
    ),
    "a negative obs_rms var": (None, _statistic("vec_normalize/obs_rms/var", -1.0), "VecNormalize obs_rms: mean and var"),
    "a NaN obs_rms mean": (None, _statistic("vec_normalize/obs_rms/mean", math.nan), "VecNormalize obs_rms: mean and var"),
    "an infinite ret_rms var": (None, _statistic("vec_normalize/ret_rms/var", math.inf), "VecNormalize ret_rms: mean and var"),
    "a zero count": (None, _statistic("vec_normalize/obs_rms/count", 0.0), "VecNormalize obs_rms: mean and var"),
}


@pytest.mark.parametrize("edit", list(VN_EDITS.values()), ids=list(VN_EDITS))
def test_vecnormalize_without_the_statistics_it_uses_is_refused(tmp_path: Path, edit: Any) -> None:
    header_edit, tensor_edit, message = edit
    forged = forge(vn_bytes(), header_edit, tensor_edit, meta_key=META_VEC_NORMALIZE, checksum_key=META_VEC_NORMALIZE_CHECKSUM)
    path = write(tmp_path, forged)
    vn = _caller_vecnormalize()
    before = _vn_state(vn)
    error = refused(lambda: load_vecnormalize(path, vn))
    assert isinstance(error, FormatError)
    assert message in str(error)
    assert_same_tree(before, _vn_state(vn))


def test_a_model_file_with_norm_obs_and_no_obs_rms_is_refused(tmp_path: Path) -> None:
    model = safe(PPO)("MlpPolicy", VecNormalize(DummyVecEnv([lambda: gym.make("CartPole-v1")])), **tiny_kwargs("PPO"))
    model.learn(32)
    buf = io.BytesIO()
    model.save(buf, vec_normalize=model.get_vec_normalize_env())
    path = write(tmp_path, forge(buf.getvalue(), lambda m: m["vec_normalize"].update(has_obs_rms=False), _drop_obs_rms))
    vn = _caller_vecnormalize()
    before = _vn_state(vn)
    error = refused(lambda: safe(PPO).load(path, env=vn))
    assert isinstance(error, FormatError) and "vec_normalize: Value error, norm_obs is true" in str(error)
    assert_same_tree(before, _vn_state(vn))


def test_one_obs_rms_for_a_dict_space_is_refused(tmp_path: Path) -> None:
    from stable_baselines3.common.envs import SimpleMultiObsEnv

    path = write(tmp_path, vn_bytes())
    venv = DummyVecEnv([SimpleMultiObsEnv])
    error = refused(lambda: load_vecnormalize(path, venv))
    assert isinstance(error, StateMismatchError) and "not per Dict key" in str(error)


def test_a_valid_vecnormalize_loads_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, vn_bytes())
    loaded = load_vecnormalize(path, DummyVecEnv([lambda: gym.make("CartPole-v1")]))
    assert_same_tree(vn_file()[1], _vn_state(loaded))


# ------------------------------------------------------------------------------------ HER bookkeeping
@functools.cache
def her_file() -> tuple[bytes, dict[str, np.ndarray], int]:
    """A HER buffer of 64 rows after 23 steps (not full; an episode running), its bookkeeping arrays, and pos."""
    model = her_model()
    model.learn(23)
    buf = io.BytesIO()
    model.save_replay_buffer(buf)
    rb = model.replay_buffer
    arrays = {"ep_start": rb.ep_start[: rb.pos, 0].copy(), "ep_length": rb.ep_length[: rb.pos, 0].copy()}
    return buf.getvalue(), arrays, int(rb.pos)


def _her_edit(change: Callable[[dict[str, np.ndarray], dict[str, np.ndarray], int], None]) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        _, saved, pos = her_file()
        arrays = {k: t[k].numpy().copy() for k in ("ep_start", "ep_length", "_current_ep_start")}
        change(arrays, saved, pos)
        t.update({k: th.from_numpy(v) for k, v in arrays.items()})

    return edit


def _episodes(saved: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """(start, length) of each finished episode of env 0."""
    return sorted({(int(s), int(n)) for s, n in zip(saved["ep_start"], saved["ep_length"], strict=True) if n > 0})


def _outside(a: dict[str, np.ndarray], saved: dict[str, np.ndarray], pos: int) -> None:
    start, _ = _episodes(saved)[0]
    a["ep_start"][start, 0] = start + 1  # in range, but the row is no longer inside its episode


def _past_pos(a: dict[str, np.ndarray], saved: dict[str, np.ndarray], pos: int) -> None:
    start, length = _episodes(saved)[-1]
    a["ep_length"][start : start + length, 0] = pos - start + 1  # into a row never written


def _disagree(a: dict[str, np.ndarray], saved: dict[str, np.ndarray], pos: int) -> None:
    start, _ = next(e for e in _episodes(saved) if e[1] >= 3)
    a["ep_start"][start + 1, 0], a["ep_length"][start + 1, 0] = start + 1, 1  # a one-row episode inside another


def _running_row_finished(a: dict[str, np.ndarray], saved: dict[str, np.ndarray], pos: int) -> None:
    assert a["_current_ep_start"][0] < pos  # the file has a running episode
    a["ep_start"][pos - 1, 0], a["ep_length"][pos - 1, 0] = pos - 1, 1


def _current_beyond_pos(a: dict[str, np.ndarray], saved: dict[str, np.ndarray], pos: int) -> None:
    a["_current_ep_start"][0] = pos + 1


HER_EDITS = {
    "a row outside its episode": (_outside, "outside its episode"),
    "an episode past pos": (_past_pos, "runs past pos={pos}"),
    "rows of one episode disagree": (_disagree, "consecutive rows of one episode disagree"),
    "a running row with a length": (_running_row_finished, "a row of the running episode"),
    "_current_ep_start beyond pos": (_current_beyond_pos, "_current_ep_start [{pos_1}] lies beyond pos={pos}"),
}


@pytest.mark.parametrize("edit", list(HER_EDITS.values()), ids=list(HER_EDITS))
def test_inconsistent_her_episodes_are_refused(tmp_path: Path, edit: Any) -> None:
    change, message = edit
    data, _, pos = her_file()
    message = message.format(pos=pos, pos_1=pos + 1)
    forged = forge(data, tensors=_her_edit(change), meta_key=META_BUFFER, checksum_key=META_BUFFER_CHECKSUM)
    path = write(tmp_path, forged)
    model = her_model()
    model.learn(7)
    before = buffer_state(model.replay_buffer)
    error = refused(lambda: model.load_replay_buffer(path, truncate_last_traj=False))
    assert isinstance(error, FormatError)
    assert "episode bookkeeping is inconsistent: " in str(error) and message in str(error)
    assert_same_tree(before, buffer_state(model.replay_buffer))


@pytest.mark.parametrize("steps", [23, 150], ids=["running episode", "full and wrapped"])
def test_her_buffers_as_sb3_writes_them_load_exactly(tmp_path: Path, steps: int) -> None:
    model = her_model()
    model.learn(steps)
    model.save_replay_buffer(tmp_path / "her")
    other = her_model()
    other.load_replay_buffer(tmp_path / "her", truncate_last_traj=False)
    assert_same_tree(buffer_state(model.replay_buffer), buffer_state(other.replay_buffer))
    other.replay_buffer.sample(32)  # FUTURE goals: every sampled row lies inside its episode


# ----------------------------------------------------------------------------------- optimizer state
def _last_param_state(m: dict[str, Any]) -> dict[str, Any]:
    entry = next(e for e in m["state_dicts"] if e["kind"] == "optimizer")
    per_param = entry["state"]["items"]["state"]["items"]
    return per_param[max(per_param, key=int)]["items"]  # type: ignore[no-any-return]


def _replace(key: str, value: Any) -> tuple[Callable[[dict[str, Any]], None], Callable[[Tensors], None]]:
    """Replace (or, with value None, drop) state ``key`` of the last parameter, and its tensor with it."""

    def edit(m: dict[str, Any]) -> None:
        items = _last_param_state(m)
        if value is None:
            del items[key]
        else:
            items[key] = value

    def tensors(t: Tensors) -> None:
        keys = [k for k in t if k.startswith("policy.optimizer.state[") and k.endswith(f"].{key}")]
        del t[max(keys, key=lambda k: int(k.split("[")[1].split("]")[0]))]

    return edit, tensors


OPTIMIZER_EDITS = {
    "exp_avg as a string": (_replace("exp_avg", "zeros"), "state 'exp_avg' is a str 'zeros', not a tensor"),
    "exp_avg missing": (_replace("exp_avg", None), "state 'exp_avg' is missing (Adam reads exp_avg, exp_avg_sq, step)"),
    "exp_avg_sq missing": (_replace("exp_avg_sq", None), "state 'exp_avg_sq' is missing"),
    "step missing": (_replace("step", None), "state 'step' is missing"),
    "step as a string": (_replace("step", "12"), "state 'step' is a str '12', not a non-negative step count"),
    "step negative": (_replace("step", -3.0), "state 'step' is a float -3.0, not a non-negative step count"),
}


@pytest.mark.parametrize("edit", list(OPTIMIZER_EDITS.values()), ids=list(OPTIMIZER_EDITS))
def test_optimizer_state_adam_cannot_step_with_is_refused(tmp_path: Path, edit: Any) -> None:
    (manifest_edit, tensor_edit), message = edit
    path = write(tmp_path, forge(base(), manifest_edit, tensor_edit))
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **{**tiny_kwargs("PPO"), "seed": 1})
    model.learn(32)
    before = _model_state(model)
    for load in (lambda: model.set_parameters(str(path)), lambda: safe(PPO).load(path)):
        error = refused(load)
        assert isinstance(error, StateMismatchError)
        assert "policy.optimizer: the stored optimizer state does not fit the optimizer: parameter " in str(error)
        assert message in str(error)
    assert_same_tree(before, _model_state(model))  # set_parameters wrote nothing: not the policy, not exp_avg


def test_adam_state_as_saved_loads_and_steps(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    model = safe(PPO).load(path, env=_caller_env())
    stored = safe_tensors(base())
    state = model.policy.optimizer.state_dict()["state"]
    last = max(state)
    assert th.equal(state[last]["exp_avg"], stored[f"policy.optimizer.state[{last}].exp_avg"])
    model.learn(32)  # Adam steps on the loaded state
