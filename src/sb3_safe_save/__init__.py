"""sb3_safe_save: safe, small and exact save/load for Stable-Baselines3 agents.

Use ``class MyDQN(SafeSaveMixin, DQN)`` or ``safe(DQN)``; ``save``/``load`` keep SB3's signatures.
"""

from sb3_safe_save._audit import AuditReport, Finding, assert_save_budget, audit
from sb3_safe_save._errors import (
    AlgorithmMismatchError,
    FormatError,
    IntegrityError,
    MissingResourceError,
    PickleRefusedError,
    ResourceMismatchError,
    SafeSaveError,
    StateMismatchError,
    UnresolvedResourceError,
    UnsupportedObjectError,
    UnsupportedVersionError,
    UntrustedTypeError,
)
from sb3_safe_save._manifest import FORMAT_VERSION, Hazard, Manifest, Placeholder, ResourceSpec
from sb3_safe_save._mixin import SafeSaveMixin, load_model, read_manifest, safe, save_model
from sb3_safe_save._resources import LazyResource, factory, lazy, register_resource, unregister_resource
from sb3_safe_save._trust import trust
from sb3_safe_save._vecnormalize import load_vecnormalize, save_vecnormalize
from sb3_safe_save._version import __version__
from sb3_safe_save._weights import file_sha256

__all__ = [
    "FORMAT_VERSION",
    "AlgorithmMismatchError",
    "AuditReport",
    "Finding",
    "FormatError",
    "Hazard",
    "IntegrityError",
    "LazyResource",
    "Manifest",
    "MissingResourceError",
    "PickleRefusedError",
    "Placeholder",
    "ResourceMismatchError",
    "ResourceSpec",
    "SafeSaveError",
    "SafeSaveMixin",
    "StateMismatchError",
    "UnresolvedResourceError",
    "UnsupportedObjectError",
    "UnsupportedVersionError",
    "UntrustedTypeError",
    "__version__",
    "assert_save_budget",
    "audit",
    "factory",
    "file_sha256",
    "lazy",
    "load_model",
    "load_vecnormalize",
    "read_manifest",
    "register_resource",
    "safe",
    "save_model",
    "save_vecnormalize",
    "trust",
    "unregister_resource",
]
