"""Trust rules: the one place that decides which references a file may make, and the only place that imports them.

A file names classes (and, rarely, functions) as ``"package.module:QualName"`` strings. ``load``,
``audit`` and the CLI all ask a ``TrustList`` and nothing else. The rules:

1. **A reference names what is defined where it says.** ``module:A.B`` is looked up in the module's
   own namespace, then through classes only (each step in a class's own ``__dict__``: never through a
   module, an instance or a descriptor), and the object found must have exactly that ``__module__``
   and ``__qualname__``. Re-exports and attribute chains (``pkg.mod:th.os.system``) never resolve.
2. **Trust is by exact identity.** The default list names the exact classes SB3 and sb3-contrib
   save (``default_trusted()``): policies, features extractors, buffers, action noises, schedules,
   ``TrainFreq``/``TrainFrequencyUnit``/``GoalSelectionStrategy``/``RNNStates``, torch optimizers and activation
   modules, gymnasium spaces, numpy scalar types; the algorithms only as the file's algorithm.
   No module globs, no functions. Beyond it:

   * classes *defined in* the module of the class you call ``load`` on (it is imported already);
   * what that class declares in ``safe_save_trusted`` (``safe(DQN, trusted=[...])`` makes such a class);
   * ``load(..., trusted=[...])`` and ``sb3_safe_save.trust(...)``: exact classes/functions or
     ``"module:QualName"`` strings, or ``"package.*"`` (an explicit user choice).
3. **Typed slots.** Where SB3 calls what a file names, the class must derive from what SB3 expects
   there (``policy_class`` -> ``BasePolicy``, ``optimizer_class`` -> ``torch.optim.Optimizer``, ...:
   ``SLOTS``), checked before anything is called. Plain objects (``ObjectNode``) are rebuilt without
   calling a constructor, and only for classes with default pickling behaviour.
4. **Factories** named in a file (``ResourceSpec.factory``) are called only when the caller trusted
   that exact reference (``trusted=``, ``trust()``, ``safe_save_trusted``): never by default, never by
   a glob or the loading class's module.

``trusted=True`` is refused: there is no "trust all". Nothing a file says about itself (its
``algorithm`` field) is ever trusted.
"""

from __future__ import annotations

import enum
import functools
import importlib
import sys
import threading
import types
from collections.abc import Iterable, Mapping
from typing import Any, Literal

TrustSpec = Iterable["type | str | Any"]
#: How a file uses a reference: a class/function value (``ref``), the class of a plain object, of
#: an enum member, of a named tuple, a resource factory, or the file's algorithm.
#: In a qualname, a class defined inside a function: such a reference is never imported; it resolves
#: only to the class itself, handed over in ``trusted=`` or ``safe_save_trusted``.
LOCALS = "<locals>"
RefKind = Literal["ref", "object", "enum", "namedtuple", "factory", "algorithm"]
Why = Literal["explicit", "declared", "home", "default"]

_lock = threading.Lock()
_registered: set[str] = set()
_MISSING: Any = object()


# ------------------------------------------------------------------------------------ references
def ref_of(obj: Any) -> str:
    """The import reference ``"module:qualname"`` of a class or function."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"{obj!r} has no __module__/__qualname__ and cannot be referenced by import path")
    return f"{module}:{qualname}"


def _dotted(ref: str) -> str:
    """``"pkg.mod:A.B"`` and ``"pkg.mod.A.B"`` compare equal (users write either).

    The ambiguity is harmless: the object is then looked up under the file's exact ``module:qualname``
    and must have exactly that ``__module__`` and ``__qualname__``.
    """
    return ref.replace(":", ".")


def lookup(module: types.ModuleType, qualname: str) -> Any:
    """The object ``qualname`` names in ``module``, walking through classes only; ``_MISSING`` if none.

    The first name is read from the module's own namespace (no module ``__getattr__``); every
    further name from a class's own ``__dict__``. The result must be a class or a function whose
    ``__module__``/``__qualname__`` are exactly these: re-exports and aliases do not resolve.
    """
    parts = qualname.split(".")
    obj = vars(module).get(parts[0], _MISSING)
    for part in parts[1:]:
        if not isinstance(obj, type):  # never through a module, an instance or a function
            return _MISSING
        obj = vars(obj).get(part, _MISSING)
    if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return _MISSING
    if getattr(obj, "__module__", None) != module.__name__ or getattr(obj, "__qualname__", None) != qualname:
        return _MISSING
    return obj


def resolves_to(ref: str, obj: Any) -> bool:
    """True if ``ref`` names exactly ``obj`` in an already imported module (used at save time)."""
    module_name, _, qualname = ref.partition(":")
    module = sys.modules.get(module_name)
    return module is not None and "<" not in qualname and lookup(module, qualname) is obj


def _normalise(item: Any) -> str:
    return _dotted(item if isinstance(item, str) else ref_of(item))


def trust(*items: type | str | Any) -> None:
    """Trust classes or functions process-wide, for every later ``load``.

    :param items: class or function objects, ``"module:QualName"`` strings (``"module.QualName"`` is read the same),
        or ``"package.*"`` to trust every class and function of a package (your explicit choice)
    """
    normalised = [_normalise(i) for i in items]
    with _lock:
        _registered.update(normalised)


# ----------------------------------------------------------------------------------- defaults
_SB3_MODULES = (
    "stable_baselines3.common.policies",
    "stable_baselines3.common.torch_layers",
    "stable_baselines3.common.buffers",
    "stable_baselines3.common.noise",
    "stable_baselines3.dqn.policies",
    "stable_baselines3.sac.policies",
    "stable_baselines3.td3.policies",
    "stable_baselines3.her.her_replay_buffer",
    "sb3_contrib.common.recurrent.policies",
    "sb3_contrib.common.recurrent.buffers",
    "sb3_contrib.common.maskable.policies",
    "sb3_contrib.common.maskable.buffers",
    "sb3_contrib.ars.policies",
    "sb3_contrib.crossq.policies",
    "sb3_contrib.qrdqn.policies",
    "sb3_contrib.tqc.policies",
)
_ALGORITHM_MODULES = (
    "stable_baselines3.a2c.a2c",
    "stable_baselines3.ddpg.ddpg",
    "stable_baselines3.dqn.dqn",
    "stable_baselines3.ppo.ppo",
    "stable_baselines3.sac.sac",
    "stable_baselines3.td3.td3",
    "sb3_contrib.ars.ars",
    "sb3_contrib.crossq.crossq",
    "sb3_contrib.ppo_mask.ppo_mask",
    "sb3_contrib.ppo_recurrent.ppo_recurrent",
    "sb3_contrib.qrdqn.qrdqn",
    "sb3_contrib.tqc.tqc",
    "sb3_contrib.trpo.trpo",
)
_NUMPY_SCALARS = (
    "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
)  # fmt: skip


def _import_optional(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:  # sb3-contrib is an optional extra
        return None


def _defined_in(module: types.ModuleType, base: type | tuple[type, ...]) -> list[type]:
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == module.__name__ and issubclass(obj, base)
    ]


@functools.cache
def default_trusted() -> Mapping[str, tuple[type, frozenset[str]]]:
    """The default list: exact reference -> (class, the ``RefKind`` uses it is trusted for).

    Built once, from fixed lists of modules (classes *defined* there that derive from the base
    classes SB3 saves) and fixed names; the same in every process with the same packages installed.
    """
    import gymnasium.spaces
    import numpy as np
    import stable_baselines3  # noqa: F401  (imports every SB3 algorithm)
    import torch.nn.modules.activation
    import torch.optim
    from stable_baselines3.common import utils as sb3_utils
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.buffers import BaseBuffer
    from stable_baselines3.common.noise import ActionNoise
    from stable_baselines3.common.policies import BasePolicy
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
    from stable_baselines3.her.goal_selection_strategy import GoalSelectionStrategy

    ref_only = frozenset({"ref"})
    out: dict[str, tuple[type, frozenset[str]]] = {}

    def add(classes: Iterable[type], kinds: frozenset[str]) -> None:
        for cls in classes:
            out[ref_of(cls)] = (cls, kinds)

    for name in _SB3_MODULES:
        module = _import_optional(name)
        if module is not None:
            add(_defined_in(module, (BasePolicy, BaseFeaturesExtractor, BaseBuffer)), ref_only)
            add(_defined_in(module, ActionNoise), frozenset({"ref", "object"}))
    for name in _ALGORITHM_MODULES:
        module = _import_optional(name)
        if module is not None:
            add(_defined_in(module, BaseAlgorithm), frozenset({"algorithm"}))
    schedules = (getattr(sb3_utils, n, None) for n in ("FloatSchedule", "ConstantSchedule", "LinearSchedule"))
    add([c for c in schedules if c is not None], frozenset({"ref", "object"}))  # SB3 >= 2.7; closures before
    add((TrainFrequencyUnit, GoalSelectionStrategy), frozenset({"ref", "enum"}))
    add((TrainFreq,), frozenset({"ref", "namedtuple"}))
    recurrent = _import_optional("sb3_contrib.common.recurrent.type_aliases")
    if recurrent is not None:  # RecurrentPPO's LSTM states (kept for an exact resume)
        add((recurrent.RNNStates,), frozenset({"ref", "namedtuple"}))
    add(
        [c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)],
        ref_only,
    )
    add((RMSpropTFLike,), ref_only)
    add(_defined_in(torch.nn.modules.activation, torch.nn.Module), ref_only)
    add((torch.nn.Identity,), ref_only)
    add(
        [c for c in vars(gymnasium.spaces).values() if isinstance(c, type) and issubclass(c, gymnasium.spaces.Space)], ref_only
    )
    add([getattr(np, n) for n in _NUMPY_SCALARS], ref_only)
    return types.MappingProxyType(out)


@functools.cache
def slots() -> Mapping[str, type]:
    """Typed slots: the name a class sits under (attribute or ``policy_kwargs`` key) -> what it must derive from.

    SB3 calls what sits there (``policy_class(...)``, ``optimizer_class(params, ...)``, ...) or its
    methods (``action_noise()``), so a class of another kind must never get there.
    """
    import gymnasium.spaces
    import torch
    from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
    from stable_baselines3.common.noise import ActionNoise
    from stable_baselines3.common.policies import BasePolicy
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
    from stable_baselines3.her.goal_selection_strategy import GoalSelectionStrategy

    return types.MappingProxyType(
        {
            "policy_class": BasePolicy,
            "features_extractor_class": BaseFeaturesExtractor,
            "activation_fn": torch.nn.Module,
            "optimizer_class": torch.optim.Optimizer,
            "replay_buffer_class": ReplayBuffer,
            "rollout_buffer_class": RolloutBuffer,
            "action_noise": ActionNoise,
            "observation_space": gymnasium.spaces.Space,
            "action_space": gymnasium.spaces.Space,
            "train_freq": TrainFreq,
            "unit": TrainFrequencyUnit,
            "goal_selection_strategy": GoalSelectionStrategy,
        }
    )


def slot_of(path: str) -> str:
    """The name a value at ``path`` sits under: ``policy_kwargs.optimizer_class`` -> ``optimizer_class``."""
    last = path.rpartition(".")[2]
    return last.partition("[")[0] if not last.startswith("[") else ""


def plain_class(cls: type) -> bool:
    """True if ``cls`` pickles by default (its ``__dict__`` is its whole state): ``ObjectNode`` classes only."""
    return (
        not any(k.__dict__.get("__slots__") for k in cls.__mro__)  # abc.ABC's empty __slots__ is fine
        and getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
        and getattr(cls, "__reduce__", None) is object.__reduce__
        and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None)
        and not hasattr(cls, "__setstate__")
        and type(cls).__call__ is type.__call__  # a plain metaclass (ABCMeta is one)
        and all(type(vars(k)["__dict__"]) is _GETSET for k in cls.__mro__ if "__dict__" in vars(k))
    )


_GETSET = type(vars(type("_Plain", (), {}))["__dict__"])  # the ordinary instance-__dict__ descriptor


def _kind_fits(obj: Any, kind: RefKind) -> str | None:
    """Why ``obj`` cannot be used as ``kind``, or None."""
    if kind in ("ref", "factory"):
        return None
    if not isinstance(obj, type):
        return "not a class"
    if kind == "enum" and not issubclass(obj, enum.Enum):
        return "not an Enum"
    if kind == "namedtuple" and not (issubclass(obj, tuple) and isinstance(vars(obj).get("_fields"), tuple)):
        return "not a named tuple class"
    if kind == "object" and not plain_class(obj):
        return "not a plain class (it customises pickling, __slots__ or construction)"
    return None


def _slot_fits(obj: Any, kind: RefKind, path: str) -> str | None:
    """Why ``obj`` cannot sit at ``path``, or None (``ref``: the class itself; else the object's class)."""
    base = slots().get(slot_of(path)) if kind in ("ref", "object", "enum", "namedtuple") else None
    if base is None:
        return None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        what = "a class" if kind == "ref" else "an object of a class"
        return f"{path.rpartition('.')[2]} must be {what} derived from {base.__module__}.{base.__qualname__}"
    return None


# ---------------------------------------------------------------------------------- the list
class Refusal:
    """One reference a load would refuse: where, and why."""

    def __init__(self, ref: str, paths: list[str], reason: str, *, trustable: bool) -> None:
        self.ref = ref
        self.paths = paths
        self.reason = reason
        self.trustable = trustable  # trusting it (trusted=[...]) would let it through

    def __repr__(self) -> str:
        return f"Refusal({self.ref!r}, {self.paths!r}, {self.reason!r})"


class TrustList:
    """The trust decisions for one load (or audit): defaults, ``trust()``, the loading class, ``trusted=``.

    :param trusted: what the caller passed as ``trusted=``
    :param home: the class ``load`` is called on (None for a file audit): classes defined in its
        module, and its ``safe_save_trusted``, are trusted
    """

    def __init__(self, trusted: TrustSpec | None, home: type | None = None) -> None:
        if isinstance(trusted, bool):
            raise TypeError(
                f"trusted={trusted} is not accepted: there is no 'trust everything' switch. "
                "Pass the classes or 'module:QualName' strings that the UntrustedTypeError lists."
            )
        with _lock:
            extra = set(_registered)
        items: list[Any] = []
        if trusted is not None:
            items = [trusted] if isinstance(trusted, (str, type)) or callable(trusted) else list(trusted)
            extra.update(_normalise(i) for i in items)
        # classes defined inside a function: never importable by name, only the very class handed over
        declared_items = _declared_items(home) if home is not None else []
        self._local = {ref_of(c): c for c in (*items, *declared_items) if isinstance(c, type) and LOCALS in c.__qualname__}
        self._exact = {i for i in extra if not i.endswith(".*")}
        self._packages = tuple(i[:-1] for i in extra if i.endswith(".*"))  # "pkg.*" -> "pkg."
        self._home = home.__module__ if home is not None else None
        declared = declared_trust(home) if home is not None else []
        self._declared = frozenset(i for i in declared if not i.endswith(".*"))
        self._declared_packages = tuple(i[:-1] for i in declared if i.endswith(".*"))

    def why(self, ref: str, kind: RefKind = "ref") -> Why | None:
        """Who trusts ``ref`` for this use, before anything is imported: ``explicit`` (``trusted=``/``trust()``),
        ``declared`` (the class's ``safe_save_trusted``), ``home`` (the loading class's module),
        ``default`` (the default list), or None.
        """
        if LOCALS in ref:
            return "explicit" if ref in self._local else None
        dotted = _dotted(ref)
        if dotted in self._declared:
            return "declared"
        if dotted in self._exact:
            return "explicit"
        if kind == "factory":  # only an exact reference the caller named
            return None
        if dotted.startswith(self._declared_packages):
            return "declared"
        if dotted.startswith(self._packages):
            return "explicit"
        entry = default_trusted().get(ref)
        if entry is not None and kind in entry[1]:
            return "default"
        if kind != "algorithm" and self._home is not None and ref.partition(":")[0] == self._home:
            return "home"
        return None

    def refusals(self, uses: Mapping[str, Iterable[tuple[str, RefKind]]]) -> list[Refusal]:
        """The references a load refuses, decided without importing anything.

        :param uses: reference -> ``(path, kind)`` for each place the file uses it
        """
        out: list[Refusal] = []
        for ref in sorted(uses):
            places = list(uses[ref])
            paths = [p for p, _ in places]
            whys = {self.why(ref, kind) for _, kind in places}
            if None in whys:
                out.append(Refusal(ref, paths, "not trusted", trustable=True))
                continue
            if whys == {"default"}:  # the class is known without importing: check the slots now
                cls = default_trusted()[ref][0]
                for path, kind in places:
                    reason = _kind_fits(cls, kind) or _slot_fits(cls, kind, path)
                    if reason is not None:
                        out.append(Refusal(ref, [path], reason, trustable=False))
                        break
        return out

    def resolve(self, ref: str, path: str, kind: RefKind = "ref") -> Any:
        """Import a reference for one use and return what it names, or raise.

        The only place a reference from a file is imported; the module is imported only after the
        trust check passed. Raises ``UntrustedTypeError`` (not trusted), ``FormatError`` (cannot be
        imported, names something else than a class/function defined there, or the wrong kind of class).
        """
        from sb3_safe_save._errors import FormatError, UntrustedTypeError

        why = self.why(ref, kind)
        if why is None:
            raise UntrustedTypeError([ref], {ref: [path]})
        if ref in self._local:
            obj: Any = self._local[ref]
        elif why == "default":
            obj = default_trusted()[ref][0]
        else:
            module_name, _, qualname = ref.partition(":")
            if why == "home":
                module = sys.modules.get(module_name)  # imported already: it defines the loading class
                if module is None:
                    raise FormatError(f"{path}: cannot import {ref}: module {module_name} is not loaded")
            else:
                try:
                    module = importlib.import_module(module_name)
                except ImportError as e:
                    raise FormatError(f"{path}: cannot import {ref}: {e}") from None
            obj = lookup(module, qualname)
            if obj is _MISSING:
                raise FormatError(
                    f"{path}: {ref} does not name a class or function defined in {module_name}"
                    " (references must name what is defined where they say, not a re-export or an attribute chain)"
                )
            if why == "home" and not isinstance(obj, type):
                raise UntrustedTypeError([ref], {ref: [path]})  # the home module is trusted for its classes only
        reason = _kind_fits(obj, kind) or _slot_fits(obj, kind, path)
        if reason is not None:
            raise FormatError(f"{path}: {ref} is refused: {reason}")
        return obj


# ------------------------------------------------------------------------------ rl-zoo3 configs
#: Packages whose wrappers and callbacks a saved rl-zoo3 ``config.yml`` may name without ``--trust``
ZOO_PACKAGES = (
    "rl_zoo3.wrappers",
    "rl_zoo3.gym_patches",  # importing rl_zoo3 replaces gymnasium.wrappers.TimeLimit with its PatchedTimeLimit
    "gymnasium.wrappers",
    "stable_baselines3.common.atari_wrappers",
    "stable_baselines3.common.vec_env",
    "sb3_contrib.common.wrappers",
)
#: The config keys rl-zoo3 imports and calls (``module.Class`` names), with the base each must derive from
ZOO_SLOTS = {
    "env_wrapper": "gymnasium.core:Wrapper",
    "vec_env_wrapper": "stable_baselines3.common.vec_env.base_vec_env:VecEnvWrapper",
    "callback": "stable_baselines3.common.callbacks:BaseCallback",
}


#: Wrapper and callback arguments that name a file or a folder: where the class writes (VecMonitor's ``filename``,
#: the video recorders' ``video_folder`` and ``name_prefix``, SB3's and rl-zoo3's callbacks' ``save_path``,
#: ``log_path``, ``best_model_save_path``, ``name_prefix``, Monitor's ``filename``, loggers' ``log_dir``). A saved
#: config may not set them, whoever trusts the class: they would choose which files ``enjoy`` truncates and
#: where it creates folders.
ZOO_PATH_ARGUMENTS = frozenset(
    {"filename", "video_folder", "name_prefix", "save_path", "log_path", "best_model_save_path", "log_dir", "folder"}
)


def zoo_path_arguments(kwargs: Any) -> list[str]:
    """The arguments in ``kwargs`` (of a wrapper or callback named in a saved config) that name a file or a folder."""
    return sorted(k for k in kwargs if k in ZOO_PATH_ARGUMENTS) if isinstance(kwargs, dict) else []


def _in_packages(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def zoo_refusals(names: Mapping[str, list[str]], trusted: TrustSpec | None) -> list[Refusal]:
    """The ``module.Class`` names of an rl-zoo3 config that ``sb3_safe_save.zoo`` must not let rl-zoo3 import and call.

    :param names: name -> the config keys (``ZOO_SLOTS``) it appears under
    :param trusted: the caller's ``--trust`` (exact names or ``"pkg.*"``): trusted as given, as ``trusted=`` is
    :return: one ``Refusal`` per name that is neither trusted by the caller nor a class derived from its
        key's base and defined in ``ZOO_PACKAGES`` (checked by importing the trusted module, as rl-zoo3
        itself would next; a function, a module or any other class there is refused)
    """
    trust = TrustList(trusted)
    out: list[Refusal] = []
    for name, keys in sorted(names.items()):
        module_name, _, class_name = name.rpartition(".")
        if trust.why(f"{module_name}:{class_name}") == "explicit":
            continue
        if not module_name or not _in_packages(module_name, ZOO_PACKAGES):
            out.append(Refusal(name, keys, "not trusted", trustable=True))
            continue
        try:
            obj = vars(importlib.import_module(module_name)).get(class_name)
        except ImportError as e:
            out.append(Refusal(name, keys, f"cannot be imported: {e}", trustable=False))
            continue
        bases = [_import_ref(ZOO_SLOTS[key]) for key in keys]
        if not (
            isinstance(obj, type) and _in_packages(obj.__module__, ZOO_PACKAGES) and all(issubclass(obj, b) for b in bases)
        ):
            what = " and ".join(sorted({b.__qualname__ for b in bases}))
            out.append(Refusal(name, keys, f"is not a {what} class defined in those packages", trustable=True))
    return out


def _import_ref(ref: str) -> Any:
    module_name, _, qualname = ref.partition(":")
    return lookup(importlib.import_module(module_name), qualname)


def _declared_items(cls: type) -> list[Any]:
    items = getattr(cls, "safe_save_trusted", ())
    return [items] if isinstance(items, (str, type)) else list(items)


def declared_trust(cls: type) -> list[str]:
    """The references a class declares trusted (``safe_save_trusted``), normalised (``"pkg.*"`` kept as is)."""
    return [_normalise(i) for i in _declared_items(cls)]
