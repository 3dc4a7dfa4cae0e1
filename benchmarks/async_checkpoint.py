"""Issue 23, part 3: the time a checkpoint takes from the training thread, blocking against in the background.

    python -m benchmarks.async_checkpoint                 # 3 repetitions, 2**19 rows (a 1.07 GB replay buffer)
    python -m benchmarks.async_checkpoint --reps 2 --rows 300000 --chunk-seconds 3
    python -m benchmarks.async_checkpoint report          # ASYNC_CHECKPOINT.md from async_checkpoint.json

A SAC agent on ``BoxEnv`` (Box(256) float32 observations, net_arch [256, 256], one gradient step per env
step) with a replay buffer of ``rows`` rows, filled with synthetic transitions (direct array writes, not
hours of training). Each repetition runs both modes, each in a fresh process (``child``):

- ``blocking``: ``save_checkpoint(model, path)``;
- ``background``: ``save_checkpoint(model, path, blocking=False)``.

A child trains in chunks of about ``chunk_seconds`` and alternates a plain chunk with a checkpoint followed
by a chunk, ``checkpoints`` times, always into the same directory (the old checkpoint is replaced, as
``keep_last`` does). Torch runs on one thread (on the shared 2-core machine two threads made a step 10x
slower). For checkpoint ``k``:

- **stall**: the ``save_checkpoint`` call plus the wait, if any, for its write before the next plain chunk
  (the time the training thread is blocked); the goal (``<= 10%`` of blocking) is checked on its median over
  the checkpoints after the first. The first one also touches the staging memory for the first time (page
  faults; the memory is reused afterwards) and is reported on its own.
- **slowdown**: the chunk after the checkpoint minus the plain chunk before it: what the writer thread takes
  from training (CPU, memory bandwidth). Reported beside the stall, with its spread: on a busy machine it is
  noisy.

Peak memory is the process's peak RSS (reset after the buffer is filled) minus the RSS before the first checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "async_checkpoint"
RESULTS = HERE / "async_checkpoint.json"
REPORT = HERE / "ASYNC_CHECKPOINT.md"
MODES = ("blocking", "background")
GOAL = 0.10


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build(rows: int) -> Any:
    import numpy as np
    from stable_baselines3 import SAC

    from benchmarks.models import BoxEnv
    from sb3_safe_save import safe

    model = safe(SAC)(
        "MlpPolicy", BoxEnv(), buffer_size=rows, learning_starts=0, batch_size=256, train_freq=1, gradient_steps=1,
        policy_kwargs={"net_arch": [256, 256]}, seed=0, device="cpu",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    buffer = model.replay_buffer
    for name in ("observations", "next_observations", "actions", "rewards"):
        array = getattr(buffer, name)
        for lo in range(0, rows, 65536):  # in slices: no temporary as large as the array
            array[lo : lo + 65536] = rng.random(array[lo : lo + 65536].shape, dtype=np.float32)
    buffer.pos, buffer.full = 0, True
    arrays = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
    return model, sum(getattr(buffer, name).nbytes for name in arrays)


def child(mode: str, rows: int, checkpoints: int, chunk_seconds: float) -> None:
    """One process, one mode: print a JSON line with the timings."""
    import torch as th

    import sb3_safe_save._buffers
    import sb3_safe_save._persist  # noqa: F401  (imported here, not by the first checkpoint)
    from sb3_safe_save import save_checkpoint, wait_for_checkpoint

    th.set_num_threads(1)
    model, buffer_bytes = _build(rows)
    target = WORK / f"ckpt_{mode}"
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    model.learn(64, reset_num_timesteps=False)  # warm up, then size the chunks
    steps = max(64, math.ceil(chunk_seconds * 64 / (time.perf_counter() - start)))

    def chunk() -> dict[str, float]:
        """Wall time, and the CPU time of this thread and of the whole process (the writer thread's shows there)."""
        t, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
        model.learn(steps, reset_num_timesteps=False)
        return {
            "wall": time.perf_counter() - t,
            "cpu_training_thread": time.thread_time() - thread,
            "cpu_process": time.process_time() - process,
        }

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux)
    rss_before = _rss_kb("VmRSS")
    records = []
    for _ in range(checkpoints):
        t = time.perf_counter()
        wait_for_checkpoint()
        wait_before = time.perf_counter() - t
        plain = chunk()
        t = time.perf_counter()
        save_checkpoint(model, target, blocking=mode == "blocking")
        call = time.perf_counter() - t
        after = chunk()
        records.append(
            {
                "call_s": call,
                "plain_chunk_s": plain["wall"],
                "chunk_after_s": after["wall"],
                "wait_before_next_s": 0.0,
                "wait_s": wait_before,
                "plain_chunk_cpu": plain,
                "chunk_after_cpu": after,
            }
        )
    t = time.perf_counter()
    wait_for_checkpoint()
    last_wait = time.perf_counter() - t
    for i, record in enumerate(records):  # the wait before chunk i+1 belongs to checkpoint i
        record["wait_before_next_s"] = records[i + 1]["wait_s"] if i + 1 < len(records) else last_wait
        del record["wait_s"]
        record["stall_s"] = record["call_s"] + record["wait_before_next_s"]
        record["slowdown_s"] = record["chunk_after_s"] - record["plain_chunk_s"]
    files = sum(p.stat().st_size for p in target.iterdir())
    shutil.rmtree(target, ignore_errors=True)
    result = {
        "mode": mode,
        "buffer_bytes": buffer_bytes,
        "checkpoint_bytes": files,
        "chunk_steps": steps,
        "checkpoints": records,
        "rss_before_kb": rss_before,
        "peak_extra_kb": _rss_kb("VmHWM") - rss_before,
    }
    print(json.dumps(result))


def measure(rows: int, reps: int, checkpoints: int, chunk_seconds: float) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src") + os.pathsep + str(HERE.parent))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    started = time.time()
    load_before = os.getloadavg()
    for rep in range(reps):
        for mode in MODES if rep % 2 == 0 else reversed(MODES):
            cmd = [sys.executable, "-m", "benchmarks.async_checkpoint", "child", mode, str(rows), str(checkpoints)]
            cmd += ["--chunk-seconds", str(chunk_seconds)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
            if out.returncode != 0:
                raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(result)
            stalls = ", ".join(f"{c['stall_s']:.3f}" for c in result["checkpoints"])
            print(f"rep {rep} {mode}: stall per checkpoint {stalls} s", file=sys.stderr, flush=True)
    data = {
        "issue": 23,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": round(time.time() - started),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rows": rows,
        "reps": reps,
        "checkpoints_per_process": checkpoints,
        "chunk_seconds": chunk_seconds,
        "runs": runs,
        "summary": summarize(runs),
    }
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    report()


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repetitions and checkpoints; the first checkpoint of each process apart from the later ones."""

    def median(mode: str, key: str, first: bool) -> float:
        values = [c[key] for r in runs[mode] for c in (r["checkpoints"][:1] if first else r["checkpoints"][1:])]
        return statistics.median(values)

    out: dict[str, Any] = {}
    for mode in MODES:
        out[mode] = {
            f"{key}_{which}": median(mode, key, which == "first")
            for key in ("stall_s", "slowdown_s", "call_s")
            for which in ("first", "later")
        }
        out[mode]["peak_extra_mb"] = statistics.median(r["peak_extra_kb"] for r in runs[mode]) / 1024
    for mode in MODES:
        later = [c for r in runs[mode] for c in r["checkpoints"][1:]]
        slowdowns = [c["slowdown_s"] for c in later]
        out[mode]["slowdown_s_later_range"] = [min(slowdowns), max(slowdowns)]
        for which in ("plain_chunk_cpu", "chunk_after_cpu"):  # CPU of threads other than training's (the writer)
            others = [c[which]["cpu_process"] - c[which]["cpu_training_thread"] for c in later]
            out[mode][f"{which}_other_threads_s"] = statistics.median(others)
            out[mode][f"{which}_training_thread_s"] = statistics.median(c[which]["cpu_training_thread"] for c in later)
    ratio = out["background"]["stall_s_later"] / out["blocking"]["stall_s_later"]
    out["ratio_later"] = ratio
    out["ratio_first"] = out["background"]["stall_s_first"] / out["blocking"]["stall_s_first"]
    with_slowdown = [out[mode]["stall_s_later"] + max(0.0, out[mode]["slowdown_s_later"]) for mode in MODES]
    out["ratio_later_with_slowdown"] = with_slowdown[1] / with_slowdown[0]
    out["goal"] = GOAL
    out["pass"] = ratio <= GOAL
    return out


def report() -> None:
    data = json.loads(RESULTS.read_text())
    s = data["summary"]
    b, a = s["blocking"], s["background"]
    sample = data["runs"]["blocking"][0]
    lines = [
        "# Checkpoints in the background (issue 23, part 3)",
        "",
        f"Measured {data['date']} on {data['machine']} (load average {data['loadavg_before'][0]:.1f} before,"
        f" {data['loadavg_after'][0]:.1f} after), by `python -m benchmarks.async_checkpoint`"
        f" ({data['reps']} repetitions of both modes, each in a fresh process, {data['checkpoints_per_process']}"
        f" checkpoints per process, training chunks of about {data['chunk_seconds']:.0f} s).",
        "",
        f"SAC, Box(256) observations, a replay buffer of {data['rows']} rows ({sample['buffer_bytes'] / 1e9:.2f} GB of"
        f" arrays, filled); each checkpoint is {sample['checkpoint_bytes'] / 1e9:.2f} GB on disk."
        " Method: `async_checkpoint.py`.",
        "",
        "| per checkpoint (median) | blocking | background | background / blocking |",
        "|---|---|---|---|",
        f"| stall, later checkpoints | {b['stall_s_later']:.3f} s | {a['stall_s_later']:.3f} s"
        f" | **{s['ratio_later']:.3f}** (goal <= {s['goal']:.2f}: {'PASS' if s['pass'] else 'MISS'}) |",
        f"| stall, first checkpoint | {b['stall_s_first']:.3f} s | {a['stall_s_first']:.3f} s | {s['ratio_first']:.3f} |",
        f"| slowdown of the next chunk, later checkpoints (min, max) | {b['slowdown_s_later']:.3f} s"
        f" ({_range(b)}) | {a['slowdown_s_later']:.3f} s ({_range(a)}) | |",
        f"| stall + slowdown (negative slowdown as 0), later checkpoints | | | {s['ratio_later_with_slowdown']:.3f} |",
        f"| `save_checkpoint` call, later checkpoints | {b['call_s_later']:.3f} s | {a['call_s_later']:.3f} s"
        f" | {a['call_s_later'] / b['call_s_later']:.3f} |",
        f"| `save_checkpoint` call, first checkpoint | {b['call_s_first']:.3f} s | {a['call_s_first']:.3f} s"
        f" | {a['call_s_first'] / b['call_s_first']:.3f} |",
        f"| CPU of the training thread: plain chunk / chunk after, later checkpoints"
        f" | {b['plain_chunk_cpu_training_thread_s']:.2f} / {b['chunk_after_cpu_training_thread_s']:.2f} s"
        f" | {a['plain_chunk_cpu_training_thread_s']:.2f} / {a['chunk_after_cpu_training_thread_s']:.2f} s | |",
        f"| CPU of the other threads (the writer): plain chunk / chunk after, later checkpoints"
        f" | {b['plain_chunk_cpu_other_threads_s']:.2f} / {b['chunk_after_cpu_other_threads_s']:.2f} s"
        f" | {a['plain_chunk_cpu_other_threads_s']:.2f} / {a['chunk_after_cpu_other_threads_s']:.2f} s | |",
        f"| peak RSS over the RSS before the checkpoints | {b['peak_extra_mb']:.0f} MB | {a['peak_extra_mb']:.0f} MB"
        f" | +{a['peak_extra_mb'] - b['peak_extra_mb']:.0f} MB |",
        "",
        "Every checkpoint (stall; call, plain chunk, chunk after, wait before the next one; seconds):",
        "",
    ]
    for mode in MODES:
        for i, run in enumerate(data["runs"][mode]):
            cells = "; ".join(
                f"{c['stall_s']:.3f} ({c['call_s']:.3f}, {c['plain_chunk_s']:.2f}, {c['chunk_after_s']:.2f},"
                f" {c['wait_before_next_s']:.3f})"
                for c in run["checkpoints"]
            )
            lines.append(f"- {mode} #{i}: {cells}")
    lines += ["", FINDINGS]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {REPORT.name}: ratio {s['ratio_later']:.3f} ({'PASS' if s['pass'] else 'MISS'})")


def _range(mode: dict[str, Any]) -> str:
    low, high = mode["slowdown_s_later_range"]
    return f"{low:.2f} to {high:.2f}"


FINDINGS = """\
## Findings (2026-12-06 06:18-06:32 UTC, the run above; the 2-core machine is shared, load average 1-2)

- **Stall: goal met.** A background checkpoint blocks the training thread for 0.106 s (median of the 9 later
  checkpoints, 0.096-0.153 s) against 1.28 s for a blocking one (1.09-1.50 s): **0.083**. What is left is
  the copy of the 1.09 GB of filled rows into the staging memory kept from the previous checkpoint (0.09 s
  per GB here; splitting it over a thread pool was slower on these 2 cores), plus the walk of the model. No
  checkpoint waited for the previous write (10 s of training between checkpoints).
- **First checkpoint: 0.865** (0.73-1.22 s). It copies into fresh pages, and first touches of 1 GB cost this
  VM 0.7-1.2 s. Later checkpoints reuse the memory. In a real run the buffer fills between checkpoints, so
  each checkpoint touches only the pages of the rows added since the previous one.
- **The writer's CPU runs beside training.** It used 0.53 s of CPU per checkpoint; the training thread's
  CPU time per chunk did not grow (9.88 s before, 9.44 s after a checkpoint) and its wall time grew by a
  median 0.04 s (-2.1 to +2.1 s: noise of a shared machine). Counting that too: 0.088 of blocking.
- **Memory: +1045 MB peak RSS**, one copy of the checkpoint (the filled buffer rows and the model), kept with
  the model for the next checkpoints. A blocking checkpoint writes from views and adds 7 MB.
- **Earlier run, busier machine** (`earlier` in the JSON: 05:55 UTC, load average 4-6, this branch before its
  rebase on the writer that hashes the bytes it writes): blocking checkpoints took 5.09 s, background ones
  stalled 0.20 s (0.040), but the writer's 2.1 s of CPU per checkpoint came out of training's share of the
  two busy cores: its chunks took a median 1.6 s longer (0.34 of blocking, stall and slowdown together).
  Where no core is idle, a background checkpoint still saves the I/O wait and fsync, not the CPU of the write.
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async_checkpoint", description=__doc__)
    parser.add_argument("what", nargs="?", default="measure", choices=["measure", "report", "child"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--rows", type=int, default=1 << 19)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--chunk-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.what == "child":
        mode, rows, checkpoints = args.args
        child(mode, int(rows), int(checkpoints), args.chunk_seconds)
    elif args.what == "report":
        report()
    else:
        measure(args.rows, args.reps, args.checkpoints, args.chunk_seconds)


if __name__ == "__main__":
    main()
