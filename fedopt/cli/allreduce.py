"""``fedopt allreduce``: the flags of a datacenter run, read into an :class:`~clients.allreduce.config.AllreduceConfig`.

The launcher and the workers are :mod:`clients.allreduce.run`: without torchrun in the environment this process
launches ``--nproc`` workers, which get the config back as these flags (:func:`fedopt.launch.config_argv`); under
torchrun it is one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from clients.allreduce.config import AllreduceConfig, load_allreduce_toml
from clients.allreduce.run import launch, run_worker, under_torchrun

from .options import parse_kv

__all__ = ["configure", "allreduce_config", "run_folder", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    # every default is left out of the namespace, so --config can supply it (flags override the file)
    d, S = AllreduceConfig(), argparse.SUPPRESS
    g = p.add_argument_group("task and training")
    g.add_argument("--config", default=None, help="TOML file with any of these options (flags override it)")
    g.add_argument("--task", default=S, help=f"built-in task (digits, synthetic, ...) or package.module:attr "
                                             f"(default {d.task})")
    g.add_argument("--task-option", dest="task_options", action="append", type=parse_kv, default=S,
                   metavar="KEY=VALUE", help="option for the task's factory (repeatable)")
    g.add_argument("--epochs", type=int, default=S, help=f"passes over the train set (default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=S,
                   help=f"per-worker batch; the global batch is nproc times it (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=S, help=f"learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, default=S, help=f"default {d.momentum}")
    g.add_argument("--weight-decay", type=float, default=S, help=f"default {d.weight_decay}")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=S, help=f"default {d.optimizer}")
    g.add_argument("--clip-norm", type=float, default=S, help="clip the gradient to this L2 norm every step")
    g.add_argument("--lr-schedule", choices=("constant", "cosine", "step"), default=S,
                   help=f"learning rate over epochs (default {d.lr_schedule})")
    g.add_argument("--lr-min", type=float, default=S, help=f"cosine: the rate it decays towards (default {d.lr_min})")
    g.add_argument("--lr-step", type=int, default=S, help="step: epochs between decays")
    g.add_argument("--lr-gamma", type=float, default=S, help=f"step: factor of each decay (default {d.lr_gamma})")
    g.add_argument("--max-steps", type=int, default=S, help="cap on optimizer steps per epoch and worker")
    g.add_argument("--seed", type=int, default=S, help=f"default {d.seed}")
    g = p.add_argument_group("synchronisation")
    g.add_argument("--sync", default=S, help="step (DDP every step, default) | local:H (average every H steps)")
    g.add_argument("--outer-lr", type=float, default=S, help="local:H: DiLoCo outer Nesterov learning rate")
    g.add_argument("--outer-momentum", type=float, default=S,
                   help=f"local:H with --outer-lr: outer momentum (default {d.outer_momentum})")
    g.add_argument("--compress", default=S, metavar="fp16|bf16|powersgd:RANK[:WARMUP][+fp16]",
                   help="--sync step: compress the gradient all-reduce with torch's comm hook: fp16/bf16 casts "
                        "(bf16 on nccl only), or PowerSGD of rank RANK after WARMUP >= 2 plain steps (default 10%% "
                        "of the run's); biases and other vectors travel uncompressed. +fp16 runs PowerSGD inside "
                        "torch's fp16_compress_wrapper: warm-up, biases and the low-rank factors in half precision")
    g.add_argument("--zero", action="store_true", default=S,
                   help="shard optimizer state (torch ZeroRedundancyOptimizer)")
    g.add_argument("--bucket-cap-mb", type=float, default=S, help=f"DDP bucket size (default {d.bucket_cap_mb:g})")
    g = p.add_argument_group("processes and devices")
    g.add_argument("--nproc", type=int, default=None,
                   help="launch N local workers through torch.distributed.run (default 1; ignored under torchrun)")
    g.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restart the worker group up to R times after a failure (default 0)")
    g.add_argument("--backend", choices=("auto", "gloo", "nccl"), default=S,
                   help="auto (default): nccl when CUDA is present, gloo otherwise")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=S, help=f"default {d.device}")
    g.add_argument("--timeout", type=float, default=S,
                   help=f"seconds a collective may wait (default {d.timeout:g})")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=S, help=f"output directory (default {d.out})")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    g.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default=S, help=f"default {d.progress}")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=S,
                   help="skip OUT/accuracy.png (saves about a second of matplotlib start-up)")


def allreduce_config(args: argparse.Namespace) -> AllreduceConfig:
    """Defaults < the --config file < flags. Raises ConfigError naming the field or the file's key."""
    values = load_allreduce_toml(args.config) if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AllreduceConfig) if hasattr(args, f.name)}
    options = {**values.get("task_options", {}), **dict(given.pop("task_options", None) or [])}
    values.update(given)
    values["task_options"] = options
    return AllreduceConfig(**values)


def run_folder(args: argparse.Namespace) -> tuple[str, bool] | None:
    """The launcher claims the output folder; under torchrun only rank 0 of the first attempt does (a restarted
    group continues the run it started, and the other ranks write nothing)."""
    if under_torchrun() and (os.environ.get("RANK") != "0" or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return None
    return allreduce_config(args).out, args.resume


def run(args: argparse.Namespace) -> int:
    cfg = allreduce_config(args)
    if under_torchrun():
        return run_worker(cfg)  # --nproc and --max-restarts are the launcher's
    return launch(cfg, 1 if args.nproc is None else args.nproc, args.max_restarts)
