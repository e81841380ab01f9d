"""run_round + SecAggClient over an in-memory transport (queues, one thread per client), with clients
killed at every stage, malformed traffic, and the codec's validation."""

from __future__ import annotations

import enum
import queue
import threading

import msgpack
import numpy as np
import pytest

from fedopt.errors import SecAggError, WireError
from fedopt.secagg import (QuantConfig, RoundConfig, SecAggClient, codec, generate_identity, identity_public_bytes,
                           run_round)

P = 300
TIMEOUT = 1.0  # per stage; only stages where someone died wait for it


class Kill(enum.Enum):
    """The incoming message at which a client thread dies (stops reading and sending): a fault at the seam."""

    AT_SETUP = codec.Setup
    AT_KEYS = codec.NeighbourKeys
    AT_DELIVERY = codec.ShareDelivery
    AT_UNMASK = codec.UnmaskRequest


class Hub:
    """An in-memory transport: one inbox queue per client, one for the coordinator."""

    def __init__(self, ids):
        self.inbox = {u: queue.Queue() for u in ids}
        self.coordinator = queue.Queue()
        self.sent_by = {u: 0 for u in ids}

    def send(self, client, parts):  # coordinator -> client
        self.inbox[client].put([bytes(p) for p in parts])

    def recv(self, timeout):  # client -> coordinator
        try:
            return self.coordinator.get(timeout=timeout)
        except queue.Empty:
            return None

    def reply(self, client, parts):
        self.sent_by[client] += sum(len(bytes(p)) for p in parts)
        self.coordinator.put((client, [bytes(p) for p in parts]))


def _client_loop(hub, sa: SecAggClient, update, kill: Kill | None, stop: threading.Event):
    while not stop.is_set():
        try:
            parts = hub.inbox[sa.id].get(timeout=0.05)
        except queue.Empty:
            continue
        if kill is not None and isinstance(codec.unpack(parts), kill.value):
            return  # killed: the process is gone
        replies = sa.handle(parts)
        if isinstance(codec.unpack(parts), codec.Setup):
            replies += sa.provide_update(*update)  # "training" finishes right after setup
        for r in replies:
            hub.reply(sa.id, r)


def run(n, kills=None, rounds=1, weighted=True, seed=0):
    ids = [f"c{i:02d}" for i in range(n)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    rng = np.random.default_rng(seed)
    updates = {u: (rng.normal(0, 0.05, P), int(rng.integers(5, 50))) for u in ids}
    hub = Hub(ids)
    stop = threading.Event()
    kills = kills or {}
    sessions = {u: SecAggClient(u, idents[u], pinned) for u in ids}
    threads = [threading.Thread(target=_client_loop, args=(hub, sessions[u], updates[u], kills.get(u), stop),
                                daemon=True) for u in ids]
    for t in threads:
        t.start()
    quant = QuantConfig(clip=10.0, bits=16, max_weight=50 if weighted else None)
    try:
        cfg = RoundConfig.create(1, ids, quant.vector_length(P))
        return run_round(cfg, quant, hub.send, hub.recv, stage_timeout=TIMEOUT, identities=pinned), updates, hub
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        assert not any(t.is_alive() for t in threads)


def _expected(updates, survivors):
    w = np.array([updates[u][1] for u in survivors], dtype=np.float64)
    x = np.stack([updates[u][0] for u in survivors])
    return (w[:, None] * x).sum(0) / w.sum()


def test_round_over_queues_gives_the_weighted_mean():
    out, updates, hub = run(6)
    assert out.survivors == tuple(sorted(updates)) and out.dropped == ()
    step = 10.0 / (2 ** 15 - 1)
    assert np.abs(out.mean - _expected(updates, out.survivors)).max() <= 6 * step * 50 / out.weight
    assert out.weight == sum(n for _, n in updates.values())
    assert all(b > 4 * P for b in hub.sent_by.values())  # each client sent its masked vector, and more


@pytest.mark.parametrize("kill", list(Kill))
def test_a_client_killed_at_each_stage_leaves_the_survivors_exact_sum(kill):
    out, updates, _ = run(8, {"c03": kill})
    if kill is Kill.AT_UNMASK:  # its masked input is in; its self-mask comes back from its neighbours' shares
        assert "c03" in out.survivors
    else:
        assert "c03" not in out.survivors
    assert out.dropped == (("c03",) if kill is Kill.AT_DELIVERY else ())
    step = 10.0 / (2 ** 15 - 1)
    assert np.abs(out.mean - _expected(updates, out.survivors)).max() <= 8 * step * 50 / out.weight


def test_too_many_killed_aborts_with_a_clear_error():
    kills = {u: Kill.AT_DELIVERY for u in ("c00", "c01", "c02", "c03", "c04")}
    with pytest.raises(SecAggError, match="aborted.*threshold"):
        run(8, kills)


def test_malformed_and_duplicate_traffic_is_dropped_and_the_round_completes():
    ids = [f"c{i}" for i in range(4)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    quant = QuantConfig(clip=10.0, bits=16)
    cfg = RoundConfig.create(3, ids, P)
    clients = {u: SecAggClient(u, idents[u], pinned) for u in ids}
    inbox = {u: [] for u in ids}
    outq: list = [("c0", [b"\xc1garbage"]), ("c1", [msgpack.packb({"kind": "advertise", "round": 3})])]

    def send(u, parts):
        inbox[u].append([bytes(p) for p in parts])

    def recv(timeout):
        while not outq:  # deliver pending client work synchronously
            pending = [(u, m) for u in ids for m in inbox[u]]
            if not pending:
                return None
            for u in ids:
                msgs, inbox[u] = inbox[u], []
                for m in msgs:
                    reps = clients[u].handle(m)
                    if isinstance(codec.unpack(m), codec.Setup):
                        reps += clients[u].provide_update(np.full(P, 0.01 * (ids.index(u) + 1)), 1)
                        if u == "c2":  # c2 sends its advertisement twice
                            outq.append(("c2", list(reps[0])))
                    outq.extend((u, r) for r in reps)
        return outq.pop(0)

    out = run_round(cfg, quant, send, recv, stage_timeout=TIMEOUT, identities=pinned)
    assert out.survivors == tuple(ids)
    assert np.allclose(out.mean, 0.025, atol=4 * 10.0 / (2 ** 15 - 1))
    # a client that receives a malformed message leaves the round without raising
    assert clients["c0"].handle([b"\x00"]) == []


def test_codec_round_trips_and_rejects_bad_bodies():
    ids = ["a", "b", "c"]
    cfg = RoundConfig.create(2, ids, 10)
    quant = QuantConfig(clip=1.5, bits=12, max_weight=7)
    s = codec.unpack(codec.pack(codec.Setup(cfg, quant)))
    assert s.config == cfg and s.quant == quant
    y = codec.MaskedInput(2, "a", np.arange(10, dtype=np.uint32))
    back = codec.unpack(codec.pack(y))
    assert back.sender == "a" and np.array_equal(back.vector, y.vector)
    bad = [
        [msgpack.packb({"kind": "masked", "round": 2, "sender": "a", "dtype": "float32", "length": 10}), bytes(40)],
        [msgpack.packb({"kind": "masked", "round": 2, "sender": "a", "dtype": "uint32", "length": 11}), bytes(40)],
        [msgpack.packb({"kind": "advertise", "round": 2, "sender": "a", "c_pk": b"x" * 31, "s_pk": b"x" * 32,
                        "signature": b"x" * 64})],
        [msgpack.packb({"kind": "unmask", "round": -1, "recipient": "a", "survivors": [], "dropped": []})],
        [msgpack.packb({"kind": "pickle", "round": 1})],
        [msgpack.packb([1, 2, 3])],
        [b"\xc1"],
    ]
    for parts in bad:
        with pytest.raises(WireError):
            codec.unpack(parts)
