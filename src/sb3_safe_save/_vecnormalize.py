"""``VecNormalize`` without pickle: settings as JSON, running statistics as float64 tensors.

SB3's ``VecNormalize.save`` pickles the whole wrapper and ``VecNormalize.load`` unpickles it (a
code-execution sink, SB3 #2281). Here the same state goes into a safetensors file:

* ``save_vecnormalize(venv_norm, path)`` / ``load_vecnormalize(path, venv)`` mirror ``save``/``load``;
* ``model.save(path, vec_normalize=model.get_vec_normalize_env())`` bundles it into the model file
  (tensors under ``vec_normalize/``, settings in ``Manifest.vec_normalize``), and
  ``Algo.load(path, env=venv)`` then wraps ``venv`` in the restored ``VecNormalize``. The same model
  file can also be given to ``load_vecnormalize``.

What is stored is what ``VecNormalize.__getstate__`` keeps — the settings, ``obs_rms`` and ``ret_rms``
(mean, var, count), ``old_obs`` and ``old_reward`` — plus ``returns``, the running discounted return
of each env that ``norm_reward`` updates ``ret_rms`` with at every step. SB3's pickle leaves it out and
``VecNormalize.set_venv`` zeros it; here it is restored, so a run continued without resetting its env
(``load(..., force_reset=False)``, ``load_checkpoint``) normalizes rewards exactly as if it had never
stopped. A reset zeros it, as always. It is restored only into a wrapper of as many envs as it was
saved with (another env count is another env, e.g. an evaluation env: zeros, as in SB3), and
files written before it was stored load zeros.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from typing import Any, Literal, cast

import numpy as np
import torch as th
from gymnasium import spaces
from pydantic import ValidationError
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, unwrap_vec_normalize

from sb3_safe_save import _weights
from sb3_safe_save._errors import FormatError, IntegrityError, StateMismatchError
from sb3_safe_save._manifest import (
    META_CHECKSUM,
    META_MANIFEST,
    TensorMeta,
    VecNormalizeState,
    _Model,
    _short,
    items_field,
    load_json,
    parse_manifest,
)

PREFIX = "vec_normalize/"
#: ``__metadata__`` keys of a standalone VecNormalize file.
META_VEC_NORMALIZE = "sb3_safe_save.vec_normalize"
META_VEC_NORMALIZE_CHECKSUM = "sb3_safe_save.vec_normalize.xxh3_128"
_SETTINGS = ("training", "norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon")
_FLOATS = ("clip_obs", "clip_reward", "gamma", "epsilon")

ReadTensor = Callable[[str], th.Tensor]


class VecNormalizeFile(_Model):
    """The header of a standalone VecNormalize file."""

    format: Literal["sb3_safe_save.vec_normalize"] = "sb3_safe_save.vec_normalize"
    format_version: Literal[1] = 1
    state: VecNormalizeState
    tensors: dict[str, TensorMeta] = items_field(max_length=1000)


# ---------------------------------------------------------------------------------------------- save
def export_vecnormalize(venv_norm: VecNormalize) -> tuple[VecNormalizeState, dict[str, np.ndarray]]:
    """The settings and the arrays (keyed relative to ``PREFIX``) of a ``VecNormalize``; arrays are not copied."""
    if not isinstance(venv_norm, VecNormalize):
        raise TypeError(f"expected a VecNormalize, got {type(venv_norm).__name__}; use model.get_vec_normalize_env()")
    arrays: dict[str, Any] = {}
    obs_rms = getattr(venv_norm, "obs_rms", None)
    obs_keys = None
    if isinstance(obs_rms, dict):
        obs_keys = [str(k) for k in obs_rms]
        for key, rms in obs_rms.items():
            _put_rms(arrays, f"obs_rms/{key}", rms)
    elif obs_rms is not None:
        _put_rms(arrays, "obs_rms", obs_rms)
    _put_rms(arrays, "ret_rms", venv_norm.ret_rms)
    arrays["old_reward"] = np.asarray(venv_norm.old_reward)
    old_obs: Any = getattr(venv_norm, "old_obs", None)
    kind, old_keys = "none", None
    if isinstance(old_obs, dict):
        kind, old_keys = "dict", [str(k) for k in old_obs]
        arrays.update({f"old_obs/{k}": np.asarray(v) for k, v in old_obs.items()})
    elif old_obs is not None:
        kind = "array"
        arrays["old_obs"] = np.asarray(old_obs)
    # absent on an unpickled wrapper before set_venv (SB3's pickle drops it); read from the instance: a wrapper
    # without venv forwards unknown attributes to a venv it does not have
    returns = vars(venv_norm).get("returns")
    if returns is not None:
        arrays["returns"] = np.asarray(returns, dtype=np.float64)
    scalars = [k for k, v in arrays.items() if isinstance(v, np.generic)]
    settings = {name: getattr(venv_norm, name) for name in _SETTINGS}
    for name in _FLOATS:
        settings[name] = _float_out(float(settings[name]))
    state = VecNormalizeState(
        **settings,
        norm_obs_keys=None if venv_norm.norm_obs_keys is None else list(venv_norm.norm_obs_keys),
        has_obs_rms=obs_rms is not None,
        obs_keys=obs_keys,
        old_obs=kind,  # type: ignore[arg-type]
        old_obs_keys=old_keys,
        numpy_scalars=sorted(scalars),
        has_returns=returns is not None,
    )
    return state, {k: np.asarray(v) for k, v in arrays.items()}


def _put_rms(arrays: dict[str, Any], prefix: str, rms: RunningMeanStd) -> None:
    arrays[f"{prefix}/mean"] = rms.mean
    arrays[f"{prefix}/var"] = rms.var
    arrays[f"{prefix}/count"] = np.asarray(rms.count, dtype=np.float64)


def save_vecnormalize(
    venv_norm: VecNormalize, path: str | os.PathLike[str] | io.BufferedIOBase, *, fsync: bool = True
) -> None:
    """Save a ``VecNormalize`` (statistics and settings) to a safetensors file, without pickle.

    The safe counterpart of ``VecNormalize.save``. The write is atomic.

    :param venv_norm: the ``VecNormalize`` wrapper, e.g. ``model.get_vec_normalize_env()``
    :param path: the file to write (a path without a suffix gets ``.safetensors``), or a binary stream
    :param fsync: flush the file and its directory to disk before returning
    """
    from sb3_safe_save._persist import header_metadata, write_file  # local: _persist imports this module

    state, arrays = export_vecnormalize(venv_norm)
    blobs = {PREFIX + k: _weights.to_blob(v) for k, v in arrays.items()}
    header = VecNormalizeFile(state=state, tensors={})
    write_file(path, blobs, header_metadata(header, blobs, META_VEC_NORMALIZE, META_VEC_NORMALIZE_CHECKSUM), fsync=fsync)


# ---------------------------------------------------------------------------------------------- load
class SafeVecNormalize(VecNormalize):
    """A ``VecNormalize`` whose ``save``/``load`` use this library's format instead of pickle.

    Use it in place of ``VecNormalize``; then everything that calls ``VecNormalize.save`` — such as
    ``CheckpointCallback(save_vecnormalize=True)`` — writes a safetensors file, whatever its name.
    """

    def save(self, save_path: str | os.PathLike[str]) -> None:
        """Save settings and statistics (no pickle). See ``save_vecnormalize``."""
        save_vecnormalize(self, save_path)

    @staticmethod
    def load(load_path: str | os.PathLike[str], venv: VecEnv) -> SafeVecNormalize:
        """Wrap ``venv`` in a ``SafeVecNormalize`` with the stored settings and statistics. See ``load_vecnormalize``."""
        return cast(SafeVecNormalize, _load(load_path, venv, cls=SafeVecNormalize, verify=True))


def load_vecnormalize(path: str | os.PathLike[str] | io.BufferedIOBase, venv: VecEnv, *, verify: bool = True) -> VecNormalize:
    """Load a ``VecNormalize`` saved by ``save_vecnormalize`` (or bundled in a model file) around ``venv``.

    The safe counterpart of ``VecNormalize.load(path, venv)``; nothing is unpickled or imported.
    A pickle written by SB3's ``VecNormalize.save`` is recognised by its content and read by the restricted
    reader of stock files (``_stock.py``): its settings and statistics are taken, nothing in it is run or imported.

    :param path: a file written by ``save_vecnormalize``, a model file saved with ``vec_normalize=``, or
        SB3's ``vecnormalize.pkl``
    :param venv: the vectorized environment to wrap
    :param verify: check every tensor's checksum while reading
    :return: a new ``VecNormalize`` wrapping ``venv``, with the stored settings and statistics
    :raises FormatError: the file holds no VecNormalize state
    :raises StateMismatchError: the statistics do not fit ``venv``'s observation space
    """
    return _load(path, venv, cls=VecNormalize, verify=verify)


def _load(
    path: str | os.PathLike[str] | io.BufferedIOBase, venv: VecEnv, *, cls: type[VecNormalize], verify: bool
) -> VecNormalize:
    from sb3_safe_save._buffers import is_pickle
    from sb3_safe_save._file import _open

    if is_pickle(path):  # VecNormalize.save's pickle: read without running it (_stock.py)
        from sb3_safe_save._stock import read_vecnormalize

        state, arrays = read_vecnormalize(path)
        return restore_vecnormalize(state, lambda key: th.from_numpy(np.asarray(arrays[key])), venv, cls=cls)
    with _open(path) as (f, size):
        header = _weights.read_header(f, size)
        state, checksums = _state_from_header(header)
        body = _weights.Body(f, header, checksums, verify=verify)
        return restore_vecnormalize(state, lambda key: body.read_tensor(PREFIX + key), venv, cls=cls)


def _state_from_header(header: _weights.Header) -> tuple[VecNormalizeState, dict[str, str]]:
    text = _weights.checked_metadata(header, META_VEC_NORMALIZE, META_VEC_NORMALIZE_CHECKSUM, "the VecNormalize header")
    if text is not None:
        raw = load_json(text, "the VecNormalize header")
        try:
            parsed = VecNormalizeFile.model_validate(raw)
        except ValidationError as e:
            raise FormatError(f"the VecNormalize header is malformed: {_short(e)}") from None
        _check_tensor_table(parsed.tensors, header, "the VecNormalize header")
        return parsed.state, {k: m.xxh3 for k, m in parsed.tensors.items()}
    text = header.metadata.get(META_MANIFEST)
    if text is None:
        raise FormatError("this file was not written by sb3_safe_save (no VecNormalize or model manifest in its header)")
    if _weights.checksum(text.encode()) != header.metadata.get(META_CHECKSUM):
        raise IntegrityError("the manifest does not match its checksum: the header is corrupted")
    manifest = parse_manifest(text)
    _check_tensor_table(manifest.tensors, header, "the manifest")
    if manifest.vec_normalize is None:
        raise FormatError(
            "this model file holds no VecNormalize statistics; save them with"
            " model.save(path, vec_normalize=model.get_vec_normalize_env()) or save_vecnormalize(venv, path)"
        )
    return manifest.vec_normalize, {k: m.xxh3 for k, m in manifest.tensors.items()}


def _check_tensor_table(tensors: dict[str, TensorMeta], header: _weights.Header, what: str) -> None:
    if set(tensors) != set(header.tensors):
        extra = sorted(set(tensors) ^ set(header.tensors))[:5]
        raise FormatError(f"{what} and the safetensors header list different tensors (e.g. {extra})")
    for key, meta in tensors.items():
        info = header.tensors[key]
        if meta.dtype != info.dtype or tuple(meta.shape) != info.shape:
            raise FormatError(
                f"tensor {key!r}: {what} says {meta.dtype} {meta.shape}, the header {info.dtype} {list(info.shape)}"
            )


def restore_vecnormalize(
    state: VecNormalizeState, read: ReadTensor, venv: VecEnv, *, cls: type[VecNormalize] = VecNormalize
) -> VecNormalize:
    """Wrap ``venv`` in a ``VecNormalize`` with ``state``; if ``venv`` already has one, update that one in place."""
    target, commit = stage_vecnormalize(state, read, venv, cls=cls)
    commit()
    return target


def stage_vecnormalize(
    state: VecNormalizeState, read: ReadTensor, venv: VecEnv, *, cls: type[VecNormalize] = VecNormalize
) -> tuple[VecNormalize, Callable[[], None]]:
    """Read and check everything ``restore_vecnormalize`` needs; change nothing yet.

    :return: the ``VecNormalize`` to use (``venv``'s own one, or a new wrapper of ``venv``) and the
        function that sets its settings and statistics; until it is called ``venv`` is unchanged
        (a failed load leaves the caller's ``VecNormalize`` as it was)
    """
    existing = unwrap_vec_normalize(venv)
    if existing is not None:
        target = existing
    else:
        settings = {name: _float_in(getattr(state, name)) if name in _FLOATS else getattr(state, name) for name in _SETTINGS}
        try:
            target = cls(venv, **settings, norm_obs_keys=None if state.norm_obs_keys is None else list(state.norm_obs_keys))
        except (ValueError, KeyError, AssertionError, TypeError, AttributeError) as e:
            raise StateMismatchError(f"the stored VecNormalize settings do not fit this env: {e}") from None
    return target, _stage(target, state, read)


def apply_vecnormalize(venv_norm: VecNormalize, state: VecNormalizeState, read: ReadTensor) -> None:
    """Set the settings and statistics of ``venv_norm`` from ``state``, checking shapes against its spaces."""
    _stage(venv_norm, state, read)()


def _stage(venv_norm: VecNormalize, state: VecNormalizeState, read: ReadTensor) -> Callable[[], None]:
    """Read and check every statistic for ``venv_norm``; return the function that sets them (nothing changes before)."""
    scalars = frozenset(state.numpy_scalars)

    def read_array(key: str) -> Any:
        array = read(key).numpy()
        return array[()] if key in scalars and array.shape == () else array

    space = venv_norm.observation_space
    obs_rms: Any = None
    if state.has_obs_rms:
        if state.obs_keys is not None:
            if not isinstance(space, spaces.Dict) or not set(state.obs_keys) <= set(space.spaces):
                raise StateMismatchError(
                    f"the VecNormalize statistics are for Dict keys {state.obs_keys}; this env has {space}"
                )
            obs_rms = {k: _read_rms(read_array, f"obs_rms/{k}", space.spaces[k].shape) for k in state.obs_keys}
        elif isinstance(space, spaces.Dict):  # normalize_obs would look up obs_rms[key]
            raise StateMismatchError(f"the VecNormalize statistics are for one array, not per Dict key; this env has {space}")
        else:
            obs_rms = _read_rms(read_array, "obs_rms", space.shape)
    ret_rms = _read_rms(read_array, "ret_rms", ())
    old_reward = read("old_reward").numpy()
    returns = np.zeros(venv_norm.num_envs)
    if state.has_returns:
        stored = _checked_returns(read("returns").numpy())
        if stored.shape == returns.shape:  # else another env (e.g. one for evaluation): zeros, as set_venv
            returns = stored
    old_obs: Any = None
    if state.old_obs == "array":
        old_obs = read("old_obs").numpy()
    elif state.old_obs == "dict":
        old_obs = {k: read(f"old_obs/{k}").numpy() for k in state.old_obs_keys or []}

    def commit() -> None:  # every read and check passed: now mutate
        for name in _SETTINGS:
            value = getattr(state, name)
            setattr(venv_norm, name, _float_in(value) if name in _FLOATS else value)
        venv_norm.norm_obs_keys = None if state.norm_obs_keys is None else list(state.norm_obs_keys)
        if obs_rms is not None:
            venv_norm.obs_rms = obs_rms
        elif hasattr(venv_norm, "obs_rms"):
            del venv_norm.obs_rms
        venv_norm.ret_rms = ret_rms
        venv_norm.old_reward = old_reward
        if old_obs is not None:
            venv_norm.old_obs = old_obs
        venv_norm.returns = returns

    return commit


def _checked_returns(returns: np.ndarray) -> np.ndarray:
    """The stored ``VecNormalize.returns``: one float64 per env (non-finite values are restored as they were)."""
    if returns.dtype != np.float64 or returns.ndim != 1:
        raise FormatError(
            f"VecNormalize returns: expected one float64 value per env, the file holds {returns.dtype}"
            f" {list(returns.shape)}; the file is malformed"
        )
    return returns


def _read_rms(read: Callable[[str], Any], prefix: str, shape: Any) -> RunningMeanStd:
    mean, var, count = (read(f"{prefix}/{part}") for part in ("mean", "var", "count"))
    if shape is not None and (mean.shape != tuple(shape) or var.shape != tuple(shape)):
        raise StateMismatchError(
            f"VecNormalize {prefix}: the stored statistics have shape {list(mean.shape)} but the env's"
            f" observations have shape {list(shape)}; load them with the env they were computed on"
        )
    if mean.dtype != np.float64 or var.dtype != np.float64 or count.shape != () or count.dtype != np.float64:
        raise FormatError(f"VecNormalize {prefix}: mean/var must be float64 and count a float64 scalar")
    if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all() and 0 < count < math.inf):
        raise FormatError(  # normalizing with them gives NaN, which a policy's distribution then refuses
            f"VecNormalize {prefix}: mean and var must be finite, var >= 0 and count > 0 and finite"
        )
    rms = RunningMeanStd(shape=mean.shape)
    rms.mean, rms.var, rms.count = mean, var, float(count)  # (RunningMeanStd.update makes 0-d ret_rms numpy scalars)
    return rms


def _float_out(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _float_in(x: Any) -> Any:
    return float(x) if isinstance(x, str) else x
