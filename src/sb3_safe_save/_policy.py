"""Deployment: ``load_policy`` (only the policy, from an agent or a policy file) and ``save_policy``.

``load_policy`` runs the same three phases as ``load`` (``_persist``) on the *policy view* of the
manifest: the data a policy is built from (``policy_class``, ``policy_kwargs``, the spaces, ``use_sde``),
the policy's state dicts, and the placeholders at those paths. Everything else in the file (optimizer
state, torch variables, VecNormalize statistics, hyperparameters, schedules) is neither decoded nor
read: its references are not audited (they are never imported) and its bytes are not checksummed
(they are never used). The header of the whole file is still checked as for ``load``.

The policy is built the way the algorithms build it, ``policy_class(observation_space, action_space,
lr_schedule, **policy_kwargs)`` (plus ``use_sde`` for on-policy algorithms), with weight
initialisation off and a ``DeferredOptimizer`` in place of the optimizer (``_deferred``): no
``torch._dynamo`` import, no Adam state.

``save_policy`` writes a policy-only file (``Manifest.content == "policy"``): the data above, with
``policy_kwargs`` = the policy's constructor parameters (what SB3's ``policy.save`` pickles), and the
state dict ``policy``. ``load_policy`` reads it with the same code path.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, cast

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import get_device

from sb3_safe_save import _rng, _weights
from sb3_safe_save._deferred import deferred_optimizers
from sb3_safe_save._errors import FormatError
from sb3_safe_save._file import PathLike, _open, _parse
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST, Manifest, ModuleState
from sb3_safe_save._persist import (
    _DECODE_ERRORS,
    _Decoder,
    _given_by_custom_objects,
    _load_state_dicts,
    _root,
    audit_phase,
    check_policy_data,
    check_sha256,
    current_versions,
    header_metadata,
    no_weight_init,
    unfilled_paths,
    warn_unfilled,
    write_file,
)
from sb3_safe_save._resources import resolve
from sb3_safe_save._trust import TrustList, TrustSpec, ref_of
from sb3_safe_save._walker import DEFAULT_MAX_OBJECT_BYTES, Walker

#: The data a policy is built from (everything else in ``Manifest.data`` is skipped).
POLICY_DATA = ("policy_class", "policy_kwargs", "observation_space", "action_space", "use_sde")
#: Constructor parameters ``save_policy`` does not store: the spaces are data of their own, and the
#: learning-rate schedule only feeds the optimizer, which a loaded policy does not build.
_NOT_KWARGS = ("observation_space", "action_space", "lr_schedule")


class _PolicyHolder:
    """What the walker, ``_load_state_dicts`` and ``unfilled_paths`` see instead of an algorithm: the policy and its data."""

    policy: Any
    policy_kwargs: dict[str, Any]

    def __init__(self, **data: Any) -> None:
        self.__dict__.update(data)

    def _excluded_save_params(self) -> list[str]:
        return []

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return [name for name in ("policy",) if name in self.__dict__], []


def _zero_schedule(_: float) -> float:
    """The learning-rate schedule a loaded policy is built with (it only sets the deferred optimizer's ``lr``)."""
    return 0.0


# ================================================================================================ load
def policy_view(manifest: Manifest) -> Manifest:
    """The part of ``manifest`` that ``load_policy`` decodes and reads."""
    data = {k: v for k, v in manifest.data.items() if k in POLICY_DATA}
    states = [e for e in manifest.state_dicts if isinstance(e, ModuleState) and e.name == "policy"]
    if not states:
        raise FormatError("the file has no state dict 'policy': it holds no policy weights to load")
    placeholders = []
    for ph in manifest.placeholders:
        paths = [p for p in ph.paths if _root(p) in data or _root(p) == "policy"]
        if paths:
            placeholders.append(ph.model_copy(update={"paths": paths}))
    return manifest.model_copy(
        update={"data": data, "state_dicts": states, "torch_variables": {}, "placeholders": placeholders}
    )


@_rng.keep_on_error  # building the policy draws gSDE noise from torch's generator: a refused file leaves it as it was
def load_policy(
    path: PathLike,
    device: th.device | str = "auto",
    *,
    custom_objects: dict[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
    trusted: TrustSpec | None = None,
    allow_pickle: bool = False,
    verify: bool = True,
    expected_sha256: str | None = None,
    strict: bool = True,
) -> BasePolicy:
    """Load only the policy, for inference, from an agent file (``save``) or a policy file (``save_policy``).

    Reads the header, then only the policy's tensors; builds the policy with weight initialisation off
    and no optimizer (a ``DeferredOptimizer`` builds a fresh one, with a warning, if it is ever used).
    The trust rules, placeholders and rebinding are those of ``load``; the references checked are
    those the policy needs. The class you would call ``load`` on is not known here, so its module is
    not trusted by default: a policy class outside SB3 / sb3-contrib needs ``trusted=[MyPolicy]``.
    VecNormalize statistics in the file are not applied (see ``load_vecnormalize``).

    :param path: the file, a URL such as ``s3://bucket/key`` (the ``remote`` extra), or a seekable binary file object
    :param device: where the policy lives (``"auto"``: CUDA if available)
    :param custom_objects: objects to use instead of stored values (``"policy_kwargs.net_arch"``, ...)
    :param resources: placeholder key -> live object, ``factory(fn)`` or ``lazy(fn)``
    :param trusted: classes or ``"module:QualName"`` strings the file may reference beyond the defaults
    :param allow_pickle: unpickle values that were saved with ``allow_pickle=True`` (runs code!)
    :param verify: check the checksum of every tensor read (default)
    :param expected_sha256: refuse the file unless its SHA-256 matches
    :param strict: a resource whose fingerprint differs raises (``False``: warn)
    :return: the policy, in evaluation mode (``policy.predict`` matches the full model's)
    """
    custom_objects = dict(custom_objects or {})
    target = get_device(device)
    with _open(path) as (f, size):
        # ---- phase 1: parse
        header, full = _parse(f, size)
        check_sha256(f, expected_sha256)
        manifest = policy_view(full)
        # ---- phase 2: audit (no imports)
        trust, covered = audit_phase(manifest, custom_objects, trusted=trusted, cls=None, allow_pickle=allow_pickle)
        # ---- phase 3: construct
        resources = {**_given_by_custom_objects(manifest.placeholders, custom_objects, covered), **(resources or {})}
        bound = resolve(manifest.placeholders, resources, trust, strict=strict, skip=covered, call="sb3_safe_save.load_policy")
        checksums = {k: m.xxh3 for k, m in full.tensors.items()}
        body = _weights.Body(f, header, checksums, verify=verify)
        decoder = _Decoder(body, trust, bound, custom_objects, manifest, allow_pickle=allow_pickle, budget=size)
        data = {name: decoder.decode(node, name) for name, node in manifest.data.items()}
        data.update({k: v for k, v in custom_objects.items() if k in POLICY_DATA and k not in data})
        holder = _PolicyHolder(policy=_build_policy(data, target))
        _load_state_dicts(cast(BaseAlgorithm, holder), manifest, decoder, body)
        unfilled = unfilled_paths(cast(BaseAlgorithm, holder), manifest, decoder)
        body.finish()
    warn_unfilled(unfilled)
    policy: BasePolicy = holder.policy
    policy.set_training_mode(False)
    if data.get("use_sde") or getattr(policy, "use_sde", False):
        reset_noise = getattr(policy, "reset_noise", None)
        if callable(reset_noise):
            reset_noise()
    return policy


def _build_policy(data: dict[str, Any], device: th.device) -> BasePolicy:
    """``policy_class(observation_space, action_space, lr_schedule, **policy_kwargs)`` as the algorithms call it."""
    check_policy_data(data)
    policy_class = data["policy_class"]
    kwargs = data.get("policy_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FormatError(f"the stored policy_kwargs is a {type(kwargs).__name__}, not a dict of keyword arguments")
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    if "use_sde" in data and "use_sde" not in kwargs and _declares(policy_class, "use_sde"):
        kwargs["use_sde"] = data["use_sde"]  # on-policy algorithms pass it apart from policy_kwargs
    args: dict[str, Any] = {"lr_schedule": _zero_schedule} if _declares(policy_class, "lr_schedule") else {}
    holder = _PolicyHolder(policy_class=policy_class, policy_kwargs=kwargs)
    try:
        with no_weight_init(), deferred_optimizers(holder), device:
            holder.policy = policy_class(data["observation_space"], data["action_space"], **args, **holder.policy_kwargs)
            policy: BasePolicy = holder.policy.to(device)
    except (RuntimeError, *_DECODE_ERRORS) as e:
        raise FormatError(f"the stored values cannot build a {policy_class.__qualname__}: {type(e).__name__}: {e}") from e
    return policy


def _declares(policy_class: type, name: str) -> bool:
    """Whether ``__init__`` of the class or of a base it forwards to (``*args, **kwargs``) names parameter ``name``."""
    for klass in policy_class.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return False
        if name in params:
            return True
        if not any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in params.values()):
            return False  # this __init__ does not forward: bases further up never see the argument
    return False


# ================================================================================================ save
def save_policy(
    policy: BasePolicy,
    path: PathLike,
    *,
    allow_pickle: bool = False,
    max_object_bytes: int | None = None,
    fsync: bool = True,
) -> None:
    """Save a policy alone, without pickle: the replacement for SB3's ``policy.save(path)``.

    The file has the agent files' format and manifest (``inspect`` and ``audit`` read it) and is
    loaded with ``load_policy``. It holds the policy's class, spaces, constructor parameters and
    weights; external modules inside it become placeholders, as with ``save``.

    :param policy: the policy (``model.policy``)
    :param path: path to the file (a path without a suffix gets ``.safetensors``), a URL or a binary stream
    :param allow_pickle: cloudpickle constructor parameters no codec can store (``load_policy`` then
        needs ``allow_pickle=True``) instead of raising ``UnsupportedObjectError``
    :param max_object_bytes: objects whose pickle would be larger become placeholders (None: 16 MiB)
    :param fsync: flush the file and its directory to disk before returning
    """
    if not isinstance(policy, BasePolicy):
        raise TypeError(f"save_policy takes a stable_baselines3 policy (model.policy), got {type(policy).__qualname__}")
    kwargs = {k: v for k, v in policy._get_constructor_parameters().items() if k not in _NOT_KWARGS}
    holder = _PolicyHolder(
        policy_class=type(policy),
        observation_space=policy.observation_space,
        action_space=policy.action_space,
        policy_kwargs=kwargs,
        policy=policy,
    )
    walker = Walker(
        allow_pickle=allow_pickle,
        max_object_bytes=DEFAULT_MAX_OBJECT_BYTES if max_object_bytes is None else max_object_bytes,
        trusted=TrustList(None, home=type(policy)),
    )
    snapshot = walker.walk(cast(BaseAlgorithm, holder))
    blobs = {key: _weights.to_blob(value) for key, value in snapshot.tensors.items()}
    manifest = Manifest(
        versions=current_versions(),
        algorithm=ref_of(type(policy)),
        base_algorithm=base_policy_ref(type(policy)),
        data=snapshot.data,
        state_dicts=snapshot.state_dicts,
        placeholders=snapshot.placeholders,
        tensors={},
        hazards=snapshot.hazards,
        content="policy",
    )
    write_file(path, blobs, header_metadata(manifest, blobs, META_MANIFEST, META_CHECKSUM), fsync=fsync)


def base_policy_ref(cls: type) -> str:
    """The SB3 / sb3-contrib policy class a policy class derives from (``...policies:ActorCriticPolicy``)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith(("stable_baselines3.", "sb3_contrib.")) and issubclass(klass, BasePolicy):
            return ref_of(klass)
    return ref_of(BasePolicy)
