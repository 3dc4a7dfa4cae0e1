"""Write the committed stock-zip corpus: tiny agents saved by older SB3 releases, each in its own venv.

Run from the repository root (needs the package index; takes minutes)::

    python tests/data/make_stock_corpus.py [RELEASE ...]

For each release a venv is created under a temporary folder, the pinned packages below are installed
from the package index, and the script's ``--write`` half runs inside it: it trains PPO, DQN and SAC
with 8-unit networks for a few steps and writes ``tests/data/stock/sb3-<release>-<algo>.zip`` plus a
``.json`` with deterministic predictions on fixed observations and the first values of every
parameter, computed by that release. ``tests/test_stock.py`` loads each zip with the safe reader and
compares. torch is not installed per venv (GBs): the venv sees the running interpreter's torch through
a ``.pth`` file, after its own packages.
"""

from __future__ import annotations

import json
import os
import pathlib
import site
import subprocess
import sys
import tempfile

OUT = pathlib.Path(__file__).parent / "stock"
#: release -> pinned packages (besides torch); a release that does not install is skipped with its pip output
RELEASES: dict[str, list[str]] = {
    "1.8.0": ["stable-baselines3==1.8.0", "gym==0.21.0", "numpy==1.26.4", "cloudpickle==3.0.0", "pandas==2.1.4"],
    "2.0.0": ["stable-baselines3==2.0.0", "gymnasium==0.28.1", "numpy==1.26.4", "cloudpickle==3.0.0", "pandas==2.1.4"],
    "2.3.2": ["stable-baselines3==2.3.2", "gymnasium==0.29.1", "numpy==1.26.4", "cloudpickle==3.0.0", "pandas==2.1.4"],
    "2.6.0": ["stable-baselines3==2.6.0", "gymnasium==1.1.1", "numpy==1.26.4", "cloudpickle==3.1.1", "pandas==2.2.3"],
}
ALGOS = {"PPO": "CartPole-v1", "DQN": "CartPole-v1", "SAC": "Pendulum-v1"}


def write(release: str) -> None:
    """Inside the release's venv: train, save, record what this release predicts."""
    import numpy as np
    import stable_baselines3 as sb3

    gym_name = "gym" if release.startswith("1.") else "gymnasium"
    gym = __import__(gym_name)
    for name, env_id in ALGOS.items():
        algo = getattr(sb3, name)
        kwargs: dict[str, object] = {"policy_kwargs": {"net_arch": [8]}, "seed": 0}
        if name == "PPO":
            kwargs.update(n_steps=16, batch_size=16, n_epochs=1)
        else:
            kwargs.update(buffer_size=100, learning_starts=16)
        model = algo("MlpPolicy", gym.make(env_id), **kwargs)
        model.learn(32)
        stem = OUT / f"sb3-{release}-{name}"
        model.save(str(stem) + ".zip")
        rng = np.random.default_rng(0)
        low, high = model.observation_space.low, model.observation_space.high
        obs = rng.uniform(np.maximum(low, -2), np.minimum(high, 2), size=(8, *low.shape)).astype(np.float32)
        actions, _ = model.predict(obs, deterministic=True)
        params = {k: v.flatten()[:4].tolist() for k, v in model.policy.state_dict().items()}
        doc = {"algo": name, "sb3": sb3.__version__, "obs": obs.tolist(), "actions": actions.tolist(), "params": params}
        pathlib.Path(str(stem) + ".json").write_text(json.dumps(doc, indent=1) + "\n")


def build(release: str, root: pathlib.Path) -> str:
    """Create the venv and install the release; returns '' or why it was skipped."""
    venv = root / release
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", *RELEASES[release], "farama-notifications==0.0.4",
         "typing-extensions", "python-dateutil", "pytz", "tzdata", "six"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"pip exited {done.returncode}"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    torch_dir = pathlib.Path(__import__("torch").__file__).parent.parent
    extra = [str(torch_dir), *site.getsitepackages()]
    pathlib.Path(purelib, "zz_host_torch.pth").write_text("\n".join(dict.fromkeys(extra)) + "\n")
    run = subprocess.run(
        [str(python), __file__, "--write", release], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
    )
    if run.returncode != 0:
        return run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
    return ""


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"]:
        write(argv[1])
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for release in argv or list(RELEASES):
            why = build(release, pathlib.Path(tmp))
            print(f"SB3 {release}: {'written' if not why else 'skipped: ' + why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
