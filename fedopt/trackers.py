"""Experiment trackers: optional sinks fed from the same per-round record that goes to ``metrics.jsonl``.

A tracker has three methods: ``start(config)`` (the resolved configuration, once), ``log(record)`` (each round), and
``close()``. Each uses its own library, installed as an optional extra:

* ``tensorboard`` (``pip install 'fedopt[tensorboard]'``): event files under ``OUT/tensorboard/`` written by
  ``torch.utils.tensorboard.SummaryWriter``; every numeric field of a record is a scalar, tagged ``fedopt/<field>``,
  at step = round. ``tensorboard --logdir OUT/tensorboard`` shows them.
* ``mlflow`` (``pip install 'fedopt[mlflow]'``): one MLflow run per fedopt run, the configuration as parameters and
  the numeric fields as metrics at step = round. The tracking URI is MLflow's own (``MLFLOW_TRACKING_URI``; default
  a local store in ``OUT``, see :func:`default_mlflow_uri`, so nothing leaves the machine unless asked).

A missing library is a :class:`~fedopt.errors.ConfigError` naming the extra to install, raised before training.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

from .errors import ConfigError

__all__ = ["Tracker", "TensorBoardTracker", "MLflowTracker", "make_tracker", "TRACKERS"]

TRACKERS = ("tensorboard", "mlflow")


class Tracker(Protocol):
    def start(self, config: dict) -> None: ...

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, out_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tracker tensorboard needs the tensorboard package: "
                              "pip install 'fedopt[tensorboard]'") from None
        self.dir = Path(out_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def start(self, config: dict) -> None:
        text = "\n".join(f"    {k} = {v!r}" for k, v in sorted(config.items()))  # indented: markdown code
        self.writer.add_text("fedopt/config", text, 0)

    def log(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(f"fedopt/{k}", v, int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, out_dir: str | os.PathLike, run_name: str) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("--tracker mlflow needs the mlflow package: pip install 'fedopt[mlflow]'") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(default_mlflow_uri(out_dir))
        self.run_name = run_name
        self.active = None

    def start(self, config: dict) -> None:
        self.active = self.mlflow.start_run(run_name=self.run_name)
        # MLflow parameters are short strings; tables are flattened to key.subkey
        flat = {}
        for k, v in config.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            elif v is not None:
                flat[k] = v
        self.mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics(_scalars(record), step=int(record["round"]))

    def close(self) -> None:
        if self.active is not None:
            self.mlflow.end_run()
            self.active = None


def default_mlflow_uri(out_dir: str | os.PathLike) -> str:
    """``OUT/mlflow.db`` (SQLite) when MLflow's database store is installed, else the file store ``OUT/mlruns``,
    which MLflow 3 accepts only with ``MLFLOW_ALLOW_FILE_STORE=true`` (set here for this process when unset)."""
    out = Path(out_dir).resolve()
    try:
        import sqlalchemy  # noqa: F401  (the full mlflow package; mlflow-skinny has no database store)
    except ImportError:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (out / "mlruns").as_uri()
    return f"sqlite:///{out / 'mlflow.db'}"


def make_tracker(name: str, out_dir: str | os.PathLike, run_name: str) -> Tracker:
    if name == "tensorboard":
        return TensorBoardTracker(out_dir)
    if name == "mlflow":
        return MLflowTracker(out_dir, run_name)
    raise ConfigError(f"tracker must be one of {', '.join(TRACKERS)}, not {name!r}")
