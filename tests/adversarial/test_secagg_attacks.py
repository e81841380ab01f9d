"""Attacks on secure aggregation, end to end: a client that forges a Shamir share in its unmask reply, and a client
that claims 2**40 samples in READY and then drops out. Each run is compared with a clean control run of the same
seed: every round must complete (or abort cleanly) and the final accuracy must stay within 2 points."""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np
import pytest

from fedopt.config import RunConfig
from fedopt.secagg import ClientSession, shamir

from . import record

BASE = dict(task="digits", clients=8, rounds=8, local_epochs=1, seed=0, progress="off", aggregator="secagg",
            clip=10.0, bits=16)
LIAR = "3"


def _forging_unmask(liar: str):
    """ClientSession.unmask as a hostile client runs it: each b-share it returns is shifted so that the secret the
    server interpolates (from the t smallest share ids, as plain Shamir does) moves by +1, a crafted forgery that
    stays in range and so passes any size check."""
    honest = ClientSession.unmask

    def unmask(self, msg):
        resp = honest(self, msg)
        if self.id != liar:
            return resp
        cfg, me = self.config, self.config.share_id(self.id)
        forged = []
        for owner, data in resp.b_shares:
            # the owner's share holders, all alive in these tests: the server interpolates from the t smallest ids
            xs = tuple(sorted(cfg.share_id(w) for w in cfg.neighbours(owner)))[: cfg.t]
            y = shamir.decode_share(data)
            if me in xs:  # shift the secret by +1: add the inverse of this holder's Lagrange coefficient
                y = (y + pow(shamir._lagrange_at_zero(xs)[xs.index(me)], -1, shamir.PRIME)) % shamir.PRIME
            forged.append((owner, shamir.encode_share(y)))
        return type(resp)(resp.round, resp.sender, tuple(forged), resp.sk_shares)

    return unmask


def _run(cfg: RunConfig, sizes: dict | None = None, drop: str | None = None):
    """An in-process run: ``(final accuracy, outcomes per round)``; ``sizes`` overrides READY counts, ``drop`` never
    sends its update (it drops out after sharing keys, every round)."""
    from clients.simulation.run import Simulation

    sim = Simulation(cfg)
    if sizes:
        sim.sizes = {**sim.sizes, **sizes}
    if drop is not None:
        run_round = sim.executor.run_round
        sim.executor.run_round = lambda server, jobs: run_round(server, [j for j in jobs if j.client != drop])
    outcomes = []
    close = sim.server.close

    def recording_close():
        out = close()
        outcomes.append((out, dict(sim.server.aggregator.last_round)))
        return out

    sim.server.close = recording_close
    sim.run()
    return sim.evaluate()["accuracy"], outcomes


@pytest.fixture(scope="module")
def control():
    acc, outcomes = _run(RunConfig.of(**BASE))
    assert all(o.applied for o, _ in outcomes) and acc > 0.6
    return acc


def test_a_forged_share_is_set_aside_and_the_run_matches_the_clean_control(control, monkeypatch, caplog):
    monkeypatch.setattr(ClientSession, "unmask", _forging_unmask(LIAR))
    with caplog.at_level(logging.WARNING, logger="fedopt.secagg"):
        acc, outcomes = _run(RunConfig.of(**BASE))
    # each round either completed or aborted cleanly (model unchanged, reason recorded); none may be garbage
    for out, info in outcomes:
        assert out.applied or info.get("aborted"), info
    assert all(out.applied for out, _ in outcomes)  # with t honest shares left, every round completes
    record("secagg: a forged Shamir share", acc, control, rounds=len(outcomes))
    assert abs(acc - control) <= 0.02, (acc, control)
    assert f"forged Shamir shares from {LIAR}" in caplog.text


def test_ready_of_2_pow_40_then_dropout_does_not_stall_training():
    """The control drops the same client with an honest READY: the claim of 2**40 must change nothing."""
    control, _ = _run(RunConfig.of(**BASE), drop=LIAR)
    acc, outcomes = _run(RunConfig.of(**BASE), sizes={LIAR: 2**40}, drop=LIAR)
    for out, info in outcomes:
        assert out.applied, info  # the dropout costs one client, never the round
        assert out.count == BASE["clients"] - 1
        assert out.weight <= (BASE["clients"] - 1) * 1_000_000
    record("secagg: READY of 2**40 then dropout", acc, control, rounds=len(outcomes))
    assert abs(acc - control) <= 0.02, (acc, control)


# ---- the same attack through the bus drivers (run_round + SecAggClient over in-memory queues) ------------------------
def test_a_forged_share_over_the_drivers_gives_the_exact_sum(monkeypatch, caplog):
    from fedopt.secagg import (QuantConfig, RoundConfig, SecAggClient, generate_identity, identity_public_bytes,
                               run_round)

    monkeypatch.setattr(ClientSession, "unmask", _forging_unmask("c03"))
    ids = [f"c{i:02d}" for i in range(8)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    rng = np.random.default_rng(1)
    updates = {u: (rng.normal(0, 0.05, 200), int(rng.integers(5, 50))) for u in ids}
    to_client = {u: queue.Queue() for u in ids}
    to_server: queue.Queue = queue.Queue()
    encoded: dict[str, np.ndarray] = {}
    stop = threading.Event()

    def client(u):
        sa = SecAggClient(u, idents[u], pinned)
        sa.on_encoded = lambda r, v: encoded.__setitem__(u, v.copy())
        while not stop.is_set():
            try:
                parts = to_client[u].get(timeout=0.05)
            except queue.Empty:
                continue
            replies = sa.handle(parts)
            if sa.round is not None and u not in encoded:
                replies += sa.provide_update(*updates[u])
            for r in replies:
                to_server.put((u, [bytes(p) for p in r]))

    def recv(timeout):
        try:
            return to_server.get(timeout=timeout)
        except queue.Empty:
            return None

    threads = [threading.Thread(target=client, args=(u,), daemon=True) for u in ids]
    for t in threads:
        t.start()
    quant = QuantConfig(clip=10.0, bits=16, max_weight=50)
    try:
        cfg = RoundConfig.create(1, ids, quant.vector_length(200))
        with caplog.at_level(logging.WARNING, logger="fedopt.secagg"):
            out = run_round(cfg, quant, lambda u, p: to_client[u].put([bytes(x) for x in p]), recv,
                            stage_timeout=5.0, identities=pinned)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
    want = np.sum(np.stack([encoded[u] for u in out.survivors]), axis=0, dtype=out.total.dtype)
    assert out.survivors == tuple(ids) and np.array_equal(out.total, want)  # bit for bit
    assert "forged Shamir shares from c03" in caplog.text
