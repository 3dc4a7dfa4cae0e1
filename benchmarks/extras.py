"""The smaller checks: walker + audit cost, the attached expert's effect on save, import time."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy

import sb3_safe_save
from benchmarks.models import BoxEnv, make_dqn, make_expert
from benchmarks.runner import summary, time_interleaved
from sb3_safe_save import read_manifest, safe
from sb3_safe_save._persist import snapshot_model


class TaggedPolicy(ActorCriticPolicy):
    """An MlpPolicy that accepts (and keeps) an arbitrary ``tags`` structure through ``policy_kwargs``."""

    def __init__(self, *args: Any, tags: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tags = tags


def _records(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"{prefix}{i}", "score": i / 3} for i in range(n)]


def count_objects(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(count_objects(k) + count_objects(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 1 + sum(count_objects(v) for v in value)
    return 1


def walker_cost(work: Path, reps: int) -> dict[str, Any]:
    """``snapshot_model`` (the save-side walk) and the audit of the saved file, on a model with 10,000+ objects."""
    tags = _records(715, "tag")  # 715 dicts x (3 keys + 3 values) + the list: ~5,000 objects
    model = safe(PPO)(TaggedPolicy, BoxEnv(), n_steps=8, batch_size=8, policy_kwargs={"tags": tags, "net_arch": [64, 64]})
    model.run_info = {"episodes": _records(715, "ep")}  # type: ignore[attr-defined]
    n_objects = count_objects(model.policy_kwargs) + count_objects(model.run_info)  # type: ignore[attr-defined]
    path = work / "walker.safetensors"
    model.save(path)
    audit = getattr(sb3_safe_save, "audit", None)
    fns = {"walk": lambda: snapshot_model(model), "read_manifest": lambda: read_manifest(path)}
    if callable(audit):  # audit of a live model walks it again, as save would; audit of a file reads its header
        fns["audit_model"] = lambda: audit(model, trusted=[TaggedPolicy])
        fns["audit_file"] = lambda: audit(path, trusted=[TaggedPolicy])
    times = time_interleaved(fns, reps)
    audit_key = "audit_file" if "audit_file" in times else "read_manifest"
    total = statistics.median(times["walk"]) + statistics.median(times[audit_key])
    return {"n_objects": n_objects, "audit_fn": audit_key, **{k: summary(v) for k, v in times.items()}, "total_s": total}


def expert_overhead(work: Path, reps: int) -> dict[str, Any]:
    """This library's save of the core-scenario DQN without an expert, with a 200 MB one and with a 7B one on meta."""
    models = {kind: make_dqn(make_expert(kind)) for kind in ("none", "200MB", "7B")}
    paths = {kind: work / f"expert-{kind}.safetensors" for kind in models}
    fns = {kind: (lambda m=m, p=paths[kind]: m.save(p)) for kind, m in models.items()}
    times = time_interleaved(fns, reps, warmup=2)
    sizes = {kind: p.stat().st_size for kind, p in paths.items()}
    return {"save": {k: summary(v) for k, v in times.items()}, "file_bytes": sizes}


_BUFFER_SCRIPT = """
import sys
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from sb3_safe_save._buffers import save_buffer

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

n, path = int(sys.argv[1]), sys.argv[2]
interpreter = status("VmRSS")
buffer = ReplayBuffer(n, spaces.Box(0, 255, (1, 84, 84), np.uint8), spaces.Discrete(4), n_envs=1)
rng = np.random.default_rng(0)
NAMES = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
for name in NAMES:
    arr = getattr(buffer, name)
    arr[...] = rng.integers(0, 255, size=arr.shape, dtype=np.uint8) if arr.dtype == np.uint8 else rng.random(arr.shape)
buffer.full, buffer.pos = True, 0
arrays = sum(getattr(buffer, k).nbytes for k in NAMES)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
save_buffer(buffer, path)
print(interpreter, arrays, status("VmHWM"))
"""


def buffer_save_memory(work: Path, quick: bool) -> dict[str, Any]:
    """Peak memory of ``save_replay_buffer`` on a full image replay buffer (84x84 uint8), in a fresh process."""
    n = 20_000 if quick else 100_000
    path = work / "buffer.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", _BUFFER_SCRIPT, str(n), str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    path.unlink(missing_ok=True)
    interpreter, arrays, peak = (int(x) for x in out)
    return {"transitions": n, "interpreter_bytes": interpreter, "array_bytes": arrays, "peak_bytes": peak}


_IMPORT_SCRIPT = """
import time
t0 = time.perf_counter()
import stable_baselines3
t1 = time.perf_counter()
import {module}
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def import_cost(reps: int) -> dict[str, Any]:
    """Fresh interpreters: ``import stable_baselines3``, then the time ``import sb3_safe_save`` adds on top."""
    sb3: list[float] = []
    added: list[float] = []
    for i in range(reps + 1):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_SCRIPT.format(module="sb3_safe_save")], capture_output=True, text=True, check=True
        ).stdout.split()
        if i:  # the first is a warm-up (cold page cache for the .pyc files)
            sb3.append(float(out[0]))
            added.append(float(out[1]))
    return {"import_sb3": summary(sb3), "added_by_sb3_safe_save": summary(added)}
