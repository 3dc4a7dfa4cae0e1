"""Machine description, goal evaluation, and the three outputs: results.json, RESULTS.md, plot.png."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.cases import LABELS

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    pkgs = ("torch", "stable-baselines3", "safetensors", "numpy", "xxhash", "gymnasium", "sb3-safe-save")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "versions": {p: version(p) for p in pkgs},
    }


def _med(results: dict[str, Any], case: str, op: str, method: str) -> float | None:
    for c in results["cases"]:
        if c["case"] == case and method in c[op]:
            return float(c[op][method]["median_s"])
    return None


def _goal(goal: str, case: str, ratio: float | None, limit: float, higher_is_better: bool, detail: str) -> dict[str, Any]:
    ok = None if ratio is None else (ratio >= limit if higher_is_better else ratio <= limit)
    return {"goal": goal, "case": case, "ratio": ratio, "limit": limit, "pass": ok, "detail": detail}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rl = [c["case"] for c in results["cases"] if c["algo"] in ("PPO", "SAC")]
    for case in rl:
        sb3, ours, st = (_med(results, case, "load", m) for m in ("sb3", "ours", "st"))
        if case.endswith(("-10M", "-50M")) and sb3 and ours:
            out.append(
                _goal(
                    "load >= 20x faster than SB3 load",
                    case,
                    sb3 / ours,
                    20,
                    True,
                    f"SB3 {sb3 * 1e3:.0f} ms, ours {ours * 1e3:.1f} ms",
                )
            )
        if ours and st:
            out.append(
                _goal(
                    "load <= 3x raw safetensors load",
                    case,
                    ours / st,
                    3,
                    False,
                    f"ours {ours * 1e3:.1f} ms, raw {st * 1e3:.1f} ms",
                )
            )
    for case in rl:
        ours, st = _med(results, case, "save", "ours"), _med(results, case, "save", "st")
        if ours and st:
            out.append(
                _goal(
                    "save <= 1.3x raw save_file (both fsync)",
                    case,
                    ours / st,
                    1.3,
                    False,
                    f"ours {ours * 1e3:.1f} ms, raw {st * 1e3:.1f} ms",
                )
            )
    for case, mem in results["memory"].items():
        m = mem.get("ours", {})
        if "load_ratio" in m:
            mib = {k: f"{m[k] / 2**20:.0f} MiB" for k in ("peak_load", "bare", "model_bytes")}
            detail = f"peak {mib['peak_load']}; bare {mib['bare']} + tensors {mib['model_bytes']}"
            out.append(
                _goal("peak load memory <= 1.3x (tensors + bare interpreter)", case, m["load_ratio"], 1.3, False, detail)
            )
    exp = results.get("expert")
    if exp:
        base_t, base_b = exp["save"]["none"]["median_s"], exp["file_bytes"]["none"]
        for kind in ("200MB", "7B"):
            t, b = exp["save"][kind]["median_s"], exp["file_bytes"][kind]
            out.append(
                _goal(
                    "expert changes save time < 5%",
                    f"DQN+{kind}",
                    t / base_t,
                    1.05,
                    False,
                    f"{t * 1e3:.1f} vs {base_t * 1e3:.1f} ms",
                )
            )
            out.append(
                _goal("expert changes file size < 1%", f"DQN+{kind}", b / base_b, 1.01, False, f"{b:,} vs {base_b:,} bytes")
            )
    w = results.get("walker")
    if w:
        walk_ms, audit_ms = w["walk"]["median_s"] * 1e3, w[w["audit_fn"]]["median_s"] * 1e3
        detail = f"{w['n_objects']:,} objects: walk {walk_ms:.1f} ms + {w['audit_fn']} {audit_ms:.1f} ms"
        out.append(_goal("walker + audit < 50 ms (value in ms / 50)", "10k objects", w["total_s"] / 0.05, 1.0, False, detail))
        if "audit_model" in w:
            ms = w["audit_model"]["median_s"] * 1e3
            detail = f"audit(model) {ms:.1f} ms (walks the live model itself)"
            out.append(_goal("audit of a live model < 50 ms (value in ms / 50)", "10k objects", ms / 50, 1.0, False, detail))
    buf = results.get("buffer")
    if buf:
        used = buf["peak_bytes"] - buf["interpreter_bytes"]
        detail = (
            f"{buf['transitions']:,} transitions: peak {used / 2**20:,.0f} MiB over the interpreter,"
            f" arrays {buf['array_bytes'] / 2**20:,.0f} MiB"
        )
        out.append(
            _goal("replay buffer save peak <= 1.3x its arrays", "84x84 uint8", used / buf["array_bytes"], 1.3, False, detail)
        )
    imp = results.get("import")
    if imp:
        added = imp["added_by_sb3_safe_save"]["median_s"]
        detail = f"+{added * 1e3:.0f} ms over import stable_baselines3 ({imp['import_sb3']['median_s'] * 1e3:.0f} ms)"
        out.append(_goal("import adds < 100 ms (value in ms / 100)", "fresh interpreter", added / 0.1, 1.0, False, detail))
    return out


def _fmt_ratio(g: dict[str, Any]) -> str:
    return "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"


def _verdict(g: dict[str, Any]) -> str:
    return "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "**MISS**")


def markdown(results: dict[str, Any], notes: list[str]) -> str:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python -m benchmarks{' --quick' if results['quick'] else ''}` on {results['started']}"
        f" in {results['duration_s'] / 60:.1f} min. Raw numbers: `results.json`; plot: `plot.png`.",
        "",
        f"**Machine.** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, CPU only; Python {m['python']},"
        f" {m['platform']}. Load average at start: {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        "## Goals (issue 6)",
        "",
        "Ratios are medians measured side by side in one run, with the library's defaults (fsync on, checksums verified).",
        "",
        "| goal | case | ratio | limit | result | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {g['case']} | {_fmt_ratio(g)} | {g['limit']} | {_verdict(g)} | {g['detail']} |")
    lines += ["", "## Times (median ms)", ""]
    lines += [*_times_table(results, "save"), "", *_times_table(results, "load")]
    lines += ["", "## Peak memory (fresh process, MiB)", "", *_memory_table(results)]
    lines += ["", "## Method", ""] + [f"- {n}" for n in _method_notes(results)]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists():
        lines += ["", "## Why the misses", "", analysis.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def _times_table(results: dict[str, Any], op: str) -> list[str]:
    methods = [k for k in LABELS if any(k in c[op] for c in results["cases"])]
    rows = [f"| {op} | params | MB on disk (ours) | " + " | ".join(LABELS[k] for k in methods) + " |"]
    rows.append("| --- " * (3 + len(methods)) + "|")
    for c in results["cases"]:
        cells = [f"{c[op][k]['median_s'] * 1e3:.1f}" if k in c[op] else "" for k in methods]
        size = c["file_bytes"].get("ours", 0) / 1e6
        rows.append(f"| {c['case']} | {c['n_parameters'] / 1e6:.2f}M | {size:.1f} | " + " | ".join(cells) + " |")
    return rows


def _memory_table(results: dict[str, Any]) -> list[str]:
    head = "| case | method | bare | tensors | peak | load ratio | ratio, torch._dynamo in bare | save peak / RSS before |"
    rows = [head, "| --- " * 8 + "|"]
    for case, mem in results["memory"].items():
        for method, m in mem.items():
            if "error" in m:
                rows.append(f"| {case} | {method} | error: {m['error'][:120]} | | | | | |")
                continue
            rows.append(
                f"| {case} | {method} | {m['bare'] / 2**20:.0f} | {m['model_bytes'] / 2**20:.0f}"
                f" | {m['peak_load'] / 2**20:.0f}"
                f" | {m['load_ratio']:.2f} | {m['load_ratio_dynamo']:.2f} | {m['save_ratio']:.2f} |"
            )
    return rows


def _method_notes(results: dict[str, Any]) -> list[str]:
    reps = sorted({c["reps"] for c in results["cases"]})
    return [
        f"Each case: one warm-up round, then {'/'.join(map(str, reps))} rounds; every round calls each method once"
        " (interleaved, so drift affects all methods alike); medians reported. SB3 load, seconds long, gets 2-3 rounds.",
        "Models: PPO `MlpPolicy` (pi=vf=[w, w]) and SAC `MlpPolicy` ([w, w], with critic and critic_target) on Box(256)"
        " observations and Box(4) actions, width chosen for 1M/10M/50M parameters, after one training step so Adam"
        " state exists. DQN: `examples/lang_dqn.make_model` after `learn(80)`, with no expert, a 200 MB `ModuleExpert`"
        " (12 x Linear(2048, 2048)) or a 7B-parameter `ModuleExpert` on `meta`.",
        "Raw methods use exactly the tensors this library writes (policy + optimizer state). Raw loads go into an"
        " already built model (`load_file`/`torch.load` + `policy.load_state_dict` + `copy_` into the Adam tensors);"
        " SB3 and this library build the model from the file.",
        "Durability: `st` and `torch` are followed by fsync of the file and its directory, as this library's default"
        " save does (it also writes to a temporary file and renames it). SB3 does not fsync.",
        "Peak memory: `python -m benchmarks.memory` in a fresh interpreter per case and method; VmHWM from"
        " /proc/self/status. `bare` = VmHWM after importing torch, SB3, safetensors and this library (and building the"
        " expert for the DQN cases); ratio = peak / (bare + tensor bytes in the file). Raw loads are measured after"
        " a peak reset (/proc/self/clear_refs) on a model built by this library's load.",
        "Walker + audit: `snapshot_model` (the save-side walk) plus `sb3_safe_save.audit(path)` of the saved file (header"
        " only; `audit(model)`, which walks the live model itself, is a separate row) on a PPO whose `policy_kwargs`"
        " and attributes hold"
        f" {results.get('walker', {}).get('n_objects', 0):,} Python objects.",
        "Import: fresh interpreters; `import stable_baselines3`, then the time `import sb3_safe_save` adds, median.",
    ]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"PPO": "-", "SAC": "--"}
    for ax, op in zip(axes, ("load", "save"), strict=False):
        for algo, style in styles.items():
            cs = [c for c in results["cases"] if c["algo"] == algo]
            for i, method in enumerate(LABELS):
                pts = [(c["n_parameters"], c[op][method]["median_s"] * 1e3) for c in cs if method in c[op]]
                if len(pts) < 2:
                    continue
                xs, ys = zip(*pts, strict=False)
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{algo}: {method}")
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="median ms", title=f"{op} time (with Adam state)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    load = results["machine"]["load_average_at_start"]
    if load[0] > 0.5:
        out.append(
            f"The machine was shared with other processes during the run (load average {load[0]:.1f} at the start on"
            f" {results['machine']['cores']} cores): absolute times are noisy; the side-by-side ratios are what the goals use."
        )
    out.append(
        "About 70 MiB of every fresh-process load is torch importing `torch._dynamo` (and sympy) when the first optimizer"
        " is built; stock SB3 pays it too. The goal ratio counts it as load memory; the next column counts it as bare."
    )
    out.append("SB3 `save` never fsyncs; its save times are page-cache writes and are not comparable with the fsync'd ones.")
    misses = [g for g in results["goals"] if g["pass"] is False]
    if misses:
        out.append("Missed: " + "; ".join(f"{g['goal']} at {g['case']} ({_fmt_ratio(g)})" for g in misses) + ".")
    return out


def write(results: dict[str, Any], extra_notes: list[str] | None = None) -> list[Path]:
    """Write results.json, RESULTS.md and plot.png; a quick run writes ``*-quick`` files (git-ignored) instead,
    so it never overwrites the committed full results."""
    tag = "-quick" if results["quick"] else ""
    paths = [HERE / f"results{tag}.json", HERE / f"RESULTS{tag}.md", HERE / f"plot{tag}.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results, notes(results) + list(extra_notes or [])))
    plot(results, paths[2])
    return paths
