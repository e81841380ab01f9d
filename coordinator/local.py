"""``fedopt simulate --transport ipc|tcp``: a coordinator in this process and one real client process per client.

Everything runs over the real bus: over ``tcp`` on 127.0.0.1 with CurveZMQ keys made for the run in a temporary
directory, over ``ipc`` through a socket file in one. Client processes each get their own process group and are torn
down when the run ends, fails or is interrupted (SIGTERM, then SIGKILL after a grace period), and they also exit on
their own if this process disappears, so no stray process outlives the run.

With ``--aggregator secagg`` every client needs a long-term identity key and every peer's pinned public identity
(:mod:`fedopt.identity`): the run writes a fresh set into its temporary directory (beside the CurveZMQ keys over
tcp, alone over ipc), which plays the part of the out-of-band enrolment of a real deployment.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedopt import bus
from fedopt.config import RunConfig
from fedopt.errors import ConfigError
from fedopt.identity import load_pinned, write_identities

__all__ = ["simulate_processes", "free_port", "shared_cores_env", "spawn_client", "stop_processes"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def spawn_client(url: str, shard: int, num_shards: int, keys: str | None = None, extra: list[str] | None = None,
                 log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``fedopt client`` for ``shard`` in its own process group (stdout+stderr to ``log_path``; ``env``
    replaces this process's environment)."""
    cmd = [sys.executable, "-m", "fedopt", "client", "--connect", url, "--shard", str(shard),
           "--num-shards", str(num_shards), "--exit-with-parent", *(["--keys", keys] if keys else []), *(extra or [])]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    finally:
        if log_path:
            out.close()


def stop_processes(procs: list[subprocess.Popen], grace: float = 3.0) -> None:
    """SIGTERM every process group, wait up to ``grace`` seconds, SIGKILL what is left, reap everything."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def simulate_processes(cfg: RunConfig) -> int:
    """Run ``cfg`` as one coordinator (here) and ``cfg.clients`` client processes over ipc or tcp."""
    from .server import Coordinator

    k = cfg.processes or cfg.clients
    if k != cfg.clients:
        raise ConfigError(f"--transport {cfg.transport} runs one process per client: --processes ({k}) must equal "
                          f"--clients ({cfg.clients})")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="fedopt-bus-") as tmp:
        keys = None
        if cfg.transport == "tcp":
            keys = str(bus.generate_keys(Path(tmp) / "keys", k))
            url = f"tcp://127.0.0.1:{free_port()}"
        else:
            url = f"ipc://{tmp}/coordinator.sock"
        security = bus.security_for(url, keys, False, "coordinator")
        extra = ["--heartbeat", str(cfg.heartbeat), "--log-level", "WARNING", "--device", cfg.device]
        pinned = None
        if cfg.aggregator == "secagg":
            ident = keys or str(write_identities(Path(tmp) / "identities", [str(i) for i in range(k)],
                                                 [f"client-{i:03d}" for i in range(k)]))
            pinned = load_pinned(ident)
            extra += ["--identities", ident]
        coordinator = Coordinator(cfg, url, security, identities=pinned, all_shards_here=True)
        logs = Path(cfg.out) / "clients"
        logs.mkdir(parents=True, exist_ok=True)
        env = shared_cores_env(k)
        procs = [spawn_client(url, i, cfg.clients, keys, extra, logs / f"client-{i:03d}.log", env) for i in range(k)]
        try:
            return coordinator.serve()
        finally:
            stop_processes(procs)
