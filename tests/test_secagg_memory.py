"""The in-memory secagg transport: real clients in process, bytes counted each way, client time by message kind."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest

from fedopt.secagg import (MemoryTransport, QuantConfig, RoundConfig, SecAggClient, SecAggDriver, codec,
                           generate_identity, identity_public_bytes)

P = 50


def _setup(n: int, weighted: bool = True):
    ids = [f"c{i}" for i in range(n)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    quant = QuantConfig(clip=1.0, bits=12, max_weight=20 if weighted else None)
    cfg = RoundConfig.create(1, ids, quant.vector_length(P))
    encoded: dict[str, np.ndarray] = {}
    clients = {}
    for u in ids:
        clients[u] = SecAggClient(u, idents[u], pinned, noise=lambda r, u=u: u.encode().ljust(32, b"."))
        clients[u].on_encoded = lambda r, v, u=u: encoded.__setitem__(u, v.copy())
    ticks = itertools.count()
    transport = MemoryTransport(clients, timer=lambda: float(next(ticks)))  # every call into a client takes 1 "s"
    driver = SecAggDriver(cfg, quant, transport.send, identities=pinned)
    return ids, cfg, quant, transport, driver, encoded


def test_a_client_that_never_provides_an_update_has_dropped_and_the_sum_is_exact():
    ids, cfg, quant, transport, driver, encoded = _setup(6)
    rng = np.random.default_rng(3)
    updates = {u: rng.normal(0, 0.05, P).astype(np.float32) for u in ids}
    driver.start()
    transport.pump(driver)
    assert driver.stage == "mask" and driver.waiting == frozenset(ids)
    for u in ids[1:]:  # c0 trains but never hands its update over
        assert transport.provide_update(u, updates[u], 5) == 1
        transport.deliver(driver)
    assert driver.waiting == {"c0"}
    driver.close_stage()
    transport.pump(driver)
    out = driver.outcome
    assert out.survivors == tuple(ids[1:]) and out.dropped == ("c0",)
    want = np.sum(np.stack([encoded[u] for u in out.survivors]), axis=0, dtype=cfg.dtype)
    assert np.array_equal(out.total, want) and out.weight == 5 * 5
    assert np.abs(out.mean - np.mean([updates[u] for u in ids[1:]], axis=0)).max() <= quant.step


def _finish(transport, driver, ids) -> None:
    """Key sharing, every client's (zero) update, then unmasking: the round runs to its end."""
    transport.pump(driver)
    for u in ids:
        transport.provide_update(u, np.zeros(P), 1)
    transport.deliver(driver)
    driver.close_stage()
    transport.pump(driver)


def test_bytes_are_counted_each_way_as_packed():
    ids, cfg, quant, transport, driver, _ = _setup(4)
    driver.start()
    setup_size = sum(memoryview(p).nbytes for p in codec.pack(codec.Setup(cfg, quant)))
    assert transport.received == {u: setup_size for u in ids}
    queued = []
    while (got := transport.recv()) is not None:
        queued.append(got)
        driver.feed(*got)
    assert {u for u, _ in queued} == set(ids)  # one advertisement each, already answered
    assert transport.sent == {u: sum(len(p) for p in parts) for u, parts in queued}
    _finish(transport, driver, ids)
    assert driver.done
    # both ends counted every message: the clients' sends are what the driver received, and the reverse
    assert transport.bytes_up == driver.bytes_received == driver.outcome.bytes_received
    assert transport.bytes_down == driver.bytes_sent
    masked = 4 * cfg.vector_length  # each client's masked vector frame, uint32 words
    assert all(transport.sent[u] > masked for u in ids)


def test_client_time_is_counted_per_message_kind():
    ids, cfg, quant, transport, driver, _ = _setup(4, weighted=False)
    driver.start()
    _finish(transport, driver, ids)
    n = len(ids)
    kinds = {"setup": n, "keys": n, "deliver": n, "update": n, "unmask": n}
    assert transport.client_calls == kinds
    assert transport.client_seconds == {k: float(c) for k, c in kinds.items()}  # one tick per call


def test_messages_for_strangers_are_dropped_and_recv_never_waits():
    ids, cfg, quant, transport, driver, _ = _setup(3)
    transport.send("zz", codec.pack(codec.Abort(1, "x")))
    assert transport.recv(5.0) is None and transport.bytes_down == 0
    with pytest.raises(KeyError):
        transport.provide_update("zz", np.zeros(P), 1)
    transport.send("c0", [msgpack.packb({"kind": 3})])  # malformed: the client logs and drops it
    assert transport.client_calls == {"malformed": 1} and transport.recv() is None
