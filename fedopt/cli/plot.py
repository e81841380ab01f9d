"""``fedopt plot RUN [RUN ...]``: accuracy and loss of finished runs on one figure (:func:`fedopt.plots.plot_runs`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..metrics import read_metrics
from ..plots import plot_runs

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each holding metrics.jsonl)")
    p.add_argument("--out", default="comparison.png", help="the PNG to write (default comparison.png)")
    p.add_argument("--title", default=None, help="figure title (default: the run names)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> int:
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
