"""Format compatibility: the committed golden files of every supported format version still load.

The files under ``tests/data/v<N>/`` were written by ``tests/data/make_golden.py`` with format version
N; ``expected.json`` next to them records what each agent predicted when it was saved. A change
that makes one of these fail breaks users' saved agents: bump ``FORMAT_VERSION`` and keep a loader
for the old version instead (see ``sb3_safe_save._manifest``).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN, PPO, SAC

from lang_dqn import CustomDQN, UnpicklableExpert
from sb3_safe_save import file_sha256, read_manifest, safe
from sb3_safe_save._manifest import SUPPORTED_VERSIONS

DATA = Path(__file__).parent / "data"
CLASSES: dict[str, Any] = {"DQN": safe(DQN), "SAC": safe(SAC), "PPO": safe(PPO), "CustomDQN": CustomDQN}
RESOURCES = {"UnpicklableExpert()": UnpicklableExpert}
CASES = [
    (version_dir.name, name, entry)
    for version_dir in sorted(DATA.glob("v*"))
    for name, entry in json.loads((version_dir / "expected.json").read_text()).items()
]


def test_every_supported_version_has_golden_files() -> None:
    versions = {int(d.name[1:]) for d in DATA.glob("v*") if (d / "expected.json").exists()}
    assert versions == set(SUPPORTED_VERSIONS)
    assert {name for v, name, _ in CASES if v == "v1"} >= {"dqn", "sac", "ppo", "lang_dqn"}


@pytest.mark.parametrize(("version", "name", "entry"), CASES, ids=[f"{v}-{n}" for v, n, _ in CASES])
def test_golden_file_loads_and_predicts(
    version: str, name: str, entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = DATA / version / entry["file"]
    assert path.stat().st_size < 100_000
    assert file_sha256(path) == entry["sha256"], "the golden file changed: golden files must never be rewritten"
    manifest = read_manifest(path)
    assert manifest.format_version == entry["format_version"] == int(version[1:])

    resources = {key: RESOURCES[spec]() for key, spec in entry["load"].get("resources", {}).items()}
    for owner, attr in [(pickle, "loads"), (pickle, "load"), (cloudpickle, "loads"), (th, "load")]:
        monkeypatch.setattr(owner, attr, _refuse)
    model = CLASSES[entry["class"]].load(path, resources=resources, expected_sha256=entry["sha256"])
    if entry["load"].get("use_expert"):
        model.policy.set_use_expert(True)

    assert model.num_timesteps == entry["num_timesteps"]
    assert getattr(model, "_n_updates", None) == entry["n_updates"]
    if "log_ent_coef" in entry:
        assert model.log_ent_coef.item() == pytest.approx(entry["log_ent_coef"], rel=1e-6)
    obs = np.asarray(entry["observations"], dtype=model.observation_space.dtype)
    actions, _ = model.predict(obs, deterministic=True)
    expected = np.asarray(entry["actions"])
    assert actions.shape == expected.shape
    if np.issubdtype(expected.dtype, np.integer):
        assert np.array_equal(actions, expected)
    else:  # continuous actions: exact on the machine that wrote them, float32 rounding elsewhere
        np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)
    if resources:
        assert all(r.calls > 0 for r in resources.values()), "the rebound expert was not consulted"


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("loading a golden file must not unpickle anything")
