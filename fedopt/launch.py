"""Local processes of a run: free ports, spawning and stopping processes, and each process's thread environment.

Every mode that starts processes on this machine uses these, and so do the tests and benchmarks that start real
coordinators, clients, peers and workers: ``simulate --transport ipc|tcp`` (:mod:`coordinator.local`), ``simulate
--mode gossip`` (:mod:`clients.gossip.sim`) and ``allreduce --nproc`` (:mod:`clients.allreduce.run`).

A process is started in its own process group (its own session), so stopping it also stops whatever it started
(torch's elastic agent, a worker pool), and a Ctrl-C on the terminal reaches the parent alone, which then stops its
children in order. :func:`stop_processes` asks first (SIGTERM), waits a grace period, then kills (SIGKILL) and reaps.

:func:`config_argv` writes a config dataclass back as the command-line flags that rebuild it in the process started.

Ports are free when they are looked up, not reserved: another program can take one before the process that was
given it binds it. :func:`free_ports` draws below the kernel's ephemeral range to make that unlikely.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["free_port", "free_ports", "loopback_interface", "shared_cores_env", "one_thread_env", "fedopt_command",
           "config_argv", "spawn", "stop_processes"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1, drawn below the kernel's ephemeral range (where other programs'
    outgoing connections land), so a port picked now is unlikely to be taken before its process binds it."""
    out: list[int] = []
    while len(out) < n:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in out:
            out.append(port)
    return out


def loopback_interface() -> str | None:
    """The name of the network interface holding 127.0.0.1 (``lo`` on Linux), or None when there is none: gloo's
    traffic between workers on one machine is kept on it (``GLOO_SOCKET_IFNAME``)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs):
            return name
    return None


def shared_cores_env(processes: int) -> dict[str, str]:
    """This environment for ``processes`` processes that share this machine: each may use its share of the cores
    for torch's intra-op threads and secagg's threads, unless the user set those variables. (Without this, 6 client
    processes of a small model on 2 cores each spun 2 threads: rounds took 5-7 s instead of 0.11 s.)"""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    share = str(max(1, cpus // max(1, processes)))
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "FEDOPT_SECAGG_THREADS"):
        env.setdefault(name, share)
    return env


def one_thread_env(**extra: str) -> dict[str, str]:
    """This environment with one intra-op thread per process (``OMP_NUM_THREADS=1``), for groups of processes that
    each should use one core whatever the user set, plus ``extra`` variables (e.g. ``PYTHONPATH``)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def fedopt_command(*args: str) -> list[str]:
    """The command line of ``fedopt ARGS`` run by this interpreter (so a virtualenv's fedopt runs its own code)."""
    return [sys.executable, "-m", "fedopt", *args]


def config_argv(cfg: Any) -> list[str]:
    """The flags that rebuild the config dataclass ``cfg`` when its command (``fedopt gossip``, ``fedopt allreduce``)
    parses them in a child process. The commands name their flags after the fields: ``batch_size`` is ``--batch-size
    VALUE``; a switch is given bare, or as ``--no-NAME`` when its default is on; a list is joined with commas;
    ``task_options`` is one ``--task-option KEY=VALUE`` each. A field at its default is left out; one without a
    default is always given. The tests parse every config's flags back and compare."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "task_options":
            out += [a for k, v in value.items() for a in ("--task-option", f"{k}={v}")]
        elif isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def spawn(cmd: Sequence[str], log_path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its stdout and stderr appended to ``log_path`` (discarded when None);
    ``env`` replaces this process's environment. Stop it with :func:`stop_processes`."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=None if env is None else dict(env), cwd=cwd)
    finally:
        if log_path is not None:
            out.close()


def stop_processes(procs: Iterable[subprocess.Popen], grace: float = 3.0) -> None:
    """SIGTERM the process group of every process, wait up to ``grace`` seconds in all, SIGKILL the groups still
    running, and reap every process. A process that has already exited is only reaped."""
    procs = list(procs)
    _signal_groups(procs, signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _signal_groups(procs, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=5)


def _signal_groups(procs: list[subprocess.Popen], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of every process still running (a group already gone is skipped)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def run_torchrun(nproc: int, module_argv: Sequence[str], max_restarts: int = 0, monitor_interval: float = 0.2) -> int:
    """Run ``python -m fedopt <module_argv>`` as ``nproc`` workers under torch's elastic agent (torchrun) in this
    process, with a c10d rendezvous on 127.0.0.1 and gloo kept on the loopback interface; returns 0, or 1 (one line on
    stderr) when the group failed. Ctrl-C stops the workers and raises KeyboardInterrupt."""
    import logging
    import uuid

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc > 1:
        # the workers share this machine's cores (torchrun would otherwise pick 1 thread and print a warning)
        os.environ.setdefault("OMP_NUM_THREADS", shared_cores_env(nproc)["OMP_NUM_THREADS"])
    # the agent's own notices (shutting down on a signal, rendezvous details) are not for the user: failures are
    # reported below in one line
    for name in list(logging.root.manager.loggerDict):  # torch gives each of its modules a logger with its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if "GLOO_SOCKET_IFNAME" not in os.environ and (lo := loopback_interface()):
        os.environ["GLOO_SOCKET_IFNAME"] = lo
    argv = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", uuid.uuid4().hex,
            "--monitor-interval", str(monitor_interval), "--module", "fedopt", *module_argv]
    try:
        torchrun.run(torchrun.get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} exit code {f.exitcode}" for r, f in sorted(e.failures.items()))
        sys.stderr.write(f"fedopt {module_argv[0]}: error: worker group failed ({failures})\n")
        return 1
    except SignalException:
        raise KeyboardInterrupt from None  # the workers are stopped: the CLI says "interrupted" once, exit 130
    return 0


def under_torchrun() -> bool:
    """Whether this process is a worker torchrun started (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
