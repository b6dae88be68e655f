#!/usr/bin/env python
"""Two results folders of the same grid, run two ways (e.g. fp32 and bf16), compared per method.

For every (dataset, teacher, student, method) found in both: best and last top-1 over the seeds of each
folder (mean +- sample std, each seed's value), the difference of the means (B - A), the larger of the
two standard deviations, Welch's t, and the verdict of the parity criterion docs/BENCHMARKS.md applies:
*within* when the difference is no larger than the larger std. The teachers' top-1 are printed beside::

    python scripts/compare_runs.py /tmp/parity/results-fp32/demo /tmp/parity/results-bf16/demo
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from dfakd.summary import collect, mean_std

FIGURES = (("best", "_best_values"), ("last", "_last_values"))


def student_rows(results: Path) -> dict[tuple[str, str, str, str], dict]:
    """(dataset, teacher, student, method) -> the summary's row for it (its seeds' values included)."""
    rows = collect(sorted((results / "students").glob("*/*/*/*/s*/result.json")), {})
    return {(r["dataset"], r["teacher"], r["student"], r["method"]): r for r in rows}


def compare(a: list[float], b: list[float]) -> dict[str, float | bool]:
    """The parity figures of B against A (at least two values each)."""
    difference = statistics.mean(b) - statistics.mean(a)
    spread = max(statistics.stdev(a), statistics.stdev(b))
    error = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    welch = difference / error if error else math.copysign(math.inf, difference) if difference else 0.0
    return {"difference": difference, "spread": spread, "welch_t": welch, "within": abs(difference) <= spread}


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} +- {std:.2f} ({', '.join(f'{v:.1f}' for v in values)})"


def table(results_a: Path, results_b: Path) -> str:
    a, b = student_rows(results_a), student_rows(results_b)
    lines = [
        f"A = {results_a}, B = {results_b}",
        "| dataset | teacher | student | method | figure | A | B | B - A | larger std | Welch t | verdict |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for key in sorted(a.keys() & b.keys()):
        if a[key]["seeds"] < 2 or b[key]["seeds"] < 2:
            lines.append(f"| {' | '.join(key)} | | fewer than 2 seeds in a folder | | | | | |")
            continue
        for name, values in FIGURES:
            va, vb = a[key][values], b[key][values]
            c = compare(va, vb)
            lines.append(
                f"| {' | '.join(key)} | {name} | {_cell(va)} | {_cell(vb)} | {c['difference']:+.3f} "
                f"| {c['spread']:.3f} | {c['welch_t']:.2f} | {'within' if c['within'] else 'outside'} |"
            )
    for label, folder in (("A", results_a), ("B", results_b)):
        for path in sorted((folder / "teachers").glob("*/*/s*/eval.json")):
            top1 = json.loads(path.read_text())["top1"]
            lines.append(f"teacher {label} {'/'.join(path.parts[-4:-1])}: top-1 {top1}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="results folder A (results/<experiment>)")
    parser.add_argument("b", type=Path, help="results folder B, compared against A")
    args = parser.parse_args(argv)
    for folder in (args.a, args.b):
        if not (folder / "students").is_dir():
            print(
                f"compare_runs: {folder} has no students/ folder (give results/<experiment>)",
                file=sys.stderr,
            )
            return 2
    print(table(args.a, args.b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
