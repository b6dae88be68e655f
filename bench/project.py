#!/usr/bin/env python
"""Projected wall time of full runs from measured step times (a benchmark, not a test).

Reads ``bench/run.py`` JSON files and projects, for a CIFAR-sized training split (50,000 images, 10,000
test images), ``epochs x (steps per epoch x the step's median time + one data pass + one evaluation)``
with ``steps per epoch = 50,000 // batch`` (the training stream drops the last incomplete batch):

- ``--distill JSON [--epochs 240]``: every distillation method of the table (and the student alone);
- ``--search JSON --search-epochs 20 --groups N``: the DFA search, groupwise, ``N`` phases of
  ``search-epochs`` epochs, each epoch ``25,000 // batch`` steps (the weight half; every step a weight and a
  beta step, which the search figure times together).

``python bench/project.py --distill a.json --epochs 240 --search b.json --search-epochs 20 --groups 3``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TRAIN, TEST = 50_000, 10_000


def figures(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    result = json.loads(Path(path).read_text())
    return result, {f["name"]: f for f in result["figures"]}


def epoch_overhead_s(figs: dict[str, dict[str, Any]], batch: int) -> float:
    """One data pass over the training split and one evaluation of the test split."""
    data = TRAIN / figs["data"]["images_per_s"] if "data" in figs else 0.0
    evaluation = TEST / figs["eval"]["images_per_s"] if "eval" in figs else 0.0
    return data + evaluation


def project(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if args.distill:
        result, figs = figures(args.distill)
        batch = result["batch"]
        steps = TRAIN // batch
        overhead = epoch_overhead_s(figs, batch)
        for name, f in figs.items():
            if name in ("teacher", "floor", "search", "data") or name.startswith("eval"):
                continue
            minutes = args.epochs * (steps * f["median_s"] + overhead) / 60
            rows.append(_row(result, name, args.epochs, steps, f["median_s"], minutes))
    if args.search:
        result, figs = figures(args.search)
        batch = result["batch"]
        steps = (TRAIN // 2) // batch
        epochs = args.search_epochs * args.groups
        minutes = epochs * steps * figs["search"]["median_s"] / 60
        rows.append(_row(result, "search", epochs, steps, figs["search"]["median_s"], minutes))
        dfa = [r for r in rows if r["figure"] == "dfa"]
        if dfa:  # the whole DFA run: the search, then the dfa distillation
            total = dfa[0]["minutes"] + minutes
            rows.append({**dfa[0], "figure": "total", "step_ms": 0.0, "epochs": dfa[0]["epochs"] + epochs})
            rows[-1].update(steps_per_epoch=0, minutes=total)
    return rows


def _row(result: dict[str, Any], name: str, epochs: int, steps: int, step_s: float, minutes: float) -> dict:
    mode = result["mode"] + (f", compiled {result['compile']}" if result.get("compile") else "")
    return {
        "pair": result["pair"],
        "device": result["machine"].get("gpu") or result["machine"]["cpu"],
        "mode": mode,
        "figure": name,
        "batch": result["batch"],
        "epochs": epochs,
        "steps_per_epoch": steps,
        "step_ms": 1000 * step_s,
        "minutes": minutes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--distill", help="bench/run.py JSON of the distillation pair")
    p.add_argument("--epochs", type=int, default=240)
    p.add_argument("--search", help="bench/run.py JSON whose search figure is used (at the search batch)")
    p.add_argument("--search-epochs", type=int, default=20, help="epochs per group (search.epochs)")
    p.add_argument("--groups", type=int, default=3, help="matched groups (groupwise phases)")
    p.add_argument("--label", default="", help="a title for the printed table")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args(argv)
    rows = project(args)
    if args.label:
        print(args.label)
    print(f"{'pair':<26} {'mode':<34} {'figure':<8} {'batch':>5} {'epochs':>6} {'steps':>6} {'ms/step':>8} "
          f"{'minutes':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['pair']:<26} {r['mode'][:34]:<34} {r['figure']:<8} {r['batch']:>5} {r['epochs']:>6} "
            f"{r['steps_per_epoch']:>6} {r['step_ms']:8.1f} {r['minutes']:8.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
