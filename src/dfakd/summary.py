"""Summary tables and plots over an experiment's results files (the workflow's last rules).

Students live at ``<exp>/students/<dataset>/<teacher>/<student>/<method>/s<seed>/result.json`` and
teachers at ``<exp>/teachers/<dataset>/<teacher>/...``; both folders are written by the workflow. The
summary reports, per pair and method, top-1 at the best and the last epoch as mean +- std over seeds,
the teacher's and the vanilla student's top-1, and the gain over vanilla and over KD. Published numbers
(from the config) appear in their own, labelled columns, never mixed with ours.
"""

from __future__ import annotations

import contextlib
import csv
import html
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
    "teacher_top1", "vanilla_best_mean", "gain_vs_vanilla", "gain_vs_kd", "paired_vs_ofd_mean",
    "paired_vs_ofd_std", "paired_vs_ofd_seeds",
]  # fmt: skip


#: the order of methods in tables and figures, by kind: the baselines first, the paper's method last
KIND_ORDER = ("vanilla", "kd", "<other>", "ofd", "dfa")


def method_rank(name: str, kind: str | None = None) -> tuple[int, str]:
    """Sort key of a method: vanilla, KD, the other baselines, OFD, then DFA and its variants (any method
    whose kind includes dfa, e.g. ``dfa_average`` or ``dfa+kd``); by name within a rank."""
    parts = set((kind or name).split("+"))
    if "dfa" in parts:
        rank = KIND_ORDER.index("dfa")
    elif len(parts) == 1 and (kind or name) in KIND_ORDER:
        rank = KIND_ORDER.index(kind or name)
    else:
        rank = KIND_ORDER.index("<other>")
    return rank, name


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value): every "mean +- std" dfakd prints."""
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
    located = [(parse_student_path(Path(path)), Path(path)) for path in student_results]
    # in seed order (2 before 10), whatever order the paths come in
    for ids, path in sorted(located, key=lambda found: found[0]["seed"]):
        result = json.loads(path.read_text())
        groups[(ids["dataset"], ids["teacher"], ids["student"], ids["method"])].append(result)
    teacher_top1 = {}
    for key, path in teacher_results.items():
        doc = json.loads(Path(path).read_text())
        teacher_top1[key] = doc.get("best_acc1", doc.get("top1"))

    rows = []
    order = sorted(groups.items(), key=lambda kv: (kv[0][:3], method_rank(kv[0][3], kv[1][0].get("method"))))
    for (dataset, teacher, student, method), results in order:
        best = mean_std([r["best_acc1"] for r in results])
        last = mean_std([r["last_acc1"] for r in results])
        rows.append({
            "dataset": dataset, "teacher": teacher, "student": student, "method": method,
            "seeds": len(results), "best_mean": best[0], "best_std": best[1], "last_mean": last[0],
            "last_std": last[1], "teacher_top1": teacher_top1.get(f"{dataset}/{teacher}"),
            "_kind": results[0].get("method", method), "_best_values": [r["best_acc1"] for r in results],
            "_last_values": [r["last_acc1"] for r in results],
            "_best_by_seed": {r.get("seed"): r["best_acc1"] for r in results},
        })  # fmt: skip
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_pair[(row["dataset"], row["teacher"], row["student"])].append(row)
    for pair_rows in by_pair.values():
        vanilla = next((r for r in pair_rows if r["_kind"] == "vanilla"), None)
        kd = next((r for r in pair_rows if r["_kind"] == "kd"), None)
        ofd = next((r for r in pair_rows if r["_kind"] == "ofd"), None)
        for row in pair_rows:
            row["vanilla_best_mean"] = vanilla["best_mean"] if vanilla else None
            row["gain_vs_vanilla"] = row["best_mean"] - vanilla["best_mean"] if vanilla else None
            row["gain_vs_kd"] = row["best_mean"] - kd["best_mean"] if kd else None
            row.update(paired_difference(row, ofd))
    for row in rows:
        del row["_kind"], row["_best_by_seed"]
    return rows


def paired_difference(row: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """Best-epoch top-1 minus the reference method's on the same seeds (a paired comparison: a seed
    fixes the student's init and data order for both), mean +- std over the seeds both ran."""
    empty = {"paired_vs_ofd_mean": None, "paired_vs_ofd_std": None, "paired_vs_ofd_seeds": None}
    if reference is None or reference is row:
        return empty
    mine, theirs = row["_best_by_seed"], reference["_best_by_seed"]
    diffs = [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs), key=str)]
    if not diffs:
        return empty
    mean, std = mean_std(diffs)
    return {"paired_vs_ofd_mean": mean, "paired_vs_ofd_std": std, "paired_vs_ofd_seeds": len(diffs)}


def _paired(row: dict[str, Any], plus_minus: str = "+-") -> str:
    if row["paired_vs_ofd_mean"] is None:
        return "–"
    mean, std, n = row["paired_vs_ofd_mean"], row["paired_vs_ofd_std"], row["paired_vs_ofd_seeds"]
    return f"{mean:+.2f} {plus_minus} {std:.2f} ({n})"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v))
                for k, v in row.items()
                if not k.startswith("_")
            }
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
    lines = [
        f"# {title}",
        "",
        "Top-1 accuracy (%) on the test split; mean +- std over seeds. "
        "'vs OFD, paired': a method's top-1 minus OFD's on the same seeds, mean +- std.",
        "",
    ]
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
            "| method | seeds | best epoch | last epoch | gain vs vanilla | gain vs KD "
            "| vs OFD, paired (seeds) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in pair_rows:
            lines.append(
                f"| {r['method']} | {r['seeds']} | {r['best_mean']:.2f} +- {r['best_std']:.2f} | "
                f"{r['last_mean']:.2f} +- {r['last_std']:.2f} | {_fmt(r['gain_vs_vanilla'], True)} | "
                f"{_fmt(r['gain_vs_kd'], True)} | {_paired(r)} |"
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


def write_html(
    rows: list[dict[str, Any]],
    published: dict[str, dict[str, float]],
    path: Path,
    title: str,
    notes: list[str] | None = None,
) -> None:
    """The summary as one self-contained HTML page (Snakemake's report shows it inline): a table per pair
    in the method order of :func:`method_rank`, published numbers apart; ``notes`` are lines above it."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{e(title)}</title><style>',
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.2em}",
        "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}",
        "td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:bold}",
        "</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p>Top-1 accuracy (%) on the test split; mean &plusmn; std over seeds.</p>",
    ]
    out += [f"<p>{e(line)}</p>" for line in notes or []]
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_pair[(row["dataset"], row["teacher"], row["student"])].append(row)
    for (dataset, teacher, student), pair_rows in by_pair.items():
        first = pair_rows[0]
        out += [
            f"<h2>{e(dataset)}: {e(teacher)} &rarr; {e(student)}</h2>",
            f"<p>Teacher: {_fmt(first['teacher_top1'])}. Vanilla student (best epoch): "
            f"{_fmt(first['vanilla_best_mean'])}.</p>",
            "<table><tr><th>method</th><th>seeds</th><th>best epoch</th><th>last epoch</th>"
            "<th>gain vs vanilla</th><th>gain vs KD</th><th>vs OFD, paired (seeds)</th></tr>",
        ]
        for r in pair_rows:
            out.append(
                f"<tr><td>{e(r['method'])}</td><td>{r['seeds']}</td>"
                f"<td>{r['best_mean']:.2f} &plusmn; {r['best_std']:.2f}</td>"
                f"<td>{r['last_mean']:.2f} &plusmn; {r['last_std']:.2f}</td>"
                f"<td>{_fmt(r['gain_vs_vanilla'], True)}</td><td>{_fmt(r['gain_vs_kd'], True)}</td>"
                f"<td>{_paired(r, '&plusmn;')}</td></tr>"
            )
        out.append("</table>")
        ref = published.get(f"{dataset}/{teacher}/{student}")
        if ref:
            out += [
                "<table><caption>Published numbers for this pair (not ours: from the literature, sources "
                "in the config)</caption><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in ref) + "</tr>",
                "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in ref.values()) + "</tr></table>",
            ]
    out.append("</body></html>")
    atomic_write_text(path, "\n".join(out) + "\n")


def summarize(
    student_results: list[Path],
    teacher_results: dict[str, Path],
    published: dict[str, dict[str, float]],
    out_csv: Path,
    out_md: Path,
    title: str,
    out_html: Path | None = None,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    rows = collect(student_results, teacher_results)
    write_csv(rows, Path(out_csv))
    write_markdown(rows, published, Path(out_md), title)
    if out_html is not None:
        write_html(rows, published, Path(out_html), title, notes)
    return rows


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar chart on a zero-based axis: best-epoch top-1 (mean +- std) per pair and method, in the method
    order of :func:`method_rank` (the rows' order), with every seed as a point."""
    from dfakd.plots import _pyplot, _save

    plt = _pyplot()
    pairs = list(dict.fromkeys((r["dataset"], r["teacher"], r["student"]) for r in rows))
    fig, axes = plt.subplots(
        1,
        max(1, len(pairs)),
        figsize=(max(4, 1 + 0.8 * len(rows) / max(1, len(pairs))) * max(1, len(pairs)), 3.8),
        squeeze=False,
    )
    for ax, pair in zip(axes[0], pairs, strict=False):
        pair_rows = [r for r in rows if (r["dataset"], r["teacher"], r["student"]) == pair]
        names = [r["method"] for r in pair_rows]
        means = [r["best_mean"] for r in pair_rows]
        ax.bar(range(len(names)), means, yerr=[r["best_std"] for r in pair_rows], capsize=3, color="tab:blue")
        for i, r in enumerate(pair_rows):
            values = r.get("_best_values") or []
            offsets = [(j - (len(values) - 1) / 2) * 0.12 for j in range(len(values))]
            ax.scatter(
                [i + o for o in offsets], values, color="black", s=10, zorder=3,
                label="seed" if i == 0 and values else None,
            )  # fmt: skip
            ax.text(i, means[i] / 2, f"{means[i]:.1f}", ha="center", va="center", color="white", fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0, 100)
        if pair_rows[0]["teacher_top1"] is not None:
            ax.axhline(pair_rows[0]["teacher_top1"], color="tab:red", linestyle="--", label="teacher")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"{pair[0]}: {pair[1]} -> {pair[2]}", fontsize=9)
        ax.set_ylabel("top-1 % (best epoch)")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_learning_curves(student_results: list[Path], path: Path) -> None:
    """Test top-1 per epoch, one panel per pair: per method the mean over seeds (line) and the range
    over seeds (min-max band), in the method order of :func:`method_rank`."""
    from matplotlib.ticker import MaxNLocator

    from dfakd.plots import _pyplot, _save

    plt = _pyplot()
    curves: dict[tuple, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    kinds: dict[str, str] = {}
    for result in student_results:
        ids = parse_student_path(Path(result))
        with contextlib.suppress(OSError, ValueError):
            kinds[ids["method"]] = json.loads(Path(result).read_text()).get("method", ids["method"])
        metrics = Path(result).parent / "metrics.csv"
        if metrics.is_file():
            with open(metrics) as f:
                accs = [float(row["test_acc1"]) for row in csv.DictReader(f)]
            curves[(ids["dataset"], ids["teacher"], ids["student"])][ids["method"]].append(accs)
    pairs = sorted(curves)
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(4.5 * max(1, len(pairs)), 3.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=False):
        for method in sorted(curves[pair], key=lambda m: method_rank(m, kinds.get(m))):
            runs = curves[pair][method]
            n = min(len(r) for r in runs)
            epochs = range(1, n + 1)
            mean = [statistics.mean(r[e] for r in runs) for e in range(n)]
            (line,) = ax.plot(epochs, mean, label=f"{method} (n={len(runs)})", marker="." if n < 3 else None)
            if len(runs) > 1:
                low = [min(r[e] for r in runs) for e in range(n)]
                high = [max(r[e] for r in runs) for e in range(n)]
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"{pair[0]}: {pair[1]} -> {pair[2]}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test top-1 % (mean, band: min-max over seeds)")
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
