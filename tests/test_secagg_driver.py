"""The server-side SecAgg+ driver, event by event, with an injected clock and real clients; no sockets, no sleeps."""

from __future__ import annotations

import dataclasses
import logging

import msgpack
import numpy as np
import pytest

from fedopt.errors import ConfigError, SecAggError
from fedopt.secagg import (QuantConfig, RoundConfig, SecAggClient, SecAggDriver, codec, generate_identity,
                           identity_public_bytes, run_round)

P = 40
TIMEOUT = 10.0


class Clock:
    """Seconds that move only when the test moves them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Wire:
    """What the driver sent, in order, and the clients that answer it when asked (``answer``)."""

    def __init__(self, clients: dict[str, SecAggClient]) -> None:
        self.clients = clients
        self.sent: list[tuple[str, list]] = []
        self.pinned: dict[str, bytes] = {}

    def send(self, client: str, parts: list) -> None:
        self.sent.append((client, [bytes(p) for p in parts]))

    def answer(self, only=None) -> list[tuple[str, list]]:
        """Each client handles what it was sent since the last call; their replies, in order."""
        out, pending, self.sent = [], self.sent, []
        for u, parts in pending:
            if only is None or u in only:
                out += [(u, r) for r in self.clients[u].handle(parts)]
        return out


def _round(n: int, round: int = 1, weighted: bool = False):
    ids = [f"c{i}" for i in range(n)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    quant = QuantConfig(clip=1.0, bits=12, max_weight=10 if weighted else None)
    cfg = RoundConfig.create(round, ids, quant.vector_length(P))
    wire = Wire({u: SecAggClient(u, idents[u], pinned, noise=lambda r: bytes(32)) for u in ids})
    clock = Clock()
    driver = SecAggDriver(cfg, quant, wire.send, identities=pinned, clock=clock, stage_timeout=TIMEOUT)
    wire.pinned = pinned
    return ids, wire, clock, driver


def test_a_stage_closes_when_everyone_answered_and_not_before():
    ids, wire, clock, driver = _round(4)
    driver.start()
    assert driver.stage == "advertise" and driver.expected == frozenset(ids)
    adverts = wire.answer()
    for u, parts in adverts[:-1]:
        assert driver.feed(u, parts)
    assert not driver.poll() and driver.stage == "advertise" and driver.waiting == {"c3"}
    assert driver.feed(*adverts[-1])
    assert driver.poll() and driver.stage == "share" and driver.expected == frozenset(ids)


def test_a_stage_closes_at_its_deadline_and_the_silent_client_has_dropped(caplog):
    ids, wire, clock, driver = _round(4)
    driver.start()
    for u, parts in wire.answer(only={"c0", "c1", "c2"}):  # c3 never answers
        assert driver.feed(u, parts)
    clock.now = TIMEOUT - 0.01
    assert not driver.poll() and driver.time_left() == pytest.approx(0.01)
    clock.now = TIMEOUT
    with caplog.at_level(logging.INFO, logger="fedopt.secagg"):
        assert driver.poll()
    assert driver.stage == "share" and driver.expected == {"c0", "c1", "c2"}
    assert "1 client(s) dropped in KeyAdvertisement: c3" in caplog.text
    assert {u for u, _ in wire.sent} == {"c0", "c1", "c2"}  # the neighbour keys went to the advertisers only
    assert driver.time_left() == TIMEOUT  # the next stage's deadline runs from when its messages went out


def test_a_client_known_gone_is_not_waited_for():
    ids, wire, clock, driver = _round(4)
    driver.start()
    for u, parts in wire.answer(only={"c0", "c1", "c2"}):
        driver.feed(u, parts)
    assert not driver.poll(gone=()) and driver.poll(gone={"c3"}) and driver.stage == "share"


def test_messages_that_do_not_fit_are_dropped_and_logged_never_raised(caplog):
    ids, wire, clock, driver = _round(4)
    driver.start()
    adverts = dict(wire.answer())
    shares_msg = codec.pack(codec.ShareKeys(1, "c0", ()))
    other_round = codec.pack(dataclasses.replace(codec.unpack(adverts["c1"]), round=2))
    cases = [
        ("c1", adverts["c0"], "claims to be 'c0'"),  # sent by c1 under c0's name
        ("zz", adverts["c0"], "not expected"),  # not a participant
        ("c0", shares_msg, "expected a KeyAdvertisement, got ShareKeys"),
        ("c1", other_round, "round 2, not 1"),
        ("c2", [b"\xc1garbage"], "not valid msgpack"),
        ("c2", [msgpack.packb({"kind": "advertise", "round": 1})], "sender"),
        ("c2", [], "empty"),
    ]
    with caplog.at_level(logging.WARNING, logger="fedopt.secagg"):
        for client, parts, why in cases:
            assert not driver.feed(client, parts), why
            assert why in caplog.records[-1].getMessage()
    assert driver.waiting == frozenset(ids)  # nothing was taken
    for u in ids:
        assert driver.feed(u, adverts[u])
    assert not driver.feed("c0", adverts["c0"])  # a second answer
    assert "already answered" in caplog.records[-1].getMessage()
    assert driver.poll() and driver.stage == "share"


def test_too_few_answers_abort_the_round_abort_goes_to_everyone_and_one_error_is_logged(caplog):
    ids, wire, clock, driver = _round(5)  # k = 4, t = 3
    driver.start()
    for u, parts in wire.answer(only={"c0", "c1"}):
        driver.feed(u, parts)
    clock.now = TIMEOUT
    with caplog.at_level(logging.ERROR, logger="fedopt.secagg"), pytest.raises(SecAggError, match="threshold t=3"):
        driver.poll()
    aborts = [(u, codec.unpack(parts)) for u, parts in wire.sent]
    assert [u for u, _ in aborts] == ids and all(isinstance(m, codec.Abort) and m.round == 1 for _, m in aborts)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "secure aggregation round 1 aborted" in errors[0].getMessage()
    assert driver.stage == "aborted" and not driver.done and driver.outcome is None
    assert isinstance(driver.error, SecAggError)
    assert not driver.poll() and not driver.feed("c0", [b"x"])
    with pytest.raises(SecAggError):
        driver.close_stage()


def test_a_full_round_gives_the_exact_sum_and_the_mean():
    ids, wire, clock, driver = _round(5, weighted=True)
    encoded: dict[str, np.ndarray] = {}
    for u, sa in wire.clients.items():
        sa.on_encoded = lambda r, v, u=u: encoded.__setitem__(u, v.copy())
    rng = np.random.default_rng(0)
    updates = {u: rng.normal(0, 0.05, P) for u in ids}
    driver.start()
    while driver.stage in ("advertise", "share"):
        for got in wire.answer():
            driver.feed(*got)
        assert driver.poll()
    assert driver.stage == "mask" and not wire.answer()  # the deliveries are in; no update yet
    for i, u in enumerate(ids[:-1]):  # the last client never sends its update
        for parts in wire.clients[u].provide_update(updates[u], i + 1):
            assert driver.feed(u, parts)
    driver.close_stage()
    for got in wire.answer():
        driver.feed(*got)
    assert driver.poll() and driver.done and driver.stage == "done"
    out = driver.outcome
    assert out.survivors == tuple(ids[:-1]) and out.dropped == (ids[-1],)
    want = np.sum(np.stack([encoded[u] for u in out.survivors]), axis=0, dtype=out.total.dtype)
    assert np.array_equal(out.total, want)  # bit for bit: the masks cancel
    assert out.weight == 1 + 2 + 3 + 4 and out.bytes_received == driver.bytes_received
    exact = sum((i + 1) * updates[u] for i, u in enumerate(ids[:-1])) / 10
    assert np.abs(out.mean - exact).max() <= QuantConfig(clip=1.0, bits=12).step


def test_run_round_waits_out_a_silent_client_on_the_injected_clock():
    """The blocking loop over the driver: recv waits by moving the clock, so a stage's deadline passes at once."""
    ids, wire, clock, _ = _round(4)
    silent = "c2"
    inbox: list = []

    def send(u, parts):
        if u != silent:
            for r in wire.clients[u].handle(parts):
                inbox.append((u, r))
            if isinstance(codec.unpack(parts), codec.Setup):
                inbox.extend((u, r) for r in wire.clients[u].provide_update(np.full(P, 0.01), 1))

    def recv(timeout):
        if inbox:
            return inbox.pop(0)
        clock.now += timeout
        return None

    cfg = RoundConfig.create(1, ids, P)
    quant = QuantConfig(clip=1.0, bits=12)
    out = run_round(cfg, quant, send, recv, stage_timeout=TIMEOUT, identities=wire.pinned, clock=clock)
    assert out.survivors == ("c0", "c1", "c3") and out.dropped == ()  # c2 never advertised: not in U2 either
    assert clock.now == TIMEOUT  # one deadline waited out, the other stages closed as soon as all answered
    assert np.allclose(out.mean, 0.01, atol=QuantConfig(clip=1.0, bits=12).step)


def test_the_driver_refuses_a_bad_timeout_and_a_second_start():
    ids, wire, clock, driver = _round(3)
    with pytest.raises(ConfigError, match="stage_timeout"):
        SecAggDriver(driver.config, driver.quant, wire.send, stage_timeout=0)
    driver.start()
    with pytest.raises(SecAggError, match="already started"):
        driver.start()
