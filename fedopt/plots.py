"""Plots of runs: test accuracy and loss against rounds (or epochs), the figure ``fedopt plot`` draws to compare runs.

Every run's ``metrics.jsonl`` holds what a plot needs. The x axis counts whole rounds, with integer ticks; it is
labelled ``epoch`` for datacenter runs (their records carry an ``epoch`` key) and ``round`` otherwise. Plots need
matplotlib (the ``plot`` extra); without it a run skips its plot and ``fedopt plot`` says so in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["plot_runs", "x_label"]


def x_label(records: list[dict]) -> str:
    return "epoch" if records and all("epoch" in r for r in records) else "round"


def plot_runs(runs: Sequence[tuple[str, list[dict]]], path: str | os.PathLike, title: str) -> Path | None:
    """Accuracy and loss of each ``(label, records)`` on two panels; the legend names the runs. Returns the PNG's
    path, or None when matplotlib is missing or no run has an evaluated round."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    series = []
    for label, records in runs:
        pts = [(r["round"], r["accuracy"], r.get("loss")) for r in records if r.get("accuracy") is not None]
        if pts:
            series.append((label, pts, x_label(records)))
    if not series:
        return None
    axes = {xl for _, _, xl in series}
    xlabel = axes.pop() if len(axes) == 1 else "round / epoch"
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts, _ in series:
        xs = [p[0] for p in pts]
        acc_ax.plot(xs, [p[1] for p in pts], marker=".", label=label)
        losses = [(x, p[2]) for x, p in zip(xs, pts) if p[2] is not None]
        if losses:
            loss_ax.plot(*zip(*losses), marker=".", label=label)
    for ax, name in ((acc_ax, "test accuracy"), (loss_ax, "test loss")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
