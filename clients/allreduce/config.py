"""AllreduceConfig: what one datacenter run is asked to do; frozen, validated field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fedopt.errors import ConfigError

from fedopt.config import OptimizerConfig, at_least, choice, load_command_toml, number, optional

from clients.allreduce.sync import parse_compress, parse_sync

__all__ = ["AllreduceConfig", "load_allreduce_toml"]


@dataclass(frozen=True, kw_only=True)
class AllreduceConfig(OptimizerConfig):
    """Field names are the ``fedopt allreduce`` flags with dashes as underscores. The optimizer and its schedule over
    epochs (one optimizer for the whole run; ``clip_norm`` clips the all-reduced gradient) are
    :class:`~fedopt.config.OptimizerConfig`'s, validated there."""

    task: str = "digits"  # built-in name or package.module:attr
    task_options: dict = field(default_factory=dict)  # keyword arguments for the task's factory
    epochs: int = 10  # passes over the train set; one metrics line (round = epoch) and one checkpoint each
    batch_size: int = 16  # per worker: the global batch is nproc * batch_size
    max_steps: int | None = None  # cap on optimizer steps per epoch and worker (short runs, equivalence checks)
    sync: str = "step"  # step (DDP every step) | local:H (average the model every H steps)
    outer_lr: float | None = None  # local:H only: DiLoCo outer learning rate (None = plain averaging)
    outer_momentum: float = 0.9  # local:H with outer_lr: the outer Nesterov momentum
    compress: str | None = None  # fp16 | bf16 | powersgd:RANK[:WARMUP][+fp16]: torch's comm hook for the all-reduce
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
        super().__post_init__()
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError("--task must be a non-empty name")
        at_least("epochs", self.epochs, 1)
        at_least("batch_size", self.batch_size, 1)
        optional(at_least, "max_steps", self.max_steps, 1)
        number("bucket_cap_mb", self.bucket_cap_mb, low_open=True)
        number("timeout", self.timeout, low_open=True)
        period = parse_sync(self.sync)
        if self.outer_lr is not None:
            if period is None:
                raise ConfigError("--outer-lr applies to --sync local:H only")
            number("outer_lr", self.outer_lr, low_open=True)
        number("outer_momentum", self.outer_momentum, 0, 1)
        if self.zero and period is not None:
            raise ConfigError("--zero shards an optimizer over synchronised gradients; it cannot be combined "
                              "with --sync local:H")
        if parse_compress(self.compress) is not None and period is not None:
            raise ConfigError("--compress compresses DDP's per-step gradient all-reduce, which --sync local:H switches "
                              "off (it all-reduces the model every H steps instead); use it with --sync step")
        choice("backend", self.backend, ("auto", "gloo", "nccl"))
        choice("device", self.device, ("auto", "cpu", "cuda"))
        choice("progress", self.progress, ("auto", "bar", "lines", "off"))
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
        return self.scheduled_lr(epoch, self.epochs)

    def replace(self, **changes) -> "AllreduceConfig":
        return dataclasses.replace(self, **changes)


def load_allreduce_toml(path: str) -> dict:
    """A ``--config`` file for ``fedopt allreduce``: the flags' names (``batch-size`` or ``batch_size``) at top level or
    under an ``[allreduce]`` table, plus a ``[task-options]`` table. Errors name the file and the key."""
    fields = {f.name for f in dataclasses.fields(AllreduceConfig)} - {"resume"}
    return load_command_toml(path, "allreduce", fields, {"task_options"})
