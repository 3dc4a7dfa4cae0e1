"""Bad input ends in a ``SafeSaveError`` subclass whose message says what, where and how to fix it."""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from safetensors.torch import save_file
from stable_baselines3 import DQN, PPO

import sb3_safe_save
from _stfile import edit_manifest
from lang_dqn import CustomDQN, CustomDQNPolicy, UnpicklableExpert, make_model
from sb3_safe_save import (
    AlgorithmMismatchError,
    FormatError,
    IntegrityError,
    LoadSourceIsADirectoryError,
    LoadSourceNotFoundError,
    MissingResourceError,
    SafeSaveError,
    StateMismatchError,
    UnsupportedObjectError,
    UnsupportedVersionError,
    UntrustedTypeError,
    safe,
    unwrap,
)


@pytest.fixture(scope="module")
def dqn_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [16]}, learning_starts=10, seed=0, device="cpu")
    model.learn(32)
    path = tmp_path_factory.mktemp("errors") / "dqn.safetensors"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    model = make_model(UnpicklableExpert(), net_arch=[16])
    path = tmp_path_factory.mktemp("expert") / "agent.safetensors"
    model.save(path)
    return path


# --------------------------------------------------------------------------------- missing resource
def test_missing_resource_is_reported_before_any_model_is_built(
    expert_file: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []

    def counting(cls: type, name: str) -> None:
        original = cls.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            built.append(name)
            original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)

    counting(CustomDQN, "algorithm")
    counting(CustomDQNPolicy, "policy")

    with pytest.raises(MissingResourceError) as info:
        CustomDQN.load(expert_file)
    assert built == [], "a model was built before the missing resource was reported"
    err = info.value
    assert isinstance(err, SafeSaveError) and isinstance(err, LookupError)
    assert err.keys == ["vlm_model"]
    msg = str(err)
    for needle in (
        "'vlm_model'",  # the key
        "policy_kwargs.vlm_model", "policy.q_net.vlm_model", "policy.q_net_target.vlm_model",  # where
        "lang_dqn.UnpicklableExpert",  # its type
        "stub-llm-7b",  # the hint (the expert's model name)
        "resources={'vlm_model':",  # the exact keyword to pass
    ):  # fmt: skip
        assert needle in msg, (needle, msg)
    assert not msg.startswith('"'), "KeyError-style quoting mangles the message"

    # given the resource, the same load builds the model exactly once
    expert = UnpicklableExpert()
    loaded = CustomDQN.load(expert_file, resources={"vlm_model": expert})
    assert built.count("algorithm") == 1 and built.count("policy") == 1
    assert sb3_safe_save.unwrap(loaded.policy.q_net.vlm_model) is expert


def test_missing_resource_via_read_manifest_is_inspectable(expert_file: pathlib.Path) -> None:
    """What a user does after the error: read the manifest to see what the file needs."""
    manifest = sb3_safe_save.read_manifest(expert_file)
    assert [p.key for p in manifest.placeholders] == ["vlm_model"]


# ----------------------------------------------------------------------------- wrong algorithm class
def test_wrong_algorithm_class(dqn_file: pathlib.Path) -> None:
    with pytest.raises(AlgorithmMismatchError) as info:
        safe(PPO).load(dqn_file)
    msg = str(info.value)
    assert isinstance(info.value, SafeSaveError)
    assert msg == (
        "this file holds a DQN model, but safe(PPO).load was called; load it with a DQN class, e.g. safe(DQN).load(path)"
    )


def test_same_base_algorithm_is_accepted(dqn_file: pathlib.Path) -> None:
    """A user subclass of DQN may load a safe(DQN) file (and vice versa): the base algorithm decides."""
    loaded = CustomDQN.load(dqn_file, device="cpu")
    assert type(loaded) is CustomDQN and loaded.num_timesteps == 32


def test_wrong_algorithm_class_for_the_scenario(expert_file: pathlib.Path) -> None:
    with pytest.raises(AlgorithmMismatchError, match="CustomDQN"):
        safe(PPO).load(expert_file, resources={"vlm_model": UnpicklableExpert()})


# ------------------------------------------------------------------------------ format version
def test_unknown_format_version(dqn_file: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "v99.safetensors"
    edit_manifest(dqn_file, out, lambda m: m.update(format_version=99))
    with pytest.raises(UnsupportedVersionError) as info:
        safe(DQN).load(out)
    msg = str(info.value)
    assert "99" in msg and "upgrade sb3_safe_save" in msg
    assert isinstance(info.value, FormatError) and isinstance(info.value, SafeSaveError)
    with pytest.raises(UnsupportedVersionError):
        sb3_safe_save.read_manifest(out)


def test_manifest_edited_without_checksum_is_an_integrity_error(dqn_file: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "edited.safetensors"
    edit_manifest(dqn_file, out, lambda m: m.update(format_version=99), fix_checksum=False)
    with pytest.raises(IntegrityError, match="checksum"):
        safe(DQN).load(out)


# --------------------------------------------------------------------------------- not our file
def test_random_bytes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(FormatError, match="not a safetensors file"):
        safe(DQN).load(path)
    with pytest.raises(FormatError):
        sb3_safe_save.read_manifest(path)


@pytest.mark.parametrize(
    "content", [b"", b"abc", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "], ids=["empty", "short", "empty-header"]
)
def test_tiny_files(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafeSaveError) as info:
        safe(DQN).load(path)
    assert isinstance(info.value, (FormatError, IntegrityError))


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"sb3_safe_save": "{}"}])
def test_plain_safetensors_file(tmp_path: pathlib.Path, metadata: dict[str, str] | None) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"weight": th.zeros(3, 2)}, str(path), metadata=metadata)
    with pytest.raises(FormatError) as info:
        safe(DQN).load(path)
    assert "sb3_safe_save" in str(info.value)


def test_stock_sb3_zip_mentions_convert(tmp_path: pathlib.Path) -> None:
    stock = DQN("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [16]}, device="cpu")
    stock.save(tmp_path / "stock.zip")
    with pytest.raises(FormatError) as info:
        safe(DQN).load(tmp_path / "stock.zip")
    msg = str(info.value)
    assert "convert" in msg and "zip" in msg
    with pytest.raises(FormatError, match="convert"):
        sb3_safe_save.read_manifest(tmp_path / "stock.zip")


def test_missing_file_is_a_file_not_found(tmp_path: pathlib.Path) -> None:
    # not a "bad file" but no file at all: still a FileNotFoundError, as SB3 raises it
    with pytest.raises(LoadSourceNotFoundError) as info:
        safe(DQN).load(tmp_path / "nope.safetensors")
    assert isinstance(info.value, FileNotFoundError) and info.value.filename == str(tmp_path / "nope.safetensors")


def test_empty_file_is_reported_as_empty(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "crashed.safetensors"
    path.write_bytes(b"")  # what a crashed stock save leaves
    with pytest.raises(FormatError, match=r"crashed\.safetensors is empty \(0 bytes\).*Load an earlier checkpoint"):
        safe(DQN).load(path)


def test_a_stock_zip_beside_a_missing_name_is_named_with_the_convert_command(tmp_path: pathlib.Path) -> None:
    DQN("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, device="cpu").save(tmp_path / "ppo.zip")
    (tmp_path / "ppo.zip").rename(tmp_path / "run.zip")
    with pytest.raises(LoadSourceNotFoundError) as info:
        safe(DQN).load(str(tmp_path / "run"))
    msg = str(info.value)
    assert f"{tmp_path / 'run.zip'} is there, a stock SB3 zip" in msg
    assert f"sb3-safe-save convert {tmp_path / 'run.zip'} {tmp_path / 'run.safetensors'}" in msg


def test_a_directory_points_to_load_checkpoint(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "checkpoint_100_steps"
    folder.mkdir()
    with pytest.raises(LoadSourceIsADirectoryError) as info:
        safe(DQN).load(folder)
    assert isinstance(info.value, IsADirectoryError)
    assert "is a directory, not a saved file" in str(info.value) and "sb3_safe_save.load_checkpoint(folder" in str(info.value)


def test_custom_objects_keyed_by_a_placeholder_key_is_the_resource(expert_file: pathlib.Path) -> None:
    expert = UnpicklableExpert()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither ignored nor warned about
        loaded = CustomDQN.load(expert_file, custom_objects={"vlm_model": expert})
    assert unwrap(loaded.policy.q_net.vlm_model) is expert and unwrap(loaded.policy_kwargs["vlm_model"]) is expert


def test_safe_classes_have_their_own_name_and_messages_name_the_call(tmp_path: pathlib.Path) -> None:
    algo = safe(DQN)
    assert algo.__qualname__ == "SafeDQN" and algo.__module__ == __name__ and repr(algo) == f"<class '{__name__}.SafeDQN'>"
    model = algo(CustomDQNPolicy, "CartPole-v1", policy_kwargs={"net_arch": [8]}, buffer_size=100, device="cpu")
    model.save(tmp_path / "m")
    assert sb3_safe_save.read_manifest(tmp_path / "m.safetensors").algorithm == "stable_baselines3.dqn.dqn:DQN"
    with pytest.raises(UntrustedTypeError) as info:
        safe(DQN).load(tmp_path / "m")
    assert "safe(DQN).load(path, trusted=['lang_dqn:CustomDQNPolicy'])" in str(info.value)
    assert "DQN.load(" not in str(info.value).replace("safe(DQN).load(", "")  # never stock DQN.load, which lacks trusted=
    with pytest.raises(UntrustedTypeError) as info:
        sb3_safe_save.load_policy(tmp_path / "m")
    assert "sb3_safe_save.load_policy(path, trusted=['lang_dqn:CustomDQNPolicy'])" in str(info.value)
    assert ".load(path" not in str(info.value)


# ------------------------------------------------------------------------------------- at save
def test_unsupported_object_lists_path_and_fixes(tmp_path: pathlib.Path) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [16]}, device="cpu")
    path = tmp_path / "m.safetensors"
    model.save(path)
    before = path.read_bytes()

    model.my_fn = lambda x: x  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedObjectError) as info:
        model.save(path)
    err = info.value
    assert isinstance(err, SafeSaveError) and isinstance(err, TypeError)
    assert [p for p, _, _ in err.problems] == ["my_fn"]
    msg = str(err)
    assert "my_fn" in msg and "function" in msg
    assert "exclude=['my_fn']" in msg
    assert "resources=" in msg and "allow_pickle=True" in msg
    # the failed save left the previous file untouched and no temporary files behind
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]

    # each fix works
    model.save(tmp_path / "excluded", exclude=["my_fn"])
    assert "my_fn" not in sb3_safe_save.read_manifest(tmp_path / "excluded.safetensors").data
    model.save(tmp_path / "declared", resources={"my_fn": model.my_fn})  # type: ignore[attr-defined]
    (ph,) = sb3_safe_save.read_manifest(tmp_path / "declared.safetensors").placeholders
    assert ph.key == "my_fn" and ph.paths == ["my_fn"] and ph.reason == "declared"


def test_unsupported_objects_are_all_reported_at_once(tmp_path: pathlib.Path) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [16]}, device="cpu")
    model.fns = {"a": lambda: 1, "b": [lambda: 2]}  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedObjectError) as info:
        model.save(tmp_path / "m")
    assert {p for p, _, _ in info.value.problems} == {"fns.a", "fns.b[0]"}


def test_save_to_a_directory(tmp_path: pathlib.Path) -> None:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [16]}, device="cpu")
    (tmp_path / "best").mkdir()
    model.save(tmp_path / "best")  # as SB3 (which writes best.zip): the suffix is added first, then it is a file
    assert (tmp_path / "best.safetensors").is_file()
    (tmp_path / "best.safetensors").unlink()
    (tmp_path / "best.safetensors").mkdir()
    with pytest.raises(SafeSaveError) as info:
        model.save(tmp_path / "best")
    assert isinstance(info.value, IsADirectoryError)  # SB3 would write best.zip_2 instead; still catchable as such
    assert "is a directory" in str(info.value) and "model.safetensors" in str(info.value)
    (tmp_path / "best").rmdir()
    (tmp_path / "best.safetensors").rmdir()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_bytes(b"")  # a missing directory is created, as in SB3; one that cannot be, raises
    with pytest.raises(SafeSaveError) as info:
        model.save(tmp_path / "file" / "model")
    assert isinstance(info.value, FileNotFoundError)
    assert "cannot create the directory" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --------------------------------------------------------------------------------------- at load
def test_policy_kwargs_mismatch_at_load(dqn_file: pathlib.Path) -> None:
    with pytest.raises(StateMismatchError) as info:
        safe(DQN).load(dqn_file, policy_kwargs={"net_arch": [32]})
    msg = str(info.value)
    assert "policy_kwargs" in msg and "custom_objects" in msg
    # the same policy_kwargs are accepted (as in SB3)
    stored = safe(DQN).load(dqn_file).policy_kwargs
    safe(DQN).load(dqn_file, policy_kwargs=dict(stored))


def test_wrong_env_spaces(dqn_file: pathlib.Path) -> None:
    with pytest.raises(StateMismatchError, match=r"[Oo]bservation spaces do not match") as info:
        safe(DQN).load(dqn_file, env=gym.make("MountainCar-v0"))
    assert isinstance(info.value, ValueError)  # what SB3 raises there, still catchable as such


def test_unknown_resource_key_warns(expert_file: pathlib.Path) -> None:
    with pytest.warns(UserWarning, match="match no placeholder"):
        CustomDQN.load(expert_file, resources={"vlm_model": UnpicklableExpert(), "typo": 1})


def test_all_errors_share_one_base() -> None:
    errors = [getattr(sb3_safe_save, n) for n in sb3_safe_save.__all__ if n.endswith("Error")]
    assert len(errors) >= 11
    assert all(issubclass(e, SafeSaveError) for e in errors)
