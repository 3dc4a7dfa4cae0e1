"""The public API is exactly ``__all__``; everything else is private (``_module``)."""

import importlib.metadata

import sb3_safe_save

EXPECTED = {
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
}


def test_all_is_pinned() -> None:
    assert set(sb3_safe_save.__all__) == EXPECTED


def test_public_names_exist_and_nothing_else_is_public() -> None:
    for name in sb3_safe_save.__all__:
        assert hasattr(sb3_safe_save, name), name
    public = {n for n in dir(sb3_safe_save) if not n.startswith("_")}
    assert public <= EXPECTED | {n for n in public if n.startswith("_")}, public - EXPECTED


def test_every_error_is_a_safe_save_error() -> None:
    errors = [getattr(sb3_safe_save, n) for n in sb3_safe_save.__all__ if n.endswith("Error")]
    assert len(errors) == 12
    for cls in errors:
        assert issubclass(cls, sb3_safe_save.SafeSaveError), cls


def test_installed_version_matches() -> None:
    assert importlib.metadata.version("sb3-safe-save") == sb3_safe_save.__version__
