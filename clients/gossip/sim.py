"""``fedopt simulate --mode gossip --peers N``: N gossip peers as local processes, and a summary of the swarm.

Peers listen on 127.0.0.1 (TCP with CurveZMQ keys made for the run, ``--transport tcp``, the default) or on socket
files (``--transport ipc``); peer ``i`` is seeded with peers ``i-1`` and ``i+1`` and learns the rest from rumours, or,
with ``--topology``, gets the whole member list. Each peer writes ``OUT/peer-NNN/`` (metrics.jsonl, model.safetensors,
log). At the end this process writes ``OUT/metrics.jsonl`` (per round: the peers' mean accuracy, min, max),
``OUT/model.safetensors`` (the sample-weighted mean of the peers' final models), ``OUT/summary.json``, and prints every
peer's accuracy, their spread and the final consensus distance. Processes are started in their own process groups
and torn down with :func:`fedopt.launch.stop_processes`, whatever happens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedopt.config import RunConfig
from fedopt.errors import FedoptError
from fedopt.keys import generate_keys
from fedopt.launch import config_argv, fedopt_command, free_ports, one_thread_env, spawn, stop_processes
from fedopt.metrics import Reporter, RunOutput, read_metrics
from fedopt.params import ParamSpec

from clients.gossip.config import GossipConfig
from clients.gossip.state import consensus_distance

__all__ = ["simulate_gossip", "peer_config", "peer_command", "swarm_summary"]


def peer_config(url: str, shard: int, n: int, seeds: list[str], cfg: RunConfig, out: Path,
                keys: str | None = None) -> GossipConfig:
    """The config of peer ``shard`` of a simulated swarm of ``n``: the run's task and training, its own folder."""
    t, f = cfg.train, cfg.federation
    return GossipConfig(
        bind=url, shard=shard, num_shards=n, peers=tuple(seeds), keys=keys, task=cfg.task,
        task_options=dict(cfg.task_options), partition=f.partition, alpha=f.alpha, seed=cfg.seed, rounds=f.rounds,
        local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, optimizer=t.optimizer,
        weight_decay=t.weight_decay, clip_norm=t.clip_norm or None, lr_schedule=t.lr_schedule, lr_min=t.lr_min,
        lr_step=t.lr_step, lr_gamma=t.lr_gamma, topology=cfg.sim.topology,
        compress=cfg.compression.compress, choco_gamma=cfg.compression.choco_gamma, out=str(out), progress="off", plot=False, exit_with_parent=True)


def peer_command(url: str, shard: int, n: int, seeds: list[str], cfg: RunConfig, out: Path,
                 keys: str | None = None, extra: list[str] | None = None) -> list[str]:
    """The ``fedopt gossip`` command line of peer ``shard`` of a simulated swarm (``extra``: flags added last)."""
    flags = config_argv(peer_config(url, shard, n, seeds, cfg, out, keys))
    return fedopt_command("gossip", *flags, "--log-level", "WARNING", *(extra or []))


def swarm_summary(peer_dirs: list[Path], weights: list[int] | None = None) -> dict:
    """Final accuracy of every peer, their mean/spread, and the consensus distance of their final models."""
    rows, vecs = [], []
    for d in peer_dirs:
        recs = read_metrics(d / "metrics.jsonl")
        if recs:
            rows.append({"peer": d.name, **{k: recs[-1].get(k) for k in ("round", "accuracy", "local_accuracy")}})
        if (d / "model.safetensors").exists():
            state = load_file(str(d / "model.safetensors"))
            vecs.append(torch.cat([state[k].flatten().to(torch.float64) for k in sorted(state)]))
    accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    mean = sum(accs) / len(accs) if accs else None
    dist = consensus_distance(vecs) if len(vecs) > 1 else 0.0
    norm = float(torch.stack(vecs).mean(0).norm()) if vecs else 1.0
    return {"peers": rows, "mean_accuracy": mean, "min_accuracy": min(accs, default=None),
            "max_accuracy": max(accs, default=None), "spread": (max(accs) - min(accs)) if accs else None,
            "consensus_distance": dist, "relative_consensus_distance": dist / max(norm, 1e-12),
            "finished": len(vecs)}


def simulate_gossip(cfg: RunConfig, timeout: float | None = None) -> int:
    n = cfg.sim.peers or cfg.sim.processes or cfg.federation.clients
    if n < 2:
        raise FedoptError("--mode gossip needs at least 2 peers")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timeout = timeout or max(120.0, cfg.federation.rounds * cfg.train.local_epochs * 10.0)
    with tempfile.TemporaryDirectory(prefix="fedopt-gossip-") as tmp:
        keys = None
        if cfg.sim.transport == "ipc":
            urls = [f"ipc://{tmp}/peer-{i:03d}.sock" for i in range(n)]
        else:
            keys = str(generate_keys(Path(tmp) / "keys", n))
            urls = [f"tcp://127.0.0.1:{p}" for p in free_ports(n)]
        procs, dirs = [], [out / f"peer-{i:03d}" for i in range(n)]
        env = one_thread_env(PYTHONUNBUFFERED="1")
        try:
            for i in range(n):
                dirs[i].mkdir(parents=True, exist_ok=True)
                seeds = urls if cfg.sim.topology else sorted({urls[(i - 1) % n], urls[(i + 1) % n]} - {urls[i]})
                cmd = peer_command(urls[i], i, n, seeds, cfg, dirs[i], keys)
                procs.append(spawn(cmd, dirs[i] / "peer.log", env))
            end = time.monotonic() + timeout
            progress = _SwarmProgress(dirs, cfg)
            try:
                while any(p.poll() is None for p in procs) and time.monotonic() < end:
                    time.sleep(0.2)
                    progress.poll()
            finally:
                progress.close()
        finally:
            stop_processes(procs)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    summary = swarm_summary(dirs)
    summary["failed_peers"] = failed
    _write_outputs(cfg, dirs, summary)
    return 1 if failed or summary["finished"] < n else 0


class _SwarmProgress:
    """Progress of a local swarm: a round counts once every peer has logged it (the peers' own metrics files are
    read every half second); it shows the peers' mean accuracy and loss of that round."""

    def __init__(self, dirs: list[Path], cfg: RunConfig) -> None:
        self.dirs, self.done, self.t0, self.last = dirs, 0, time.monotonic(), 0.0
        self.reporter = Reporter(cfg.federation.rounds, cfg.progress, title=f"fedopt gossip: {len(dirs)} peers")

    def poll(self) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        rows = [read_metrics(d / "metrics.jsonl") for d in self.dirs]
        reached = min((len(r) for r in rows), default=0)
        for r in range(self.done + 1, reached + 1):
            at = [rs[r - 1] for rs in rows]
            mean = lambda key: (sum(v) / len(v)) if (v := [x[key] for x in at if x.get(key) is not None]) else None  # noqa: E731
            self.reporter.round_done({"round": r, "accuracy": mean("accuracy"), "loss": mean("loss"),
                                      "clients": len(at), "seconds": now - self.t0})
        self.done = max(self.done, reached)

    def close(self) -> None:
        self.reporter.close()


def _write_outputs(cfg: RunConfig, dirs: list[Path], summary: dict) -> None:
    out = Path(cfg.out)
    per_peer = [read_metrics(d / "metrics.jsonl") for d in dirs]
    output = RunOutput(out, cfg.federation.rounds, "off",
                       title=f"fedopt simulate --mode gossip: {cfg.task}, {len(dirs)} peers", plot=cfg.plot)
    try:
        for r in range(1, cfg.federation.rounds + 1):
            recs = [next((x for x in p if x["round"] == r), None) for p in per_peer]
            recs = [x for x in recs if x is not None]
            if not recs:
                continue
            accs = [x["accuracy"] for x in recs if x.get("accuracy") is not None]
            losses = [x["loss"] for x in recs if x.get("loss") is not None]
            output.round_done({
                "round": r, "accuracy": sum(accs) / len(accs) if accs else None,
                "min_accuracy": min(accs, default=None), "max_accuracy": max(accs, default=None),
                "loss": sum(losses) / len(losses) if losses else None, "clients": len(recs),
                "seconds": max(x["seconds"] for x in recs),
                "bytes_up": sum(x["bytes_up"] for x in recs), "bytes_down": sum(x["bytes_down"] for x in recs),
                "max_node_bytes": max(x["bytes_up"] + x["bytes_down"] for x in recs),
            })
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        vecs, spec = [], None
        for d in dirs:
            if (d / "model.safetensors").exists():
                state = load_file(str(d / "model.safetensors"))
                spec = ParamSpec.from_state_dict(state)
                vecs.append(spec.flatten(state))
        extra = {f"peer {r['peer']}": f"accuracy {r['accuracy']:.4f}" for r in summary["peers"]
                 if r["accuracy"] is not None}
        if summary["mean_accuracy"] is not None:
            extra["peers' mean accuracy"] = f"{summary['mean_accuracy']:.4f} (spread {summary['spread']:.4f})"
        extra["consensus distance"] = f"{summary['consensus_distance']:.4g} " \
                                      f"({summary['relative_consensus_distance']:.2%} of the mean model's norm)"
        if summary["failed_peers"]:
            extra["failed peers"] = ", ".join(map(str, summary["failed_peers"]))
        if vecs:
            output.finish(spec, torch.stack(vecs).mean(0), extra)
    finally:
        output.close()
