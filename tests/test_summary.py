"""The summary table's paired comparison against OFD: per seed, then mean +- std over the shared seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfakd import summary


def _result(base: Path, method: str, kind: str, seed: int, best: float) -> Path:
    path = base / "students" / "ds" / "t" / "s" / method / f"s{seed}" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"best_acc1": best, "last_acc1": best, "seed": seed, "method": kind}))
    return path


def test_paired_difference_against_ofd_uses_the_same_seeds(tmp_path: Path) -> None:
    paths = [
        _result(tmp_path, "ofd", "ofd", 0, 80.0),
        _result(tmp_path, "ofd", "ofd", 1, 82.0),
        _result(tmp_path, "ofd", "ofd", 2, 90.0),  # a seed the DFA variant lacks: not compared
        _result(tmp_path, "dfa_average", "dfa", 0, 81.0),
        _result(tmp_path, "dfa_average", "dfa", 1, 81.5),
        _result(tmp_path, "vanilla", "vanilla", 0, 70.0),
    ]
    rows = {
        r["method"]: r for r in summary.summarize(paths, {}, {}, tmp_path / "s.csv", tmp_path / "s.md", "t")
    }
    dfa = rows["dfa_average"]
    assert dfa["paired_vs_ofd_seeds"] == 2
    assert dfa["paired_vs_ofd_mean"] == pytest.approx(0.25)  # (+1.0 and -0.5) / 2
    assert dfa["paired_vs_ofd_std"] == pytest.approx(1.0607, abs=1e-4)
    assert rows["ofd"]["paired_vs_ofd_mean"] is None  # OFD against itself: nothing
    assert (
        rows["vanilla"]["paired_vs_ofd_mean"] == pytest.approx(-10.0)
        and rows["vanilla"]["paired_vs_ofd_std"] == 0
    )
    assert "| dfa_average | 2 |" in (tmp_path / "s.md").read_text()
    assert "+0.25 +- 1.06 (2)" in (tmp_path / "s.md").read_text()
    assert "paired_vs_ofd_mean" in (tmp_path / "s.csv").read_text().splitlines()[0]


def test_per_seed_values_are_in_seed_order_whatever_order_the_files_come_in(tmp_path: Path) -> None:
    seeds = [10, 2, 0, 1]  # as a lexicographic listing of s0, s1, s10, s2 would not give them
    paths = [_result(tmp_path, "kd", "kd", seed, 90.0 + seed) for seed in seeds]
    for order in (paths, sorted(paths), sorted(paths, key=str, reverse=True)):
        (row,) = summary.collect(order, {})
        assert row["_best_values"] == row["_last_values"] == [90.0, 91.0, 92.0, 100.0]


def test_search_alphas_table_averages_over_search_seeds_per_variant(tmp_path: Path) -> None:
    import subprocess
    import sys

    def write(run: str, alphas: list[float]) -> None:
        folder = tmp_path / "search" / "mnist5k" / "t" / "resnet8" / run
        folder.mkdir(parents=True)
        group = {"spatial": 8, "layers": ["a", "b", "c"], "alpha": alphas}
        (folder / "search.json").write_text(json.dumps({"groups": [group]}))

    write("s0", [0.2, 0.2, 0.6])
    write("s1", [0.4, 0.2, 0.4])
    write("mse_st-s0", [0.7, 0.2, 0.1])
    script = Path(__file__).parents[1] / "scripts" / "search_alphas.py"
    run = subprocess.run([sys.executable, script, tmp_path], capture_output=True, text=True, check=True)
    out = run.stdout
    rows = [line for line in out.splitlines() if line.startswith("| mnist5k")]
    assert rows == [
        "| mnist5k | t | resnet8 | default | 8 px | a 0.30 +- 0.14; b 0.20 +- 0.00; c 0.50 +- 0.14 "
        "| s0: 3, s1: 1 |",
        "| mnist5k | t | resnet8 | mse_st | 8 px | a 0.70 +- 0.00; b 0.20 +- 0.00; c 0.10 +- 0.00 | s0: 1 |",
    ]


def test_compare_runs_applies_the_parity_criterion_per_method_and_figure(tmp_path: Path) -> None:
    """scripts/compare_runs.py: B - A of the seed means against the larger seed std, per method, for best
    and last top-1. Hand-computed: kd's difference is 0.5 against a std of 1.0, Welch t
    0.5 / sqrt(1/3 + 0.25/3); ofd's 2.0 against 0.5, t 2 / sqrt(2 * 0.25/3)."""
    import subprocess
    import sys

    def write(folder: Path, method: str, seed: int, best: float, last: float) -> None:
        path = folder / "students" / "ds" / "t" / "s" / method / f"s{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"best_acc1": best, "last_acc1": last, "seed": seed, "method": method}))

    a, b = tmp_path / "a", tmp_path / "b"
    for seed, (ka, kb, oa, ob) in enumerate(
        [(90.0, 91.0, 80.0, 82.5), (91.0, 92.0, 81.0, 83.0), (92.0, 91.5, 80.5, 82.0)]
    ):
        write(a, "kd", seed, ka, ka)
        write(b, "kd", seed, kb, kb - 3.0)  # last: B is 2.5 lower on average, outside the std
        write(a, "ofd", seed, oa, oa)
        write(b, "ofd", seed, ob, ob)
    write(a, "dfa", 0, 1.0, 1.0)  # only in A: not compared
    script = Path(__file__).parents[1] / "scripts" / "compare_runs.py"
    out = subprocess.run([sys.executable, script, a, b], capture_output=True, text=True, check=True).stdout
    rows = {
        tuple(c.strip() for c in line.split("|")[4:6]): line for line in out.splitlines() if "| ds |" in line
    }
    assert sorted(rows) == [("kd", "best"), ("kd", "last"), ("ofd", "best"), ("ofd", "last")]
    assert rows["kd", "best"].endswith("| +0.500 | 1.000 | 0.77 | within |")
    assert rows["kd", "last"].endswith("| -2.500 | 1.000 | -3.87 | outside |")
    assert rows["ofd", "best"].endswith("| +2.000 | 0.500 | 4.90 | outside |")
    assert "91.00 +- 1.00 (90.0, 91.0, 92.0)" in rows["kd", "best"]
