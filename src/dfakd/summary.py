"""Summary tables and plots over an experiment's results files (the workflow's last rules).

Students live at ``<exp>/students/<dataset>/<teacher>/<student>/<method>/s<seed>/result.json`` and
teachers at ``<exp>/teachers/<dataset>/<teacher>/...``; both folders are written by the workflow. The
summary reports, per pair and method, top-1 at the best and the last epoch as mean +- std over seeds,
the teacher's and the vanilla student's top-1, and the gain over vanilla and over KD. Published numbers
(from the config) appear in their own, labelled columns, never mixed with ours.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from dfakd.errors import DfakdError
from dfakd.files import atomic_write_text

FIELDS = [
    "dataset", "teacher", "student", "method", "seeds", "best_mean", "best_std", "last_mean", "last_std",
    "teacher_top1", "vanilla_best_mean", "gain_vs_vanilla", "gain_vs_kd",
]  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def parse_student_path(path: Path) -> dict[str, Any]:
    """``.../students/<dataset>/<teacher>/<student>/<method>/s<seed>/result.json`` -> its ids."""
    parts = path.parts
    try:
        i = len(parts) - 1 - parts[::-1].index("students")
        dataset, teacher, student, method, seed = parts[i + 1 : i + 6]
    except (ValueError, IndexError):
        raise DfakdError(
            f"{path} is not under <exp>/students/<dataset>/<teacher>/<student>/<method>/s<seed>/"
        ) from None
    return {
        "dataset": dataset,
        "teacher": teacher,
        "student": student,
        "method": method,
        "seed": int(seed[1:]),
    }


def collect(student_results: list[Path], teacher_results: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per (dataset, teacher, student, method). ``teacher_results``: ``'<dataset>/<teacher>'`` ->
    a ``result.json`` (trained: best_acc1) or an evaluation JSON (imported: top1)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in student_results:
        ids = parse_student_path(Path(path))
        result = json.loads(Path(path).read_text())
        groups[(ids["dataset"], ids["teacher"], ids["student"], ids["method"])].append(result)
    teacher_top1 = {}
    for key, path in teacher_results.items():
        doc = json.loads(Path(path).read_text())
        teacher_top1[key] = doc.get("best_acc1", doc.get("top1"))

    rows = []
    for (dataset, teacher, student, method), results in sorted(groups.items()):
        best = _mean_std([r["best_acc1"] for r in results])
        last = _mean_std([r["last_acc1"] for r in results])
        rows.append({
            "dataset": dataset, "teacher": teacher, "student": student, "method": method,
            "seeds": len(results), "best_mean": best[0], "best_std": best[1], "last_mean": last[0],
            "last_std": last[1], "teacher_top1": teacher_top1.get(f"{dataset}/{teacher}"),
            "_kind": results[0].get("method", method),
        })  # fmt: skip
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_pair[(row["dataset"], row["teacher"], row["student"])].append(row)
    for pair_rows in by_pair.values():
        vanilla = next((r for r in pair_rows if r["_kind"] == "vanilla"), None)
        kd = next((r for r in pair_rows if r["_kind"] == "kd"), None)
        for row in pair_rows:
            row["vanilla_best_mean"] = vanilla["best_mean"] if vanilla else None
            row["gain_vs_vanilla"] = row["best_mean"] - vanilla["best_mean"] if vanilla else None
            row["gain_vs_kd"] = row["best_mean"] - kd["best_mean"] if kd else None
    for row in rows:
        del row["_kind"]
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()}
        )
    atomic_write_text(path, buf.getvalue())


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def write_markdown(
    rows: list[dict[str, Any]], published: dict[str, dict[str, float]], path: Path, title: str
) -> None:
    """``published``: ``'<dataset>/<teacher>/<student>'`` -> ``{column: value}`` from the config."""
    lines = [f"# {title}", "", "Top-1 accuracy (%) on the test split; mean +- std over seeds.", ""]
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_pair[(row["dataset"], row["teacher"], row["student"])].append(row)
    for (dataset, teacher, student), pair_rows in by_pair.items():
        teacher_top1 = pair_rows[0]["teacher_top1"]
        lines += [
            f"## {dataset}: {teacher} -> {student}",
            "",
            f"Teacher: {_fmt(teacher_top1)}. "
            f"Vanilla student (best epoch): {_fmt(pair_rows[0]['vanilla_best_mean'])}.",
            "",
            "| method | seeds | best epoch | last epoch | gain vs vanilla | gain vs KD |",
            "|---|---|---|---|---|---|",
        ]
        for r in pair_rows:
            lines.append(
                f"| {r['method']} | {r['seeds']} | {r['best_mean']:.2f} +- {r['best_std']:.2f} | "
                f"{r['last_mean']:.2f} +- {r['last_std']:.2f} | {_fmt(r['gain_vs_vanilla'], True)} | "
                f"{_fmt(r['gain_vs_kd'], True)} |"
            )
        ref = published.get(f"{dataset}/{teacher}/{student}")
        if ref:
            cols = list(ref)
            lines += [
                "",
                "Published numbers for this pair (not ours: from the literature, sources in the config):",
                "",
                "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols),
                "| " + " | ".join(str(ref[c]) for c in cols) + " |",
            ]
        lines.append("")
    atomic_write_text(path, "\n".join(lines))


def summarize(
    student_results: list[Path],
    teacher_results: dict[str, Path],
    published: dict[str, dict[str, float]],
    out_csv: Path,
    out_md: Path,
    title: str,
) -> list[dict[str, Any]]:
    rows = collect(student_results, teacher_results)
    write_csv(rows, Path(out_csv))
    write_markdown(rows, published, Path(out_md), title)
    return rows


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar chart: best-epoch top-1 (mean +- std) per pair and method."""
    from dfakd.plots import _pyplot, _save

    plt = _pyplot()
    pairs = sorted({(r["dataset"], r["teacher"], r["student"]) for r in rows})
    fig, axes = plt.subplots(
        1,
        len(pairs),
        figsize=(max(4, 1 + 0.8 * len(rows) / max(1, len(pairs))) * len(pairs), 3.5),
        squeeze=False,
    )
    for ax, pair in zip(axes[0], pairs, strict=True):
        pair_rows = [r for r in rows if (r["dataset"], r["teacher"], r["student"]) == pair]
        names = [r["method"] for r in pair_rows]
        means = [r["best_mean"] for r in pair_rows]
        ax.bar(names, means, yerr=[r["best_std"] for r in pair_rows], capsize=3, color="tab:blue")
        low = min(means) - 5
        ax.set_ylim(max(0, low), min(100, max(means) + 3))
        if pair_rows[0]["teacher_top1"] is not None:
            ax.axhline(pair_rows[0]["teacher_top1"], color="tab:red", linestyle="--", label="teacher")
            ax.legend(fontsize=7)
        ax.set_title(f"{pair[0]}: {pair[1]} -> {pair[2]}", fontsize=9)
        ax.set_ylabel("top-1 % (best epoch)")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_learning_curves(student_results: list[Path], path: Path) -> None:
    """Test top-1 per epoch, seed-averaged, one line per method, one panel per pair."""
    from dfakd.plots import _pyplot, _save

    plt = _pyplot()
    curves: dict[tuple, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for result in student_results:
        ids = parse_student_path(Path(result))
        metrics = Path(result).parent / "metrics.csv"
        if metrics.is_file():
            with open(metrics) as f:
                accs = [float(row["test_acc1"]) for row in csv.DictReader(f)]
            curves[(ids["dataset"], ids["teacher"], ids["student"])][ids["method"]].append(accs)
    pairs = sorted(curves)
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(4.5 * max(1, len(pairs)), 3.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=False):
        for method, runs in sorted(curves[pair].items()):
            n = min(len(r) for r in runs)
            mean = [statistics.mean(r[e] for r in runs) for e in range(n)]
            ax.plot(range(1, n + 1), mean, label=method)
        ax.set_title(f"{pair[0]}: {pair[1]} -> {pair[2]}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 %")
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
