"""The public API is exactly ``__all__``; everything else is private (``_module``)."""

import importlib.metadata
import re
from pathlib import Path

import pytest

import sb3_safe_save

EXPECTED = {
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
    "StockPickleRefusedError",
    "RemoteStorageUnavailableError",
    "Placeholder",
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
}


def test_all_is_pinned() -> None:
    assert set(sb3_safe_save.__all__) == EXPECTED


def test_public_names_exist_and_nothing_else_is_public() -> None:
    for name in sb3_safe_save.__all__:
        assert hasattr(sb3_safe_save, name), name
    public = {n for n in dir(sb3_safe_save) if not n.startswith("_")}
    public -= {"zoo"}  # the command module of python -m sb3_safe_save.zoo (an attribute once imported), not API
    assert public <= EXPECTED | {n for n in public if n.startswith("_")}, public - EXPECTED


def test_every_error_is_a_safe_save_error() -> None:
    errors = [getattr(sb3_safe_save, n) for n in sb3_safe_save.__all__ if n.endswith("Error")]
    assert len(errors) == 20
    for cls in errors:
        assert issubclass(cls, sb3_safe_save.SafeSaveError), cls


def test_installed_version_matches() -> None:
    assert importlib.metadata.version("sb3-safe-save") == sb3_safe_save.__version__


def test_defining_a_safe_algorithm_does_not_import_the_machinery() -> None:
    """``SafeSaveMixin``/``safe`` stay light: pydantic, the codecs and the walker load on the first save or load."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from stable_baselines3 import DQN\n"
        "from sb3_safe_save import SafeSaveMixin, safe\n"
        "class MyDQN(SafeSaveMixin, DQN): pass\n"
        "safe(DQN)\n"
        "heavy = sorted(m for m in ('pydantic', 'sb3_safe_save._persist', 'sb3_safe_save._walker') if m in sys.modules)\n"
        "print(heavy)\n"
        "import sb3_safe_save\n"
        "sb3_safe_save.read_manifest\n"
        "print('sb3_safe_save._file' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", out
    assert out[1] == "True"


def test_one_version_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The version lives in _version.py: the CLI, every manifest and the changelog's newest release say it."""
    from stable_baselines3 import PPO

    from sb3_safe_save._cli import main

    version = sb3_safe_save.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"sb3-safe-save {version}\n"
    model = sb3_safe_save.safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs={"net_arch": [4]})
    model.save(tmp_path / "ppo")
    assert sb3_safe_save.read_manifest(tmp_path / "ppo.safetensors").versions.sb3_safe_save == version
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    newest = re.search(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE)
    assert newest is not None and newest.group(1) == version
