"""Write the golden files of the current format version into ``tests/data/v<FORMAT_VERSION>/``.

Golden files pin the file format: ``tests/test_format_compat.py`` loads each one with the current code
and compares its predictions with those recorded here when it was written. They must keep loading
for as long as their format version is supported, so **they are never regenerated**: the script
refuses a directory that exists. When the format changes (``FORMAT_VERSION`` bumps, see
``sb3_safe_save._manifest``), run it once to write ``tests/data/v<N>/``; older directories stay untouched.
Version 2 added a schedule (PPO's ``learning_rate`` is a lambda, stored as a ``schedule`` node) and the
saved random state.

Run from the repository root::

    .venv/bin/python tests/data/make_golden.py

It writes, for each agent, ``<name>.safetensors`` (each well under 100 KB: 8-unit networks, short
training) and one ``expected.json`` holding, per file, the algorithm, how to load it, fixed
observations and the deterministic actions the agent takes on them, plus a few scalar attributes.

The agents:

* ``dqn``: DQN on CartPole (replay buffer not stored, optimizer state stored);
* ``sac``: SAC on Pendulum with a learned entropy coefficient (``ent_coef="auto"``: ``log_ent_coef``
  and its own optimizer);
* ``ppo``: PPO on CartPole;
* ``lang_dqn``: the scenario ``CustomDQN`` from ``examples/lang_dqn.py``, whose Q-network consults an
  ``UnpicklableExpert``; the expert is a placeholder in the file, rebound at load with
  ``resources={"vlm_model": UnpicklableExpert()}``; the predictions are taken with ``use_expert``
  switched on (after saving, and again after loading: it is a plain module attribute the constructor
  sets, not stored), so they depend on the rebound expert.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "examples"))

N_OBS = 16


def observations(space: Any, seed: int) -> np.ndarray:
    space.seed(seed)
    return np.stack([space.sample() for _ in range(N_OBS)])


def build() -> dict[str, Any]:
    from stable_baselines3 import DQN, PPO, SAC

    from lang_dqn import UnpicklableExpert, make_model
    from sb3_safe_save import safe

    models: dict[str, tuple[Any, dict[str, Any]]] = {}
    dqn = safe(DQN)(
        "MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, buffer_size=200, learning_starts=32,
        target_update_interval=16, seed=0,
    )  # fmt: skip
    models["dqn"] = (dqn.learn(96), {})
    sac = safe(SAC)(
        "MlpPolicy",
        "Pendulum-v1",
        policy_kwargs={"net_arch": [8]},
        buffer_size=200,
        learning_starts=32,
        ent_coef="auto",
        seed=0,
    )
    models["sac"] = (sac.learn(96), {})
    ppo = safe(PPO)(
        "MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, n_epochs=2, policy_kwargs={"net_arch": [8]}, seed=0,
        learning_rate=lambda progress: 3e-4 * progress,  # a schedule without a class: a ``schedule`` node (v2)
    )  # fmt: skip
    models["ppo"] = (ppo.learn(64), {})
    lang = make_model(UnpicklableExpert(), net_arch=[8])
    lang.learn(96)
    models["lang_dqn"] = (lang, {"resources": {"vlm_model": "UnpicklableExpert()"}, "use_expert": True})
    return models


def main() -> None:
    from sb3_safe_save import FORMAT_VERSION, file_sha256, read_manifest

    out = HERE / f"v{FORMAT_VERSION}"
    if out.exists():
        sys.exit(f"{out} exists: golden files are never rewritten (see the module docstring)")
    out.mkdir(parents=True)
    expected: dict[str, Any] = {}
    for name, (model, load) in build().items():
        path = out / f"{name}.safetensors"
        model.save(path)
        if load.get("use_expert"):  # a plain module attribute: not stored, switched on after load
            model.policy.set_use_expert(True)
        obs = observations(model.observation_space, seed=123)
        actions, _ = model.predict(obs, deterministic=True)
        entry: dict[str, Any] = {
            "file": path.name,
            "class": type(model).__name__,
            "sha256": file_sha256(path),
            "format_version": read_manifest(path).format_version,
            "load": load,
            "observations": obs.tolist(),
            "actions": actions.tolist(),
            "num_timesteps": model.num_timesteps,
            "n_updates": getattr(model, "_n_updates", None),
        }
        if hasattr(model, "log_ent_coef"):
            entry["log_ent_coef"] = float(model.log_ent_coef.item())
        expected[name] = entry
        print(f"{path.relative_to(HERE.parent.parent)}: {path.stat().st_size} bytes")
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
