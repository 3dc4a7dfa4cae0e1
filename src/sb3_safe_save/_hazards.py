"""Hazards: what training will do to a live resource, found from facts about the model, checked before it happens.

An expert passed through ``policy_kwargs`` and stored with ``self.vlm_model = vlm_model`` becomes a
registered submodule. Then SB3 treats it as part of the policy. This module finds that from facts, never
from names:

* ``shared_with_target``: the online and target networks hold parameters with the same storage, so
  SB3's target update (``polyak_update``) writes into them in place. With ``tau=1`` (DQN) the first
  target update zeroes them. Always destructive: ``learn()`` refuses to start (``HazardError``).
* ``reinitialised_on_build``: a resource is registered under a part of an ``ortho_init`` policy;
  building the policy re-initialises its Linear/Conv2d weights. ``guard_build`` restores them
  bit for bit and raises ``HazardError``.
* ``external_in_optimizer``: a resource's trainable parameters are in an optimizer. That may be
  intended (fine-tuning a backbone), so it is a ``HazardWarning`` when the model is built.

``guard_build`` runs around every ``_setup_model`` (construction and ``load``), ``check_before_learn``
at the start of every ``learn()``: both before the first gradient step or target update. Saving
records the same hazards in the file (``find_hazards``), for the audit.

The opt-in guard ``safe_save_externalize = True`` (or ``safe(DQN, externalize=True)``) rewires the
registration itself: after the policy is built, every registration of a resource module is replaced
by its ``external()`` wrapper and its parameters leave the optimizers (which hold no state yet), as
if the network had written ``self.vlm_model = external(vlm_model)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save._errors import HazardError, HazardWarning, algo_name, base_name
from sb3_safe_save._external import External, unwrap

FIX = "self.{attr} = sb3_safe_save.external({attr})"
_TARGET_PAIRS = (
    ("q_net", "q_net_target"),
    ("critic", "critic_target"),
    ("actor", "actor_target"),
    ("quantile_net", "quantile_net_target"),
)
_ORTHO_INIT_ROOTS = (
    "features_extractor",
    "pi_features_extractor",
    "vf_features_extractor",
    "mlp_extractor",
    "action_net",
    "value_net",
)
_MAX_DEPTH = 4


class Hazard:
    """One hazard: a code, a severity (``warning``/``error``), what happens and the fix, the attribute paths."""

    __slots__ = ("code", "message", "paths", "severity")

    def __init__(self, code: str, severity: str, message: str, paths: list[str]) -> None:
        self.code, self.severity, self.message, self.paths = code, severity, message, paths

    def __repr__(self) -> str:
        return f"Hazard({self.code!r}, {self.severity!r}, paths={self.paths[:3]!r})"


# ------------------------------------------------------------------------------------------ resources
Resources = dict[int, tuple[str, th.nn.Module]]


def resource_modules(model: BaseAlgorithm) -> Resources:
    """The ``nn.Module`` resources of ``model``: id -> (key, module).

    A resource came from outside the policy: a module in ``policy_kwargs`` (at any depth up to four
    containers; the key is its last name there, as the walker names placeholders) or one declared in the
    class's ``safe_save_resources``. (At save, the walker passes its own findings to ``find_hazards``.)
    """
    found: Resources = {}
    _collect(getattr(model, "policy_kwargs", None), "policy_kwargs", found, 0)
    declared = getattr(type(model), "safe_save_resources", {})
    if declared:
        from sb3_safe_save._walker import resolve_attr  # only then: the walker imports the codecs and pydantic
    for key, path in declared.items():
        with contextlib.suppress(AttributeError, LookupError, TypeError, ValueError):
            obj = unwrap(resolve_attr(model, path))
            if isinstance(obj, th.nn.Module):
                found.setdefault(id(obj), (key, obj))
    return found


def _collect(value: Any, key: str, out: Resources, depth: int) -> None:
    value = unwrap(value)
    if isinstance(value, th.nn.Module):
        out.setdefault(id(value), (key, value))
    elif isinstance(value, dict) and depth < _MAX_DEPTH:
        for k, v in value.items():
            _collect(v, str(k), out, depth + 1)
    elif isinstance(value, (list, tuple)) and depth < _MAX_DEPTH:
        for i, v in enumerate(value):
            _collect(v, f"{key}_{i}" if depth else str(i), out, depth + 1)


# ------------------------------------------------------------------------------------------ finding
def find_hazards(model: BaseAlgorithm, resources: Resources) -> list[Hazard]:
    """``shared_with_target`` and ``reinitialised_on_build`` from facts about the live model."""
    policy = getattr(model, "policy", None)
    if not isinstance(policy, th.nn.Module):
        return []
    return [*_shared_with_target(model, policy, resources), *_reinitialised(policy, resources)]


def _shared_with_target(model: BaseAlgorithm, policy: th.nn.Module, resources: Resources) -> list[Hazard]:
    hazards: list[Hazard] = []
    for online, target in _TARGET_PAIRS:
        a, b = getattr(policy, online, None), getattr(policy, target, None)
        if not isinstance(a, th.nn.Module) or not isinstance(b, th.nn.Module) or a is b:
            continue
        shared = {_storage_key(p) for p in a.parameters()} & {_storage_key(p) for p in b.parameters()}
        if not shared:
            continue
        covered_a, covered_b = _covering(a, shared), _covering(b, shared)
        paths = [_join(f"policy.{online}", n) for n, _ in covered_a] + [_join(f"policy.{target}", n) for n, _ in covered_b]
        named = ", ".join(
            _join(f"policy.{online}", n) + (f" (resource {resources[id(m)][0]!r})" if id(m) in resources else "")
            for n, m in covered_a[:3]
        ) + (f" and {len(covered_a) - 3} more" if len(covered_a) > 3 else "")
        attr = (covered_a[0][0].rpartition(".")[2] or "expert") if covered_a else "expert"
        tau = getattr(model, "tau", None)
        if isinstance(tau, (int, float)) and tau >= 1:
            effect, severity = "with tau=1.0 (a hard update) it zeroes them at the first target update", "error"
        elif isinstance(tau, (int, float)) and tau > 0:
            effect = f"with tau={tau} it shrinks them by a factor 1 - tau**2 = {1 - tau * tau:.6g} at every target update"
            severity = "error"
        else:
            effect, severity = f"with tau={tau} it leaves them alone", "warning"
        hazards.append(
            Hazard(
                "shared_with_target",
                severity,
                f"{named} is registered in both policy.{online} and policy.{target} ({len(shared)} parameter tensors"
                f" shared): SB3's target update (polyak_update) writes into those tensors in place, and {effect}."
                f" Keep the resource out of the module system: {FIX.format(attr=attr)}",
                paths,
            )
        )
    return hazards


def _reinitialised(policy: th.nn.Module, resources: Resources) -> list[Hazard]:
    if not getattr(policy, "ortho_init", False):
        return []
    where: dict[int, list[str]] = {}
    for root in _ORTHO_INIT_ROOTS:
        module = getattr(policy, root, None)
        if isinstance(module, th.nn.Module):
            for name, sub in module.named_modules():
                if id(sub) in resources:
                    where.setdefault(id(sub), []).append(_join(f"policy.{root}", name))
    return [
        Hazard(
            "reinitialised_on_build",
            "error",
            f"resource {resources[ident][0]!r} is registered inside a policy built with ortho_init=True: constructing"
            f" the policy re-initialises its Linear/Conv2d weights. Keep it out of the module system"
            f" ({FIX.format(attr=paths[0].rpartition('.')[2])}) or pass policy_kwargs=dict(ortho_init=False)",
            paths,
        )
        for ident, paths in where.items()
    ]


def optimizer_hazards(model: BaseAlgorithm, resources: Resources) -> list[Hazard]:
    """``external_in_optimizer``: trainable parameters of a resource in one of the model's optimizers."""
    trainable = {id(p): key for key, module in resources.values() for p in module.parameters() if p.requires_grad}
    hazards = []
    for name, opt in _optimizers(model):
        keys = [trainable[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in trainable]
        if keys:
            hazards.append(
                Hazard(
                    "external_in_optimizer",
                    "warning",
                    f"optimizer {name!r} holds {len(keys)} trainable parameters of resource {sorted(set(keys))[0]!r}:"
                    " training updates them whenever they get a gradient. If you mean to fine-tune it, nothing to do"
                    " (silence this with warnings.filterwarnings('ignore', category=sb3_safe_save.HazardWarning))."
                    " Otherwise keep it out"
                    f" of the module system: {FIX.format(attr=sorted(set(keys))[0])}",
                    [name],
                )
            )
    return hazards


# ------------------------------------------------------------------------------------------ checking
_warned: weakref.WeakKeyDictionary[Any, set[tuple[str, ...]]] = weakref.WeakKeyDictionary()
_warned_lock = threading.Lock()


_LIBRARIES = ("sb3_safe_save", "stable_baselines3", "sb3_contrib", "rl_zoo3", "contextlib")


def warn_once(model: Any, ident: tuple[str, ...], message: str, category: type[Warning]) -> None:
    """Warn ``message`` once per model and ``ident`` (not at every build, learn or checkpoint of it).

    The warning points at the caller's line (``model = CustomDQN(...)``), not at SB3's or ours.
    """
    with _warned_lock:
        seen = _warned.setdefault(model, set())
        if ident in seen:
            return
        seen.add(ident)
    warnings.warn(message, category, stacklevel=_outside_libraries())


def _outside_libraries() -> int:
    """The ``stacklevel`` of the first frame, from ``warn_once``'s caller outwards, that is not in SB3 or here."""
    frame: types.FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level


def warn_hazard(model: Any, hazard: Any, when: str) -> None:
    """``HazardWarning`` for a ``Hazard`` (ours or the manifest's), once per model."""
    warn_once(model, (hazard.code, *hazard.paths), f"{hazard.code} ({when}): {hazard.message}", HazardWarning)


_loading = contextvars.ContextVar("sb3_safe_save_loading", default=False)


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Marks the ``_setup_model`` that ``load`` runs (it builds without initialising weights)."""
    token = _loading.set(True)
    try:
        yield
    finally:
        _loading.reset(token)


@contextlib.contextmanager
def guard_build(model: BaseAlgorithm, *, externalize: bool) -> Iterator[None]:
    """Around ``_setup_model``: keep what the policy's build does to resources from going unnoticed.

    Before the build, the Linear/Conv2d tensors of the resources are copied when the policy will
    ``ortho_init`` them (not at load: load builds without initialising). After it, ``externalize``
    rewires the registrations; a resource the build re-initialised is restored bit for bit, then
    ``HazardError`` is raised unless it was rewired; every other hazard is warned (``HazardWarning``).
    """
    loading = _loading.get()
    resources = resource_modules(model)
    saved = {} if loading or not resources or not _will_ortho_init(model) else _init_targets(resources)
    yield
    hazards = find_hazards(model, resources)
    reinitialised = [h for h in hazards if h.code == "reinitialised_on_build"]
    if reinitialised and saved:
        with th.no_grad():
            for tensor, copy in saved.values():
                tensor.copy_(copy)
    if externalize and resources and _externalize(model, resources):
        hazards = find_hazards(model, resources)  # what is left once the resources are no longer registered
    elif reinitialised and saved:
        raise HazardError(f"{reinitialised[0].message}. Your resource's weights were restored. {_rewire_hint(model)}")
    for hazard in [*hazards, *optimizer_hazards(model, resources)]:
        if hazard.code != "reinitialised_on_build" or loading:
            warn_hazard(model, hazard, "found when the model was " + ("loaded" if loading else "built"))


def check_before_learn(model: BaseAlgorithm) -> None:
    """At the start of ``learn()``: refuse to train a model whose target update would damage a resource."""
    for hazard in find_hazards(model, resource_modules(model)):
        if hazard.code == "shared_with_target" and hazard.severity == "error":
            raise HazardError(
                f"{algo_name(type(model))}.learn() refused to start, before any gradient step or target update"
                f" (nothing was changed): {hazard.message}. {_rewire_hint(model)}"
            )


def _rewire_hint(model: BaseAlgorithm) -> str:
    cls = type(model)
    how = (
        f"safe({base_name(cls)}, externalize=True)"
        if algo_name(cls).startswith("safe(")
        else f"safe_save_externalize = True in class {cls.__qualname__}"
    )
    return f"Or let sb3_safe_save do it when the model is built: {how}"


def _will_ortho_init(model: BaseAlgorithm) -> bool:
    from stable_baselines3.common.policies import ActorCriticPolicy

    policy_class = getattr(model, "policy_class", None)
    kwargs = getattr(model, "policy_kwargs", None) or {}
    return isinstance(policy_class, type) and issubclass(policy_class, ActorCriticPolicy) and kwargs.get("ortho_init", True)


def _init_targets(resources: Resources) -> dict[int, tuple[th.Tensor, th.Tensor]]:
    """Copies of what ``BasePolicy.init_weights`` writes: the weight and bias of every Linear/Conv2d of the resources."""
    out: dict[int, tuple[th.Tensor, th.Tensor]] = {}
    for _, module in resources.values():
        for sub in module.modules():
            if isinstance(sub, (th.nn.Linear, th.nn.Conv2d)):
                for t in (sub.weight, sub.bias):
                    if t is not None and id(t) not in out:
                        out[id(t)] = (t, t.detach().clone())
    return out


def _externalize(model: BaseAlgorithm, resources: Resources) -> bool:
    """Replace each registration of a resource in the policy by its ``external()`` wrapper; drop its parameters
    from the optimizers. Returns whether anything was rewired."""
    policy = getattr(model, "policy", None)
    if not isinstance(policy, th.nn.Module):
        return False
    rewired: set[int] = set()
    for parent in list(policy.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in resources:
                del parent._modules[name]
                parent.__dict__[name] = External(child)
                rewired.add(id(child))
    if not rewired:
        return False
    params = {id(p) for ident in rewired for p in resources[ident][1].parameters()}
    for _, opt in _optimizers(model):
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in params]
    return True


def _optimizers(model: BaseAlgorithm) -> Iterator[tuple[str, th.optim.Optimizer]]:
    """The optimizers among the state dicts SB3 saves (``policy.optimizer``, ``actor.optimizer``, ...), by name."""
    state_dicts, _ = model._get_torch_save_params()
    for name in state_dicts:
        obj: Any = model
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, th.optim.Optimizer):
            yield name, obj


def _storage_key(t: th.Tensor) -> tuple[Any, ...]:
    """Tensors with the same key share memory (meta and empty tensors have none: their identity)."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("id", id(t))
    return (t.device, t.untyped_storage().data_ptr())


def _covering(root: th.nn.Module, shared: set[tuple[Any, ...]]) -> list[tuple[str, th.nn.Module | None]]:
    """The outermost submodules whose parameters are all ``shared``, plus any other shared parameter by name."""
    chosen: list[tuple[str, th.nn.Module | None]] = []
    done: set[int] = set()
    for name, module in root.named_modules():
        if any(c == "" or name.startswith(c + ".") for c, _ in chosen):
            continue
        params = list(module.parameters())
        if params and all(_storage_key(p) in shared for p in params):
            chosen.append((name, module))
            done.update(id(p) for p in params)
    for name, p in root.named_parameters():
        if id(p) not in done and _storage_key(p) in shared:
            chosen.append((name, None))
    return chosen


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name else prefix
