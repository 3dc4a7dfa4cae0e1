"""Trust rules: which import references a file may make, and the only place that imports them.

A file names classes and functions as ``"package.module:QualName"`` strings. At load, every such
reference is checked against the trust list *before anything is imported* (phase 2 of the load);
only then does ``import_ref`` import them (phase 3).

Trusted by default:

* anything under ``stable_baselines3`` and ``sb3_contrib``;
* gymnasium space classes (``gymnasium.spaces``);
* torch activation classes (``torch.nn.modules.activation``) and optimizers (``torch.optim``);
* numpy scalar types (``numpy:float32`` ...);
* the module that defines the class you call ``load`` on (it is imported already, so trusting it
  runs no new code).

Everything else must be trusted explicitly, per call with ``load(..., trusted=[MyPolicy, "pkg.mod.Name"])``
or process-wide with ``sb3_safe_save.trust(...)``. ``trusted=True`` is refused: there is no "trust all".
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

TrustSpec = Iterable["type | str | Any"]

_DEFAULT_PREFIXES: tuple[str, ...] = (
    "stable_baselines3.",
    "sb3_contrib.",
    "gymnasium.spaces.",
    "torch.nn.modules.activation:",
    "torch.optim.",
)
_NUMPY_SCALARS = frozenset(
    f"numpy:{name}"
    for name in (
        "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "longlong", "ulonglong", "intc", "uintc", "half", "single", "double",
    )
)  # fmt: skip

_lock = threading.Lock()
_registered: set[str] = set()


def ref_of(obj: Any) -> str:
    """The import reference ``"module:qualname"`` of a class or function."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"{obj!r} has no __module__/__qualname__ and cannot be referenced by import path")
    return f"{module}:{qualname}"


def resolves_to(ref: str, obj: Any) -> bool:
    """True if ``ref`` names exactly ``obj`` in an already imported module (used at save time)."""
    module_name, _, qualname = ref.partition(":")
    if "<" in qualname:  # <locals>, <lambda>
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


def _normalise(item: Any) -> str:
    if isinstance(item, str):
        return item
    return ref_of(item)


def trust(*items: type | str | Any) -> None:
    """Trust classes or functions process-wide, for every later ``load``.

    :param items: class or function objects, ``"module.QualName"`` / ``"module:QualName"`` strings,
        or ``"package.*"`` to trust a whole package
    """
    with _lock:
        _registered.update(_normalise(i) for i in items)


class TrustList:
    """The trust decisions for one load: the defaults, ``trust(...)`` registrations and ``trusted=``."""

    def __init__(self, trusted: TrustSpec | None, home_module: str | None) -> None:
        if isinstance(trusted, bool):
            raise TypeError(
                f"trusted={trusted} is not accepted: there is no 'trust everything' switch. "
                "Pass the classes or 'module.Name' strings that the UntrustedTypeError lists."
            )
        with _lock:
            extra = set(_registered)
        if trusted is not None:
            extra.update(_normalise(i) for i in ([trusted] if isinstance(trusted, (str, type)) else trusted))
        self._exact = {i.replace(":", ".") for i in extra if not i.endswith(".*")}
        packages = [i[:-2] for i in extra if i.endswith(".*")]
        self._prefixes = [p for pkg in packages for p in (pkg + ".", pkg + ":")]
        if home_module:
            self._prefixes.append(home_module + ":")

    def why(self, ref: str) -> str | None:
        """``"explicit"`` (trusted by the user), ``"default"`` (default list) or None (untrusted)."""
        if ref.replace(":", ".") in self._exact or any(ref.startswith(p) for p in self._prefixes):
            return "explicit"
        if ref in _NUMPY_SCALARS or any(ref.startswith(p) for p in _DEFAULT_PREFIXES):
            return "default"
        return None

    def untrusted(self, refs: Iterable[str]) -> list[str]:
        return sorted({r for r in refs if self.why(r) is None})


def import_ref(ref: str, *, default_trust: bool) -> Any:
    """Import a reference that passed the trust check and return the object it names.

    References trusted only by the default list must name classes (defence in depth: the default
    list trusts SB3 classes such as policies and schedules, not every function in those packages).
    """
    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if ref.startswith("numpy:") and not (isinstance(obj, type) and issubclass(obj, np.generic)):
        raise TypeError(f"{ref} is not a numpy scalar type")
    if default_trust and not isinstance(obj, type):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a class; trust it explicitly with trusted=[{ref!r}]")
    return obj
