"""AllreduceConfig: what one datacenter run is asked to do; frozen, validated field by field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fedopt.errors import ConfigError

from fedopt.schedules import OPTIMIZERS, SCHEDULES, scheduled_lr

from clients.allreduce.sync import parse_sync

__all__ = ["AllreduceConfig", "load_allreduce_toml"]


def _number(name: str, value, low: float, strict: bool = False, kind=(int, float)) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(f"{name} must be a number {'>' if strict else '>='} {low}, not {value!r}")


@dataclass(frozen=True)
class AllreduceConfig:
    """Field names are the ``fedopt allreduce`` flags with dashes as underscores."""

    task: str = "digits"  # built-in name or package.module:attr
    task_options: dict = field(default_factory=dict)  # keyword arguments for the task's factory
    epochs: int = 10  # passes over the train set; one metrics line (round = epoch) and one checkpoint each
    batch_size: int = 16  # per worker: the global batch is nproc * batch_size
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # sgd | adam | adamw (one optimizer for the whole run)
    clip_norm: float | None = None  # clip the all-reduced gradient to this global L2 norm before each step
    lr_schedule: str = "constant"  # lr over epochs: constant | cosine | step (the same schedule rounds use)
    lr_min: float = 0.0  # cosine: the rate it decays towards
    lr_step: int = 10  # step: epochs between decays
    lr_gamma: float = 0.1  # step: factor of each decay
    max_steps: int | None = None  # cap on optimizer steps per epoch and worker (short runs, equivalence checks)
    sync: str = "step"  # step (DDP every step) | local:H (average the model every H steps)
    outer_lr: float | None = None  # local:H only: DiLoCo outer learning rate (None = plain averaging)
    outer_momentum: float = 0.9  # local:H with outer_lr: the outer Nesterov momentum
    zero: bool = False  # shard optimizer state with torch's ZeroRedundancyOptimizer
    backend: str = "auto"  # auto (nccl with CUDA, gloo otherwise) | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size
    timeout: float = 300.0  # seconds any collective may wait before the group fails
    seed: int = 0
    out: str = "runs/latest"
    resume: bool = False
    progress: str = "auto"
    plot: bool = True  # write OUT/accuracy.png (when matplotlib is installed)

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError("task must be a non-empty name")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            _number(name.replace("_", "-"), v, 1, kind=int)
        if self.max_steps is not None:
            _number("max-steps", self.max_steps, 1, kind=int)
        _number("lr", self.lr, 0, strict=True)
        _number("momentum", self.momentum, 0)
        _number("weight-decay", self.weight_decay, 0)
        _number("lr-min", self.lr_min, 0)
        _number("lr-step", self.lr_step, 1, kind=int)
        _number("lr-gamma", self.lr_gamma, 0, strict=True)
        if self.clip_norm is not None:
            _number("clip-norm", self.clip_norm, 0, strict=True)
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("lr-schedule", self.lr_schedule, SCHEDULES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"momentum applies to optimizer sgd only (optimizer is {self.optimizer!r})")
        _number("bucket-cap-mb", self.bucket_cap_mb, 0, strict=True)
        _number("timeout", self.timeout, 0, strict=True)
        period = parse_sync(self.sync)
        if self.outer_lr is not None:
            if period is None:
                raise ConfigError("outer-lr applies to --sync local:H only")
            _number("outer-lr", self.outer_lr, 0, strict=True)
        if not (isinstance(self.outer_momentum, (int, float)) and 0 <= self.outer_momentum < 1):
            raise ConfigError(f"outer-momentum must be in [0, 1), not {self.outer_momentum!r}")
        if self.zero and period is not None:
            raise ConfigError("--zero shards an optimizer over synchronised gradients; it cannot be combined "
                              "with --sync local:H")
        for name, value, allowed in (("backend", self.backend, ("auto", "gloo", "nccl")),
                                     ("device", self.device, ("auto", "cpu", "cuda")),
                                     ("progress", self.progress, ("auto", "bar", "lines", "off"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")
        if not isinstance(self.task_options, dict):
            raise ConfigError("task-option must be KEY=VALUE pairs")

    @property
    def period(self) -> int | None:
        """H for ``local:H``; None for step sync."""
        return parse_sync(self.sync)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (1-based) under ``lr_schedule``."""
        return scheduled_lr(self.lr, self.lr_schedule, epoch, self.epochs, lr_min=self.lr_min, step=self.lr_step,
                            gamma=self.lr_gamma)

    def replace(self, **changes) -> "AllreduceConfig":
        return dataclasses.replace(self, **changes)


def load_allreduce_toml(path: str) -> dict:
    """A ``--config`` file for ``fedopt allreduce``: the flags' names (``batch-size`` or ``batch_size``) at top level or
    under an ``[allreduce]`` table, plus a ``[task-options]`` table. Errors name the file and the key."""
    from fedopt.config import read_toml

    raw = read_toml(path)
    if isinstance(raw.get("allreduce"), dict):
        raw = {**{k: v for k, v in raw.items() if k != "allreduce"}, **raw["allreduce"]}
    fields = {f.name for f in dataclasses.fields(AllreduceConfig)} - {"resume"}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(k.replace("_", "-") for k in fields))
            raise ConfigError(f"unknown config key {key!r} in {path} (known keys: {known})")
        if isinstance(value, dict) != (name == "task_options"):
            kind = "a table" if name == "task_options" else "a value"
            raise ConfigError(f"config key {key!r} in {path} must be {kind}")
        out[name] = dict(value) if isinstance(value, dict) else value
    return out
