"""Figures written by the jobs and the summary (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    import io

    from dfakd.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def alpha_heatmap(search: dict[str, Any], path: str | Path) -> None:
    """Final alphas: one row per group, one column per candidate layer (position within the group)."""
    plt = _pyplot()
    groups = search["groups"]
    width = max(len(g["alpha"]) for g in groups)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * width, 0.9 + 0.7 * len(groups)))
    grid = [[float("nan")] * width for _ in groups]
    for r, g in enumerate(groups):
        for c, a in enumerate(g["alpha"]):
            grid[r][c] = a
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for r, g in enumerate(groups):
        for c, (name, a) in enumerate(zip(g["layers"], g["alpha"], strict=True)):
            ax.text(
                c,
                r,
                f"{name}\n{a:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if a < 0.6 else "black",
            )
    ax.set_yticks(range(len(groups)), [f"{g['spatial']}px" for g in groups])
    ax.set_xticks(range(width), [str(i + 1) for i in range(width)])
    ax.set_xlabel("candidate layer within the group")
    ax.set_title(f"DFA alphas: {search['teacher']} -> {search['student']} ({search['schedule']})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)
    plt.close(fig)


def alpha_trajectory_plot(csv_path: str | Path, path: str | Path) -> None:
    """Alpha of every candidate layer over search steps, one panel per group."""
    plt = _pyplot()
    series: dict[int, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            steps, alphas = series[int(row["spatial"])].setdefault(row["layer"], ([], []))
            steps.append(int(row["step"]))
            alphas.append(float(row["alpha"]))
    sizes = sorted(series, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for name, (steps, alphas) in series[size].items():
            ax.plot(steps, alphas, label=name)
        ax.set_title(f"{size}px group")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("alpha")
    _save(fig, path)
    plt.close(fig)
