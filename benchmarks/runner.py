"""Runs every case, then the walker and import checks, and evaluates the goals of issue 6."""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch as th

from benchmarks.cases import LOAD_METHODS, SAVE_METHODS, Case, cases, model_class, reps_for
from benchmarks.methods import file_for, flat_tensors, load_fn, save_fn
from benchmarks.models import make_dqn, make_expert, make_rl_model, n_parameters

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
ROOT = HERE.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Warm-up, then ``reps`` rounds calling each function once per round (drift hits all methods alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + reps):
        for key, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            del result
            if i >= warmup:
                times[key].append(dt)
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def run_case(case: Case, quick: bool) -> dict[str, Any]:
    log(f"== {case.name}: building")
    t0 = time.perf_counter()
    expert = make_expert(case.expert) if case.expert else None
    model = make_rl_model(case.algo, case.n_params) if case.is_rl else make_dqn(expert)
    build_s = time.perf_counter() - t0
    stem = WORK / case.name
    tensors = flat_tensors(model)
    reps = reps_for(case, quick)
    save_methods = [m for m in SAVE_METHODS if case.sb3 or m != "sb3"]
    load_methods = [m for m in LOAD_METHODS if case.sb3 or m != "sb3"]
    if not case.is_rl:  # the core scenario: compare the library with and without the expert; raw methods on the RL cases
        save_methods, load_methods = [m for m in save_methods if m in ("sb3", "ours", "ours_nofsync")], ["sb3", "ours"]
        load_methods = [m for m in load_methods if m in save_methods]
    log(f"   built in {build_s:.1f}s ({n_parameters(model):,} parameters); saving x{reps}")
    saves = time_interleaved({m: save_fn(m, model, tensors, file_for(m, stem)) for m in save_methods}, reps)
    sizes = {m: file_for(m, stem).stat().st_size for m in save_methods}
    for m in ("sb3", "ours"):  # the files the loads read
        if m in save_methods:
            save_fn(m, model, tensors, file_for(m, stem))()
    cls = model_class(case.name)
    fast = {m: load_fn(m, cls, file_for(m, stem), expert, model) for m in load_methods if m != "sb3"}
    log(f"   loading x{reps}")
    loads = time_interleaved(fast, reps)
    if "sb3" in load_methods:
        big = case.n_params >= 50_000_000  # SB3 load takes seconds there: no warm-up round, 2 rounds
        sb3_load = {"sb3": load_fn("sb3", cls, file_for("sb3", stem), expert)}
        loads.update(time_interleaved(sb3_load, 1 if quick else 2 if big else 3, warmup=0 if quick or big else 1))
    result = {
        "case": case.name,
        "algo": case.algo,
        "expert": case.expert or None,
        "n_parameters": n_parameters(model),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "build_s": build_s,
        "reps": reps,
        "save": {m: summary(v) for m, v in saves.items()},
        "load": {m: summary(v) for m, v in loads.items()},
        "file_bytes": sizes,
    }
    del model, tensors, fast
    gc.collect()
    return result


def run_memory(case: Case, methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        spec = {"case": case.name, "method": method, "stem": str(WORK / case.name), "expert": case.expert}
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            out[method] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
            continue
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        m["load_ratio"] = m["peak_load"] / (m["bare"] + m["model_bytes"])
        m["load_ratio_dynamo"] = m["peak_load"] / (m["bare_with_dynamo"] + m["model_bytes"])
        m["save_ratio"] = m["peak_save"] / (m["before_save"])
        out[method] = m
    return out


def memory_methods(case: Case, quick: bool) -> list[str]:
    if quick:
        return ["ours"] if case.name in ("PPO-10M", "DQN-200MB-expert") else []
    if not case.is_rl:
        return ["ours", "sb3"] if case.sb3 else ["ours"]
    if case.n_params >= 50_000_000:
        return ["ours", "sb3", "st", "torch"]
    return ["ours", "sb3"] if case.n_params >= 10_000_000 else ["ours"]


def run(quick: bool) -> dict[str, Any]:
    from benchmarks import extras, report

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    th.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    results: dict[str, Any] = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cases": [], "memory": {}}
    results["machine"] = report.machine()
    for case in cases(quick):
        results["cases"].append(run_case(case, quick))
        if memory_methods(case, quick):
            log(f"   peak memory ({', '.join(memory_methods(case, quick))}) in fresh processes")
            results["memory"][case.name] = run_memory(case, memory_methods(case, quick))
        for m in ("sb3", "ours", "st", "st_nofsync", "torch"):
            file_for(m, WORK / case.name).unlink(missing_ok=True)
    log("== walker + audit, expert save overhead, import time")
    results["walker"] = extras.walker_cost(WORK, reps=5 if quick else 15)
    results["expert"] = extras.expert_overhead(WORK, reps=7 if quick else 21)
    results["import"] = extras.import_cost(reps=3 if quick else 7)
    log("== replay buffer save, peak memory")
    results["buffer"] = extras.buffer_save_memory(WORK, quick)
    results["goals"] = report.goals(results)
    results["duration_s"] = time.time() - started
    shutil.rmtree(WORK, ignore_errors=True)
    return results
