"""The documented small experiment (docs/experiments.md): on the offline demo (resnet20 -> resnet8,
mnist5k), DFA's searched aggregation against the fixed `average` and `random` aggregations and against
vanilla, KD and OFD (= DFA with the `last` aggregation), over several seeds; mean +- std of top-1.

Usage: python scripts/demo_experiment.py [--seeds 0 1 2] [--out results/demo-experiment]
Every step is a `dfakd` CLI call; finished steps are skipped when the script is rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dfakd.summary import mean_std

CONFIG = "config/jobs/demo.yaml"
ROWS = [  # (label, method, aggregation mode or None)
    ("vanilla", "vanilla", None),
    ("KD", "kd", None),
    ("OFD (= DFA, `last` aggregation)", "ofd", None),
    ("DFA, `average` aggregation", "dfa", "average"),
    ("DFA, `random` aggregation", "dfa", "random"),
    ("DFA, searched aggregation (prune)", "dfa", "prune"),
]


def dfakd(*args: str) -> None:
    cmd = [sys.executable, "-m", "dfakd", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="results/demo-experiment")
    args = parser.parse_args()
    out = Path(args.out)
    common = [
        "-c",
        CONFIG,
        "--set",
        f"results_dir={out}",
        "--set",
        "tracking.experiment=dfakd-demo-experiment",
    ]

    dfakd("prepare-data", "mnist5k", "--root", "data/mnist5k")
    teacher = out / "teacher"
    dfakd("train", *common, "--set", "model.arch=resnet20", "-o", str(teacher))
    common += ["--set", f"teacher.checkpoint={teacher / 'best.pt'}"]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in ROWS}
    for seed in args.seeds:
        seeded = [*common, "--set", f"seed={seed}"]
        search = out / f"search-s{seed}"
        dfakd("search", *seeded, "-o", str(search))
        for label, method, mode in ROWS:
            run = out / f"{method}-{mode or 'none'}-s{seed}"
            extra = []
            if mode is not None:
                agg = out / f"aggregation-{mode}-s{seed}.yaml"
                dfakd(
                    "derive", *seeded, "--mode", mode, "--search", str(search / "search.json"), "-o", str(agg)
                )
                extra = ["--aggregation", str(agg)]
            dfakd("distill", *seeded, "--method", method, *extra, "-o", str(run))
            results[label].append(json.loads((run / "result.json").read_text()))

    teacher_acc = json.loads((teacher / "result.json").read_text())["best_acc1"]
    lines = [
        f"Teacher resnet20: {teacher_acc:.2f}% (best epoch). Student resnet8, {len(args.seeds)} seeds "
        f"({', '.join(map(str, args.seeds))}); top-1 % on the 1,000 test digits, mean +- std over seeds.",
        "",
        "| student trained with | last epoch | best epoch |",
        "|---|---|---|",
    ]
    for label, runs in results.items():
        cells = []
        for key in ("last_acc1", "best_acc1"):
            values = [r[key] for r in runs]
            mean, std = mean_std(values)
            cells.append(f"{mean:.2f} +- {std:.2f}")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
