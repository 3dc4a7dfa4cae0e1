"""Rebinding: finding a live object for every placeholder before the model is built.

Resolution order for each placeholder (first match wins; documented in the README):

1. ``resources=`` given to ``load`` — keyed by the placeholder's key. A value (the object or its
   ``external()`` wrapper: each path gets what it held at save) is used as is, unless it is marked:
   ``factory(fn)`` calls ``fn(placeholder)``, ``lazy(fn)`` binds a proxy that calls
   ``fn(placeholder)`` on first use;
2. factories registered in this process with ``register_resource(key_or_type, factory)``;
3. entry points in the group ``sb3_safe_save.resources`` (name = key or qualified type name);
4. the placeholder's own ``ResourceSpec.factory`` — only if that reference is trusted; an untrusted
   factory is never imported;
5. otherwise ``MissingResourceError`` (all missing keys at once), unless the placeholder is optional:
   then an ``Unbound`` stand-in that raises ``UnresolvedResourceError`` when used.

Factories from steps 1-3 are called with the ``Placeholder`` (key, paths, type, hint, spec); the
spec's own factory (step 4) is called with the spec's JSON keyword arguments: ``fn(**spec.kwargs)``.
A lazy spec (``ResourceSpec(lazy=True)``) wraps whatever step 2-4 found in a ``LazyResource``.
"""

from __future__ import annotations

import difflib
import inspect
import threading
import warnings
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from sb3_safe_save._errors import (
    FormatError,
    MissingResourceError,
    ResourceMismatchError,
    SafeSaveError,
    UnresolvedResourceError,
)
from sb3_safe_save._external import unwrap
from sb3_safe_save._manifest import Placeholder
from sb3_safe_save._trust import TrustList

ENTRY_POINT_GROUP = "sb3_safe_save.resources"
Factory = Callable[[Placeholder], Any]

_registry_lock = threading.Lock()
_registry: dict[str, Factory] = {}


class factory:
    """Mark a callable in ``resources=`` as a factory: it is called with the ``Placeholder`` at load."""

    def __init__(self, fn: Factory) -> None:
        self.fn = fn


class lazy:
    """Mark a factory to run on first use: ``resources={"vlm_model": lazy(build)}``.

    The proxy builds the object exactly once, even when threads race, and then forwards attribute
    access and calls to it. ``LazyResource.resolve()`` returns the real object.
    """

    def __init__(self, fn: Factory) -> None:
        self.fn = fn


def register_resource(key_or_type: str | type, fn: Factory) -> None:
    """Register a factory for placeholders with this key (a ``str``) or of this type (a class).

    :param key_or_type: a placeholder key such as ``"vlm_model"``, or the class of the resource
    :param fn: called with the ``Placeholder``; returns the live object
    """
    key = key_or_type if isinstance(key_or_type, str) else f"{key_or_type.__module__}.{key_or_type.__qualname__}"
    with _registry_lock:
        _registry[key] = fn


def unregister_resource(key_or_type: str | type) -> None:
    """Remove a factory registered with ``register_resource``."""
    key = key_or_type if isinstance(key_or_type, str) else f"{key_or_type.__module__}.{key_or_type.__qualname__}"
    with _registry_lock:
        _registry.pop(key, None)


class LazyResource:
    """A stand-in that builds its resource on first use, exactly once (thread-safe)."""

    def __init__(self, build: Callable[[], Any], placeholder: Placeholder, check: Callable[[Any], None]) -> None:
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_placeholder", placeholder)
        object.__setattr__(self, "_check", check)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_value", _UNSET)

    def resolve(self) -> Any:
        value = object.__getattribute__(self, "_value")
        if value is _UNSET:
            with object.__getattribute__(self, "_lock"):
                value = object.__getattribute__(self, "_value")
                if value is _UNSET:
                    value = object.__getattribute__(self, "_build")()
                    object.__getattribute__(self, "_check")(value)
                    object.__setattr__(self, "_value", value)
        return value

    @property
    def is_built(self) -> bool:
        return object.__getattribute__(self, "_value") is not _UNSET

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolve(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.resolve(), name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        ph = object.__getattribute__(self, "_placeholder")
        state = "built" if self.is_built else "not built yet"
        return f"<LazyResource {ph.key!r} ({ph.type}), {state}>"


class Unbound:
    """Stands in for an optional resource that was not supplied; any use raises ``UnresolvedResourceError``."""

    def __init__(self, placeholder: Placeholder) -> None:
        object.__setattr__(self, "_placeholder", placeholder)

    def _fail(self, *_: Any, **__: Any) -> Any:
        ph = object.__getattribute__(self, "_placeholder")
        raise UnresolvedResourceError(
            f"optional resource {ph.key!r} ({ph.type}, at {', '.join(ph.paths)}) was not supplied at load and is now used;"
            f" pass it with load(..., resources={{{ph.key!r}: obj}})"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # protocol lookups (copy, pickle, hasattr checks) stay normal
            raise AttributeError(name)
        return self._fail()

    __call__ = _fail

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<Unbound optional resource {object.__getattribute__(self, '_placeholder').key!r}>"


_UNSET = object()


def standin_placeholder(obj: Any) -> Placeholder | None:
    """The placeholder a ``LazyResource`` or ``Unbound`` stands for (without building it), else None.

    Lets a loaded model be saved again: the stand-in becomes the same placeholder (key, type, spec).
    """
    if type(obj) in (LazyResource, Unbound):
        return object.__getattribute__(obj, "_placeholder")  # type: ignore[no-any-return]
    return None


def fingerprint_of(obj: Any) -> dict[str, Any]:
    """The fingerprint of a live object: ``__sb3_fingerprint__()`` if it defines one, else what can be measured."""
    method = getattr(type(obj), "__sb3_fingerprint__", None)
    if method is not None:
        return dict(method(obj))
    out: dict[str, Any] = {"type": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    parameters = getattr(obj, "parameters", None)
    if callable(parameters):
        try:
            out["num_parameters"] = sum(p.numel() for p in parameters())
        except Exception:  # not a torch-like parameters() after all
            pass
    return out


def _checker(ph: Placeholder, strict: bool) -> Callable[[Any], None]:
    def check(obj: Any) -> None:
        expected = ph.spec.fingerprint if ph.spec is not None else None
        if not expected:
            return
        actual = fingerprint_of(obj)
        diff = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
        if not diff:
            return
        detail = ", ".join(f"{k}: saved {v!r}, got {a!r}" for k, (v, a) in diff.items())
        msg = f"resource {ph.key!r} does not match the fingerprint recorded at save ({detail})"
        if strict:
            raise ResourceMismatchError(msg + "; pass the right object, or load(..., strict=False) to only warn")
        warnings.warn(msg, UserWarning, stacklevel=4)

    return check


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve(
    placeholders: list[Placeholder],
    resources: Mapping[str, Any] | None,
    trust: TrustList,
    *,
    strict: bool = True,
    skip: frozenset[str] = frozenset(),
    call: str = "Algo.load",
) -> dict[str, Any]:
    """Find a live object for every placeholder (see the module docstring for the order).

    :param skip: keys not needed (covered by ``custom_objects``)
    :param call: the load call that was made, for the error message (``"CustomDQN.load"``)
    :return: placeholder key -> object (or ``LazyResource`` / ``Unbound``)
    :raises MissingResourceError: listing every placeholder that could not be resolved, before any factory is called
    """
    resources = dict(resources or {})
    unknown = sorted(set(resources) - {p.key for p in placeholders})
    with _registry_lock:
        registry = dict(_registry)
    entry_points = _EntryPoints()
    bound: dict[str, Any] = {}
    builds: list[tuple[Placeholder, Factory, Callable[[Any], None], bool]] = []
    missing: list[tuple[str, list[str], str, dict[str, object]]] = []
    for ph in placeholders:
        if ph.key in skip:
            continue
        check = _checker(ph, strict)
        build: Factory | None = None
        wrap_lazy = ph.spec is not None and ph.spec.lazy
        if ph.key in resources:
            value = resources[ph.key]
            if isinstance(value, lazy):
                build, wrap_lazy = value.fn, True
            elif isinstance(value, factory):
                build = value.fn
            else:
                check(unwrap(value))  # the object or its external() wrapper
                bound[ph.key] = value
                continue
        else:
            build = _found_factory(ph, registry, entry_points, trust)
        if build is None:
            if ph.optional:
                bound[ph.key] = Unbound(ph)
                continue
            hint: dict[str, object] = dict(ph.hint)
            if ph.spec is not None and ph.spec.factory is not None:
                hint["untrusted_factory"] = f"{ph.spec.factory} (pass trusted=[{ph.spec.factory!r}] to let it rebuild this)"
            missing.append((ph.key, ph.paths, ph.type, hint))
            continue
        builds.append((ph, build, check, wrap_lazy))
    if missing:  # before any factory runs
        typos = {key: close[0] for key, *_ in missing if (close := difflib.get_close_matches(key, unknown, n=1, cutoff=0.6))}
        raise MissingResourceError(missing, call=call, typos=typos)
    if unknown:
        warnings.warn(
            f"resources {unknown} match no placeholder in the file (it has {[p.key for p in placeholders]})",
            UserWarning,
            stacklevel=4,
        )
    for ph, build, check, wrap_lazy in builds:
        bound[ph.key] = _build(build, ph, check, wrap_lazy)
    return bound


class _EntryPoints:
    """The group's entry points, scanned once per ``resolve`` on first need (not once per placeholder)."""

    def __init__(self) -> None:
        self._found: dict[str, Any] | None = None

    def get(self, name: str) -> Any:
        if self._found is None:
            self._found = _entry_points()
        return self._found.get(name)


def _found_factory(
    ph: Placeholder, registry: Mapping[str, Factory], entry_points: _EntryPoints, trust: TrustList
) -> Factory | None:
    """Steps 2-4: a registered factory, an entry point, a trusted spec factory."""
    if ph.key in registry or ph.type in registry:
        return registry.get(ph.key) or registry[ph.type]
    ep = entry_points.get(ph.key) or entry_points.get(ph.type)
    if ep is not None:
        return ep.load()  # type: ignore[no-any-return]
    if ph.spec is not None and ph.spec.factory is not None and trust.why(ph.spec.factory, "factory") is not None:
        return _spec_factory(ph, trust)  # the caller trusted this exact reference
    return None


def _spec_factory(ph: Placeholder, trust: TrustList) -> Factory:
    assert ph.spec is not None and ph.spec.factory is not None
    ref, kwargs = ph.spec.factory, dict(ph.spec.kwargs)

    def build(_: Placeholder) -> Any:
        try:
            fn = trust.resolve(ref, f"placeholder {ph.key!r} spec.factory", "factory")  # an exact reference the caller trusted
            try:
                inspect.signature(fn).bind(**kwargs)
            except ValueError:  # no signature to check (some builtins): the call decides
                pass
            return fn(**kwargs)
        except SafeSaveError:
            raise
        except Exception as e:  # the file chose the kwargs: wrong names or values are the file's fault
            raise FormatError(
                f"placeholder {ph.key!r}: the spec factory {ref} failed with the file's kwargs: {type(e).__name__}: {e}"
            ) from e

    return build


def _build(fn: Factory, ph: Placeholder, check: Callable[[Any], None], wrap_lazy: bool) -> Any:
    if wrap_lazy:
        return LazyResource(lambda: fn(ph), ph, check)
    value = fn(ph)
    check(unwrap(value))
    return value
