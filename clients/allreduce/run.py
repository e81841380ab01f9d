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

import os
import signal

from fedopt.errors import ConfigError
from fedopt.launch import config_argv, run_torchrun, under_torchrun

from clients.allreduce.config import AllreduceConfig

__all__ = ["under_torchrun", "run_worker", "preflight", "launch"]


def run_worker(cfg: AllreduceConfig) -> int:
    """Train as the worker torchrun started this process as; 0 when the run is done."""
    from clients.allreduce.worker import train_worker

    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    if elastic:
        # the agent owns the group: on Ctrl-C it stops every worker (with SIGINT) and reports once; a worker
        # just ends, with no traceback of its own
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    train_worker(cfg)
    if elastic:
        _leave_now()
    return 0


def _leave_now() -> None:
    """End a finished worker process the agent started without interpreter finalization.

    Everything the run writes is closed by now (metrics, model, checkpoint, trackers) and the group destroyed. Yet
    now and then a rank still aborted while Python tore itself down ("terminate called without an active
    exception", exit code -6, seen once in CI on a 2-core machine): a gloo thread still joinable when its C++ owner
    was freed during finalization. The agent then fails the whole group of a run that had finished. A worker process
    is the agent's alone, so it flushes its streams and leaves with exit code 0 directly."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def preflight(cfg: AllreduceConfig, nproc: int) -> None:
    """Everything a launch can check before starting workers, so bad input is one line and exit code 2."""
    from fedopt.checkpoint import CHECKPOINT
    from fedopt.task import resolve_task

    from clients.allreduce.worker import pick_backend

    resolve_task(cfg.task, cfg.task_options)
    pick_backend(cfg.backend, cfg.device, nproc - 1, cfg.compress)
    if cfg.resume and not os.path.exists(os.path.join(cfg.out, CHECKPOINT)):
        raise ConfigError(f"--resume: no checkpoint in {cfg.out}")


def launch(cfg: AllreduceConfig, nproc: int, max_restarts: int = 0, monitor_interval: float = 0.2) -> int:
    """Start ``nproc`` local workers with torch's elastic agent on loopback, restarting the group up to
    ``max_restarts`` times; returns 0, or 1 when the group failed. Raises ConfigError for bad input."""
    if not (isinstance(nproc, int) and nproc >= 1):
        raise ConfigError(f"nproc must be >= 1, not {nproc}")
    if not (isinstance(max_restarts, int) and max_restarts >= 0):
        raise ConfigError(f"max-restarts must be >= 0, not {max_restarts}")
    preflight(cfg, nproc)
    return run_torchrun(nproc, ["allreduce", *config_argv(cfg)], max_restarts, monitor_interval)
