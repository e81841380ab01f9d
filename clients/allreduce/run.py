"""``fedopt allreduce``: datacenter mode, the same Task trained by tightly synced workers on torch.distributed.

Two ways in, one worker:

* ``fedopt allreduce --nproc N [--max-restarts R] ...`` is its own launcher: it validates the options, then runs
  torch's elastic agent (``torch.distributed.run``, i.e. torchrun) in this process with a c10d rendezvous on
  ``127.0.0.1`` and a free port, which starts N workers as ``python -m fedopt allreduce ...``.
* ``torchrun --nproc-per-node N [--nnodes ...] -m fedopt allreduce ...`` starts the same workers directly (multi-node
  runs go this way). A process that finds ``RANK`` and ``WORLD_SIZE`` in its environment is a worker.

Each worker (see :mod:`clients.allreduce.worker`) joins the group (NCCL with one GPU per process when CUDA is present,
gloo on CPU; ``--backend`` forces one), wraps the Task's model in ``DistributedDataParallel`` and calls the Task's own
``train()`` once per epoch; rank 0 evaluates, writes ``metrics.jsonl`` / ``model.safetensors`` like every other mode, and
checkpoints atomically. Synchronisation is torch's, never fedopt's own (:mod:`clients.allreduce.sync`):
``--sync step`` is DDP's gradient all-reduce every step (Li et al., VLDB 2020, arXiv 2006.15704); ``--sync local:H``
is local SGD with a model all-reduce every H steps, optionally with DiLoCo's outer Nesterov step (``--outer-lr``);
``--zero`` shards optimizer state with ``ZeroRedundancyOptimizer`` (Rajbhandari et al., SC 2020).

Fault tolerance is torchrun's: with ``--max-restarts R`` a worker that dies makes the agent restart the whole group,
and the new workers resume from the last epoch checkpoint by themselves; every epoch appears once in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import uuid

from fedopt.errors import ConfigError
from fedopt.launch import free_port, loopback_interface, shared_cores_env

from clients.allreduce.config import AllreduceConfig, load_allreduce_toml

__all__ = ["configure", "run", "launch", "config_from_args", "worker_argv", "under_torchrun"]

_DEFAULTS = AllreduceConfig()


def configure(p: argparse.ArgumentParser) -> None:
    from fedopt.options import parse_kv

    # every default is left out of the namespace, so --config can supply it (flags override the file)
    d, S = _DEFAULTS, argparse.SUPPRESS
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


def config_from_args(args: argparse.Namespace) -> AllreduceConfig:
    """Defaults < the --config file < flags."""
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
    return config_from_args(args).out, args.resume


def worker_argv(cfg: AllreduceConfig) -> list[str]:
    """The command-line flags that rebuild ``cfg`` in a worker (only the ones that differ from the defaults)."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(_DEFAULTS, f.name)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "task_options":
            for k, v in value.items():
                out += ["--task-option", f"{k}={v}"]
        elif isinstance(value, bool):
            out += [flag] if value else ["--no-" + f.name.replace("_", "-")]  # a switch whose default is on
        else:
            out += [flag, str(value)]
    return out


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if under_torchrun():
        from clients.allreduce.worker import train_worker

        if "TORCHELASTIC_RUN_ID" in os.environ:
            # the agent owns the group: on Ctrl-C it stops every worker (with SIGINT) and reports once; a worker
            # just ends, with no traceback of its own
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        train_worker(cfg)
        return 0
    nproc = 1 if args.nproc is None else args.nproc
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, not {nproc}")
    if args.max_restarts < 0:
        raise ConfigError(f"max-restarts must be >= 0, not {args.max_restarts}")
    return launch(cfg, nproc, args.max_restarts)


def preflight(cfg: AllreduceConfig, nproc: int) -> None:
    """Everything a launch can check before starting workers, so bad input is one line and exit code 2."""
    from fedopt.checkpoint import CHECKPOINT
    from fedopt.task import resolve_task

    from clients.allreduce.worker import pick_backend

    resolve_task(cfg.task, cfg.task_options)
    pick_backend(cfg.backend, cfg.device, nproc - 1)
    if cfg.resume and not os.path.exists(os.path.join(cfg.out, CHECKPOINT)):
        raise ConfigError(f"--resume: no checkpoint in {cfg.out}")


def launch(cfg: AllreduceConfig, nproc: int, max_restarts: int = 0, monitor_interval: float = 0.2) -> int:
    """Start ``nproc`` local workers with torch's elastic agent on loopback; returns 0, or 1 when the group failed."""
    preflight(cfg, nproc)
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc > 1:
        # the workers share this machine's cores, as simulate's client processes do (torchrun would otherwise pick 1
        # and print a warning about it); with one worker, a small model gets one thread from the worker itself
        os.environ.setdefault("OMP_NUM_THREADS", shared_cores_env(nproc)["OMP_NUM_THREADS"])
    # the agent's own notices (shutting down on a signal, rendezvous details) are not for the user: failures are
    # reported below in one line
    for name in list(logging.root.manager.loggerDict):  # torch gives each of its modules a logger with its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # --nproc runs on this machine only: keep gloo's traffic on the loopback interface
    if "GLOO_SOCKET_IFNAME" not in os.environ and (lo := loopback_interface()):
        os.environ["GLOO_SOCKET_IFNAME"] = lo
    argv = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", uuid.uuid4().hex,
            "--monitor-interval", str(monitor_interval), "--module", "fedopt", "allreduce", *worker_argv(cfg)]
    try:
        torchrun.run(torchrun.get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} exit code {f.exitcode}" for r, f in sorted(e.failures.items()))
        sys.stderr.write(f"fedopt allreduce: error: worker group failed ({failures})\n")
        return 1
    except SignalException:
        raise KeyboardInterrupt from None  # the workers are stopped: the CLI says "interrupted" once, exit 130
    return 0
