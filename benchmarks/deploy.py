"""Deployment benchmarks (issue 13): ``python -m benchmarks.deploy [--quick]``.

1. **Time to first action**, each run in a fresh interpreter: import, load, one ``predict``, for stock
   ``PPO.load`` (zip), stock ``ActorCriticPolicy.load`` (``policy.save``'s pickle), our ``load``, our evaluation
   load (``training=False``) and ``load_policy``; with the peak RSS (VmHWM) of each process and whether
   ``torch._dynamo`` got imported. The methods are interleaved round by round; medians are reported.
2. **Fresh-memory floor**: in one process per case (imports done, one warm-up round), a plain ``readinto``
   of every tensor of the same file into a new ``torch.empty`` (the floor the goal uses), next to our loads
   (checksums verified), ``safetensors.torch.load_file`` (which maps the file privately and returns before
   reading anything; shown as is and followed by one read of every page) and the old yardstick, ``readinto``
   into tensors that already exist and were touched ("raw into an already built model"). That process runs with
   ``MALLOC_MMAP_THRESHOLD_=65536``, so every large allocation is a fresh ``mmap`` (glibc would otherwise
   start reusing freed, already-faulted memory after the first rounds, and the "fresh" floor would not be).

Writes ``deploy.json`` and ``DEPLOY.md`` here (``--quick``: ``*-quick`` files, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work_deploy"

TTFA_METHODS = ("stock", "stock_policy", "ours", "ours_eval", "load_policy")
FLOOR_METHODS = ("ours", "ours_eval", "load_policy", "floor_readinto", "floor_st", "floor_st_touched", "raw_into_built")
LABELS = {
    "stock": "stock `PPO.load` (zip)",
    "stock_policy": "stock `ActorCriticPolicy.load` (`policy.save` pickle)",
    "ours": "`safe(Algo).load`",
    "ours_eval": "`safe(Algo).load(training=False)`",
    "load_policy": "`load_policy`",
    "floor_readinto": "**floor**: `readinto` into fresh `torch.empty` tensors",
    "floor_st": "`safetensors.torch.load_file` (mmap: returns before reading)",
    "floor_st_touched": "`load_file` + touching every page",
    "raw_into_built": "`readinto` into an already built (touched) model",
}

_TTFA = r"""
import time
T0 = time.perf_counter()
import json, sys
import numpy as np
method, path, algo, obs_dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if method == "bare":
    import torch, stable_baselines3, sb3_safe_save
    T1 = T2 = time.perf_counter()
    model = None
elif method == "stock_policy":
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.sac.policies import SACPolicy
    T1 = time.perf_counter()
    model = (ActorCriticPolicy if algo == "PPO" else SACPolicy).load(path, device="cpu")
elif method == "load_policy":
    from sb3_safe_save import load_policy
    T1 = time.perf_counter()
    model = load_policy(path, device="cpu")
else:
    import stable_baselines3 as sb3
    cls = getattr(sb3, algo)
    if method != "stock":
        from sb3_safe_save import safe
        cls = safe(cls)
    T1 = time.perf_counter()
    model = cls.load(path, device="cpu", **({"training": False} if method == "ours_eval" else {}))
T2 = time.perf_counter()
action = None if model is None else model.predict(np.linspace(-1, 1, obs_dim, dtype=np.float32), deterministic=True)[0]
T3 = time.perf_counter()
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"import_s": T1 - T0, "load_s": T2 - T1, "predict_s": T3 - T2, "total_s": T3 - T0, "peak_rss": peak,
                  "dynamo": "torch._dynamo" in sys.modules, "action": None if action is None else action.tolist()}))
"""

_FLOOR = r"""
import gc, json, statistics, sys, time
import numpy as np
import torch as th
import stable_baselines3 as sb3
from safetensors.torch import load_file
from sb3_safe_save import load_policy, safe
from sb3_safe_save._weights import torch_dtype

path, algo, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
th.set_num_threads(1)
cls = safe(getattr(sb3, algo))

def layout():
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, [(k, torch_dtype(v["dtype"]), v["shape"], v["data_offsets"]) for k, v in header.items()]

BODY, TENSORS = layout()

def read_into(dests):
    with open(path, "rb", buffering=0) as f:
        for (key, dtype, shape, (start, end)), t in zip(TENSORS, dests):
            if end > start:
                view = memoryview(t.reshape(-1).view(th.uint8).numpy())
                f.seek(BODY + start)
                got = 0
                while got < end - start:
                    got += f.readinto(view[got:])
    return dests

def fresh():
    return read_into([th.empty(shape, dtype=dtype) for _, dtype, shape, _ in TENSORS])

def touch(tensors):
    for t in tensors.values():
        if t.numel():
            t.reshape(-1).view(th.uint8)[::4096].sum()
    return tensors

built = fresh()  # touched once: the old yardstick reads into memory that exists already
fns = {
    "ours": lambda: cls.load(path, device="cpu"),
    "ours_eval": lambda: cls.load(path, device="cpu", training=False),
    "load_policy": lambda: load_policy(path, device="cpu"),
    "floor_st": lambda: load_file(path),
    "floor_st_touched": lambda: touch(load_file(path)),
    "floor_readinto": fresh,
    "raw_into_built": lambda: read_into(built),
}
times = {k: [] for k in fns}
for i in range(1 + reps):
    for key, fn in fns.items():
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        del out
        if i:
            times[key].append(dt)
print(json.dumps(times))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def _child(script: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 900) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, env=_env(env), timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({args}): {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _med(values: list[float]) -> float:
    return float(statistics.median(values))


def build_files(algo: str, n_params: int) -> dict[str, Any]:
    """Train the benchmark model briefly and write it in every format the methods read."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    from benchmarks.models import OBS_DIM, make_rl_model, n_parameters

    model = make_rl_model(algo, n_params)
    stem = WORK / f"{algo}-{n_params // 1_000_000}M"
    files = {"ours": f"{stem}.safetensors", "stock": f"{stem}.zip", "stock_policy": f"{stem}.policy.pth"}
    model.save(files["ours"])
    BaseAlgorithm.save(model, files["stock"])
    model.policy.save(files["stock_policy"])
    policy_bytes = sum(t.numel() * t.element_size() for t in model.policy.state_dict().values())
    info = {
        "files": files,
        "n_parameters": n_parameters(model),
        "policy_bytes": policy_bytes,
        "file_bytes": Path(files["ours"]).stat().st_size,
        "obs_dim": OBS_DIM,
    }
    del model
    return info


def time_to_first_action(algo: str, info: dict[str, Any], reps: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ("bare", *TTFA_METHODS)}
    for _ in range(reps):
        for method in ("bare", *TTFA_METHODS):
            path = info["files"]["stock" if method == "stock" else "stock_policy" if method == "stock_policy" else "ours"]
            runs[method].append(_child(_TTFA, [method, path, algo, str(info["obs_dim"])]))
    out: dict[str, Any] = {}
    for method, rs in runs.items():
        out[method] = {
            **{k: _med([r[k] for r in rs]) for k in ("import_s", "load_s", "predict_s", "total_s")},
            "peak_rss": int(_med([r["peak_rss"] for r in rs])),
            "dynamo": any(r["dynamo"] for r in rs),
            "total_runs_s": [r["total_s"] for r in rs],
        }
    actions = {m: rs[0]["action"] for m, rs in runs.items() if m != "bare"}
    out["same_action"] = len({json.dumps(a) for a in actions.values()}) == 1
    return out


def floor(algo: str, info: dict[str, Any], reps: int) -> dict[str, Any]:
    times = _child(_FLOOR, [info["files"]["ours"], algo, str(reps)], env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    return {k: {"median_s": _med(v), "runs_s": v} for k, v in times.items()}


def cases(quick: bool) -> list[tuple[str, int, bool, int]]:
    """(algo, parameters, time-to-first-action too, repetitions)."""
    if quick:
        return [("PPO", 1_000_000, True, 2), ("PPO", 10_000_000, True, 2), ("SAC", 10_000_000, False, 3)]
    return [
        ("PPO", 10_000_000, True, 3),
        ("SAC", 10_000_000, False, 3),
        ("PPO", 1_000_000, True, 2),
        ("PPO", 50_000_000, True, 2),
        ("SAC", 50_000_000, False, 2),
    ]


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def goal(text: str, case: str, ratio: float, limit: float, detail: str) -> None:
        out.append({"goal": text, "case": case, "ratio": ratio, "limit": limit, "pass": ratio <= limit, "detail": detail})

    for c in results["cases"]:
        name, t, fl = c["case"], c.get("ttfa"), c["floor"]
        if t and name == "PPO-10M":
            s, p = t["stock"]["total_s"], t["load_policy"]["total_s"]
            goal("load_policy time to first action <= 0.6x stock PPO.load", name, p / s, 0.6, f"{p:.2f} s vs {s:.2f} s")
        if name.endswith(("-10M", "-50M")):
            best = fl["floor_readinto"]["median_s"]
            ours = fl["ours"]["median_s"]
            goal(
                "full load (checksums verified) <= 1.5x fresh-memory floor",
                name,
                ours / best,
                1.5,
                f"{ours * 1e3:.0f} ms vs floor {best * 1e3:.0f} ms",
            )
        if t:
            bare, peak = t["bare"]["peak_rss"], t["load_policy"]["peak_rss"]
            ratio = peak / (bare + c["policy_bytes"])
            goal(
                "load_policy peak RSS <= 1.1x (interpreter + policy tensors)",
                name,
                ratio,
                1.1,
                f"peak {peak / 2**20:.0f} MiB; interpreter {bare / 2**20:.0f} MiB"
                f" + policy {c['policy_bytes'] / 2**20:.0f} MiB",
            )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Deployment benchmarks (issue 13)",
        "",
        f"Produced by `python -m benchmarks.deploy` on {results['started']} in {results['duration_s'] / 60:.1f} min."
        " Raw numbers: `deploy.json`."
        + ("" if results.get("complete") else " **Partial run**: the cases below are those that finished."),
        "",
        f"**Machine.** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, CPU only; Python {m['python']};"
        f" torch {m['versions']['torch']}, stable-baselines3 {m['versions']['stable-baselines3']},"
        f" safetensors {m['versions']['safetensors']}. Load average at start:"
        f" {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, at the end:"
        f" {', '.join(f'{x:.1f}' for x in results['load_average_at_end'])}.",
        "",
        "**Conditions.** The 2 cores may be shared with other jobs (the load average above says how much), so"
        " absolute times are noisy; every ratio below compares methods measured in the same run,"
        " interleaved round by round, as medians over the repetitions shown. Files are in the page cache (each was"
        " just written). Time to first action: one fresh interpreter per run, from its first line to the first"
        " `predict` returning. Floor: one process per case, `MALLOC_MMAP_THRESHOLD_=65536` (every large allocation"
        " is fresh memory), one warm-up round, torch on one thread.",
        "",
        "## Goals",
        "",
        "| goal | case | ratio | limit | result | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for g in results["goals"]:
        verdict = "PASS" if g["pass"] else "**MISS**"
        lines.append(f"| {g['goal']} | {g['case']} | {g['ratio']:.2f} | {g['limit']} | {verdict} | {g['detail']} |")
    lines += [
        "",
        "## Time to first action (fresh process; median seconds) and peak RSS",
        "",
        "| case | method | total | import | load | predict | peak RSS MiB | torch._dynamo imported | runs (total s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in results["cases"]:
        t = c.get("ttfa")
        if not t:
            continue
        for method in ("bare", *TTFA_METHODS):
            r = t[method]
            label = LABELS.get(method, "interpreter only (`import torch, stable_baselines3, sb3_safe_save`)")
            runs = ", ".join(f"{x:.2f}" for x in r["total_runs_s"])
            lines.append(
                f"| {c['case']} | {label} | {r['total_s']:.2f} | {r['import_s']:.2f} | {r['load_s']:.2f} |"
                f" {r['predict_s']:.3f} | {r['peak_rss'] / 2**20:.0f} | {'yes' if r['dynamo'] else 'no'} | {runs} |"
            )
        same = "yes" if t["same_action"] else "NO"
        lines.append(f"| {c['case']} | all methods chose the same action | {same} | | | | | | |")
    lines += [
        "",
        "## Load vs the fresh-memory floor (one process, median ms)",
        "",
        "| case | params | file MB | policy MB | " + " | ".join(LABELS[m] for m in FLOOR_METHODS) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in FLOOR_METHODS) + " |",
    ]
    for c in results["cases"]:
        fl = c["floor"]
        cells = " | ".join(f"{fl[m]['median_s'] * 1e3:.0f}" for m in FLOOR_METHODS)
        sizes = f"{c['n_parameters'] / 1e6:.1f}M | {c['file_bytes'] / 1e6:.0f} | {c['policy_bytes'] / 1e6:.0f}"
        lines.append(f"| {c['case']} | {sizes} | {cells} |")
    lines += ["", *results.get("notes", [])]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any]) -> None:
    """Write ``deploy.json`` and ``DEPLOY.md`` (after every case: a run cut short keeps what it measured)."""
    results["goals"] = goals(results)
    results["duration_s"] = time.time() - results["started_at"]
    results["load_average_at_end"] = os.getloadavg()
    notes_file = HERE / "DEPLOY_NOTES.md"
    if notes_file.exists():
        results["notes"] = notes_file.read_text().splitlines()
    tag = "-quick" if results["quick"] else ""
    (HERE / f"deploy{tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / f"DEPLOY{tag}.md").write_text(markdown(results))


def run(quick: bool) -> dict[str, Any]:
    from benchmarks.report import machine

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    started = time.time()
    results: dict[str, Any] = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}
    results["started_at"] = started
    results["cases"] = []
    for algo, n_params, ttfa, reps in cases(quick):
        name = f"{algo}-{n_params // 1_000_000}M"
        log(f"== {name}: building")
        info = build_files(algo, n_params)
        case: dict[str, Any] = {"case": name, **{k: v for k, v in info.items() if k != "files"}, "reps": reps}
        if ttfa:
            log(f"   time to first action, {len(TTFA_METHODS)} methods x {reps} fresh processes")
            case["ttfa"] = time_to_first_action(algo, info, reps)
        log(f"   floor, {len(FLOOR_METHODS)} methods x {reps}")
        case["floor"] = floor(algo, info, reps)
        results["cases"].append(case)
        for f in info["files"].values():
            Path(f).unlink(missing_ok=True)
        results["complete"] = len(results["cases"]) == len(cases(quick))
        write(results)
    shutil.rmtree(WORK, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1M and 10M only, 2-3 repetitions")
    args = parser.parse_args()
    results = run(args.quick)
    for g in results["goals"]:
        print(f"{'PASS' if g['pass'] else 'MISS'}  {g['ratio']:.2f}  {g['goal']} [{g['case']}]  {g['detail']}")
    print(f"done in {results['duration_s']:.0f}s")


def rewrite() -> None:
    """Regenerate ``DEPLOY.md`` from ``deploy.json`` (after editing ``DEPLOY_NOTES.md``)."""
    results = json.loads((HERE / "deploy.json").read_text())
    notes_file = HERE / "DEPLOY_NOTES.md"
    results["notes"] = notes_file.read_text().splitlines() if notes_file.exists() else []
    (HERE / "DEPLOY.md").write_text(markdown(results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "examples"))
    if sys.argv[1:] == ["--rewrite"]:
        rewrite()
    else:
        main()
