"""``fedopt simulate --transport ipc|tcp``: a coordinator in this process and one real client process per client.

Everything runs over the real bus: over ``tcp`` on 127.0.0.1 with CurveZMQ keys made for the run in a temporary
directory, over ``ipc`` through a socket file in one. Client processes each get their own process group and are torn
down when the run ends, fails or is interrupted (SIGTERM, then SIGKILL after a grace period: :mod:`fedopt.launch`),
and they also exit on their own if this process disappears, so no stray process outlives the run.

With ``--aggregator secagg`` every client needs a long-term identity key and every peer's pinned public identity
(:mod:`fedopt.identity`): the run writes a fresh set into its temporary directory (beside the CurveZMQ keys over
tcp, alone over ipc), which plays the part of the out-of-band enrolment of a real deployment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

from fedopt import bus
from fedopt.config import RunConfig
from fedopt.errors import ConfigError
from fedopt.identity import load_pinned, write_identities
from fedopt.keys import generate_keys
from fedopt.launch import fedopt_command, free_port, shared_cores_env, spawn, stop_processes

__all__ = ["simulate_processes", "spawn_client"]


def spawn_client(url: str, shard: int, num_shards: int, keys: str | None = None, extra: list[str] | None = None,
                 log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``fedopt client`` for ``shard`` in its own process group (stdout+stderr to ``log_path``; ``env``
    replaces this process's environment)."""
    cmd = fedopt_command("client", "--connect", url, "--shard", str(shard), "--num-shards", str(num_shards),
                         "--exit-with-parent", *(["--keys", keys] if keys else []), *(extra or []))
    return spawn(cmd, log_path, env)


def simulate_processes(cfg: RunConfig) -> int:
    """Run ``cfg`` as one coordinator (here) and ``cfg.federation.clients`` client processes over ipc or tcp."""
    from .server import Coordinator

    k = cfg.sim.processes or cfg.federation.clients
    if k != cfg.federation.clients:
        raise ConfigError(f"--transport {cfg.sim.transport} runs one process per client: --processes ({k}) must equal "
                          f"--clients ({cfg.federation.clients})")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="fedopt-bus-") as tmp:
        keys = None
        if cfg.sim.transport == "tcp":
            keys = str(generate_keys(Path(tmp) / "keys", k))
            url = f"tcp://127.0.0.1:{free_port()}"
        else:
            url = f"ipc://{tmp}/coordinator.sock"
        security = bus.security_for(url, keys, False, "coordinator")
        extra = ["--heartbeat", str(cfg.bus.heartbeat), "--log-level", "WARNING", "--device", cfg.device]
        pinned = None
        if cfg.federation.aggregator == "secagg":
            ident = keys or str(write_identities(Path(tmp) / "identities", [str(i) for i in range(k)],
                                                 [f"client-{i:03d}" for i in range(k)]))
            pinned = load_pinned(ident)
            extra += ["--identities", ident]
        coordinator = Coordinator(cfg, url, security, identities=pinned, all_shards_here=True)
        logs = Path(cfg.out) / "clients"
        logs.mkdir(parents=True, exist_ok=True)
        env = shared_cores_env(k)
        procs = [spawn_client(url, i, cfg.federation.clients, keys, extra, logs / f"client-{i:03d}.log", env)
                 for i in range(k)]
        try:
            return coordinator.serve()
        finally:
            stop_processes(procs)
