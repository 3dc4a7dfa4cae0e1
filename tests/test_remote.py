"""URL paths through fsspec: ``memory://`` always (fsspec installed), ``s3://`` against a moto server on loopback.

Nothing is mocked: the S3 tests start moto's real HTTP server on 127.0.0.1 and talk to it through s3fs
and botocore, with dummy credentials and no other network.
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stable_baselines3 import DQN, PPO

from _compare import assert_same_model
from sb3_safe_save import UnsupportedObjectError, audit, read_manifest, safe
from sb3_safe_save._cli import main
from sb3_safe_save._errors import RemoteStorageUnavailableError
from sb3_safe_save._persist import _open, _parse
from sb3_safe_save._remote import READ_AHEAD, is_url

fsspec = pytest.importorskip("fsspec", reason='fsspec is not installed: pip install "sb3-safe-save[remote]"')


def _ppo(net_arch: list[int]) -> Any:
    kwargs = {"n_steps": 16, "batch_size": 16, "n_epochs": 1, "seed": 0}
    model = safe(PPO)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": net_arch}, **kwargs)
    model.learn(16)
    return model


@pytest.fixture(scope="module")
def small() -> Any:
    return _ppo([8])


@pytest.fixture(scope="module")
def large() -> Any:
    """About 1.6 MB of weights and Adam state: far more than the header plus the read-ahead."""
    return _ppo([256, 256])


def test_is_url() -> None:
    assert is_url("s3://bucket/key") and is_url("memory://m") and is_url("gs://b/k.safetensors")
    assert not is_url("file:///tmp/m") and not is_url("/tmp/m") and not is_url(Path("/tmp/m")) and not is_url("m.safetensors")


# ------------------------------------------------------------------------------------------ memory://
def test_memory_round_trip(small: Any) -> None:
    url = f"memory://sb3-safe-save-{uuid.uuid4().hex}/agent"  # no suffix: saved as agent.safetensors, as for paths
    small.save(url)
    fs = fsspec.filesystem("memory")
    assert fs.exists(url + ".safetensors") and not fs.exists(url)
    assert_same_model(small, safe(PPO).load(url, device="cpu"))  # the suffix-less URL falls back, as for paths
    loaded = safe(PPO).load(url + ".safetensors", device="cpu")
    assert_same_model(small, loaded)
    assert read_manifest(url + ".safetensors").algorithm.endswith(":PPO")


def test_memory_failed_save_keeps_the_previous_object(small: Any) -> None:
    url = f"memory://sb3-safe-save-{uuid.uuid4().hex}/agent.safetensors"
    small.save(url)
    before = fsspec.filesystem("memory").cat_file(url)
    small.unsupported = lambda x: x  # no codec, pickling not allowed: save fails while walking
    try:
        with pytest.raises(UnsupportedObjectError):
            small.save(url)
    finally:
        del small.unsupported
    assert fsspec.filesystem("memory").cat_file(url) == before


def test_memory_replay_buffer_and_vecnormalize() -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_safe_save import load_vecnormalize, save_vecnormalize

    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, buffer_size=200, learning_starts=10, seed=0)
    model.learn(40)
    root = f"memory://sb3-safe-save-{uuid.uuid4().hex}"
    model.save_replay_buffer(f"{root}/buffer")
    other = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, buffer_size=200, seed=1)
    other.load_replay_buffer(f"{root}/buffer.safetensors")
    assert other.replay_buffer.pos == model.replay_buffer.pos
    np.testing.assert_array_equal(other.replay_buffer.observations, model.replay_buffer.observations)

    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0))
    venv.reset()
    venv.step(np.array([0]))
    save_vecnormalize(venv, f"{root}/vecnormalize")
    restored = load_vecnormalize(f"{root}/vecnormalize.safetensors", make_vec_env("CartPole-v1", n_envs=1))
    np.testing.assert_array_equal(restored.obs_rms.mean, venv.obs_rms.mean)


def test_file_url_is_a_local_path(small: Any, tmp_path: Path) -> None:
    small.save(f"file://{tmp_path}/agent")
    assert (tmp_path / "agent.safetensors").is_file() and not list(tmp_path.glob("*.tmp"))
    assert_same_model(small, safe(PPO).load(f"file://{tmp_path}/agent.safetensors", device="cpu"))


def test_missing_backend_names_the_extra(small: Any) -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed, so gs:// has its backend")
    with pytest.raises(RemoteStorageUnavailableError, match=r"sb3-safe-save\[remote\]") as info:
        small.save("gs://bucket/agent.safetensors")
    assert isinstance(info.value, ImportError)
    with pytest.raises(RemoteStorageUnavailableError):
        read_manifest("gs://bucket/agent.safetensors")


# ------------------------------------------------------------------------------------------- s3://
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """A bucket on a moto S3 server on loopback; yields the s3fs file system configured for it."""
    pytest.importorskip("s3fs", reason='s3fs is not installed: pip install "sb3-safe-save[remote]"')
    server_mod = pytest.importorskip("moto.server", reason='moto[server] is not installed: pip install "moto[server]"')
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
        }.items():
            mp.setenv(name, value)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        # how users point s3fs at a custom endpoint too (or FSSPEC_S3_ENDPOINT_URL)
        mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("models")
        try:
            yield fs
        finally:
            server.stop()


def test_s3_round_trip(s3: Any, large: Any) -> None:
    url = "s3://models/ppo/agent.safetensors"
    large.save(url)
    assert s3.exists(url)
    loaded = safe(PPO).load(url, device="cpu")
    assert_same_model(large, loaded)
    data = s3.cat_file(url)
    pinned = safe(PPO).load(url, device="cpu", expected_sha256=hashlib.sha256(data).hexdigest())
    assert pinned.num_timesteps == large.num_timesteps


def test_s3_audit_reads_the_header_only(s3: Any, large: Any) -> None:
    url = "s3://models/ppo/audited.safetensors"
    large.save(url)
    size = s3.size(url)
    with _open(url) as (f, found):  # what audit, read_manifest and inspect --no-sha256 do
        header, _ = _parse(f, found)
        fetched = f.cache.total_requested_bytes
    assert found == size > 1_000_000
    assert fetched <= header.body_start + READ_AHEAD + 8 and fetched < size // 4, (fetched, header.body_start, size)

    report = audit(url, max_bytes="10 MB")
    assert report.ok and report.total_bytes == size, report.table()


def test_s3_failed_save_keeps_the_previous_object(s3: Any, small: Any) -> None:
    url = "s3://models/keep/agent.safetensors"
    small.save(url)
    before = s3.cat_file(url)
    small.unsupported = lambda x: x
    try:
        with pytest.raises(UnsupportedObjectError):
            small.save(url)
    finally:
        del small.unsupported
    assert s3.cat_file(url) == before
    assert s3.ls("models/keep") == ["models/keep/agent.safetensors"]  # no temporary objects left behind
    assert_same_model(small, safe(PPO).load(url, device="cpu"))


def test_s3_cli_inspect_and_audit(s3: Any, small: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = "s3://models/cli/agent.safetensors"
    small.save(url)
    data = s3.cat_file(url)
    assert main(["inspect", "--format", "json", url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == url and doc["size_bytes"] == len(data) and doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["algorithm"].endswith(":PPO")

    assert main(["audit", "--format", "json", url]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reports"][0]["ok"] is True

    assert main(["inspect", "s3://models/cli/missing.safetensors"]) == 2
    assert "missing" in capsys.readouterr().err
