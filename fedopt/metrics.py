"""Metrics: one JSON object per round in ``OUT/metrics.jsonl``, progress on a terminal, a summary, a plot.

The metrics file is a contract every mode honours: each line has at least
``round, accuracy, loss, clients, seconds, bytes_up, bytes_down``. Lines are appended and flushed as rounds finish;
on ``--resume`` the file is cut back to the last checkpointed round first, so every round appears exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable

__all__ = ["MetricsWriter", "read_metrics", "Reporter", "summary_table", "plot_accuracy", "REQUIRED_KEYS",
           "claim_run_dir"]

REQUIRED_KEYS = ("round", "accuracy", "loss", "clients", "seconds", "bytes_up", "bytes_down")


#: what a finished or interrupted run leaves in its folder (and in each peer-NNN sub-folder of a simulated swarm)
_RESULTS = ("metrics.jsonl", "model.safetensors", "checkpoint.safetensors")
_DERIVED = ("accuracy.png", "summary.json")  # made from the results; replaced with them


def _holds_results(d: Path) -> bool:
    return any(p.stat().st_size > 0 for p in (d / name for name in _RESULTS) if p.is_file())


def claim_run_dir(out: str | os.PathLike, resume: bool | None = False, overwrite: bool = False) -> Path:
    """Make sure a run may write into ``out`` before it starts, so no earlier result is lost by accident.

    A folder holds results when it, or one of its ``peer-*`` sub-folders (``simulate --mode gossip``), has a
    non-empty ``metrics.jsonl``, a model or a checkpoint. Such a folder is refused unless ``resume`` (continue it: it
    must then hold a checkpoint) or ``overwrite`` (its result files are deleted here, and nothing else);
    ``resume=None`` is a command that cannot resume. Raises ConfigError naming the folder and the ways out.
    """
    from .errors import ConfigError

    d = Path(out)
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run in the folder) or --overwrite (replace it), not both")
    if d.exists() and not d.is_dir():
        raise ConfigError(f"output folder {d} is a file")
    folders = [d, *sorted(p for p in d.glob("peer-*") if p.is_dir())] if d.is_dir() else []
    held = [f for f in folders if _holds_results(f)]
    if not held:
        return d
    if resume:
        if not (d / "checkpoint.safetensors").is_file() and not any(
                (f / "checkpoint.safetensors").is_file() for f in held):
            raise ConfigError(f"--resume: {d} holds results but no checkpoint to continue from "
                              f"(give --overwrite to replace them)")
        return d
    if not overwrite:
        ways = "give --overwrite to replace it" if resume is None else \
            "give --resume to continue it or --overwrite to replace it"
        raise ConfigError(f"{d} holds the results of an earlier run: {ways} (or choose another --out)")
    for f in held:
        for name in _RESULTS + _DERIVED:
            (f / name).unlink(missing_ok=True)
    print(f"fedopt: --overwrite: removed the earlier results in {d}", file=sys.stderr, flush=True)
    return d


class MetricsWriter:
    """Appends one JSON line per round. ``resume_after=r`` keeps only lines with ``round <= r`` first."""

    def __init__(self, path: str | os.PathLike, resume_after: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("round", 0) <= resume_after]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise KeyError(f"metrics record lacks {missing}")
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a crash ends the readable history
    return out


class Reporter:
    """Progress for a run: a rich progress bar with live accuracy on a terminal, one line per round otherwise."""

    def __init__(self, total_rounds: int, mode: str = "auto", title: str = "fedopt", stream=None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.total = total_rounds
        self._progress = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._task = self._progress.add_task(title, total=total_rounds, acc="-")
            self._progress.start()
            self._route_logs()

    def round_done(self, rec: dict) -> None:
        acc = rec.get("accuracy")
        acc_s = "-" if acc is None else f"{acc:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=rec["round"], acc=acc_s)
        elif self.mode == "lines":
            loss = rec.get("loss")
            loss_s = "-" if loss is None else f"{loss:.4f}"
            print(f"round {rec['round']:>4}/{self.total}  accuracy {acc_s}  loss {loss_s}  "
                  f"clients {rec['clients']:>4}  {rec['seconds']:.3f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            root = logging.getLogger()
            for above, original in self._routed:
                root.removeHandler(above)
                root.addHandler(original)
            self._routed = []

    def _route_logs(self) -> None:
        """While the bar is live, log lines that would go to the terminal print through its console, above the bar
        (a handler writing to stderr directly would draw them through it)."""
        root = logging.getLogger()
        self._routed: list[tuple[logging.Handler, logging.Handler]] = []
        for h in list(root.handlers):
            if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__, self.stream):
                above = _AboveBar(self._progress.console, h)
                root.removeHandler(h)
                root.addHandler(above)
                self._routed.append((above, h))


class _AboveBar(logging.Handler):
    """Prints the records another handler would write through a rich console, in that handler's format and level."""

    def __init__(self, console, like: logging.Handler) -> None:
        super().__init__(like.level)
        self.console = console
        self.setFormatter(like.formatter or logging.Formatter())
        for f in like.filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, emoji=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def summary_table(records: Iterable[dict], title: str, extra: dict | None = None) -> str:
    """A small text table of a finished run (printed to stdout at the end of a run)."""
    records = list(records)
    if not records:
        return f"{title}: no rounds completed"
    evaluated = [r for r in records if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else records[-1]
    best = max(evaluated, key=lambda r: r["accuracy"]) if evaluated else last
    secs = sorted(r["seconds"] for r in records)
    rows = [
        ("rounds", f"{records[-1]['round']}"),
        ("final accuracy", f"{last.get('accuracy', float('nan')):.4f}" if evaluated else "-"),
        ("best accuracy", f"{best['accuracy']:.4f} (round {best['round']})" if evaluated else "-"),
        ("final test loss", f"{last['loss']:.4f}" if last.get("loss") is not None else "-"),
        ("median round time", f"{secs[len(secs) // 2]:.3f} s"),
        ("total time", f"{sum(secs):.2f} s"),
        ("bytes up / down", f"{_human(sum(r['bytes_up'] for r in records))} / "
                            f"{_human(sum(r['bytes_down'] for r in records))}"),
    ]
    rows += [(k, str(v)) for k, v in (extra or {}).items()]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def plot_accuracy(records: list[dict], path: str | os.PathLike, label: str = "accuracy",
                  title: str | None = None) -> Path | None:
    """Test accuracy and loss per round (per epoch for datacenter runs) as a PNG; returns None (and does nothing)
    when matplotlib is not installed."""
    from .plots import plot_runs

    return plot_runs([(label, records)], path, title or label)


class RunOutput:
    """Everything a training run writes, in one place every mode shares: ``metrics.jsonl`` (with progress),
    ``model.safetensors``, ``accuracy.png`` (when matplotlib is installed) and the summary printed at the end."""

    def __init__(self, out_dir: str | os.PathLike, total_rounds: int, progress: str = "auto",
                 title: str = "fedopt", resume_after: int | None = None, plot: bool = True) -> None:
        self.dir = Path(out_dir)
        self.plot = plot  # accuracy.png costs about a second of matplotlib import; --no-plot skips it
        self.dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.writer = MetricsWriter(self.dir / "metrics.jsonl", resume_after)
        self.records: list[dict] = read_metrics(self.dir / "metrics.jsonl")
        self.reporter = Reporter(total_rounds, "off" if progress == "off" else progress, title)
        self.trackers: list = []  # fedopt.trackers sinks, fed every record
        done = [r["accuracy"] for r in self.records if isinstance(r.get("accuracy"), (int, float))]
        self._best = max(done) if done else None  # best test accuracy so far (kept across --resume)

    def round_done(self, record: dict, model: tuple | None = None) -> None:
        """Write ``record``; with ``model = (spec, vec)``, also ``best.safetensors`` when its accuracy is the best."""
        self.writer.write(record)
        self.records.append(record)
        self.reporter.round_done(record)
        for t in self.trackers:
            t.log(record)
        acc = record.get("accuracy")
        if model is not None and isinstance(acc, (int, float)) and (self._best is None or acc > self._best):
            from .checkpoint import save_model

            self._best = acc
            save_model(self.dir / "best.safetensors", *model, {"round": record["round"], "accuracy": acc})

    def setup(self, cfg, task=None) -> None:
        """What a run writes once before its first round: ``config.toml`` (``cfg``, a RunConfig), ``partition.json``
        (when ``task`` holds every client's shard in this process and can say what each holds), and the
        ``--tracker`` sink."""
        self.write_config(cfg.to_toml())
        if task is not None:
            from .data.partition import PartitionSpec, partition_stats

            fed = cfg.federation
            stats = partition_stats(task, fed.clients, cfg.seed, PartitionSpec(fed.partition, fed.alpha))
            if stats is not None:
                self.write_json("partition.json", stats)
        if cfg.tracker is not None:
            from .trackers import make_tracker

            self.track(make_tracker(cfg.tracker, self.dir, self.dir.resolve().name), cfg.to_dict())

    def track(self, tracker, config: dict) -> None:
        """Feed every later record to ``tracker`` too (see :mod:`fedopt.trackers`); it sees ``config`` first."""
        tracker.start(config)
        self.trackers.append(tracker)

    def write_config(self, toml_text: str) -> None:
        """``OUT/config.toml``: the run's full resolved configuration (``--config OUT/config.toml`` re-runs it)."""
        from .checkpoint import atomic_write

        atomic_write(self.dir / "config.toml", toml_text.encode())

    def write_json(self, name: str, obj) -> None:
        from .checkpoint import atomic_write

        atomic_write(self.dir / name, (json.dumps(obj, indent=1) + "\n").encode())

    def finish(self, spec, vec, extra: dict | None = None, stream=None) -> None:
        from .checkpoint import save_model

        self.reporter.close()
        self.writer.close()
        save_model(self.dir / "model.safetensors", spec, vec, {"rounds": len(self.records)})
        if self.plot:
            plot_accuracy(self.records, self.dir / "accuracy.png", self.dir.resolve().name,
                          f"{self.title} ({self.dir})")
        print(summary_table(self.records, self.title, extra), file=stream or sys.stdout, flush=True)

    def close(self) -> None:
        self.reporter.close()
        for t in self.trackers:
            t.close()
        self.trackers = []
        if not self.writer._f.closed:
            self.writer.close()
