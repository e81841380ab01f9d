"""Live fuzzing: a raw DEALER throws random, hostile and mutated messages at a coordinator while it trains with real
client processes (over ipc, in a temporary directory), and the run must still finish every round, each with about
the accuracy of the same round of a clean run.

The attacker says HELLO and READY under a client id of its own, answers TRAIN with OFFER and PULL with a hostile
UPDATE (NaN, Inf, huge, wrongly sized, or a zero delta claiming the largest weight the wire allows), and between
those sends messages from ``fedopt.testing.hostile_frames``. Every message sent is written to ``attack.log`` in the
test's directory, numbered, so a crash can be traced to the message that caused it. CI sends 2,000 messages;
``FEDOPT_FUZZ_EXAMPLES`` sets the count.
"""

from __future__ import annotations

import math
import os
import random
import time

import pytest
import torch
import zmq

from _bus import Cluster, read_rounds, wait_for
from clients.simulation.run import simulate
from fedopt import testing, wire
from fedopt.config import RunConfig
from fedopt.errors import WireError
from fedopt.testing import Fault

from . import record

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
COUNT = int(os.environ.get("FEDOPT_FUZZ_EXAMPLES", "2000"))
ROUNDS, CLIENTS, SEED = max(20, COUNT // 100), 3, 7  # enough rounds that the attack ends while training goes on
OPTS = ["--task", "digits", "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--local-epochs", "1", "--seed",
        str(SEED), "--partition", "iid", "--heartbeat", "0.5", "--min-clients", "2", "--deadline", "10",
        "--fed-eval-every", "2"]
ATTACKER = "1000000"  # a client id of the attacker's own: it impersonates nobody


def hostile_update(k: int, rnd: int, n: int) -> wire.UpdateMsg:
    """The ``k``-th (cyclically) UPDATE the wire accepts and the coordinator must judge: an inflated weight or norm,
    bad values, a wrong length."""
    variants = [
        (torch.zeros(n), 2**40), (torch.full((n,), 1e3), 1), (torch.full((n,), math.nan), 10),
        (torch.full((n,), math.inf), 10), (torch.full((n,), 3e38), 10), (torch.zeros(n + 1), 10),
        (torch.zeros(max(n - 1, 0)), 10), (torch.zeros(1, n), 10),
    ]
    delta, weight = variants[k % len(variants)]
    return wire.UpdateMsg(round=rnd, num_samples=weight, metrics={"loss": 0.1, "partial": False}, delta=delta,
                          sender=ATTACKER)


def seeds(n: int) -> list[list[bytes]]:
    vec = torch.zeros(n)
    msgs = [wire.Hello(client=ATTACKER, device="cpu"), wire.Ready(num_samples=100),
            wire.Offer(round=1, num_samples=100, metrics={"loss": 0.5}), wire.Result(round=2, num_samples=10,
                                                                                     metrics={"accuracy": 0.5}),
            wire.UpdateMsg(round=1, num_samples=100, metrics={"loss": 0.5}, delta=vec), wire.Heartbeat(),
            wire.SecAgg(round=1, parts=[b"\x80"]), wire.GossipPush(xid=1, num_samples=5, addr="ipc://x", model=vec),
            wire.Bye(reason="leaving"), wire.Pass(round=1, reason="no update")]
    return [[bytes(f) for f in wire.encode(m, chunk_bytes=max(4 * n // 3, 1))] for m in msgs]


def attack(ctx: zmq.Context, url: str, count: int, log_path, running) -> dict:
    """Send ``count`` hostile messages to ``url``, reacting to what comes back (a hostile upload whenever the
    coordinator pulls one), and go on reacting after the last one until ``running()`` turns false."""
    rng = random.Random(1234)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    stats = {"sent": 0, "updates": 0, "trains": 0, "finished_at_round": None}
    n, pool = 16, seeds(16)
    try:
        with open(log_path, "w") as log:
            def send(frames, what):
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    return
                log.write(f"{stats['sent']}\t{what}\t{[bytes(f)[:160] for f in frames]!r}\n")
                stats["sent"] += 1

            send(wire.encode(wire.Hello(client=ATTACKER, device="cpu", sender=ATTACKER)), "hello")
            fuzzed = 0
            while running():
                while sock.poll(0):
                    try:
                        msg = wire.decode(sock.recv_multipart())
                    except WireError:
                        continue
                    if isinstance(msg, wire.Welcome):
                        n = sum(math.prod(e[1]) for e in msg.spec.get("entries", []))
                        pool = seeds(n)
                        send(wire.encode(wire.Ready(num_samples=rng.choice([1, 600, 2**40]), sender=ATTACKER)),
                             "ready")
                    elif isinstance(msg, wire.Train):
                        stats["trains"] += 1
                        send(wire.encode(wire.Offer(round=msg.round, num_samples=600, sender=ATTACKER)), "offer")
                    elif isinstance(msg, wire.Pull):
                        send(wire.encode(hostile_update(stats["updates"], msg.round, n)), "hostile update")
                        stats["updates"] += 1
                    elif isinstance(msg, wire.Evaluate):
                        send(wire.encode(wire.Result(round=msg.round, num_samples=rng.choice([0, 2**40]),
                                                     metrics={"accuracy": 1.0, "loss": 0.0})), "result")
                    elif isinstance(msg, wire.Bye) and msg.reason != "done":  # told to register again: do
                        send(wire.encode(wire.Hello(client=ATTACKER, device="cpu", sender=ATTACKER)), "hello")
                for _ in range(min(10, count - fuzzed)):
                    send(testing.hostile_frames(rng, pool, model_size=n), "fuzz")
                    fuzzed += 1
                if fuzzed == count and stats["finished_at_round"] is None:
                    stats["finished_at_round"] = len(read_rounds(log_path.parent / "out"))
                log.flush()
                time.sleep(0.002)  # the clients' messages share the coordinator's loop with ours
    finally:
        sock.close(0)
    return stats


def test_coordinator_survives_hostile_traffic_while_training(zmq_context, tmp_path):
    c = Cluster(tmp_path, transport="ipc")
    try:
        c.start_coordinator(*OPTS)
        for i in range(CLIENTS):
            # each round takes at least 0.5 s of training, so the attack (a few ms a message) overlaps the run
            c.start_client(i, faults={Fault.SLOW_TRAIN: 0.5})
        wait_for(lambda: c.rounds() or "training round" in c.log("client-0"), 120, "training to start")
        stats = attack(zmq_context, c.url, COUNT, tmp_path / "attack.log",
                       running=lambda: c.coordinator.poll() is None)
        log = c.log()
        assert c.coordinator.returncode == 0, f"the coordinator died; see {tmp_path}/attack.log\n{log[-4000:]}"
    finally:
        c.stop()
    rows = c.rounds()
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    assert stats["finished_at_round"] is not None and stats["finished_at_round"] < ROUNDS, \
        f"the run ended before the attack did: raise ROUNDS ({stats})"
    ref = simulate(RunConfig.of(task="digits", clients=CLIENTS, rounds=ROUNDS, local_epochs=1, seed=SEED,
                             partition="iid", out=str(tmp_path / "ref"), progress="off"))
    clean = [r["accuracy"] for r in ref.records]
    got = [r["accuracy"] for r in rows]
    # a round the attacker poisoned counts even when later rounds recover: every round stays near the clean one
    poisoned = [(i + 1, round(a, 3), round(b, 3)) for i, (a, b) in enumerate(zip(got, clean))
                if not math.isfinite(a) or a < b - 0.15]
    assert not poisoned, f"rounds (round, accuracy, clean accuracy) the attack pulled down: {poisoned}; " \
                         f"see {tmp_path}/attack.log and coordinator.log"
    record(f"coordinator: {stats['sent']} fuzzed messages while training", got[-1], clean[-1], rounds=len(rows))
    assert got[-1] >= clean[-1] - 0.05, (got[-1], clean[-1], stats)
    print(f"\nlive fuzz: {stats['sent']} messages sent over rounds 1-{stats['finished_at_round'] + 1} of {ROUNDS}, "
          f"{stats['updates']} hostile uploads pulled; accuracy {got[-1]:.3f} vs clean {clean[-1]:.3f}")
