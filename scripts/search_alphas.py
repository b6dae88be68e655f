#!/usr/bin/env python
"""The searched alphas of a workflow's results folder as a Markdown table (docs/experiments.md).

One row per (dataset, teacher, student, search variant) and matched group: each teacher layer's final alpha,
mean +- std over the search seeds found, and where the largest weight sits (the layer's position in its
group, 1 = shallowest), per seed::

    python scripts/search_alphas.py results/ablation
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from dfakd.summary import mean_std


def collect(results: Path) -> dict[tuple[str, str, str, str, int], list[tuple[int, list[str], list[float]]]]:
    """(dataset, teacher, student, variant, spatial) -> [(search seed, layer names, alphas)]."""
    found = defaultdict(list)
    for path in sorted((results / "search").glob("*/*/*/*/search.json")):
        dataset, teacher, student, run = path.parts[-5:-1]
        variant, _, seed = run.rpartition("-")
        doc = json.loads(path.read_text())
        for group in doc["groups"]:
            key = (dataset, teacher, student, variant or "default", group["spatial"])
            found[key].append((int(seed.lstrip("s")), group["layers"], group["alpha"]))
    return found


def table(found) -> str:
    lines = [
        "| dataset | teacher | student | search | group | alpha per layer (shallow -> deep), mean +- std "
        "| largest at, per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dataset, teacher, student, variant, spatial), runs in sorted(
        found.items(), key=lambda kv: (*kv[0][:4], -kv[0][4])
    ):
        runs.sort()
        names = runs[0][1]
        columns = list(zip(*(alphas for _, _, alphas in runs), strict=True))
        cells = []
        for name, values in zip(names, columns, strict=True):
            mean, std = mean_std(values)
            cells.append(f"{name} {mean:.2f} +- {std:.2f}")
        largest = ", ".join(f"s{seed}: {max(range(len(a)), key=a.__getitem__) + 1}" for seed, _, a in runs)
        lines.append(
            f"| {dataset} | {teacher} | {student} | {variant} | {spatial} px | {'; '.join(cells)} "
            f"| {largest} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a workflow's results folder (results/<experiment>)")
    args = parser.parse_args(argv)
    found = collect(args.results)
    if not found:
        raise SystemExit(f"no search/*/*/*/*/search.json under {args.results}")
    print(table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
