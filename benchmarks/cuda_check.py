"""Issue 13's GPU check, one prepared script: ``python -m benchmarks.cuda_check --device cuda --out DIR``.

1. **Round trip, bitwise.** A PPO and a SAC saved on the CPU are loaded with ``device=<device>`` (our
   ``load``, which reads CUDA-bound tensors through two pinned host buffers and checks each checksum on the
   host bytes), and with ``load_policy``. Every policy and optimizer tensor must equal the CPU load moved to
   the device, and the deterministic actions must match. A model loaded on the device is saved again and
   loaded on the CPU: the same bits.
2. **Timing** (median of ``--reps`` runs, each ending in ``torch.cuda.synchronize()``): our ``load`` and
   ``load_policy`` straight to the device, against our CPU load followed by ``.to(device)``, and stock
   ``PPO.load(zip, device=...)``.

Writes ``cuda_check.json`` and ``CUDA.md`` into ``--out`` (default: this folder) and exits 1 if any
round trip differs. ``--device cpu`` runs the same code without a GPU (a smoke test of the script).

On the lent GPU machine (no SB3, gymnasium, pydantic or xxhash in its image), carry wheels for its
Python 3.12 in an ignored folder of the checkout, then install them there with ``--no-index``::

    pip download --dest .whl --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any --no-deps \\
        stable-baselines3==2.9.2 gymnasium==1.4.0 pydantic==2.14.3 pydantic-core==2.50.4 xxhash==4.1.0 \\
        typing-inspection annotated-types farama-notifications
    # there: pip install --no-index --no-deps .whl/*.whl -e . && python -m benchmarks.cuda_check --out $OUT
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm

from benchmarks.models import OBS_DIM, make_rl_model
from sb3_safe_save import load_policy, safe

HERE = Path(__file__).resolve().parent


def _sync(device: th.device) -> None:
    if device.type == "cuda":
        th.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: th.device, reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        out = None
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _tensors(model: BaseAlgorithm) -> dict[str, th.Tensor]:
    """Every policy tensor and every optimizer state tensor, by name."""
    out = {f"policy/{k}": v for k, v in model.policy.state_dict().items()}
    optimizers = [getattr(model.policy, "optimizer", None)]
    optimizers += [getattr(getattr(model, name, None), "optimizer", None) for name in ("actor", "critic")]
    optimizers.append(getattr(model, "ent_coef_optimizer", None))
    for i, opt in enumerate(o for o in optimizers if o is not None):
        for pid, state in opt.state_dict()["state"].items():
            out.update({f"opt{i}/{pid}/{k}": v for k, v in state.items() if isinstance(v, th.Tensor)})
    return out


def _differences(a: dict[str, th.Tensor], b: dict[str, th.Tensor], device: th.device) -> list[str]:
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if key.startswith("policy/") and x.device.type != device.type:
            bad.append(f"{key}: on {x.device}")
        if x.dtype != y.dtype or x.shape != y.shape or not th.equal(x.cpu(), y.cpu()):
            bad.append(key)
    return bad


def check(algo: str, n_params: int, device: th.device, reps: int, work: Path) -> dict[str, Any]:
    cls = safe(PPO if algo == "PPO" else SAC)
    model = make_rl_model(algo, n_params)
    ours, stock = work / f"{algo}.safetensors", work / f"{algo}.zip"
    model.save(ours)
    BaseAlgorithm.save(model, stock)
    obs = np.random.default_rng(0).random((8, OBS_DIM), dtype=np.float32)

    t_ours, direct = _timed(lambda: cls.load(ours, device=device), device, reps)
    t_via_cpu = _timed(lambda: cls.load(ours, device="cpu").policy.to(device), device, reps)[0]
    t_policy, policy = _timed(lambda: load_policy(ours, device=device), device, reps)
    t_stock = _timed(lambda: (PPO if algo == "PPO" else SAC).load(stock, device=device), device, reps)[0]

    on_cpu = _tensors(cls.load(ours, device="cpu"))
    problems = _differences(_tensors(direct), on_cpu, device)
    policy_state = {f"policy/{k}": v for k, v in policy.state_dict().items()}
    problems += [f"load_policy {p}" for p in _differences(policy_state, {k: on_cpu[k] for k in policy_state}, device)]
    reference = cls.load(ours, device="cpu")
    reference.policy.to(device)
    actions = [m.predict(obs, deterministic=True)[0] for m in (direct, policy, reference)]
    if not all(np.array_equal(actions[0], a) for a in actions):
        problems.append("deterministic actions differ between loads")
    buf = io.BytesIO()
    direct.save(buf)
    back = cls.load(io.BytesIO(buf.getvalue()), device="cpu")
    problems += [f"saved from {device}: {p}" for p in _differences(_tensors(back), on_cpu, th.device("cpu"))]
    return {
        "algo": algo,
        "n_params": n_params,
        "file_bytes": ours.stat().st_size,
        "reps": reps,
        "seconds": {
            "ours_load_to_device": t_ours,
            "ours_load_cpu_then_to": t_via_cpu,
            "load_policy_to_device": t_policy,
            "stock_load_to_device": t_stock,
        },
        "problems": problems,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# GPU load check (issue 13): {result['device_name']}",
        "",
        f"{result['date']}; torch {result['torch']}; Python {result['python']}. Median of the repetitions, each ending",
        "in `torch.cuda.synchronize()`; files in the page cache.",
        "",
        "| case | file | our `load(device)` | our CPU load + `.to(device)` | `load_policy(device)` | stock `load(zip, device)`"
        " | round trip |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        s = c["seconds"]
        lines.append(
            f"| {c['algo']} {c['n_params'] / 1e6:.0f}M | {c['file_bytes'] / 1e6:.0f} MB | {s['ours_load_to_device']:.3f} s"
            f" | {s['ours_load_cpu_then_to']:.3f} s | {s['load_policy_to_device']:.3f} s | {s['stock_load_to_device']:.3f} s"
            f" | {'bitwise equal' if not c['problems'] else '; '.join(c['problems'][:5])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_check", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--params", type=int, nargs="+", default=[1_000_000, 50_000_000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    device = th.device(args.device)
    result: dict[str, Any] = {
        "device": str(device),
        "device_name": th.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": th.__version__,
        "python": platform.python_version(),
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.params:
            for algo in ("PPO", "SAC"):
                result["cases"].append(check(algo, n, device, args.reps, Path(tmp)))
                print(json.dumps(result["cases"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "CUDA.md").write_text(markdown(result))
    problems = [p for c in result["cases"] for p in c["problems"]]
    print(markdown(result))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
