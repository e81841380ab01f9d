"""Gossip swarms of real processes on loopback: accuracy against FedAvg, consensus, churn, bad input, refused keys."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import load_file

from clients.gossip.sim import peer_command, swarm_summary
from fedopt import wire
from fedopt.config import RunConfig
from fedopt.keys import generate_keys
from fedopt.launch import free_ports, one_thread_env, spawn, stop_processes
from fedopt.metrics import read_metrics
from fedopt.testing import Fault, fault_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PEER_ENV = one_thread_env(PYTHONUNBUFFERED="1")  # each peer process on one core
CONSENSUS_TOLERANCE = 0.02  # final consensus distance, relative to the mean model's norm


def rows(d: Path) -> list[dict]:
    return read_metrics(d / "metrics.jsonl")


def log(d: Path) -> str:
    p = d / "peer.log"
    return p.read_text(errors="replace") if p.exists() else ""


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_eight_peers_match_fedavg_and_refuse_a_rogue_key(zmq_context, tmp_path):
    from clients.simulation.run import simulate

    n, rounds = 8, 20
    cfg = RunConfig.of(clients=n, rounds=rounds, local_epochs=2, partition="dirichlet", alpha=0.5, seed=0, progress="off",
                    out=str(tmp_path / "fedavg"), mode="gossip")
    keys = generate_keys(tmp_path / "keys", n)
    rogue = generate_keys(tmp_path / "rogue", 1)
    urls = [f"tcp://127.0.0.1:{p}" for p in free_ports(n)]
    dirs = [tmp_path / f"peer-{i}" for i in range(n)]
    procs = []
    try:
        for i in range(n):
            dirs[i].mkdir()
            seeds = [urls[(i - 1) % n], urls[(i + 1) % n]]
            procs.append(spawn(peer_command(urls[i], i, n, seeds, cfg, dirs[i], str(keys), ["--exchanges", "8"]),
                               dirs[i] / "peer.log", PEER_ENV))
        wait_for(lambda: len(rows(dirs[0])) >= 1, 60, "peer 0 to train a round")
        _rogue(zmq_context, urls[0], keys, rogue)
        wait_for(lambda: all(p.poll() is not None for p in procs), 120, "every peer to finish")
    finally:
        stop_processes(procs)
    assert [p.returncode for p in procs] == [0] * n, log(dirs[0])[-3000:]
    reference = simulate(cfg.replace(mode="federated")).records  # FedAvg, same data, epochs and rounds, in-process
    fedavg = reference[-1]["accuracy"]
    s = swarm_summary(dirs)
    print(f"\ngossip mean {s['mean_accuracy']:.4f} (spread {s['spread']:.4f}) vs FedAvg {fedavg:.4f}; "
          f"consensus {s['relative_consensus_distance']:.4f}")
    # how close asynchronous gossip gets to FedAvg depends on how many exchanges complete, so on load: 0.906-0.916 on
    # a quiet 2-core machine, 0.891 in a CI run next to another test (FedAvg 0.914); the assertions below check that
    # the peers mix, and benchmarks/gossip.py measures the gap
    assert s["mean_accuracy"] >= fedavg - 0.04
    # the consensus distance each peer measures shrinks, and the final models agree within the tolerance
    early = [r["consensus"] for d in dirs for r in rows(d)[:3] if r["consensus"] is not None]
    late = [r["consensus"] for d in dirs for r in rows(d)[-3:] if r["consensus"] is not None]
    assert sum(late) / len(late) < 0.7 * sum(early) / len(early)
    assert s["relative_consensus_distance"] < CONSENSUS_TOLERANCE
    assert "curve: refused" in log(dirs[0])  # the rogue key was refused at the handshake, and logged
    # no hotspot: no peer moved more than 4 models per exchange slot in any round after
    # the first (where the peers' start-up pulls land, which are outside the budget); counted at its sockets, the
    # bytes (headers and refusals included) stay within 10% of that
    params = sum(t.numel() for t in load_file(str(dirs[1] / "model.safetensors")).values())
    load = [(r["models_moved"] / r["slots"], (r["bytes_up"] + r["bytes_down"]) / (r["slots"] * 4 * params))
            for d in dirs for r in rows(d)[1:]]
    assert max(m for m, _ in load) <= 4 and max(b for _, b in load) <= 4.4, max(load)


def _battery(ctx: zmq.Context, url: str, out: Path) -> None:
    """The bus's malformed-message battery, aimed at a running peer's socket by a raw DEALER."""
    with ctx.socket(zmq.DEALER) as raw:  # closed however the block ends
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(url)
        head = lambda **kw: msgpack.packb({"v": 1, **kw})  # noqa: E731
        me = "tcp://127.0.0.1:1"
        raw.send_multipart([b"\x00garbage\xff"])
        raw.send_multipart([b"\xc1 not msgpack"])
        raw.send_multipart([head(type="EXPLODE")])
        push = dict(type="GOSSIP_PUSH", xid=1, version=1, num_samples=10, addr=me, peers={})
        raw.send_multipart([head(**push, tensors=[{"dtype": "float32", "shape": [100]}]), b"\0" * 12])
        raw.send_multipart([head(**push, tensors=[{"dtype": "float32", "shape": [10**12]}]), b"\0" * 16])
        unasked = wire.GossipPush(xid=5, num_samples=10, addr=me, model=torch.zeros(10))
        raw.send_multipart(wire.encode(unasked))
        for bad in ("nan", "short"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # ask for an exchange until the peer agrees, then push a bad model
                raw.send_multipart(wire.encode(wire.GossipFetch(xid=9, addr=me, kind="exchange")))
                if raw.poll(5000):
                    msg = wire.decode(raw.recv_multipart())
                    if isinstance(msg, wire.GossipReply):
                        n = msg.model.numel()
                        model = torch.full((n,), math.nan) if bad == "nan" else torch.zeros(n - 1)
                        raw.send_multipart(wire.encode(wire.GossipPush(xid=9, num_samples=10, addr=me, model=model)))
                        break
                time.sleep(0.1)
            else:
                raise AssertionError("the peer never agreed to an exchange")
        wait_for(lambda: "does not match this peer's" in log(out), 30, "the peer to refuse the short model")


def _rogue(ctx: zmq.Context, url: str, keys: Path, rogue: Path) -> None:
    """A peer whose key is not in the allow-list: refused at the handshake, and the refusal is logged."""
    with ctx.socket(zmq.DEALER) as s:  # closed however the block ends
        s.setsockopt(zmq.LINGER, 0)
        secret = rogue / "clients" / "client-000.key_secret"
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(secret)
        s.curve_serverkey, _ = zmq.auth.load_certificate(keys / "coordinator.key")
        s.connect(url)
        s.send_multipart(wire.encode(wire.GossipFetch(xid=1, addr="tcp://127.0.0.1:2", kind="fetch")))
        assert not s.poll(3000)  # nothing comes back


def test_churn_kill_join_restart_and_bad_input(zmq_context, tmp_path, monkeypatch):
    """One swarm, every kind of churn: two peers killed with SIGKILL mid-run, a newcomer, and a killed peer restarted
    from its checkpoint; and the malformed-message battery aimed at a survivor while all that goes on. Peers are slowed a
    little (``Fault.SLOW_TRAIN``) so the run lasts long enough to churn in.

    What it asserts holds however loaded the machine is: IID shards, so a survivor's accuracy does not hinge on how many
    exchanges the load let complete (a peer that trained its shard alone still clears the bar), and the newcomer's
    join is checked by what a fetch guarantees (a newer model than its own, from the live swarm)."""
    n, rounds = 5, 12
    cfg = RunConfig.of(clients=n + 1, rounds=rounds, local_epochs=2, partition="iid", seed=1, mode="gossip")
    urls = [f"ipc://{tmp_path}/p{i}.sock" for i in range(n + 1)]
    dirs = [tmp_path / f"peer-{i}" for i in range(n + 1)]
    fast = ["--exchange-timeout", "1", "--peer-timeout", "4", "--join-wait", "4", "--linger", "1",
            "--log-level", "INFO"]
    for name, value in fault_env({Fault.SLOW_TRAIN: 0.3}).items():  # every peer, through its environment
        monkeypatch.setenv(name, value)
    procs: dict[int, object] = {}
    started = []

    def start(i, *extra):
        dirs[i].mkdir(exist_ok=True)
        seeds = [urls[(i - 1) % n], urls[(i + 1) % n]] if i < n else urls[:2]
        procs[i] = spawn(peer_command(urls[i], i, n + 1, seeds, cfg, dirs[i], None, [*fast, *extra]),
                         dirs[i] / "peer.log", PEER_ENV)
        started.append(procs[i])

    try:
        for i in range(n):
            start(i, "--linger", "8")  # survivors stay while anyone still talks to them, however slow it starts
        wait_for(lambda: len(rows(dirs[0])) >= 3 and len(rows(dirs[3])) >= 2, 90, "round 3")
        for i in (3, 4):  # kill -9 two peers mid-run
            os.killpg(procs[i].pid, signal.SIGKILL)
            procs[i].wait(timeout=10)
        wait_for(lambda: len(rows(dirs[0])) >= 5, 60, "round 5")
        start(5, "--rounds", "5", "--join-wait", "15")  # a newcomer joins (it trains 5 rounds of its own)
        start(3, "--resume", "--join-wait", "15")  # a killed peer restarts from its (now stale) checkpoint
        _battery(zmq_context, urls[1], dirs[1])  # malformed messages and bad models aimed at a survivor
        wait_for(lambda: all(procs[i].poll() is not None for i in (0, 1, 2, 3, 5)), 120, "the peers to finish")
    finally:
        stop_processes(started)
    for i in (0, 1, 2, 3, 5):
        assert procs[i].returncode == 0, log(dirs[i])[-2000:]
    survivors = [rows(dirs[i])[-1]["accuracy"] for i in (0, 1, 2)]
    assert min(survivors) >= 0.80, survivors  # the rest finished and reached the target
    assert "timed out: dropping it" in "".join(log(dirs[i]) for i in (0, 1, 2))  # they noticed the dead ones
    # the newcomer pulled the swarm's model before training (the median of its live seeds' models, or one bounded
    # mix) and caught up within a few exchanges
    assert "joined: " in log(dirs[5])
    new = rows(dirs[5])
    assert new[0]["round"] == 1 and new[0]["version"] >= 2  # it took a model newer than its own
    assert new[1]["accuracy"] >= min(survivors) - 0.10, (new[:2], survivors)
    # the restarted peer continued from its checkpoint, adopted the newer swarm model, and finished
    back = rows(dirs[3])
    assert [r["round"] for r in back] == list(range(1, rounds + 1))  # one metrics file, continued after the restart
    assert back[-1]["accuracy"] >= 0.75
    assert "joined: " in log(dirs[3])
    # the attacked peer logged every bad message, kept training to the end and refused the bad models
    text = log(dirs[1])
    for reason in ("header is not msgpack", "unknown message type 'EXPLODE'", "frame has 12", "over the limit",
                   "non-finite values", "does not match this peer's", "matches no exchange"):
        assert reason in text, reason
    assert [r["round"] for r in rows(dirs[1])] == list(range(1, rounds + 1))
    model = load_file(str(dirs[1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in model.values())
