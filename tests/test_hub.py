"""Sharing on the Hugging Face Hub: the packaged folder and model card, upload through HfApi, download offline."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("yaml")  # comes with rl-zoo3 / huggingface_hub; make test-min has neither

import stable_baselines3
import torch as th
import yaml
from stable_baselines3 import PPO

from sb3_safe_save import (
    FormatError,
    IntegrityError,
    file_sha256,
    load_from_hub,
    package_for_hub,
    push_to_hub,
    read_manifest,
    safe,
)

huggingface_hub = pytest.importorskip("huggingface_hub")
# a submodule is not an attribute of the lazy package until something imports it: import it here, so the
# tests below do not depend on which other tests ran first in this worker
pytest.importorskip("huggingface_hub.constants")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: everything here is offline."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model() -> Any:
    agent = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, policy_kwargs={"net_arch": [8]})
    agent.learn(32)
    return agent


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    meta: dict[str, Any] = yaml.safe_load(card.split("---\n")[1])
    return meta


def test_package_writes_agent_card_and_config(model: Any, tmp_path: Path) -> None:
    folder = package_for_hub(model, tmp_path / "repo", tags=["my-tag"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "ppo-CartPole-v1.safetensors"]
    agent_file = folder / "ppo-CartPole-v1.safetensors"
    sha256 = file_sha256(agent_file)
    n_params = sum(p.numel() for p in model.policy.parameters())

    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "stable-baselines3"
    assert meta["tags"][:4] == ["CartPole-v1", "deep-reinforcement-learning", "reinforcement-learning", "stable-baselines3"]
    assert "my-tag" in meta["tags"]
    assert f"| SHA-256 | `{sha256}` |" in card
    assert "| algorithm | `stable_baselines3.ppo.ppo.PPO` |" in card
    assert f"| file | `ppo-CartPole-v1.safetensors`, {agent_file.stat().st_size:,} bytes |" in card
    assert f"| policy | {n_params:,} parameters, {4 * n_params:,} bytes |" in card
    assert f"stable-baselines3 {stable_baselines3.__version__}" in card
    assert "None: the file is self-contained." in card
    assert f'expected_sha256="{sha256}"' in card

    config = json.loads((folder / "config.json").read_text())
    assert config["sha256"] == sha256
    assert config["env_id"] == "CartPole-v1"
    assert config["filename"] == "ppo-CartPole-v1.safetensors"
    assert config["policy_parameters"] == n_params
    assert config["versions"]["stable_baselines3"] == stable_baselines3.__version__
    assert config["hyperparameters"]["n_steps"] == 32
    assert config["placeholders"] == []


def test_card_lists_the_live_resources_an_agent_needs(tmp_path: Path) -> None:
    from lang_dqn import UnpicklableExpert, make_model

    agent = make_model(UnpicklableExpert(name="stub-llm-7b"), net_arch=[8])
    folder = package_for_hub(agent, tmp_path / "repo", env_id="CartPole-v1")
    card = (folder / "README.md").read_text()
    assert "- this agent needs a live `vlm_model` at load: `resources={'vlm_model': obj}`" in card
    assert "| `vlm_model` | `lang_dqn.UnpicklableExpert` |" in card
    assert "resources={...})" in card  # the usage snippet says it too
    (placeholder,) = read_manifest(folder / "customdqn-CartPole-v1.safetensors").placeholders
    assert f"| {placeholder.reason} |" in card
    config = json.loads((folder / "config.json").read_text())
    assert [p["key"] for p in config["placeholders"]] == ["vlm_model"]
    assert config["placeholders"][0]["reason"] == placeholder.reason
    assert config["placeholders"][0]["paths"] == placeholder.paths


def test_package_a_saved_file_and_refuse_bad_names(model: Any, tmp_path: Path) -> None:
    model.save(tmp_path / "agent.safetensors")
    folder = package_for_hub(tmp_path / "agent.safetensors", tmp_path / "repo", env_id="ALE/Pong-v5")
    assert (folder / "ppo-ALE-Pong-v5.safetensors").read_bytes() == (tmp_path / "agent.safetensors").read_bytes()
    with pytest.raises(ValueError, match="env_id"):
        package_for_hub(tmp_path / "agent.safetensors", tmp_path / "repo2")
    with pytest.raises(ValueError, match=r"plain file name ending in \.safetensors"):
        package_for_hub(model, tmp_path / "repo3", filename="../agent.zip")
    with pytest.raises(TypeError, match="saves with pickle"):
        package_for_hub(PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32), tmp_path / "repo4")


def test_package_an_rl_zoo3_run_with_its_other_files(model: Any, tmp_path: Path) -> None:
    run = tmp_path / "logs" / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    model.save(run / "CartPole-v1.safetensors")
    (run / "CartPole-v1" / "config.yml").write_text("n_steps: 32\n")
    extra = [run / "CartPole-v1" / "config.yml"]
    folder = package_for_hub(run / "CartPole-v1.safetensors", tmp_path / "repo", env_id="CartPole-v1", extra_files=extra)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "config.yml",
        "ppo-CartPole-v1.safetensors",
    ]
    sha256 = file_sha256(folder / "config.yml")
    assert f"| `config.yml` | `{sha256}` |" in (folder / "README.md").read_text()
    assert json.loads((folder / "config.json").read_text())["extra_files"] == {"config.yml": sha256}
    (run / "CartPole-v1" / "vecnormalize.pkl").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="pickles"):
        package_for_hub(model, tmp_path / "repo2", extra_files=[run / "CartPole-v1" / "vecnormalize.pkl"])
    with pytest.raises(ValueError, match=r"already has a file named 'config\.json'"):
        package_for_hub(model, tmp_path / "repo3", extra_files=[folder / "config.json"])


def test_push_is_one_upload_folder_call(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> None:
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self: Any, **kwargs: Any) -> str:
        calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())}))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert push_to_hub(model, "me/ppo-cartpole", private=True) == "commit-info"
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/ppo-cartpole", "private": True, "exist_ok": True}
    upload = calls[1][1]
    assert upload["repo_id"] == "me/ppo-cartpole"
    assert upload["files"] == ["README.md", "config.json", "ppo-CartPole-v1.safetensors"]
    assert upload["revision"] is None
    assert upload["commit_message"] == "Upload agent (sb3_safe_save format)"


def test_card_usage_names_the_repo(model: Any, tmp_path: Path) -> None:
    card = (package_for_hub(model, tmp_path / "repo", repo_id="me/ppo-cartpole") / "README.md").read_text()
    assert 'model = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors", revision="<commit>",' in card


@pytest.fixture
def hub_cache(model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A Hub cache, offline, holding me/ppo-cartpole at COMMIT (main points to it), laid out as hf_hub_download expects."""
    folder = package_for_hub(model, tmp_path / "repo")
    cache = tmp_path / "hf-home" / "hub"
    repo = cache / "models--me--ppo-cartpole"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf-home")), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these at import: set its constants too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    return cache, file_sha256(folder / "ppo-CartPole-v1.safetensors")


def test_load_from_hub_through_the_offline_cache(model: Any, hub_cache: tuple[Path, str], no_pickle: None) -> None:
    _, sha256 = hub_cache
    loaded = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors")  # main -> COMMIT, algorithm from the file
    assert type(loaded).__name__ == "PPO" and type(loaded) is safe(PPO)
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[name], tensor), name
    pinned = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors", revision=COMMIT, expected_sha256=sha256)
    assert pinned.num_timesteps == model.num_timesteps
    with pytest.raises(IntegrityError):
        load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors", revision=COMMIT, expected_sha256="0" * 64)


def test_load_from_hub_reads_stock_zips_without_running_them(model: Any, hub_cache: tuple[Path, str]) -> None:
    """A huggingface_sb3 repo's stock .zip loads through the restricted reader; no TRUST_REMOTE_CODE (issue 25)."""
    cache, _ = hub_cache
    stock = cache / "models--me--ppo-cartpole" / "snapshots" / COMMIT / "ppo-CartPole-v1.zip"
    PPO.save(model, stock)
    loaded = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.zip")  # algorithm guessed from the policy class
    assert type(loaded) is safe(PPO)
    for name, tensor in model.policy.state_dict().items():
        assert th.equal(loaded.policy.state_dict()[name], tensor), name
    assert load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.zip", expected_sha256=file_sha256(stock)) is not None
    with pytest.raises(IntegrityError):
        load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.zip", expected_sha256="0" * 64)
    with pytest.raises(FormatError, match="loads sb3_safe_save files"):
        load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.pkl")
