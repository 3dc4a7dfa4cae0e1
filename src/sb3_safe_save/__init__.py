"""sb3_safe_save: safe, small and exact save/load for Stable-Baselines3 agents.

Use ``class MyDQN(SafeSaveMixin, DQN)`` or ``safe(DQN)``; ``save``/``load`` keep SB3's signatures.
"""

import importlib as _importlib
import typing as _typing

from sb3_safe_save._errors import (
    AlgorithmMismatchError,
    CheckpointWriteError,
    FormatError,
    HazardError,
    HazardWarning,
    IntegrityError,
    LoadSourceIsADirectoryError,
    LoadSourceNotFoundError,
    MissingResourceError,
    PickleRefusedError,
    RemoteStorageUnavailableError,
    ResourceMismatchError,
    SafeSaveError,
    SaveTargetDirectoryMissingError,
    SaveTargetIsADirectoryError,
    SaveWarning,
    StateMismatchError,
    StockPickleRefusedError,
    UnresolvedResourceError,
    UnsupportedObjectError,
    UnsupportedVersionError,
    UntrustedTypeError,
)
from sb3_safe_save._external import External, external, unwrap
from sb3_safe_save._trust import trust
from sb3_safe_save._version import __version__

if _typing.TYPE_CHECKING:
    from sb3_safe_save._audit import AuditReport, Finding, assert_save_budget, audit
    from sb3_safe_save._checkpoint import (
        ResumeCheckpointCallback,
        list_checkpoints,
        load_checkpoint,
        save_checkpoint,
        wait_for_checkpoint,
    )
    from sb3_safe_save._file import read_manifest
    from sb3_safe_save._hub import load_from_hub, package_for_hub, push_to_hub
    from sb3_safe_save._manifest import FORMAT_VERSION, Hazard, Manifest, Placeholder, ResourceSpec
    from sb3_safe_save._mixin import SafeSaveMixin, safe
    from sb3_safe_save._persist import load_model, save_model
    from sb3_safe_save._policy import load_policy, save_policy
    from sb3_safe_save._resources import LazyResource, factory, lazy, register_resource, unregister_resource
    from sb3_safe_save._vecnormalize import SafeVecNormalize, load_vecnormalize, save_vecnormalize
    from sb3_safe_save._weights import file_sha256

# Imported on first use (PEP 562): they pull in pydantic, the codecs and the walker, which a module
# that only defines ``class MyDQN(SafeSaveMixin, DQN)`` does not need until it saves or loads; and
# SafeSaveMixin/safe import Stable-Baselines3 (and torch), which reading a file's header does not need
# (``sb3-safe-save inspect``, ``read_manifest``).
_LAZY = {
    "SafeSaveMixin": "sb3_safe_save._mixin",
    "safe": "sb3_safe_save._mixin",
    "AuditReport": "sb3_safe_save._audit",
    "Finding": "sb3_safe_save._audit",
    "assert_save_budget": "sb3_safe_save._audit",
    "audit": "sb3_safe_save._audit",
    "load_from_hub": "sb3_safe_save._hub",
    "package_for_hub": "sb3_safe_save._hub",
    "push_to_hub": "sb3_safe_save._hub",
    "ResumeCheckpointCallback": "sb3_safe_save._checkpoint",
    "list_checkpoints": "sb3_safe_save._checkpoint",
    "load_checkpoint": "sb3_safe_save._checkpoint",
    "save_checkpoint": "sb3_safe_save._checkpoint",
    "wait_for_checkpoint": "sb3_safe_save._checkpoint",
    "FORMAT_VERSION": "sb3_safe_save._manifest",
    "Hazard": "sb3_safe_save._manifest",
    "Manifest": "sb3_safe_save._manifest",
    "Placeholder": "sb3_safe_save._manifest",
    "ResourceSpec": "sb3_safe_save._manifest",
    "load_model": "sb3_safe_save._persist",
    "read_manifest": "sb3_safe_save._file",
    "save_model": "sb3_safe_save._persist",
    "load_policy": "sb3_safe_save._policy",
    "save_policy": "sb3_safe_save._policy",
    "LazyResource": "sb3_safe_save._resources",
    "factory": "sb3_safe_save._resources",
    "lazy": "sb3_safe_save._resources",
    "register_resource": "sb3_safe_save._resources",
    "unregister_resource": "sb3_safe_save._resources",
    "SafeVecNormalize": "sb3_safe_save._vecnormalize",
    "load_vecnormalize": "sb3_safe_save._vecnormalize",
    "save_vecnormalize": "sb3_safe_save._vecnormalize",
    "file_sha256": "sb3_safe_save._weights",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sb3_safe_save' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "FORMAT_VERSION",
    "AlgorithmMismatchError",
    "AuditReport",
    "CheckpointWriteError",
    "External",
    "Finding",
    "FormatError",
    "Hazard",
    "HazardError",
    "HazardWarning",
    "IntegrityError",
    "LazyResource",
    "LoadSourceIsADirectoryError",
    "LoadSourceNotFoundError",
    "Manifest",
    "MissingResourceError",
    "PickleRefusedError",
    "Placeholder",
    "RemoteStorageUnavailableError",
    "ResourceMismatchError",
    "ResourceSpec",
    "ResumeCheckpointCallback",
    "SafeSaveError",
    "SafeSaveMixin",
    "SafeVecNormalize",
    "SaveTargetDirectoryMissingError",
    "SaveTargetIsADirectoryError",
    "SaveWarning",
    "StateMismatchError",
    "StockPickleRefusedError",
    "UnresolvedResourceError",
    "UnsupportedObjectError",
    "UnsupportedVersionError",
    "UntrustedTypeError",
    "__version__",
    "assert_save_budget",
    "audit",
    "external",
    "factory",
    "file_sha256",
    "lazy",
    "list_checkpoints",
    "load_checkpoint",
    "load_from_hub",
    "load_model",
    "load_policy",
    "load_vecnormalize",
    "package_for_hub",
    "push_to_hub",
    "read_manifest",
    "register_resource",
    "safe",
    "save_checkpoint",
    "save_model",
    "save_policy",
    "save_vecnormalize",
    "trust",
    "unregister_resource",
    "unwrap",
    "wait_for_checkpoint",
]
