"""``python -m benchmarks [--quick]``: run the suite and write results.json, RESULTS.md and plot.png.

``--quick`` (smaller models, fewer repetitions; 86 s on the 2-core dev machine) writes ``results-quick.json``,
``RESULTS-quick.md`` and ``plot-quick.png`` instead, which git ignores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # lang_dqn, the core scenario


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer repetitions (under 2 minutes)")
    args = parser.parse_args()
    from benchmarks import report, runner

    results = runner.run(quick=args.quick)
    written = report.write(results)
    for g in results["goals"]:
        verdict = "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "MISS")
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        print(f"{verdict:4}  {ratio:>7}  {g['goal']} [{g['case']}]  {g['detail']}")
    print(f"done in {results['duration_s']:.0f}s; wrote {', '.join(p.name for p in written)} in benchmarks/")


if __name__ == "__main__":
    main()
