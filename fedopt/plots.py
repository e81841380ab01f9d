"""Plots of runs: test accuracy and loss against rounds (or epochs), and ``fedopt plot RUN [RUN ...]`` to compare runs.

Every run's ``metrics.jsonl`` holds what a plot needs. The x axis counts whole rounds, with integer ticks; it is
labelled ``epoch`` for datacenter runs (their records carry an ``epoch`` key) and ``round`` otherwise. Plots need
matplotlib (the ``plot`` extra); without it a run skips its plot and ``fedopt plot`` says so in one line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from .errors import ConfigError

__all__ = ["plot_runs", "x_label", "configure", "run"]


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


# ---- `fedopt plot` ------------------------------------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each holding metrics.jsonl)")
    p.add_argument("--out", default="comparison.png", help="the PNG to write (default comparison.png)")
    p.add_argument("--title", default=None, help="figure title (default: the run names)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> int:
    from .metrics import read_metrics

    runs = []
    for folder in args.runs:
        path = Path(folder) / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{folder} is not a run folder (no metrics.jsonl)")
        records = read_metrics(path)
        if not records:
            raise ConfigError(f"{path} holds no rounds")
        runs.append((Path(folder).resolve().name, records))
    names = [n for n, _ in runs]
    if len(set(names)) < len(names):  # two folders of the same name: label them by their full paths
        runs = [(str(Path(f)), r) for f, (_, r) in zip(args.runs, runs)]
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists: give another --out, or --force to replace it")
    title = args.title or "fedopt: " + " vs ".join(label for label, _ in runs)
    if plot_runs(runs, out, title) is None:
        raise ConfigError("fedopt plot needs matplotlib: pip install 'fedopt[plot]'")
    print(out)
    return 0
