"""Smoke runs of each extra, in a venv that holds the package with that extra and nothing else (``make test-extras``).

Usage: ``python tests/extras_smoke.py EXTRA`` with EXTRA one of contrib, remote, zoo, hub. Each run does what the
extra is for, as the README shows it, in a temporary folder, with no network: exit 0 when it worked. Not a pytest
module (the venvs hold no pytest): it uses only the package, its dependencies and the extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def _run(*args: str) -> None:
    """Run a command with this venv's Python, echoing it; any failure ends the smoke run."""
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def _same_weights(a: object, b: object) -> None:
    import torch

    left, right = a.policy.state_dict(), b.policy.state_dict()  # type: ignore[attr-defined]
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(right[name], tensor), name


def smoke_contrib(work: Path) -> None:
    """Save and load an sb3-contrib algorithm (trusted by default) and an SB3 one, exactly."""
    from sb3_contrib import QRDQN, TQC

    from sb3_safe_save import safe

    for algo, env, kwargs in ((QRDQN, "CartPole-v1", {"learning_starts": 16}), (TQC, "Pendulum-v1", {"learning_starts": 16})):
        model = safe(algo)("MlpPolicy", env, buffer_size=256, batch_size=16, seed=0, **kwargs)
        model.learn(32)
        model.save(work / algo.__name__)
        loaded = safe(algo).load(work / f"{algo.__name__}.safetensors")
        _same_weights(model, loaded)
        assert loaded.num_timesteps == model.num_timesteps
        print(f"{algo.__name__}: saved and loaded exactly")


def smoke_remote(work: Path) -> None:
    """Save, audit and load through a ``memory://`` URL (fsspec), and the CLI's inspect/audit of it."""
    from stable_baselines3 import PPO

    from sb3_safe_save import audit, safe

    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, seed=0)
    model.learn(64)
    model.save("memory://smoke/runs/ppo")
    loaded = safe(PPO).load("memory://smoke/runs/ppo.safetensors")
    _same_weights(model, loaded)
    print(audit("memory://smoke/runs/ppo.safetensors").table())
    # the CLI runs in another process, where memory:// is empty: check it reads fsspec URLs through file://
    model.save(work / "ppo")
    _run("-m", "sb3_safe_save", "inspect", "--no-sha256", (work / "ppo.safetensors").as_uri())
    _run("-m", "sb3_safe_save", "audit", (work / "ppo.safetensors").as_uri())


def smoke_zoo(work: Path) -> None:
    """rl-zoo3's train, enjoy and a continued train through ``python -m sb3_safe_save.zoo``: no pickle written."""
    os.chdir(work)
    zoo = ("-m", "sb3_safe_save.zoo")
    _run(*zoo, "train", "--algo", "ppo", "--env", "CartPole-v1", "-n", "2000", "-f", "logs", "--save-freq", "1000")
    _run(*zoo, "enjoy", "--algo", "ppo", "--env", "CartPole-v1", "-f", "logs", "--no-render", "-n", "200")
    model_file = "logs/ppo/CartPole-v1_1/CartPole-v1.safetensors"
    _run(*zoo, "train", "--algo", "ppo", "--env", "CartPole-v1", "-n", "2000", "-f", "logs", "-i", model_file)
    pickles = [p for p in Path("logs").rglob("*") if p.suffix in (".pkl", ".zip")]
    assert not pickles, pickles
    _run("-m", "sb3_safe_save", "audit", model_file, "logs/ppo/CartPole-v1_2/CartPole-v1.safetensors")
    # push without uploading: the repo folder a run would share (needs no huggingface_hub)
    _run(
        *zoo,
        "push",
        "--algo",
        "ppo",
        "--env",
        "CartPole-v1",
        "-f",
        "logs",
        "--repo-id",
        "me/ppo-cartpole",
        "--output",
        "hub-run",
    )
    shared = sorted(p.name for p in Path("hub-run").iterdir())
    assert {"ppo-CartPole-v1.safetensors", "README.md", "config.yml"} <= set(shared), shared
    print(f"zoo: trained, enjoyed, continued and packaged ({', '.join(shared)}); no .pkl/.zip under logs/")


def smoke_hub(work: Path) -> None:
    """package_for_hub, then load_from_hub from an offline Hub cache holding that folder (no network)."""
    import hashlib

    from stable_baselines3 import PPO

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = work / "hf-home" / "hub"
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf-home"), HF_HUB_CACHE=str(cache))
    from sb3_safe_save import load_from_hub, package_for_hub, safe  # after the environment: huggingface_hub reads it

    model = safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, seed=0)
    model.learn(64)
    folder = package_for_hub(model, work / "hub-repo")
    print((folder / "README.md").read_text()[:400], "...", flush=True)
    repo = cache / "models--me--ppo-cartpole"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    sha256 = hashlib.sha256((folder / "ppo-CartPole-v1.safetensors").read_bytes()).hexdigest()
    loaded = load_from_hub("me/ppo-cartpole", "ppo-CartPole-v1.safetensors", revision=commit, expected_sha256=sha256)
    _same_weights(model, loaded)
    print("hub: packaged, then loaded offline from the cache with the card's SHA-256")


SMOKES: dict[str, Callable[[Path], None]] = {
    "contrib": smoke_contrib,
    "remote": smoke_remote,
    "zoo": smoke_zoo,
    "hub": smoke_hub,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SMOKES:
        print(f"usage: python tests/extras_smoke.py {{{','.join(SMOKES)}}}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix=f"extras-{argv[0]}-") as tmp:
        SMOKES[argv[0]](Path(tmp))
    print(f"[{argv[0]}] smoke run passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
