"""The two halves: ``save_model`` (model -> file) and ``load_model`` (file -> model).

Save (top to bottom): walk the model -> tensors to bytes views + checksums -> manifest -> atomic write.

Load, in three phases (nothing the file names is imported before phase 3):

1. **parse** (``_file``, no torch): read the safetensors header only, check the manifest checksum, validate it with pydantic;
2. **audit**: ``decide`` makes every refusal the header and manifest decide (the algorithm matches, every
   import reference is trusted, pickled values are allowed or replaced, state dicts, tensors and random state
   fit the algorithm, ...; ``audit`` reports the same decisions), then every placeholder gets a live object
   (``MissingResourceError`` before any model exists);
3. **construct**: import, decode, build the model the way ``BaseAlgorithm.load`` does but with weight
   initialisation switched off, then read each tensor straight into the model's own memory.

``SafeSaveMixin`` (``_mixin.py``) calls these; this module is imported on the first save or load, so
``import sb3_safe_save`` stays cheap.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import json
import os
import pathlib
import platform
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, Literal, TypeVar

import cloudpickle
import numpy as np
import stable_baselines3 as sb3
import torch as th
from gymnasium import spaces as gym_spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import DiagGaussianDistribution, StateDependentNoiseDistribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.utils import check_for_correct_spaces
from stable_baselines3.common.vec_env import VecNormalize

from sb3_safe_save import _hazards, _remote, _rng, _weights
from sb3_safe_save._codecs import BY_KIND, check_object_state, decode_device, schedule_class_missing
from sb3_safe_save._deferred import DeferredOptimizer, deferred_optimizers
from sb3_safe_save._errors import (
    AlgorithmMismatchError,
    FormatError,
    IntegrityError,
    PickleRefusedError,
    SafeSaveError,
    SaveTargetDirectoryMissingError,
    SaveTargetIsADirectoryError,
    SaveWarning,
    StateMismatchError,
    UntrustedTypeError,
    algo_name,
    is_sb3_class,
    made_from,
)
from sb3_safe_save._external import external, unwrap

# phase 1 lives in _file (no torch); re-exported for the modules that import it from here
from sb3_safe_save._file import PathLike, _open, _parse
from sb3_safe_save._file import read_manifest as read_manifest
from sb3_safe_save._manifest import (
    META_CHECKSUM,
    META_MANIFEST,
    DeviceNode,
    Manifest,
    ModuleState,
    Node,
    ObjectNode,
    OptimizerState,
    PickleNode,
    Placeholder,
    PlaceholderNode,
    RefNode,
    ResourceSpec,
    TensorMeta,
    Versions,
    _Model,
    iter_nodes,
    iter_paths,
    node_refs,
)
from sb3_safe_save._resources import resolve
from sb3_safe_save._trust import RefKind, TrustList, TrustSpec, default_trusted, lookup, ref_of, slots
from sb3_safe_save._vecnormalize import PREFIX as VN_PREFIX
from sb3_safe_save._vecnormalize import export_vecnormalize, stage_vecnormalize
from sb3_safe_save._version import __version__
from sb3_safe_save._walker import _MODULE_INTERNALS, DEFAULT_MAX_OBJECT_BYTES, Snapshot, Walker, excluded_names, resolve_attr

SUFFIX = _weights.SUFFIX
SelfAlgo = TypeVar("SelfAlgo", bound=BaseAlgorithm)


# =============================================================================================== save
def save_model(
    model: BaseAlgorithm,
    path: PathLike,
    exclude: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    *,
    resources: Mapping[str, Any] | None = None,
    specs: Mapping[str, ResourceSpec | Mapping[str, Any]] | None = None,
    optional: Iterable[str] = (),
    allow_pickle: bool = False,
    max_object_bytes: int | None = None,
    fsync: bool = True,
    vec_normalize: VecNormalize | None = None,
) -> None:
    """Save ``model`` to one safetensors file. See ``SafeSaveMixin.save``."""
    staged = stage_model(
        model, exclude, include, resources=resources, specs=specs, optional=optional,
        allow_pickle=allow_pickle, max_object_bytes=max_object_bytes, vec_normalize=vec_normalize,
    )  # fmt: skip
    staged.write(path, fsync=fsync)


def stage_model(
    model: BaseAlgorithm,
    exclude: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    *,
    resources: Mapping[str, Any] | None = None,
    specs: Mapping[str, ResourceSpec | Mapping[str, Any]] | None = None,
    optional: Iterable[str] = (),
    allow_pickle: bool = False,
    max_object_bytes: int | None = None,
    vec_normalize: VecNormalize | None = None,
) -> StagedFile:
    """What ``save_model`` writes, not yet written (the arguments are ``save_model``'s).

    The blobs are views of the model's live memory: copy them (``_background.Stager``) before training goes on.
    """
    snapshot = snapshot_model(
        model, exclude, include, resources=resources, specs=specs, optional=optional,
        allow_pickle=allow_pickle, max_object_bytes=max_object_bytes,
    )  # fmt: skip
    _warn_hazards(model, snapshot)
    _warn_unloadable(model, excluded_names(model, exclude, include)[0])
    blobs = {key: _weights.to_blob(value) for key, value in snapshot.tensors.items()}
    manifest = build_manifest(model, snapshot, {})
    if vec_normalize is not None:
        vn_state, arrays = export_vecnormalize(vec_normalize)
        blobs.update({VN_PREFIX + key: _weights.to_blob(value) for key, value in arrays.items()})
        manifest = manifest.model_copy(update={"vec_normalize": vn_state})
    return StagedFile(blobs, header_metadata(manifest, blobs, META_MANIFEST, META_CHECKSUM))


@dataclasses.dataclass(frozen=True)
class StagedFile:
    """A file ready to write: its tensors as bytes, and its ``__metadata__`` (from the checksums as written).

    ``save_model`` and ``save_buffer`` write one at once, from views of the live memory. An asynchronous
    checkpoint copies the blobs first (``_background.Stager``) and writes the copy in the background.

    :param blobs: tensor key -> bytes to write
    :param metadata: the header for ``write_file`` (``header_metadata``: values taken when the file was staged)
    :param capacity: tensor key -> bytes it may grow to (a replay buffer's arrays, as rows are added);
        lets a stager keep one copy in memory for all later checkpoints
    """

    blobs: dict[str, _weights.Blob]
    metadata: _weights.Metadata
    capacity: dict[str, int] = dataclasses.field(default_factory=dict)

    def write(self, path: PathLike, *, fsync: bool = True) -> None:
        write_file(path, self.blobs, self.metadata, fsync=fsync)


def _warn_hazards(model: BaseAlgorithm, snapshot: Snapshot) -> None:
    """``HazardWarning`` for each error-level hazard, once per model (the build already warned the same ones)."""
    for hazard in snapshot.hazards:
        if hazard.severity == "error":
            _hazards.warn_hazard(model, hazard, "found at save")


def _warn_unloadable(model: BaseAlgorithm, excluded: set[str]) -> None:
    """SB3 #2025's workaround, ``_excluded_save_params() + ["policy_kwargs"]``: say at once that the file needs more."""
    if "policy_kwargs" not in excluded or not getattr(model, "policy_kwargs", None):
        return
    cls = type(model)
    message = (
        f"{algo_name(cls)}.save leaves out policy_kwargs ({cls.__qualname__}._excluded_save_params() or exclude= names it):"
        " the file cannot rebuild the policy by itself; load it with"
        f" {algo_name(cls)}.load(path, policy_kwargs={{...the same values...}}). With sb3_safe_save the exclusion is"
        " unnecessary: live objects in policy_kwargs (an expert) are kept out of the file anyway, as placeholders"
        " rebound with load(..., resources=...). Remove 'policy_kwargs' from _excluded_save_params()."
    )
    _hazards.warn_once(model, ("policy_kwargs_excluded",), message, SaveWarning)


def write_file(path: PathLike, blobs: Mapping[str, _weights.Blob], metadata: _weights.Metadata, *, fsync: bool) -> None:
    """Write a container to an open binary stream, a URL (one upload) or a local path (atomically).

    A path without a suffix, or with SB3's ``.zip``/``.pkl``, gets ``.safetensors`` (``_weights.saved_name``);
    missing directories are created, as SB3 does.
    """
    if isinstance(path, io.BufferedIOBase):
        _weights.write_stream(path, blobs, metadata)
    elif _remote.is_url(path):
        _remote.write(path, blobs, metadata)
    else:
        _weights.write_atomic(_target_path(_remote.local(path)), blobs, metadata, fsync=fsync)


def tensor_metas(blobs: Mapping[str, _weights.Blob], checksums: Mapping[str, str]) -> dict[str, TensorMeta]:
    """The manifest's record of each tensor: dtype, shape and the XXH3-128 checksum of the bytes written."""
    return {k: TensorMeta(dtype=b.dtype, shape=list(b.shape), xxh3=checksums[k]) for k, b in blobs.items()}


def header_metadata(
    header: _Model, blobs: Mapping[str, _weights.Blob], key: str, checksum_key: str
) -> Callable[[Mapping[str, str]], dict[str, str]]:
    """The ``__metadata__`` of a file described by ``header`` (a model with a ``tensors`` table), for ``write_file``.

    The writer calls it with the checksum of each tensor's bytes as written (``_weights._write``): the
    ``tensors`` table is filled in from them, so a tensor that changes during the save (training in another
    thread) cannot make the file fail its checks.

    :param header: the manifest, or the header model of a buffer or VecNormalize file
    :param key: the ``__metadata__`` key of its JSON
    :param checksum_key: the key of the JSON's own checksum
    """

    def make(checksums: Mapping[str, str]) -> dict[str, str]:
        text = header.model_copy(update={"tensors": tensor_metas(blobs, checksums)}).model_dump_json()
        return {"format": "pt", key: text, checksum_key: _weights.checksum(text.encode())}

    return make


def snapshot_model(
    model: BaseAlgorithm,
    exclude: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    *,
    resources: Mapping[str, Any] | None = None,
    specs: Mapping[str, ResourceSpec | Mapping[str, Any]] | None = None,
    optional: Iterable[str] = (),
    allow_pickle: bool = False,
    max_object_bytes: int | None = None,
) -> Snapshot:
    """Walk ``model`` as ``save`` would, without writing anything."""
    cls = type(model)
    declared = {key: resolve_attr(model, p) for key, p in getattr(cls, "safe_save_resources", {}).items()}
    declared.update(resources or {})
    if "policy_kwargs" in excluded_names(model, exclude, include)[0]:  # not in the data, but its modules are resources
        for key, module in _hazards.resource_modules(model).values():
            declared.setdefault(key, module)
    all_specs = {**getattr(cls, "safe_save_specs", {}), **(specs or {})}
    optional = frozenset(optional)
    walker = Walker(
        allow_pickle=allow_pickle,
        max_object_bytes=DEFAULT_MAX_OBJECT_BYTES if max_object_bytes is None else max_object_bytes,
        declared=declared,
        specs={k: v if isinstance(v, ResourceSpec) else ResourceSpec.model_validate(v) for k, v in all_specs.items()},
        optional=optional | frozenset(getattr(cls, "safe_save_optional", ())),
        trusted=TrustList(None, home=cls),
    )
    snapshot = walker.walk(model, exclude, _keep_session_state(model, exclude, include))
    snapshot.random_state, rng_tensors = _rng.capture(model)
    snapshot.tensors.update(rng_tensors)
    unused = (set(resources or {}) | set(specs or {}) | optional) - {p.key for p in snapshot.placeholders}
    if unused:
        warnings.warn(
            f"resources/specs/optional given for {sorted(unused)}, which match no resource in the model"
            f" (its resources are {[p.key for p in snapshot.placeholders]})",
            UserWarning,
            stacklevel=4,
        )
    return snapshot


def build_manifest(model: BaseAlgorithm, snapshot: Snapshot, tensors: Mapping[str, TensorMeta]) -> Manifest:
    return Manifest(
        versions=current_versions(),
        algorithm=ref_of(made_from(type(model))),
        base_algorithm=base_algorithm_ref(type(model)),
        data=snapshot.data,
        state_dicts=snapshot.state_dicts,
        torch_variables=snapshot.torch_variables,
        placeholders=snapshot.placeholders,
        tensors=dict(tensors),
        hazards=snapshot.hazards,
        random_state=snapshot.random_state,
    )


def _target_path(path: str | os.PathLike[str]) -> pathlib.Path:
    target = pathlib.Path(_weights.saved_name(str(path)))  # a folder "best_model" -> "best_model.safetensors", as SB3
    if target.is_dir():
        raise SaveTargetIsADirectoryError(f"{target} is a directory; give a file name such as {target / ('model' + SUFFIX)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # as SB3's save does
    except OSError as e:
        raise SaveTargetDirectoryMissingError(f"cannot create the directory {target.parent} to save {target}: {e}") from None
    return target


@functools.cache
def current_versions() -> Versions:
    try:
        import sb3_contrib

        contrib: str | None = sb3_contrib.__version__
    except ImportError:
        contrib = None
    import gymnasium

    return Versions(
        sb3_safe_save=__version__,
        stable_baselines3=sb3.__version__,
        torch=th.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        gymnasium=gymnasium.__version__,
        sb3_contrib=contrib,
    )


def _short_ref(ref: str) -> str:
    """``stable_baselines3.dqn.dqn:DQN`` -> ``DQN`` (the file's text: printable characters only)."""
    return "".join(c if c.isprintable() else "?" for c in ref.rpartition(":")[2])[:100]


def base_algorithm_ref(cls: type) -> str:
    """The SB3 / sb3-contrib algorithm a class derives from (``stable_baselines3.dqn.dqn:DQN``)."""
    for klass in cls.__mro__:
        if is_sb3_class(klass) and issubclass(klass, BaseAlgorithm):  # not a subclass that borrows SB3's module
            return ref_of(klass)
    raise TypeError(f"{cls.__qualname__} does not derive from a stable_baselines3 or sb3_contrib algorithm")


# =============================================================================================== load
@_rng.keep_on_error
def load_model(
    cls: type[SelfAlgo],
    path: PathLike,
    env: GymEnv | None = None,
    device: th.device | str = "auto",
    custom_objects: dict[str, Any] | None = None,
    print_system_info: bool = False,
    force_reset: bool = True,
    *,
    resources: Mapping[str, Any] | None = None,
    trusted: TrustSpec | None = None,
    allow_pickle: bool = False,
    verify: bool = True,
    expected_sha256: str | None = None,
    strict: bool = True,
    restore_random_state: bool = True,
    training: bool = True,
    **kwargs: Any,
) -> SelfAlgo:
    """Load a model saved by ``save_model``. See ``SafeSaveMixin.load``."""
    custom_objects = dict(custom_objects or {})
    with _open(path) as (f, size):
        # ---- phase 1: parse
        header, manifest = _parse(f, size)
        check_sha256(f, expected_sha256)
        if print_system_info:
            print(
                "== SAVED WITH ==",
                json.dumps(manifest.versions.model_dump(), indent=2),  # ASCII: text from the file cannot drive a terminal
                "== CURRENT ==",
                current_versions().model_dump_json(indent=2),
                sep="\n",
            )

        # ---- phase 2: audit (no imports): every refusal the header and manifest decide (``decide``)
        trust, covered = audit_phase(
            manifest, custom_objects, trusted=trusted, cls=cls, allow_pickle=allow_pickle, kwargs=kwargs
        )
        resources = {
            **_given_by_policy_kwargs(manifest, kwargs),
            **_given_by_custom_objects(manifest.placeholders, custom_objects, covered),
            **(resources or {}),
        }
        bound = resolve(  # missing: before any call
            manifest.placeholders, resources, trust, strict=strict, skip=covered, call=f"{algo_name(cls)}.load"
        )

        # ---- phase 3: construct (every check passed; only now is anything the file names called). The caller's
        # objects (env, VecNormalize, resources) are changed only once everything has succeeded.
        body = _weights.Body(f, header, {k: m.xxh3 for k, m in manifest.tensors.items()}, verify=verify)
        provided = [unwrap(v) for v in (*bound.values(), *custom_objects.values())]  # the caller's: never written into
        seeds = _env_seeds(env)
        restore_rng = None
        try:
            commit_vec_normalize = None
            if manifest.vec_normalize is not None:
                env, commit_vec_normalize = _attach_vec_normalize(cls, manifest, body, env)
            decoder = _Decoder(body, trust, bound, custom_objects, manifest, allow_pickle=allow_pickle, budget=size)
            model = _build(cls, manifest, decoder, env, device, custom_objects, force_reset, kwargs, training=training)
            _load_state(model, manifest, decoder, body, provided, training=training)
            unfilled = unfilled_paths(model, manifest, decoder)
            _check_external(model, manifest, provided)
            if manifest.random_state is not None:
                restore_rng = _rng.prepare_restore(model, manifest.random_state, body.read_tensor, env_given=env is not None)
            unread = set(header.tensors) - body.read_keys - _skipped_tensors(manifest, custom_objects)
            if not training:
                unread -= optimizer_tensors(manifest)
            if unread:
                raise FormatError(f"the file holds tensors the manifest never uses: {sorted(unread)[:5]}")
            body.finish()
        except BaseException as e:
            _restore_env_seeds(seeds)
            if isinstance(e, (SafeSaveError, OSError, Warning)) or not isinstance(e, Exception):
                raise
            # last line of defence: whatever else a file made fail here is still a SafeSaveError
            raise FormatError(f"the file cannot be loaded: {type(e).__name__}: {e}") from e
        if commit_vec_normalize is not None:
            commit_vec_normalize()
    if restore_rng is not None and restore_random_state:
        restore_rng()  # last: a load that fails leaves the process's random state alone
    warn_unfilled(unfilled)  # only once the load has succeeded: a refused load says one thing
    return model


def _env_seeds(env: Any) -> list[tuple[Any, dict[str, Any]]]:
    """The pending seeds and reset options of ``env`` and the VecEnvs it wraps (SB3's build seeds them)."""
    out: list[tuple[Any, dict[str, Any]]] = []
    for _ in range(64):
        if env is None:
            break
        state = {k: copy.copy(env.__dict__[k]) for k in ("_seeds", "_options") if k in getattr(env, "__dict__", {})}
        if state:
            out.append((env, state))
        env = getattr(env, "venv", None)
    return out


def _restore_env_seeds(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for env, state in saved:
        env.__dict__.update(state)


def check_sha256(f: IO[bytes], expected_sha256: str | None) -> None:
    """Refuse the file unless its SHA-256 is ``expected_sha256`` (no check when None)."""
    if expected_sha256 is not None:
        found = _weights.sha256_of(f)
        if found != expected_sha256.lower():
            raise IntegrityError(f"SHA-256 mismatch: expected {expected_sha256}, the file has {found}")


def audit_phase(
    manifest: Manifest,
    custom_objects: Mapping[str, Any],
    *,
    trusted: TrustSpec | None,
    cls: type[BaseAlgorithm] | None,
    allow_pickle: bool,
    kwargs: Mapping[str, Any] | None = None,
) -> tuple[TrustList, frozenset[str]]:
    """Phase 2 (imports and calls nothing the file names): raise the first of ``decide``'s refusals.

    Every load path (``load_model``, ``load_policy``) runs this on the part of the manifest it will decode,
    then binds the placeholders (``resolve``) first thing in phase 3.

    :param cls: the class ``load`` was called on; None for ``load_policy``, whose view of the manifest
        holds only the policy's constructor data and state dict
    :param kwargs: the extra keyword arguments given to ``load`` (they set model attributes)
    :return: the trust list and the placeholder keys ``custom_objects`` makes unnecessary
    """
    trust = TrustList(trusted, home=cls)
    decisions = decide(
        manifest, cls, trust, policy=cls is None, custom_objects=custom_objects, kwargs=kwargs, allow_pickle=allow_pickle
    )
    if decisions:
        raise decisions[0].error
    return trust, frozenset(p.key for p in manifest.placeholders if _covered(p, manifest, custom_objects))


@dataclasses.dataclass(frozen=True)
class Decision:
    """One refusal decided from the header and manifest alone: a load raises the first, ``audit`` reports each.

    :param error: what the load raises (several decisions may share one error: every untrusted reference is
        named in one ``UntrustedTypeError``)
    :param code: the audit finding's code
    :param message: the audit finding's text (empty: the error's)
    :param paths: the attribute paths, placeholder paths or tensor keys concerned
    :param severity: the audit finding's severity: ``warning`` for a reference the caller may still trust
    :param type: the reference concerned, if any
    :param key: the placeholder key concerned, if any
    """

    error: SafeSaveError
    code: str
    message: str = ""
    paths: tuple[str, ...] = ()
    severity: Literal["warning", "error"] = "error"
    type: str | None = None
    key: str | None = None


def decide(
    manifest: Manifest,
    cls: type[BaseAlgorithm] | None,
    trust: TrustList,
    *,
    policy: bool = False,
    custom_objects: Mapping[str, Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
) -> list[Decision]:
    """Every refusal of a load that the header and manifest decide, in the order the load raises them.

    Imports, builds and calls nothing the file names: this is load's phase 2 and all of ``audit``'s
    verdict on a file. The load raises the first decision; ``audit`` reports each as a finding.

    :param manifest: the parsed manifest (``_parse`` checked it against the safetensors header)
    :param cls: the class ``load`` is called on; None when no class loads it (``audit`` of a file whose
        base algorithm is not an SB3 algorithm) or for ``policy``
    :param trust: the trust list the load uses
    :param policy: decide for ``load_policy`` (``manifest`` is then its ``policy_view``)
    :param custom_objects: the values the load puts in place of stored ones (never decoded)
    :param kwargs: the extra keyword arguments of ``load`` (they set model attributes)
    :param allow_pickle: the load unpickles
    """
    custom = dict(custom_objects or {})
    kwargs = dict(kwargs or {})
    out: list[Decision] = []
    if not policy:
        out += _algorithm_decisions(manifest, cls)
        if manifest.content != "agent":
            return out  # nothing else matters to load; audit checks the file as load_policy reads it
    refs, pickles = references(manifest, custom)
    out += _reference_decisions(trust, refs, None if policy else cls, policy=policy)
    if cls is not None and not policy:
        out += _data_key_decisions(cls, manifest)
    out += _rebind_decisions(manifest, None if policy else cls)
    if pickles and not allow_pickle:
        out.append(Decision(PickleRefusedError(pickles), "pickle", paths=tuple(pickles)))
    if not policy and "policy_kwargs" not in manifest.data and "policy_kwargs" not in kwargs:
        # a warning for audit: like a placeholder, what the caller passes to load (policy_kwargs=), not a forgery
        out.append(Decision(_no_policy_kwargs(cls), "refused_attribute", severity="warning", paths=("policy_kwargs",)))
    # what phase 3 used to find only after building the model, decided here from the manifest alone
    out += _policy_data_decisions(manifest, custom, policy=policy)
    out += _value_decisions(manifest, custom, trust)
    if cls is not None and not policy:
        out += _state_name_decisions(cls, manifest)
    out += _module_state_decisions(manifest)
    out += _tensor_decisions(manifest, custom, policy=policy)
    if not policy and manifest.random_state is not None:
        out += _random_state_decisions(manifest, custom, kwargs)
    return out


def _algorithm_decisions(manifest: Manifest, cls: type[BaseAlgorithm] | None) -> list[Decision]:
    """An agent file, of the algorithm ``cls`` derives from."""
    error: SafeSaveError
    if manifest.content != "agent":
        error = FormatError(
            f"this file holds a {manifest.content} only (written by save_policy), not an agent;"
            " load it with sb3_safe_save.load_policy(path)"
        )  # a warning for audit: the file is fine for load_policy, which audit then checks as well
        return [Decision(error, "content", severity="warning", paths=("content",))]
    if cls is None:
        error = FormatError(
            f"base algorithm {manifest.base_algorithm} is not a stable_baselines3/sb3_contrib algorithm:"
            " no algorithm class loads this file"
        )
        return [Decision(error, "refused_reference", paths=("base_algorithm",), type=manifest.base_algorithm)]
    expected_base = base_algorithm_ref(cls)
    if manifest.base_algorithm == expected_base:
        return []
    saved = _short_ref(manifest.base_algorithm)
    by = "" if manifest.algorithm == manifest.base_algorithm else f" (saved by {_short_ref(manifest.algorithm)})"
    error = AlgorithmMismatchError(
        f"this file holds a {saved} model{by}, but {algo_name(cls)}.load was called"
        + ("" if _short_ref(expected_base) in algo_name(cls) else f" (a {_short_ref(expected_base)})")
        + f"; load it with a {saved} class, e.g. safe({saved}).load(path)"
    )
    return [Decision(error, "refused_reference", paths=("base_algorithm",), type=manifest.base_algorithm)]


def _reference_decisions(
    trust: TrustList, refs: Mapping[str, list[tuple[str, RefKind]]], cls: type | None, *, policy: bool
) -> list[Decision]:
    """Every reference the trust list refuses (importing nothing): untrusted ones first, as one error."""
    refusals = trust.refusals(refs)
    untrusted = [r for r in refusals if r.trustable]
    out: list[Decision] = []
    if untrusted:
        where = {r.ref: r.paths for r in untrusted}
        error: SafeSaveError = UntrustedTypeError(
            [r.ref for r in untrusted], where, algo=cls, call="sb3_safe_save.load_policy" if policy else None
        )
        out += [
            Decision(error, "untrusted_reference", severity="warning", paths=tuple(sorted(set(r.paths))), type=r.ref)
            for r in untrusted
        ]
    refused = [r for r in refusals if not r.trustable]
    if refused:
        error = FormatError("; ".join(f"{', '.join(r.paths[:3])}: {r.ref} is refused: {r.reason}" for r in refused[:5]))
        for r in refused:
            used = sorted(set(r.paths))
            message = f"{r.ref} (used by {', '.join(used[:3])}) is refused by load: {r.reason}"
            out.append(Decision(error, "refused_reference", message, tuple(used), type=r.ref))
    return out


def _data_key_decisions(cls: type[BaseAlgorithm], manifest: Manifest) -> list[Decision]:
    refused = refused_data_keys(cls, manifest)
    if not refused:
        return []
    detail = "; ".join(f"{name!r}: {why}" for name, why in list(refused.items())[:5])
    error = FormatError(
        f"the file sets attributes a {cls.__qualname__} file never holds ({detail});"
        " it was not written by save (if you saved with include=[...] of such a name, save without it)"
    )
    return [
        Decision(error, "refused_attribute", f"the file sets {name!r}, which load refuses: {why}", (name,))
        for name, why in refused.items()
    ]


def _rebind_decisions(manifest: Manifest, cls: type | None) -> list[Decision]:
    bad_paths = rebind_problems(manifest, cls)
    if not bad_paths:
        return []
    error = FormatError("; ".join(f"placeholder {k!r}: cannot rebind at {p!r}: {why}" for k, p, why in bad_paths[:5]))
    return [
        Decision(error, "refused_attribute", f"placeholder {k!r} at {p!r}: load refuses to rebind there: {why}", (p,), key=k)
        for k, p, why in bad_paths
    ]


#: The node kinds that can decode to a policy class (``policy_class``) or a space (the spaces), by key.
_POLICY_DATA_KINDS = {
    "policy_class": {"ref", "placeholder", "pickle"},
    "observation_space": {"space", "object", "placeholder", "pickle"},
    "action_space": {"space", "object", "placeholder", "pickle"},
}


def _policy_data_decisions(manifest: Manifest, custom: Mapping[str, Any], *, policy: bool) -> list[Decision]:
    """What ``check_policy_data`` would refuse after decoding: a policy class or space missing, or stored as a
    value that cannot be one (a string, a number, a list...)."""
    out: list[Decision] = []
    for key, kinds in _POLICY_DATA_KINDS.items():
        if key in custom and (policy or key in manifest.data):
            continue  # the caller's value is used
        if key not in manifest.data:
            error = FormatError(f"the file has no {key!r}; it cannot be rebuilt (was it left out with exclude=?)")
        elif getattr(manifest.data[key], "kind", None) not in kinds:
            node = manifest.data[key]
            found = getattr(node, "kind", None) or type(node).__name__
            what = "a stable_baselines3 policy class" if key == "policy_class" else "a gymnasium space"
            error = FormatError(f"the stored {key} is a {found} node, not {what}")
        else:
            continue
        out.append(Decision(error, "malformed", paths=(key,)))
    return out


def _value_decisions(manifest: Manifest, custom: Mapping[str, Any], trust: TrustList) -> list[Decision]:
    """Stored values decoding would refuse: a device such as ``meta``; object state that shadows the class's methods.

    An object's class is judged here where it is known without importing anything (the default trust list, or
    a module already imported); decoding judges the others.
    """
    described = {p.key for p in manifest.placeholders}
    out: list[Decision] = []
    for top, root in _walk_data(manifest):
        for path, node in iter_paths(root, top, skip=custom.__contains__):
            try:
                if isinstance(node, PlaceholderNode) and node.key not in described:
                    raise FormatError(
                        f"{path}: the manifest uses placeholder {node.key!r} but does not describe it; the file is malformed"
                    )
                if isinstance(node, DeviceNode):
                    decode_device(node.value, path)
                elif isinstance(node, ObjectNode) and schedule_class_missing(node.cls) is None:
                    check_object_state(_known_class(node.cls, trust), node, path)
            except FormatError as e:
                out.append(Decision(e, "refused_attribute", paths=(path,)))
    return out


def _known_class(ref: str, trust: TrustList) -> type | None:
    """The class ``ref`` names, if trusted as an object's class and known without importing anything, else None."""
    if trust.why(ref, "object") is None:
        return None  # refused anyway
    entry = default_trusted().get(ref)
    if entry is not None:
        return entry[0] if isinstance(entry[0], type) else None
    module_name, _, qualname = ref.partition(":")
    module = sys.modules.get(module_name)
    found = lookup(module, qualname) if module is not None else None
    return found if isinstance(found, type) else None


def _state_name_decisions(cls: type[BaseAlgorithm], manifest: Manifest) -> list[Decision]:
    """State dicts and torch variables a ``cls`` model never has, or state dicts it always has and the file lacks."""
    names = torch_save_names(cls)
    if names is None:
        return []  # the class decides on its built state: phase 3 checks against the model
    (required, possible), (_, possible_variables) = names
    stored = [e.name for e in manifest.state_dicts]
    out: list[Decision] = []
    foreign = sorted(set(stored) - possible)
    if foreign:
        error = StateMismatchError(
            f"the file has state dicts {foreign[:5]}, which a {cls.__qualname__} model does not have ({sorted(possible)})"
        )
        out.append(Decision(error, "malformed", paths=tuple(foreign)))
    missing = sorted(required - set(stored))
    if missing or len(set(stored)) != len(stored):
        error = StateMismatchError(
            f"a {cls.__qualname__} model has state dicts {sorted(required)} but the file has {sorted(stored)}"
        )
        out.append(Decision(error, "malformed", paths=tuple(missing or stored)))
    foreign = sorted(set(manifest.torch_variables) - possible_variables)
    if foreign:
        error = StateMismatchError(
            f"the file has torch variables {foreign[:5]}, which a {cls.__qualname__} model does not have"
            f" ({sorted(possible_variables)})"
        )
        out.append(Decision(error, "malformed", paths=tuple(foreign)))
    return out


class _StandIn:
    """What a probed model attribute reads in ``torch_save_names``' second call: set, not None."""


def torch_save_names(cls: type[BaseAlgorithm]) -> tuple[tuple[set[str], set[str]], tuple[set[str], set[str]]] | None:
    """What ``cls._get_torch_save_params()`` can return, without a model, or None if that cannot be told.

    The method is called on a bare instance whose attributes (all but methods and other descriptors of the
    class) read None, then a stand-in that is not None: SAC's ``ent_coef_optimizer is not None`` takes both
    branches. A method that fails on such an instance decides on state only the built model has: None.

    :return: ``((state dicts in both calls, in either), (torch variables in both, in either))``
    """
    calls: list[tuple[set[str], set[str]]] = []
    for fill in (None, _StandIn()):

        def read(self: Any, name: str, fill: Any = fill) -> Any:
            static = inspect.getattr_static(type(self), name, _NOT_FOUND)
            if static is _NOT_FOUND or isinstance(static, (type(None), bool, int, float, str)):
                return fill
            return object.__getattribute__(self, name)

        try:
            probe: Any = types.new_class(f"_Probe{cls.__name__}", (cls,), exec_body=functools.partial(_set_read, read))
            state_dicts, variables = probe._get_torch_save_params(object.__new__(probe))
            if not all(isinstance(n, str) for n in (*state_dicts, *variables)):
                return None
        except Exception:  # reads state of the built model (or a user override does something else)
            return None
        calls.append((set(state_dicts), set(variables)))
    (s1, v1), (s2, v2) = calls
    return (s1 & s2, s1 | s2), (v1 & v2, v1 | v2)


def _set_read(read: Callable[[Any, str], Any], namespace: dict[str, Any]) -> None:
    namespace["__getattribute__"] = read


def _module_state_decisions(manifest: Manifest) -> list[Decision]:
    """Weights left out under a prefix that is no placeholder's path; aliases of keys that are not stored."""
    at = {path for ph in manifest.placeholders for path in ph.paths}
    out: list[Decision] = []
    for entry in manifest.state_dicts:
        if not isinstance(entry, ModuleState):
            continue
        for prefix in entry.external_prefixes:
            if not prefix.endswith("."):
                error = FormatError(f"{entry.name}: external prefix {prefix!r} must end with '.'")
            elif f"{entry.name}.{prefix[:-1]}" not in at:
                error = FormatError(
                    f"{entry.name}: the file leaves out the weights under {prefix!r} but records no resource at"
                    f" {entry.name}.{prefix[:-1]}; the file is malformed"
                )
            else:
                continue
            out.append(Decision(error, "malformed", paths=(f"{entry.name}.{prefix}",)))
        keys = set(entry.keys)
        for alias, canonical in entry.aliases.items():
            if canonical not in keys:
                error = FormatError(f"{entry.name}: alias {alias!r} points to {canonical!r}, which is not stored")
                out.append(Decision(error, "malformed", paths=(f"{entry.name}.{alias}",)))
    return out


def _tensor_decisions(manifest: Manifest, custom: Mapping[str, Any], *, policy: bool) -> list[Decision]:
    """Tensors the manifest uses but the file lacks, and (``load``) tensors in the file that nothing uses."""
    used: set[str] = set()
    needed: list[str] = []  # read by the load: not below a custom_objects path
    for entry in manifest.state_dicts:
        if isinstance(entry, ModuleState):
            needed += [f"{entry.name}/{key}" for key in entry.keys]
    for top, root in _walk_data(manifest):
        for path, node in iter_paths(root, top):
            key = getattr(node, "tensor", None)
            if isinstance(key, str):
                used.add(key)
                if not _under(path, custom):
                    needed.append(key)
    if not policy:
        state = manifest.random_state
        if state is not None:
            needed += [f"{_rng.PREFIX}{name}" for name in ("torch_cpu", "numpy_key", "python")]
            needed += [f"{_rng.PREFIX}torch_cuda/{i}" for i in range(state.torch_cuda)]
            needed += [f"{_rng.PREFIX}gsde/{path}/{attr}" for path, attrs in state.gsde.items() for attr in attrs]
        if manifest.vec_normalize is not None:
            used.update(k for k in manifest.tensors if k.startswith(VN_PREFIX))  # read as its statistics need them
    used.update(needed)
    out: list[Decision] = []
    missing = [key for key in needed if key not in manifest.tensors]
    if missing:
        error = FormatError(f"the manifest refers to tensor {missing[0]!r}, which the file does not contain")
        out.append(Decision(error, "malformed", paths=tuple(missing[:100])))
    if not policy:
        unused = sorted(set(manifest.tensors) - used - _skipped_tensors(manifest, custom))
        if unused:
            error = FormatError(f"the file holds tensors the manifest never uses: {unused[:5]}")
            out.append(Decision(error, "malformed", paths=tuple(unused[:100])))
    return out


#: The random-state tensors of fixed layout: uint8 bytes of this many uint32 (``_rng``).
_RNG_WORDS = {"numpy_key": 624, "python": 625}


def _random_state_decisions(manifest: Manifest, custom: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[Decision]:
    """Random state the rebuilt model cannot take: gSDE noise without gSDE, generator keys of the wrong size."""
    state = manifest.random_state
    assert state is not None
    out: list[Decision] = []
    for name, words in _RNG_WORDS.items():
        meta = manifest.tensors.get(_rng.PREFIX + name)
        if meta is not None and (meta.dtype != "U8" or meta.shape != [4 * words]):
            error: SafeSaveError = FormatError(
                f"random_state.{name}: expected {4 * words} bytes, the file has a {meta.dtype} {meta.shape} tensor"
            )
            out.append(Decision(error, "malformed", paths=(f"random_state.{name}",)))
    if state.gsde:
        use_sde = kwargs["use_sde"] if "use_sde" in kwargs else custom.get("use_sde", manifest.data.get("use_sde"))
        for path in state.gsde:
            if use_sde is not True or (path != "policy" and not path.startswith("policy.")):
                error = StateMismatchError(
                    f"random_state.gsde: the file has gSDE noise at {path!r}, the rebuilt model does not"
                    + ("" if use_sde is True else " (it sets no use_sde=True)")
                )
                out.append(Decision(error, "malformed", paths=(f"random_state.gsde.{path}",)))
            for attr in state.gsde[path]:
                meta = manifest.tensors.get(f"{_rng.PREFIX}gsde/{path}/{attr}")
                rank = 2 if attr == "exploration_mat" else 3  # (latent, actions) or (n_envs, latent, actions)
                if meta is not None and len(meta.shape) != rank:
                    error = StateMismatchError(
                        f"random_state.gsde: {path}.action_dist.{attr} is stored as {meta.dtype} {meta.shape};"
                        f" gSDE needs a tensor of rank {rank}"
                    )
                    out.append(Decision(error, "malformed", paths=(f"random_state.gsde.{path}.{attr}",)))
    return out


def optimizer_tensors(manifest: Manifest) -> set[str]:
    """The tensor keys that hold optimizer state (an evaluation load leaves them unread)."""
    return {
        key
        for entry in manifest.state_dicts
        if isinstance(entry, OptimizerState)
        for node in iter_nodes(entry.state)
        if (key := getattr(node, "tensor", None)) is not None
    }


def is_sb3_zip(path: PathLike) -> bool:
    """True if ``path`` starts like a zip file (a stock SB3 save)."""
    if isinstance(path, (io.BufferedIOBase, io.RawIOBase)):
        pos = path.tell()
        start = path.read(4)
        path.seek(pos)
    elif isinstance(path, str) and _remote.is_url(path):
        return False
    else:
        target = pathlib.Path(path)
        if not target.exists() and target.with_suffix(".zip").exists():  # SB3 adds ".zip" to suffix-less paths
            target = target.with_suffix(".zip")
        if not target.is_file():
            return False
        with open(target, "rb") as f:
            start = f.read(4)
    return start == b"PK\x03\x04"


def _walk_data(manifest: Manifest) -> Iterator[tuple[str, Node]]:
    """(top-level path, node) for every node a load would decode."""
    yield from manifest.data.items()
    for entry in manifest.state_dicts:
        if isinstance(entry, OptimizerState):
            yield entry.name, entry.state
    yield from manifest.torch_variables.items()


_REF_KINDS: dict[str, RefKind] = {"ref": "ref", "object": "object", "enum": "enum", "namedtuple": "namedtuple"}


def references(
    manifest: Manifest, custom_objects: Mapping[str, Any] | None = None
) -> tuple[dict[str, list[tuple[str, RefKind]]], list[str]]:
    """Every import reference with where and how it is used, and every pickled value, that a load would decode."""
    refs: dict[str, list[tuple[str, RefKind]]] = {}
    pickles: list[str] = []
    replaced = (custom_objects or {}).__contains__  # a replaced value (and all below it) is never decoded
    for top, root in _walk_data(manifest):
        for path, node in iter_paths(root, top, skip=replaced):
            for ref in node_refs(node):
                if schedule_class_missing(ref) is None:  # else rebuilt by the installed (older) SB3, not imported
                    refs.setdefault(ref, []).append((path, _REF_KINDS[getattr(node, "kind", "ref")]))
            if isinstance(node, PickleNode):
                pickles.append(path)
    return refs, pickles


def _covered(ph: Placeholder, manifest: Manifest, custom_objects: Mapping[str, Any]) -> bool:
    """A placeholder is not needed if ``custom_objects`` replaces every data path it sits at."""
    data_paths = [p for p in ph.paths if _root(p) in manifest.data]
    return bool(custom_objects) and len(data_paths) == len(ph.paths) and all(_under(p, custom_objects) for p in data_paths)


def _given_by_custom_objects(
    placeholders: Iterable[Placeholder], custom_objects: Mapping[str, Any], covered: frozenset[str]
) -> dict[str, Any]:
    """Placeholders whose object ``custom_objects`` supplies at one of their data paths (key -> object).

    ``custom_objects={"policy_kwargs.vlm_model": expert}`` gives the expert for the policy's constructor;
    the same object also sits in the module tree (``policy.q_net.vlm_model``), where it is rebound as if
    passed with ``resources=``. A placeholder's key that is not an attribute of the model
    (``custom_objects={"vlm_model": expert}``) is taken as ``resources={"vlm_model": expert}``.
    """
    given: dict[str, Any] = {}
    for ph in placeholders:
        if ph.key in covered:
            continue
        if ph.key in custom_objects and not any(_root(p) == ph.key for p in ph.paths):  # keyed as in resources=
            given[ph.key] = custom_objects[ph.key]
        for path in ph.paths:
            for prefix, value in custom_objects.items():
                if path == prefix:
                    given.setdefault(ph.key, value)
                elif _under(path, [prefix]):
                    with contextlib.suppress(AttributeError, LookupError, TypeError, ValueError):
                        given.setdefault(ph.key, resolve_attr(value, path[len(prefix) :]))
    return given


def _no_policy_kwargs(cls: type[BaseAlgorithm] | None) -> StateMismatchError:
    """A file saved without ``policy_kwargs`` (SB3 #2025's workaround) needs them again from the caller."""
    name = cls.__qualname__ if cls is not None else "the algorithm"
    return StateMismatchError(
        f"the file was saved without policy_kwargs ({name}._excluded_save_params() or save(exclude=)"
        f" left them out), so it cannot rebuild the policy by itself: load it with"
        f" {algo_name(cls) if cls is not None else 'Algo'}.load(path, policy_kwargs={{...the values used in training...}})."
        " To make files that load by themselves, remove 'policy_kwargs' from _excluded_save_params(): sb3_safe_save"
        " keeps live objects in them (an expert) out of the file anyway"
    )


def _given_by_policy_kwargs(manifest: Manifest, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """For a file saved without ``policy_kwargs``: the live objects ``load(..., policy_kwargs=...)`` hands over, by key.

    Such a file's placeholders (found in the module tree) are keyed by the attribute names the
    objects had, which are the ``policy_kwargs`` names in the usual ``self.vlm_model = vlm_model``.
    """
    given = kwargs.get("policy_kwargs")
    if "policy_kwargs" in manifest.data or not isinstance(given, Mapping):
        return {}
    keys = {ph.key for ph in manifest.placeholders}
    return {k: v for k, v in given.items() if k in keys and not isinstance(v, (type(None), bool, int, float, str))}


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == c or path.startswith(c + ".") or path.startswith(c + "[") for c in prefixes)


def _root(path: str) -> str:
    return path.split(".")[0].split("[")[0]


def _skipped_tensors(manifest: Manifest, custom_objects: Mapping[str, Any]) -> set[str]:
    return {k for k in manifest.tensors if _under(k.removesuffix("#pickle"), custom_objects)}


#: What building Python values or a model from well-formed but hostile manifest values can raise.
_DECODE_ERRORS = (
    TypeError, ValueError, ArithmeticError, KeyError, IndexError, AttributeError, AssertionError, RecursionError, MemoryError,
)  # fmt: skip
#: What decoding may allocate from sizes declared in JSON (a ``Box`` space's ``shape``, ...): the
#: file's size, or this much if the file is smaller. Decoded bytes that come from the file's tensors
#: cost nothing extra; a few hundred bytes of JSON can never ask for gigabytes.
MIN_DECODE_BUDGET = 64 << 20


class _Decoder:
    """Implements the codecs' ``Decoder`` protocol for one load."""

    def __init__(
        self,
        body: _weights.Body,
        trust: TrustList,
        bound: Mapping[str, Any],
        overrides: Mapping[str, Any],
        manifest: Manifest,
        *,
        allow_pickle: bool = False,
        budget: int = 0,
    ) -> None:
        self._allow_pickle = allow_pickle
        self._budget = max(MIN_DECODE_BUDGET, budget)
        self._body = body
        self._trust = trust
        self.bound = bound
        self._overrides = overrides
        self._manifest = manifest
        self._wrappers: dict[str, Any] = {}
        self._placeholders: dict[str, Placeholder] | None = None

    def decode(self, node: Node, path: str) -> Any:
        if path in self._overrides:
            return self._overrides[path]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        try:
            return BY_KIND[node.kind].decode(node, path, self)
        except SafeSaveError:
            raise
        except Exception as e:  # a value the codec accepts in shape but not in content (2**70 as int64, ...)
            raise FormatError(f"{path}: the stored {node.kind} cannot be decoded: {type(e).__name__}: {e}") from None

    def tensor(self, key: str) -> th.Tensor:
        return self._body.read_tensor(key)

    def charge(self, nbytes: int, path: str) -> None:
        if nbytes > self._budget:
            raise FormatError(
                f"{path}: decoding the file's values would allocate over {MIN_DECODE_BUDGET >> 20} MiB or the file's"
                f" size ({nbytes} more bytes asked, {self._budget} left); the file declares absurd sizes"
            )
        self._budget -= nbytes

    def resolve(self, ref: str, path: str, kind: RefKind) -> Any:
        return self._trust.resolve(ref, path, kind)  # phase 2 checked the references; this decides for each use

    def placeholder(self, key: str, path: str) -> Any:
        if self._placeholders is None:  # by key, built once: not a scan of every placeholder per node
            self._placeholders = {}
            for p in self._manifest.placeholders:
                self._placeholders.setdefault(p.key, p)
        ph = self._placeholders.get(key) or self._manifest.placeholder(key)  # (the latter raises the error)
        if key not in self.bound:
            raise FormatError(f"{path}: placeholder {key!r} was not resolved")
        return self.bound_at(ph, path)

    def bound_at(self, ph: Placeholder, path: str) -> Any:
        """The resource for ``path``: wrapped in ``external()`` where it was wrapped at save (one wrapper per key)."""
        obj = self.bound[ph.key]
        if path not in ph.external_paths:
            return unwrap(obj)
        if ph.key not in self._wrappers:
            self._wrappers[ph.key] = external(obj)
        return self._wrappers[ph.key]

    def unpickle(self, node: PickleNode, path: str) -> Any:
        if not self._allow_pickle:  # phase 2 names pickles by tensor key; a forged file can put them elsewhere
            raise PickleRefusedError([path])
        data = self._body.read_tensor(node.tensor).numpy().tobytes()
        return cloudpickle.loads(data)


_init_lock = threading.RLock()


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Turn the in-place ``torch.nn.init`` functions into no-ops (the loaded tensors overwrite them anyway).

    Building a 50M-parameter PPO policy spends seconds in orthogonal initialisation whose result
    load then throws away. Process-wide while active; a lock serialises concurrent loads.
    """
    init = th.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    with _init_lock:
        saved = {n: getattr(init, n) for n in names}
        try:
            for n in names:
                setattr(init, n, _skip_init)
            yield
        finally:
            for n, fn in saved.items():
                setattr(init, n, fn)


def _skip_init(tensor: th.Tensor, *args: Any, **kwargs: Any) -> th.Tensor:
    return tensor


def refused_data_keys(cls: type[BaseAlgorithm], manifest: Manifest) -> dict[str, str]:
    """The stored attributes a file may not set on a ``cls`` model -> why: what SB3's ``save`` could never write.

    Refused: names in ``cls._excluded_save_params()`` (``env``, ``device``, ``policy``, ``replay_buffer``, ...:
    a stored ``env`` string would reach ``gym.make``, a stored ``device`` would override the caller's), the
    roots of the state dicts and torch variables (restored from tensors), and names of class attributes
    (methods, properties, descriptors, classes, tables such as ``policy_aliases``). Scalar class-level
    defaults (``use_expert = False``) that an instance attribute shadows stay allowed: SB3's ``save`` writes those.
    """
    roots = {_root(e.name) for e in manifest.state_dicts} | {_root(n) for n in manifest.torch_variables}
    return refused_keys(cls, manifest.data, roots)


def refused_keys(cls: type[BaseAlgorithm], names: Iterable[str], roots: set[str]) -> dict[str, str]:
    """``refused_data_keys`` for data attribute ``names`` and state-dict/torch-variable ``roots`` (a stock zip's too)."""
    excluded = set(_excluded_save_params(cls)) - set(SESSION_STATE)
    out: dict[str, str] = {}
    for name in names:
        static = inspect.getattr_static(cls, name, _NOT_FOUND)
        if name.startswith("__"):
            out[name] = "a dunder name"
        elif name in excluded:
            out[name] = f"SB3 never saves it ({cls.__qualname__}._excluded_save_params())"
        elif name in roots:
            out[name] = "it is restored from the stored tensors"
        elif static is not _NOT_FOUND and not isinstance(static, (type(None), bool, int, float, str)):
            out[name] = f"it is a {type(static).__name__} of {cls.__qualname__}, not instance data"
    return out


_NOT_FOUND = object()


def _excluded_save_params(cls: type[BaseAlgorithm]) -> list[str]:
    """``cls._excluded_save_params()`` without a model (it only lists names); SB3's base list if it needs one."""
    bare = object.__new__(cls)
    try:
        names = cls._excluded_save_params(bare)
    except Exception:  # a user override reading instance state: fall back to SB3's own list
        names = BaseAlgorithm._excluded_save_params(bare)
    return [n for n in names if isinstance(n, str)]


def _build(
    cls: type[SelfAlgo],
    manifest: Manifest,
    decoder: _Decoder,
    env: GymEnv | None,
    device: th.device | str,
    custom_objects: Mapping[str, Any],
    force_reset: bool,
    kwargs: dict[str, Any],
    *,
    training: bool = True,
) -> SelfAlgo:
    """Rebuild the model as ``BaseAlgorithm.load`` does, from decoded data (``training=False``: no optimizer yet)."""
    data = {name: decoder.decode(node, name) for name, node in manifest.data.items()}
    if "policy_kwargs" in data and isinstance(data["policy_kwargs"], dict):
        data["policy_kwargs"].pop("device", None)
    if "policy_kwargs" in kwargs and "policy_kwargs" in data and not _equal(kwargs["policy_kwargs"], data["policy_kwargs"]):
        raise StateMismatchError(
            "the policy_kwargs passed to load differ from the stored ones; to replace single entries use"
            " custom_objects={'policy_kwargs.<key>': value}, and for live objects resources={...}"
        )
    check_policy_data(data)
    if env is not None:
        try:
            env = cls._wrap_env(env, data.get("verbose", 0))
            check_for_correct_spaces(env, data["observation_space"], data["action_space"])
        except Exception as e:  # whatever stored spaces or settings make these raise
            raise StateMismatchError(f"the env given to load does not fit the saved agent: {type(e).__name__}: {e}") from None
        if force_reset:
            data["_last_obs"] = None
        data["n_envs"] = env.num_envs
    try:
        model = cls(policy=data["policy_class"], env=env, device=device, _init_setup_model=False)  # type: ignore[call-arg]
        model.__dict__.update(data)
        model.__dict__.update(kwargs)
        with no_weight_init(), _hazards.loading(), contextlib.nullcontext() if training else deferred_optimizers(model):
            model._setup_model()
        _restore_session_state(model, data)
    except (SafeSaveError, Warning):  # a HazardWarning made an error by the caller's warning filters is theirs
        raise
    except Exception as e:  # hostile or corrupted hyperparameters (n_steps=-5, net_arch=[2**31], an env id, ...)
        raise FormatError(
            f"the stored values cannot rebuild a {cls.__qualname__}: {type(e).__name__}: {e}"
            " (if the file is intact, check the arguments given to load: e.g. HerReplayBuffer needs env=)"
        ) from e
    return model


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays, whose == is elementwise
        return False


def check_policy_data(data: Mapping[str, Any]) -> None:
    """The decoded values a policy is built from: ``policy_class`` a policy class, the spaces gymnasium spaces."""
    for key in ("observation_space", "action_space", "policy_class"):
        if key not in data:
            raise FormatError(f"the file has no {key!r}; it cannot be rebuilt (was it left out with exclude=?)")
    policy_class = data["policy_class"]
    if not (isinstance(policy_class, type) and issubclass(policy_class, BasePolicy)):
        raise FormatError(f"the stored policy_class {policy_class!r:.100} is not a stable_baselines3 policy class")
    for key in ("observation_space", "action_space"):
        if not isinstance(data[key], gym_spaces.Space):
            raise FormatError(f"the stored {key} is a {type(data[key]).__name__}, not a gymnasium space")


def _attach_vec_normalize(
    cls: type[BaseAlgorithm], manifest: Manifest, body: _weights.Body, env: GymEnv | None
) -> tuple[GymEnv | None, Callable[[], None] | None]:
    """Wrap ``env`` in the stored VecNormalize; without an env, only read (and verify) its tensors.

    :return: the env to build with and the function that sets the statistics: ``env``'s own
        ``VecNormalize`` is changed only when that is called, after the whole load has succeeded
    """
    assert manifest.vec_normalize is not None
    if env is None:
        for key in manifest.tensors:
            if key.startswith(VN_PREFIX):
                body.read_tensor(key)
        return None, None
    try:
        venv = cls._wrap_env(env, verbose=0)
    except Exception as e:  # not an env at all
        raise StateMismatchError(f"the env given to load cannot be wrapped: {type(e).__name__}: {e}") from None
    return stage_vecnormalize(manifest.vec_normalize, lambda key: body.read_tensor(VN_PREFIX + key), venv)


#: Attributes SB3 leaves out of its save but an exact resume needs (RecurrentPPO's LSTM memory, kept
#: in step with ``_last_obs``). Saved unless named in ``exclude``; restored after ``_setup_model``
#: resets them, unless the load forced an env reset.
SESSION_STATE = ("_last_lstm_states",)


def _keep_session_state(
    model: BaseAlgorithm, exclude: Iterable[str] | None, include: Iterable[str] | None
) -> list[str] | None:
    include = None if include is None else list(include)
    extra = [n for n in SESSION_STATE if hasattr(model, n) and n not in set(exclude or ())]
    return include if not extra else [*(include or []), *extra]


def _restore_session_state(model: BaseAlgorithm, data: Mapping[str, Any]) -> None:
    if data.get("_last_obs") is None:  # reset forced (or nothing to resume): keep what _setup_model built
        return
    for name in SESSION_STATE:
        if data.get(name) is not None:
            setattr(model, name, _to_device(data[name], model.device))


def _to_device(value: Any, device: th.device) -> Any:
    if isinstance(value, th.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        items = [_to_device(v, device) for v in value]
        return type(value)(*items) if hasattr(type(value), "_fields") else tuple(items)
    return value


def load_parameters(model: BaseAlgorithm, path: PathLike, *, exact_match: bool = True, verify: bool = True) -> None:
    """In place: put the stored weights and optimizer state into an existing model (SB3's ``set_parameters``).

    Only state dicts are read: no attribute is decoded, nothing is imported, no resource is needed.
    All or nothing: every check, and every checksum (streamed, one chunk of memory), passes before
    the first byte is copied into the model, so a file that fails leaves the model as it was.

    :param model: the model to update
    :param path: a file written by ``save``
    :param exact_match: the file must hold exactly the model's state dicts, each with exactly the
        model's keys; with False, only what both have is loaded
    :param verify: check the checksum of every tensor read
    """
    with _open(path) as (f, size):
        header, manifest = _parse(f, size)
        expected_base = base_algorithm_ref(type(model))
        if manifest.base_algorithm != expected_base:
            raise AlgorithmMismatchError(
                f"this file holds a {manifest.base_algorithm} model; it cannot set the parameters of a {expected_base}"
            )
        body = _weights.Body(f, header, {k: m.xxh3 for k, m in manifest.tensors.items()}, verify=verify)
        decoder = _Decoder(body, TrustList(None), {}, {}, manifest, budget=size)
        _check_external(model, manifest, None)
        _load_state_dicts(model, manifest, decoder, body, exact_match=exact_match, in_place=True)
        body.finish()


Commit = Callable[[], None]


def _load_state_dicts(
    model: BaseAlgorithm,
    manifest: Manifest,
    decoder: _Decoder,
    body: _weights.Body,
    *,
    exact_match: bool = True,
    in_place: bool = False,
    provided: Iterable[Any] = (),
    optimizers: bool = True,
) -> None:
    """Put module and optimizer state dicts back, like SB3's ``set_parameters``.

    Two steps: every entry is planned (keys, shapes, dtypes and optimizer state checked, optimizer
    state decoded) before any is committed. ``in_place`` (a model the caller owns) also verifies the
    checksum of every tensor to be copied before the first copy.

    :param provided: the caller's objects (resources): their tensors are never written into
    :param optimizers: False (an evaluation load): optimizer state is neither read nor loaded
    """
    expected, _ = model._get_torch_save_params()
    stored = [e.name for e in manifest.state_dicts]
    if exact_match and sorted(expected) != sorted(stored):
        raise StateMismatchError(f"the model has state dicts {sorted(expected)} but the file has {sorted(stored)}")
    foreign = sorted(set(stored) - set(expected))  # only the model's own state dicts are ever written
    if foreign:
        raise StateMismatchError(f"the file has state dicts {foreign[:5]}, which the model does not have ({sorted(expected)})")
    protected = {id(t) for obj in provided if isinstance(obj, th.nn.Module) for t in obj.state_dict(keep_vars=True).values()}
    commits: list[Commit] = []
    reads: list[str] = []
    for entry in manifest.state_dicts:
        if isinstance(entry, OptimizerState) and not optimizers:
            continue
        target = _state_target(model, entry)
        if isinstance(entry, ModuleState):
            plan = _plan_module if exact_match else _plan_module_partial
            commit, keys = plan(getattr(target, "_orig_mod", target), entry, body, protected)
            commits.append(commit)
            reads += keys
        else:
            state = decoder.decode(entry.state, entry.name)
            _check_optimizer_state(target, state, entry.name)
            commits.append(functools.partial(_commit_optimizer, target, state, entry.name))
    if in_place:
        body.verify(reads)
    for commit in commits:
        commit()


def _state_target(model: BaseAlgorithm, entry: ModuleState | OptimizerState) -> Any:
    try:
        target = resolve_attr(model, entry.name)
    except (AttributeError, KeyError, IndexError, TypeError):
        raise StateMismatchError(f"the file has state dict {entry.name!r}, which the model does not have") from None
    if isinstance(target, DeferredOptimizer):  # loaded with training=False: the real optimizer is built now (it warns)
        target = target.materialize()
    kind = th.nn.Module if isinstance(entry, ModuleState) else th.optim.Optimizer
    if not isinstance(target, kind):
        raise StateMismatchError(
            f"the file has a {entry.kind} state dict {entry.name!r}, but the model's {entry.name} is a {type(target).__name__}"
        )
    return target


def _commit_optimizer(optimizer: th.optim.Optimizer, state: Any, name: str) -> None:
    try:
        optimizer.load_state_dict(state)
    except (RuntimeError, *_DECODE_ERRORS) as e:  # checked before: only a custom optimizer's own checks get here
        raise StateMismatchError(f"{name}: the stored optimizer state does not fit the optimizer: {e}") from None


#: Optimizers whose per-parameter state tensors (beyond 0-d counters) have their parameter's shape.
_PARAM_SHAPED_STATE = {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "SGD", "Adagrad", "RMSpropTFLike"}
_RMSPROP_STATE = (("step", None), ("square_avg", None), ("momentum_buffer", "momentum"), ("grad_avg", "centered"))
_ADAM_STATE = (("step", None), ("exp_avg", None), ("exp_avg_sq", None), ("max_exp_avg_sq", "amsgrad"))
#: The per-parameter state ``step`` reads once a parameter has any: (key, the group setting that makes it needed).
_REQUIRED_STATE: dict[str, tuple[tuple[str, str | None], ...]] = {
    "Adam": _ADAM_STATE,
    "AdamW": _ADAM_STATE,
    "Adamax": (("step", None), ("exp_avg", None), ("exp_inf", None)),
    "NAdam": (("step", None), ("mu_product", None), ("exp_avg", None), ("exp_avg_sq", None)),
    "RAdam": (("step", None), ("exp_avg", None), ("exp_avg_sq", None)),
    "Adagrad": (("step", None), ("sum", None)),
    "RMSprop": _RMSPROP_STATE,
    "RMSpropTFLike": _RMSPROP_STATE,
    "SGD": (),  # momentum_buffer: a tensor or None, read with state.get
}


def _check_optimizer_state(optimizer: th.optim.Optimizer, state: Any, name: str) -> None:
    """Refuse (``StateMismatchError``) optimizer state that ``load_state_dict`` would reject or take wrongly."""

    def fail(why: str) -> StateMismatchError:
        return StateMismatchError(f"{name}: the stored optimizer state does not fit the optimizer: {why}")

    if not (isinstance(state, dict) and isinstance(state.get("param_groups"), list) and isinstance(state.get("state"), dict)):
        raise fail("it must be a dict with a 'state' dict and a 'param_groups' list")
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved_groups):
        raise fail(f"{len(saved_groups)} parameter groups stored, the optimizer has {len(groups)}")
    params: dict[Any, th.Tensor] = {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise fail(f"parameter group {i} has no 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise fail(f"parameter group {i} holds {len(saved['params'])} parameters, the optimizer's {len(group['params'])}")
        for key, value in saved.items():
            if key not in ("params", "param_names") and key in group and not _same_kind(value, group[key]):
                raise fail(f"parameter group {i}: {key!r} is a {type(value).__name__}, not a {type(group[key]).__name__}")
        params.update(zip(saved["params"], group["params"], strict=True))
    if len(params) != sum(len(g["params"]) for g in groups) or not all(type(k) is int for k in params):
        raise fail("parameter ids must be distinct integers")
    kind = type(optimizer).__name__
    group_of = {p: saved for saved in saved_groups for p in saved["params"]}  # load_state_dict keeps the stored settings
    for key, param_state in state["state"].items():
        if key not in params or not isinstance(param_state, dict):
            raise fail(f"state for parameter {key!r}, which no parameter group holds")
        why = _param_state_problem(kind, param_state, params[key].shape, group_of[key])
        if why is not None:
            raise fail(f"parameter {key}: {why}")


def _param_state_problem(kind: str, state: Mapping[Any, Any], shape: th.Size, group: Any) -> str | None:
    """What a built-in optimizer (``kind``) would trip over in one parameter's state, or take wrongly.

    Tensors beyond 0-d counters have the parameter's shape. Once a parameter has any state, ``step``
    reads every needed value (``_REQUIRED_STATE``): each must be a tensor (``step``: a finite count >= 0,
    as a number or a one-element tensor); other values may also be None (SGD's ``momentum_buffer``).
    """
    for k, v in state.items():
        if kind in _PARAM_SHAPED_STATE and isinstance(v, th.Tensor) and v.dim() > 0 and v.shape != shape:
            return f"state {k!r} has shape {list(v.shape)}, the parameter {list(shape)}"
    if kind not in _REQUIRED_STATE or not state:  # an empty state is built at the first step
        return None
    required = _REQUIRED_STATE[kind]
    needed = {key for key, setting in required if setting is None or (isinstance(group, dict) and group.get(setting))}
    missing = sorted(needed - set(state))
    if missing:
        return f"state {missing[0]!r} is missing ({kind} reads {', '.join(sorted(needed))})"
    for key, value in state.items():
        if key == "step":
            number = value.item() if isinstance(value, th.Tensor) and value.numel() == 1 and not value.is_complex() else value
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < float("inf"):
                return f"state 'step' is {_describe(value)}, not a non-negative step count"
        elif not isinstance(value, th.Tensor) and (key in needed or value is not None):
            return f"state {key!r} is {_describe(value)}, not a tensor"
    return None


def _describe(value: Any) -> str:
    return f"a {type(value).__name__}" + (f" {list(value.shape)}" if isinstance(value, th.Tensor) else f" {value!r:.40}")


def _same_kind(a: Any, b: Any) -> bool:
    """Values that may replace each other in a parameter group (``lr``: any real number; ``betas``: a pair ...)."""
    if a is None or b is None:
        return a is b or (isinstance(a, bool) or isinstance(b, bool))  # e.g. foreach: None or a bool
    real = (int, float, np.floating, np.integer)
    if isinstance(a, real) and isinstance(b, real) and not isinstance(a, bool) and not isinstance(b, bool):
        return True
    if isinstance(a, th.Tensor) or isinstance(b, th.Tensor):
        return isinstance(a, (th.Tensor, *real)) and isinstance(b, (th.Tensor, *real))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_kind(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b)


def _load_state(
    model: BaseAlgorithm,
    manifest: Manifest,
    decoder: _Decoder,
    body: _weights.Body,
    provided: Iterable[Any] = (),
    *,
    training: bool = True,
) -> None:
    """Put state dicts, optimizer state (unless not ``training``) and torch variables back."""
    provided = list(provided)
    _load_state_dicts(model, manifest, decoder, body, provided=provided, optimizers=training)
    device = model.device
    variables = set(model._get_torch_save_params()[1])
    foreign = sorted(set(manifest.torch_variables) - variables)  # only the model's own torch variables are written
    if foreign:
        raise StateMismatchError(
            f"the file has torch variables {foreign[:5]}, which the model does not have ({sorted(variables)})"
        )
    for name, node in manifest.torch_variables.items():
        value = decoder.decode(node, name)
        if value is None:
            continue
        if not isinstance(value, th.Tensor):
            raise FormatError(f"torch variable {name!r} is a {type(value).__name__}, not a tensor")
        try:
            current = resolve_attr(model, name)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise StateMismatchError(f"the file has torch variable {name!r}, which the model does not have") from None
        if (
            not isinstance(current, th.Tensor)
            or current.shape != value.shape
            or current.dtype != value.dtype
            or any(current is obj for obj in provided)
        ):
            raise StateMismatchError(
                f"torch variable {name!r}: the model has {current!r:.80}, the file a {value.dtype} tensor {list(value.shape)}"
            )
        current.data = value.to(device)  # keep the optimizer's reference valid (SB3 #391)
    if getattr(model, "use_sde", False):
        reset_noise = getattr(model.policy, "reset_noise", None)
        if not callable(reset_noise):  # use_sde=True stored for an algorithm without gSDE (a corrupted file)
            raise FormatError(f"the file sets use_sde=True but {type(model.policy).__name__} has no gSDE noise to reset")
        reset_noise()


def _fast_path_ok(module: th.nn.Module) -> bool:
    """Direct reads into parameters are exact unless a module customises state-dict loading."""
    base = th.nn.Module._load_from_state_dict
    for m in module.modules():
        if type(m)._load_from_state_dict is not base or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return False
    return not module._load_state_dict_pre_hooks


def _plan_module(
    module: th.nn.Module, entry: ModuleState, body: _weights.Body, protected: set[int]
) -> tuple[Commit, list[str]]:
    """Check a module's stored state against the module; return what copies it in and the tensors that reads."""
    targets = module.state_dict(keep_vars=True)
    for prefix in entry.external_prefixes:
        if not prefix.endswith("."):
            raise FormatError(f"{entry.name}: external prefix {prefix!r} must end with '.'")
    external = frozenset(entry.external_prefixes)
    expected = {k for k in targets if external.isdisjoint(_dot_prefixes(k))}
    stored = set(entry.keys) | set(entry.aliases)
    if expected != stored:
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        raise StateMismatchError(
            f"{entry.name}: the rebuilt model does not match the stored weights"
            f" (missing {missing[:5]}{'...' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''});"
            " was the model saved with different policy_kwargs, or a resource of a different architecture given?"
        )
    _check_aliases(entry, targets, protected)
    tensor_keys = [f"{entry.name}/{key}" for key in entry.keys]
    for key, tensor_key in zip(entry.keys, tensor_keys, strict=True):
        _check_target(body, tensor_key, targets[key], protected)
    scales = _noise_scales(module)
    staged = {  # read (and checked) now: a value the policy cannot sample with is refused before any copy
        key: _checked_noise_scale(body.read_tensor(tensor_key), scales[id(targets[key])], tensor_key)
        for key, tensor_key in zip(entry.keys, tensor_keys, strict=True)
        if id(targets[key]) in scales
    }
    if not _fast_path_ok(module):
        state = {
            key: staged[key] if key in staged else body.read_tensor(tensor_key)
            for key, tensor_key in zip(entry.keys, tensor_keys, strict=True)
        }
        state.update({alias: state[canonical] for alias, canonical in entry.aliases.items()})
        return functools.partial(_commit_state_dict, module, state, entry.name), []

    def commit() -> None:
        try:
            for key, tensor_key in zip(entry.keys, tensor_keys, strict=True):
                if key in staged:
                    with th.no_grad():
                        targets[key].copy_(staged[key])
                else:
                    body.read_into_tensor(tensor_key, targets[key])
        except FormatError as e:
            raise StateMismatchError(str(e)) from None
        with th.no_grad():
            for alias, canonical in entry.aliases.items():
                if targets[alias].data_ptr() != targets[canonical].data_ptr():
                    targets[alias].copy_(targets[canonical])

    return commit, tensor_keys


def _noise_scales(module: th.nn.Module) -> dict[int, Callable[[th.Tensor], th.Tensor]]:
    """The log standard deviations a Gaussian policy in ``module`` samples with: ``id(parameter)`` -> log_std to std."""
    found: dict[int, Callable[[th.Tensor], th.Tensor]] = {}
    for m in module.modules():
        dist, log_std = getattr(m, "action_dist", None), getattr(m, "log_std", None)
        if isinstance(log_std, th.nn.Parameter) and isinstance(dist, StateDependentNoiseDistribution):
            found[id(log_std)] = dist.get_std
        elif isinstance(log_std, th.nn.Parameter) and isinstance(dist, DiagGaussianDistribution):
            found[id(log_std)] = th.exp
    return found


def _checked_noise_scale(log_std: th.Tensor, to_std: Callable[[th.Tensor], th.Tensor], key: str) -> th.Tensor:
    """``log_std`` if the standard deviation it gives is positive and finite (``Normal`` refuses anything else)."""
    with th.no_grad():
        std = to_std(log_std)
    bad = ~(th.isfinite(std) & (std > 0))
    if bool(bad.any()):
        raise StateMismatchError(
            f"tensor {key!r}: the log standard deviation {log_std.flatten()[:4].tolist()} gives a standard deviation of"
            f" {std[bad][0].item()}; it must give a positive, finite one, or the policy cannot sample actions"
            " (the file is corrupted, forged, or saved from a run that diverged)"
        )
    return log_std


def _check_aliases(entry: ModuleState, targets: Mapping[str, th.Tensor], protected: set[int]) -> None:
    for alias, canonical in entry.aliases.items():
        if canonical not in entry.keys:
            raise FormatError(f"{entry.name}: alias {alias!r} points to {canonical!r}, which is not stored")
        a, c = targets[alias], targets[canonical]
        if a.shape != c.shape or a.dtype != c.dtype:
            raise StateMismatchError(f"{entry.name}: alias {alias!r} and {canonical!r} differ in shape or dtype")
        if id(a) in protected:
            raise FormatError(f"{entry.name}: the file would overwrite {alias!r}, a tensor of a resource you supplied")


def _check_target(body: _weights.Body, key: str, dest: th.Tensor, protected: set[int]) -> None:
    info = body.info(key)
    if _weights.torch_dtype(info.dtype) != dest.dtype or info.shape != tuple(dest.shape):
        raise StateMismatchError(
            f"tensor {key!r}: stored as {info.dtype} {list(info.shape)} but the model has {dest.dtype} {list(dest.shape)}"
        )
    if id(dest) in protected:
        raise FormatError(f"tensor {key!r}: the file would overwrite a tensor of a resource you supplied")


def _commit_state_dict(module: th.nn.Module, state: dict[str, th.Tensor], name: str) -> None:
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise StateMismatchError(f"{name}: {e}") from None


def _plan_module_partial(
    module: th.nn.Module, entry: ModuleState, body: _weights.Body, protected: set[int]
) -> tuple[Commit, list[str]]:
    """``exact_match=False``: load the keys both sides have, as ``load_state_dict(strict=False)`` does."""
    targets = module.state_dict(keep_vars=True)
    keys = [key for key in entry.keys if key in targets]
    for key in keys:
        _check_target(body, f"{entry.name}/{key}", targets[key], protected)
    state = {key: body.read_tensor(f"{entry.name}/{key}") for key in keys}
    scales = _noise_scales(module)
    for key in keys:
        if id(targets[key]) in scales:
            _checked_noise_scale(state[key], scales[id(targets[key])], f"{entry.name}/{key}")
    state.update({a: state[c] for a, c in entry.aliases.items() if a in targets and c in state})
    for alias in state.keys() - set(keys):
        if state[alias].shape != targets[alias].shape or id(targets[alias]) in protected:
            raise StateMismatchError(f"{entry.name}: alias {alias!r} does not fit the model's tensor")
    return functools.partial(_commit_state_dict, module, state, entry.name), []


def _check_external(model: BaseAlgorithm, manifest: Manifest, provided: Iterable[Any] | None) -> None:
    """Every state-dict entry the file leaves out must belong to a resource, so no parameter is left unfilled.

    A module state's ``external_prefixes`` (the state-dict keys it does not store) must each be the
    path of a placeholder; after a load (``provided`` given) the module at that path must be one of
    the caller's objects (a bound resource or a ``custom_objects`` value), or have no state at all.
    Weight initialisation is off while a model is built for loading, so anything else would be
    uninitialised memory.
    """
    at = {path: ph.key for ph in manifest.placeholders for path in ph.paths}
    given = None if provided is None else {id(obj) for obj in provided}
    for entry in manifest.state_dicts:
        if not isinstance(entry, ModuleState) or not entry.external_prefixes:
            continue
        module: Any = None
        for prefix in entry.external_prefixes:
            sub = prefix.removesuffix(".")
            if not prefix.endswith(".") or f"{entry.name}.{sub}" not in at:
                raise FormatError(
                    f"{entry.name}: the file leaves out the weights under {prefix!r} but records no resource at"
                    f" {entry.name}.{sub}; the file is malformed"
                )
            if given is None:
                continue
            if module is None:
                module = _state_target(model, entry)
                module = getattr(module, "_orig_mod", module)
                held = {p for k in module.state_dict(keep_vars=True) for p in _dot_prefixes(k)}
            if prefix not in held:
                continue
            try:
                owner = module.get_submodule(sub)
            except AttributeError:
                owner = None
            if id(unwrap(owner)) not in given:
                raise StateMismatchError(
                    f"{entry.name}: the weights under {prefix!r} are not in the file, and the model holds no resource you"
                    f" supplied there (placeholder {at[f'{entry.name}.{sub}']!r}); they would be uninitialised"
                )


def unfilled_paths(model: BaseAlgorithm, manifest: Manifest, decoder: _Decoder) -> list[str]:
    """Where the file recorded a bound resource and the rebuilt model does not hold it; nothing is written.

    The constructor puts the resources it is given (``policy_kwargs``) where the network's code puts them;
    load never creates or replaces an attribute, so a file cannot choose where a caller's object goes (a
    second registration of the expert, an attribute of the env). A path the constructor did not fill is an
    attribute set after the model was built: ``warn_unfilled`` says so once the load has succeeded.
    """
    resources = {id(unwrap(obj)) for obj in decoder.bound.values()}
    missing: list[str] = []
    for ph in manifest.placeholders:
        if ph.key not in decoder.bound:
            continue
        for path in ph.paths:
            if _root(path) in manifest.data or "[" in path:
                continue
            parent, attr = rebind_target(model, path, ph.key, resources)
            current = _NOT_FOUND if parent is _NOT_FOUND else _own_attribute(parent, attr)
            if current is _NOT_FOUND or unwrap(current) is not unwrap(decoder.bound[ph.key]):
                missing.append(f"{ph.key!r} at {path}")
    return missing


def warn_unfilled(missing: list[str]) -> None:
    if missing:
        warnings.warn(
            f"the file recorded resources where the rebuilt model does not hold them ({'; '.join(missing[:5])}):"
            " load never creates or replaces attributes, so they were not put there. If your code set them after"
            " building the model, set them again after load",
            UserWarning,
            stacklevel=4,
        )


def rebind_problem(path: str, algo: type | None = None, policy_class: type | None = None) -> str | None:
    """Why a placeholder path can never be a rebind target, decided without a model (load's phase 2 and audit).

    Refused: non-identifier or dunder names, torch internals, a path through a slot that holds a class
    (``policy.optimizer_class.step``), and a target that is a method, property or other class attribute
    of ``nn.Module``, ``Optimizer``, gymnasium ``Space``, the algorithm (one-part paths) or its policy class
    (``policy.<name>``). ``rebind_target`` then checks the rebuilt model itself.

    :param algo: the loading class
    :param policy_class: the stored policy class, where known without importing (else ``BasePolicy``)
    """
    parts = path.split(".")
    if any(p.startswith("__") or not p.isidentifier() for p in parts):
        return "only plain attribute names may be rebound"
    if parts[-1] in _MODULE_INTERNALS:
        return "it names a torch internal attribute"
    through = [p for p in parts[:-1] if p in slots()]
    if through:
        return f"it goes through {through[0]!r}, which holds a class"
    owners: list[type] = [th.nn.Module, th.optim.Optimizer, gym_spaces.Space]
    if len(parts) == 1 and algo is not None:
        owners.append(algo)
    if len(parts) == 2 and parts[0] == "policy":
        owners.append(policy_class or BasePolicy)
    for owner in owners:
        static = inspect.getattr_static(owner, parts[-1], _NOT_FOUND)
        if static is not _NOT_FOUND and not isinstance(static, (type(None), bool, int, float, str)):
            return f"{parts[-1]!r} is a {type(static).__name__} of {owner.__qualname__}, not an instance attribute"
    return None


def rebind_problems(manifest: Manifest, algo: type | None) -> list[tuple[str, str, str]]:
    """``(key, path, why)`` for each placeholder path outside ``data`` that ``rebind_problem`` refuses.

    Linear in the manifest: each path is looked up in indexes of the resource paths and of what is stored.
    """
    policy_ref = manifest.data.get("policy_class")
    entry = default_trusted().get(policy_ref.ref) if isinstance(policy_ref, RefNode) else None
    out: list[tuple[str, str, str]] = []
    resource_paths = {p for ph in manifest.placeholders for p in ph.paths}
    modules = {e.name for e in manifest.state_dicts if isinstance(e, ModuleState)}
    stored_at = _stored_index(manifest)
    for ph in manifest.placeholders:
        for path in ph.paths:
            if _root(path) in manifest.data or "[" in path:
                continue  # decoded with the data, not rebound
            inside = next((q for q in _dot_prefixes(path) if q[:-1] in resource_paths), None)
            stored = stored_at(path)
            problem = (
                f"it is outside the stored modules ({', '.join(sorted(modules)[:5]) or 'none'}): a resource is only ever"
                " found inside them, never in the env or another object of the caller's"
                if not any(q[:-1] in modules for q in _dot_prefixes(path))
                else f"it goes through {inside[:-1]!r}, where a resource is bound (not the model's own object)"
                if inside is not None
                else f"the file stores {stored!r} there (a resource would replace what was just loaded)"
                if stored is not None
                else rebind_problem(path, algo, entry[0] if entry is not None else None)
            )
            if problem is not None:
                out.append((ph.key, path, problem))
    return out


def _dot_prefixes(name: str) -> Iterator[str]:
    """``"a.b.c"`` -> ``"a."``, ``"a.b."``: each proper prefix that ends at a dot, dot included."""
    i = name.find(".")
    while i != -1:
        yield name[: i + 1]
        i = name.find(".", i + 1)


def _stored_index(manifest: Manifest) -> Callable[[str], str | None]:
    """``stored_at(path)``: a state dict, stored weight or torch variable at or below ``path`` (which no resource
    may replace), or None. Built once (sorted names), each lookup a bisection: not a scan of every key per path.
    """
    labels: dict[str, str] = {}  # full attribute path -> what the message names (the first in the manifest)
    for entry in manifest.state_dicts:
        labels.setdefault(entry.name, entry.name)
        if isinstance(entry, ModuleState):
            for key in (*entry.keys, *entry.aliases):
                labels.setdefault(f"{entry.name}.{key}", f"{entry.name}/{key}")
    for name in manifest.torch_variables:
        labels.setdefault(name, name)
    names = sorted(labels)

    def stored_at(path: str) -> str | None:
        if path in labels:
            return labels[path]
        i = bisect.bisect_left(names, path + ".")  # every name below path sorts right after it
        return labels[names[i]] if i < len(names) and names[i].startswith(path + ".") else None

    return stored_at


def rebind_target(model: BaseAlgorithm, path: str, key: str, resources: set[int]) -> tuple[Any, str]:
    """The object and attribute name of a placeholder's ``path`` in the rebuilt model, or raise.

    Each step is read from an instance's own ``__dict__`` (or an ``nn.Module``'s sub-modules): never through
    a class, a module, a function, a property or a bound resource; the target attribute must not be a
    method, property or other descriptor of the object's class. The object is ``_NOT_FOUND`` where the
    rebuilt model has no such step.
    """
    problem = rebind_problem(path, type(model))
    if problem is not None:
        raise FormatError(f"placeholder {key!r}: cannot rebind at {path!r}: {problem}")
    *steps, attr = path.split(".")
    obj: Any = model
    for i, step in enumerate(steps):
        found = _own_attribute(obj, step)
        if found is _NOT_FOUND:
            return _NOT_FOUND, attr
        where = ".".join(steps[: i + 1])
        if id(unwrap(found)) in resources:
            raise FormatError(f"placeholder {key!r}: cannot rebind at {path!r}: {where!r} is a live resource, not the model's")
        if isinstance(found, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            raise FormatError(
                f"placeholder {key!r}: cannot rebind at {path!r}: {where!r} is a {type(found).__name__},"
                " not an object of the model"
            )
        obj = found
    static = inspect.getattr_static(type(obj), attr, _NOT_FOUND)
    if static is not _NOT_FOUND and hasattr(type(static), "__get__"):
        raise FormatError(
            f"placeholder {key!r}: cannot rebind at {path!r}: {attr!r} is a {type(static).__name__}"
            f" of {type(obj).__qualname__}, not an instance attribute"
        )
    return obj, attr


def _own_attribute(obj: Any, name: str) -> Any:
    """``obj.name`` if it is an instance attribute (or an ``nn.Module`` sub-module), else ``_NOT_FOUND``."""
    if isinstance(obj, th.nn.Module) and name in obj._modules:
        return obj._modules[name]
    try:
        own = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return _NOT_FOUND
    return own.get(name, _NOT_FOUND) if isinstance(own, dict) else _NOT_FOUND
