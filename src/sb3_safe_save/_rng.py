"""Random state: what training draws from, captured at save and put back at load.

SB3's ``_setup_model`` reseeds torch, numpy, ``random`` and the action space from ``model.seed`` at
every load (SB3 #1526, #1643, #326), so a run that is saved, loaded and continued differs from one
that never stopped. ``capture`` records, and load puts back after the model is built:

* torch's CPU generator and every initialised CUDA generator;
* numpy's global generator and Python's ``random``;
* the observation- and action-space generators (reseeded by ``_setup_model``);
* gSDE exploration matrices (``reset_noise()`` at load draws new ones);
* each environment's ``np_random`` and the ``VecEnv``'s pending reset seeds, when an env is given to load.

Action-noise state (Ornstein-Uhlenbeck's ``noise_prev``) and the VecNormalize statistics travel with
the model's attributes already. An environment's own simulator state cannot be seen through a
``VecEnv`` and is not restored: pass the same env object (``force_reset=False``) to continue it.

``prepare_restore`` checks every stored state on scratch generators and returns the function that
applies it, which load calls last: a malformed file, or a load that fails later, changes nothing.
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import StateDependentNoiseDistribution
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from sb3_safe_save._codecs import decode_generator, generator_state
from sb3_safe_save._errors import FormatError, StateMismatchError
from sb3_safe_save._manifest import RandomState

PREFIX = "rng/"
P = ParamSpec("P")
R = TypeVar("R")
_GSDE_TENSORS = ("exploration_mat", "exploration_matrices")


# =============================================================================================== save
def capture(model: BaseAlgorithm) -> tuple[RandomState, dict[str, th.Tensor]]:
    """The random state of the process and of ``model`` (spaces, gSDE, env generators), plus its tensors."""
    tensors: dict[str, th.Tensor] = {PREFIX + "torch_cpu": th.get_rng_state()}
    n_cuda = 0
    if th.cuda.is_available() and th.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, cuda_state in enumerate(th.cuda.get_rng_state_all()):
            tensors[f"{PREFIX}torch_cuda/{i}"] = cuda_state
            n_cuda += 1
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    tensors[PREFIX + "numpy_key"] = _bytes(np.asarray(numpy_state["state"]["key"], dtype=np.uint32))
    tensors[PREFIX + "python"] = _bytes(np.asarray(internal, dtype=np.uint32))
    spaces = {
        name: generator_state(space._np_random)
        for name in ("observation_space", "action_space")
        if (space := getattr(model, name, None)) is not None and getattr(space, "_np_random", None) is not None
    }
    gsde: dict[str, list[str]] = {}
    for path, dist in _gsde_distributions(model):
        for attr in _GSDE_TENSORS:
            value = getattr(dist, attr, None)
            if isinstance(value, th.Tensor):
                tensors[f"{PREFIX}gsde/{path}/{attr}"] = value.detach().cpu()
                gsde.setdefault(path, []).append(attr)
    envs, seeds = _env_state(model.get_env())
    state = RandomState(
        torch_cuda=n_cuda,
        numpy_pos=int(numpy_state["state"]["pos"]),
        numpy_has_gauss=1 if numpy_state["has_gauss"] else 0,
        numpy_gauss=float(numpy_state["gauss"]),
        python_version=version,
        python_gauss=gauss,
        spaces=spaces,  # type: ignore[arg-type]
        envs=envs,
        env_seeds=seeds,
        gsde=gsde,  # type: ignore[arg-type]
    )
    return state, tensors


def _bytes(array: np.ndarray) -> th.Tensor:
    return th.from_numpy(array.astype("<u4").view(np.uint8).copy())


def _uint32(tensor: th.Tensor, n: int, what: str) -> np.ndarray:
    if tensor.dtype != th.uint8 or tuple(tensor.shape) != (4 * n,):
        raise FormatError(
            f"random_state.{what}: expected {4 * n} bytes, the file has a {tensor.dtype} {list(tensor.shape)} tensor"
        )
    return tensor.numpy().view("<u4").astype(np.uint32)


def _gsde_distributions(model: BaseAlgorithm) -> list[tuple[str, StateDependentNoiseDistribution]]:
    policy = getattr(model, "policy", None)
    if not isinstance(policy, th.nn.Module):
        return []
    found = []
    for name, module in policy.named_modules():
        dist = getattr(module, "action_dist", None)
        if isinstance(dist, StateDependentNoiseDistribution):
            found.append(("policy" + (f".{name}" if name else ""), dist))
    return found


def _base_vec_env(venv: VecEnv) -> VecEnv:
    while isinstance(venv, VecEnvWrapper):
        venv = venv.venv
    return venv


def _env_state(venv: VecEnv | None) -> tuple[list[dict[str, Any] | None] | None, list[int | None] | None]:
    """Each env's generator (None where it has none yet) and the seeds pending for the next reset."""
    if venv is None:
        return None, None
    try:
        generators = venv.get_attr("_np_random")
    except (AttributeError, NotImplementedError):  # a VecEnv that cannot show its envs' generators
        generators = [None] * venv.num_envs
    envs = [generator_state(g) if isinstance(g, np.random.Generator) else None for g in generators]
    seeds = getattr(_base_vec_env(venv), "_seeds", None)
    return envs, (list(seeds) if isinstance(seeds, list) else None)


# =============================================================================================== load
def keep_on_error(load: Callable[P, R]) -> Callable[P, R]:
    """Decorate a load function: if it raises, put the process's random state back as it was.

    SB3's ``_setup_model`` reseeds torch, numpy and ``random`` from ``model.seed`` while the model
    is being built, before anything can fail; a failed load should leave no trace.
    """

    @functools.wraps(load)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        cuda = th.cuda.is_available() and th.cuda.is_initialized()  # type: ignore[no-untyped-call]
        saved = th.get_rng_state(), np.random.get_state(legacy=False), random.getstate()
        saved_cuda = th.cuda.get_rng_state_all() if cuda else None
        try:
            return load(*args, **kwargs)
        except BaseException:
            th.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
            if saved_cuda is not None:
                th.cuda.set_rng_state_all(saved_cuda)
            raise

    return wrapper


def prepare_restore(
    model: BaseAlgorithm, state: RandomState, read: Callable[[str], th.Tensor], *, env_given: bool
) -> Callable[[], None]:
    """Read and check the stored random state; return the function that puts it back.

    Nothing global changes until the returned function is called: load calls it last, once
    everything else has succeeded.

    :param model: the freshly built model
    :param state: the manifest's ``random_state``
    :param read: reads a tensor of the file by its full key
    :param env_given: an env was passed to load; only then are env generators and pending seeds restored
    :return: a function without arguments that restores the state
    """
    torch_cpu = read(PREFIX + "torch_cpu")
    _check(lambda: th.Generator().set_state(torch_cpu), "torch_cpu")
    _check_torch_normals(torch_cpu)
    cuda = [read(f"{PREFIX}torch_cuda/{i}") for i in range(state.torch_cuda)]
    key = _uint32(read(PREFIX + "numpy_key"), 624, "numpy_key")
    numpy_state = {
        "bit_generator": "MT19937",
        "state": {"key": key, "pos": state.numpy_pos},
        "has_gauss": state.numpy_has_gauss,
        "gauss": state.numpy_gauss,
    }
    _check(lambda: np.random.RandomState().set_state(numpy_state), "numpy")
    internal = _uint32(read(PREFIX + "python"), 625, "python")
    python_state = (state.python_version, tuple(int(x) for x in internal), state.python_gauss)
    _check(lambda: random.Random().setstate(python_state), "python")
    spaces: dict[str, np.random.Generator] = {
        name: decode_generator(s, f"random_state.spaces.{name}") for name, s in state.spaces.items()
    }
    gsde: dict[str, dict[str, th.Tensor]] = {
        path: {a: read(f"{PREFIX}gsde/{path}/{a}") for a in attrs} for path, attrs in state.gsde.items()
    }
    dists = dict(_gsde_distributions(model))
    for path, tensors in gsde.items():
        if path not in dists:
            raise StateMismatchError(f"random_state.gsde: the file has gSDE noise at {path!r}, the rebuilt model does not")
        for attr, value in tensors.items():
            _check_gsde(dists[path], f"{path}.action_dist.{attr}", attr, value)
    venv = model.get_env() if env_given else None
    envs = None
    if venv is not None and state.envs is not None:
        if len(state.envs) != venv.num_envs:  # SB3 loads into any number of envs: theirs keep their own generators
            warnings.warn(
                f"random_state.envs: the file has {len(state.envs)} env generators, the env given to load has"
                f" {venv.num_envs} envs; the envs' generators are left as they are (the rest is restored)",
                UserWarning,
                stacklevel=2,
            )
        else:
            envs = [None if s is None else decode_generator(s, f"random_state.envs[{i}]") for i, s in enumerate(state.envs)]

    def apply() -> None:
        _apply(model, venv, state, gsde, dists, spaces, envs)
        if cuda and th.cuda.is_available():
            th.cuda.set_rng_state_all(cuda[: th.cuda.device_count()])
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        th.set_rng_state(torch_cpu)

    return apply


#: Where torch's CPU generator state (5056 bytes: ATen's ``CPUGeneratorImplState``) keeps its cached normal
#: draws: ``normal_x``, ``normal_y``, ``normal_rho`` (float64; ``normal_y`` is the next ``randn`` value when
#: ``normal_is_valid``) and ``next_float_normal_sample`` (float32).
_TORCH_NORMALS = ((5016, "<f8", 3), (5048, "<f4", 1))


def _check_torch_normals(state: th.Tensor) -> None:
    """Refuse a torch CPU state whose cached normal draws are NaN or infinite (the next ``randn`` would return them)."""
    raw = state.numpy()
    for offset, dtype, count in _TORCH_NORMALS:
        values = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
        if not np.isfinite(values).all():
            raise FormatError(
                f"random_state.torch_cpu: the cached normal draw is {values.tolist()}: it must be finite"
                " (the next torch.randn would return it); the file is corrupted or forged"
            )


def _check_gsde(dist: StateDependentNoiseDistribution, where: str, attr: str, value: th.Tensor) -> None:
    """Refuse gSDE noise that ``get_noise`` cannot use: ``exploration_mat`` is ``(latent_sde_dim, action_dim)``,
    ``exploration_matrices`` ``(n, latent_sde_dim, action_dim)``, both of the model's dtype and finite."""
    current = getattr(dist, attr, None)
    rank = 2 if attr == "exploration_mat" else 3
    expected = (getattr(dist, "latent_sde_dim", None), getattr(dist, "action_dim", None))
    dtype = current.dtype if isinstance(current, th.Tensor) else th.get_default_dtype()
    if value.dim() != rank or value.dtype != dtype or tuple(value.shape[-2:]) != expected:
        raise StateMismatchError(
            f"random_state.gsde: {where} is stored as {value.dtype} {list(value.shape)}; the rebuilt model needs a"
            f" {dtype} tensor of rank {rank} ending in {list(expected)}"
        )
    if not bool(th.isfinite(value).all()):
        raise StateMismatchError(f"random_state.gsde: {where} holds NaN or infinite values; gSDE noise must be finite")


def _apply(
    model: BaseAlgorithm,
    venv: VecEnv | None,
    state: RandomState,
    gsde: Mapping[str, Mapping[str, th.Tensor]],
    dists: Mapping[str, StateDependentNoiseDistribution],
    spaces: Mapping[str, np.random.Generator],
    envs: list[np.random.Generator | None] | None,
) -> None:
    for path, tensors in gsde.items():
        dist = dists[path]
        for attr, value in tensors.items():
            setattr(dist, attr, value.to(model.device))
    for name in ("observation_space", "action_space"):
        # a model built on an env holds the env's own space objects (an env may sample its spaces
        # too: one stream, as in the run that never stopped); load gave it copies from the file
        env_space = getattr(venv, name, None)
        if env_space is not None and env_space is not getattr(model, name) and env_space == getattr(model, name):
            setattr(model, name, env_space)
    for name, generator in spaces.items():
        getattr(model, name)._np_random = generator
    if envs is not None and venv is not None:
        for i, env_generator in enumerate(envs):
            if env_generator is not None:
                venv.set_attr("np_random", env_generator, indices=[i])
        base = _base_vec_env(venv)
        if state.env_seeds is not None and isinstance(getattr(base, "_seeds", None), list):
            if len(state.env_seeds) == base.num_envs:
                base._seeds = list(state.env_seeds)


def _check(apply: Callable[[], Any], what: str) -> None:
    try:
        apply()
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError) as e:
        raise FormatError(f"random_state.{what}: the stored generator state is invalid: {e}") from None
