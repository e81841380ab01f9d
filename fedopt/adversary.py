"""Hostile participants that speak the wire protocol to a running coordinator: the attack classes of the README's
threat model, for the adversarial tests and ``benchmarks/adversarial.py``. Nothing here is used by a run.

Each attack is a function ``attack(ctx) -> None`` that runs until ``ctx.stop`` is set or its deadline passes; it may
open sockets only to ``ctx.url`` (loopback or ipc in every caller) through :mod:`fedopt.bus`. :class:`Attack` runs
one in a thread and closes every socket it opened, whatever happens.

Attacks (name -> what the attacker does):

    malformed       undecodable bytes and hostile fields: a tensor shaped [0, 2**63] with an empty frame, a string
                    loss, READY of 2**64 - 1, wrong types, unknown types, oversized declarations
    impersonate     HELLO under the ids of honest clients (and, with keys, one enrolled key claiming other ids),
                    then uploads under them
    weight          READY with 2**40 samples (the wire's ceiling), then uploads -global (the update that zeroes the
                    model) claiming as many
    huge_norm       uploads a finite update of norm ~1e30
    hold_credit     OFFERs and never uploads when PULLed
    sybil           ``count`` fake ids that HELLO, READY and heartbeat but never train
    never_read      registers, is selected, and never reads its socket (ZeroMQ stops reading the connection)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import msgpack
import torch

from . import bus, wire

__all__ = ["AttackContext", "Attack", "ATTACKS"]


@dataclass
class AttackContext:
    url: str  # the coordinator
    security: bus.Security  # the attacker's own (an enrolled key, or none under --insecure)
    client: str = "attacker"  # the id it registers under
    victims: tuple[str, ...] = ()  # honest clients' ids, for impersonation
    count: int = 1  # sockets or fake ids, where the attack uses several
    deadline: float = 600.0  # seconds the attack runs at most
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0  # messages sent, for reports
    ctx: object = None  # the zmq context (set by Attack)

    def running(self, t0: float) -> bool:
        return not self.stop.is_set() and time.monotonic() - t0 < self.deadline


class _Session:
    """One attacker connection: an Endpoint plus raw sends; closed by Attack."""

    def __init__(self, c: AttackContext, rcvhwm: int | None = None) -> None:
        self.c = c
        self.ep = bus.Endpoint(bus.dealer(c.ctx, c.url, c.security, rcvhwm=rcvhwm))

    def send(self, msg: wire.Message) -> None:
        self.ep.send(msg)
        self.c.sent += 1

    def raw(self, *frames: bytes) -> None:
        try:
            self.ep.sock.send_multipart(list(frames), flags=1)  # NOBLOCK
        except Exception:  # noqa: BLE001 - a full queue just drops this attempt
            return
        self.c.sent += 1

    def recv(self, timeout: float) -> wire.Message | None:
        try:
            got = self.ep.recv(timeout)
        except bus.BadMessage:
            return None
        return None if got is None else got[1]

    def close(self) -> None:
        self.ep.close()


def _head(**kw) -> bytes:
    return msgpack.packb({"v": wire.VERSION, **kw}, use_bin_type=True)


def _register(s: _Session, client: str, samples: int = 100) -> None:
    s.send(wire.Hello(client=client, device="cpu"))
    s.send(wire.Ready(num_samples=samples))


def _serve_rounds(c: AttackContext, s: _Session, on_train: Callable, on_pull: Callable | None, t0: float) -> None:
    """Answer TRAIN and PULL like a client, with the attack's own update; heartbeat meanwhile."""
    pending = None
    last_hb = 0.0
    reads = 0
    while c.running(t0):
        msg = s.recv(0.05)
        if isinstance(msg, (wire.Train, wire.Evaluate)):
            reads += 1
        if isinstance(msg, wire.Train):
            pending = on_train(msg)
            if pending is not None:
                s.send(wire.Offer(round=msg.round, num_samples=pending[1]))
        elif isinstance(msg, wire.Pull) and pending is not None and on_pull is not None:
            on_pull(s, msg, pending)
        elif isinstance(msg, wire.Bye) and msg.reason == "done":
            return
        if time.monotonic() - last_hb > 0.3:
            s.send(wire.Heartbeat(round=reads))
            last_hb = time.monotonic()


def _upload(s: _Session, msg: wire.Pull, pending) -> None:
    delta, n = pending
    s.send(wire.UpdateMsg(round=msg.round, num_samples=n, metrics={"loss": 0.1}, delta=delta))


def malformed(c: AttackContext, sessions: list) -> None:
    s = _Session(c)
    sessions.append(s)
    t0 = time.monotonic()
    upd = dict(type="UPDATE", round=1, num_samples=10)
    batch = [
        (b"\x00garbage\xff",),
        (_head(type="UPDATE", round=1, num_samples=10, metrics={},
               tensors=[{"dtype": "float32", "shape": [0, 2 ** 63]}]), b""),
        (_head(type="UPDATE", round=1, num_samples=10, metrics={},
               tensors=[{"dtype": "float32", "shape": [2 ** 62, 0, 2 ** 62]}]), b""),
        (_head(**upd, metrics={"loss": "a string"}, tensors=[{"dtype": "float32", "shape": [1]}]), b"\0" * 4),
        (_head(type="READY", num_samples=2 ** 64 - 1),),
        (_head(type="READY", num_samples=-5),),
        (_head(type="OFFER", round=1, num_samples=10, metrics={"loss": float("nan")}),),
        (_head(type="RESULT", round=1, num_samples=10, metrics={"accuracy": "x", "loss": [1, 2]}),),
        (_head(type="HELLO", client=["not", "a", "string"]),),
        (_head(type="HELLO", client="x" * 100_000),),
        (_head(type="EXPLODE"),),
        (_head(type="SECAGG", round=1, parts=3), b"a", b"b"),
        (_head(type="UPDATE", round=1, num_samples=10, metrics={}, tensors=[{"dtype": "float32", "shape": [4],
                                                                              "frames": 2 ** 40}]), b"\0" * 16),
        (_head(**upd, metrics={"loss": 1.0}, tensors=[{"dtype": "complex128", "shape": [1]}]), b"\0" * 16),
    ]
    s.send(wire.Hello(client=c.client, device="cpu"))
    while c.running(t0):
        for frames in batch:
            s.raw(*frames)
        s.send(wire.Heartbeat())
        while s.recv(0.0) is not None:
            pass
        time.sleep(0.05)


def impersonate(c: AttackContext, sessions: list) -> None:
    t0 = time.monotonic()
    socks = {v: _Session(c) for v in c.victims}
    sessions.extend(socks.values())
    while c.running(t0):
        for victim, s in socks.items():
            s.send(wire.Hello(client=victim, device="cpu"))
            s.send(wire.Ready(num_samples=10 ** 6))
            s.send(wire.Offer(round=1, num_samples=10 ** 6))
            while (m := s.recv(0.0)) is not None:
                if isinstance(m, wire.Train):  # were it admitted, it would poison the round under the victim's id
                    s.send(wire.Offer(round=m.round, num_samples=10 ** 6))
                elif isinstance(m, wire.Pull):
                    s.send(wire.UpdateMsg(round=m.round, num_samples=10 ** 6, delta=torch.zeros(1)))
        time.sleep(0.2)


def _poisoner(make_delta: Callable[[wire.Train], torch.Tensor], samples: int):
    def attack(c: AttackContext, sessions: list) -> None:
        s = _Session(c)
        sessions.append(s)
        _register(s, c.client, samples)
        _serve_rounds(c, s, lambda m: (make_delta(m), samples), _upload, time.monotonic())
    return attack


def _opposite(m: wire.Train) -> torch.Tensor:
    return -m.model.to(torch.float32)


def _huge(m: wire.Train) -> torch.Tensor:
    g = torch.Generator().manual_seed(m.round)
    d = torch.randn(m.model.numel(), generator=g)
    return d * (1e30 / float(d.norm()))


def _crowd(c: AttackContext, socks: list, answer: Callable[[_Session, wire.Message], None], t0: float) -> None:
    """Many registered connections on one thread (a socket belongs to one thread): each message goes to ``answer``;
    all heartbeat, claiming to have read every model (the claim is capped by what was sent)."""
    last_hb = 0.0
    while c.running(t0):
        for s in socks:
            while (m := s.recv(0.0)) is not None:
                if isinstance(m, wire.Bye) and m.reason == "done":
                    return
                answer(s, m)
        if time.monotonic() - last_hb > 0.3:
            for s in socks:
                s.send(wire.Heartbeat(round=10 ** 6))
            last_hb = time.monotonic()
        time.sleep(0.01)


def _offer_only(s: _Session, m: wire.Message) -> None:
    if isinstance(m, wire.Train):
        s.send(wire.Offer(round=m.round, num_samples=100))  # and never upload when pulled


def hold_credit(c: AttackContext, sessions: list) -> None:
    t0 = time.monotonic()
    socks = [_Session(c) for _ in range(c.count)]
    sessions.extend(socks)
    for i, s in enumerate(socks):
        _register(s, f"{c.client}-{i}", 100)
    _crowd(c, socks, _offer_only, t0)


def sybil(c: AttackContext, sessions: list) -> None:
    t0 = time.monotonic()
    socks = []
    for i in range(c.count):
        if not c.running(t0):
            return
        s = _Session(c)
        sessions.append(s)
        socks.append(s)
        _register(s, f"{c.client}-{i}", 100)
    _crowd(c, socks, lambda s, m: None, t0)  # read everything (TRAIN included), answer nothing


def never_read(c: AttackContext, sessions: list) -> None:
    t0 = time.monotonic()
    s = _Session(c, rcvhwm=1)
    sessions.append(s)
    _register(s, c.client, 100)
    while c.running(t0):  # heartbeats keep it alive; nothing is ever read
        s.send(wire.Heartbeat())
        time.sleep(0.3)


ATTACKS: dict[str, Callable] = {
    "malformed": malformed,
    "impersonate": impersonate,
    "weight": _poisoner(_opposite, 2 ** 40),  # the wire's own ceiling on a sample count
    "huge_norm": _poisoner(_huge, 100),
    "hold_credit": hold_credit,
    "sybil": sybil,
    "never_read": never_read,
}


class Attack:
    """Run one attack in a thread: ``with Attack("weight", ctx): ...``; every socket is closed on exit."""

    def __init__(self, name: str, context: AttackContext) -> None:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r} (known: {', '.join(ATTACKS)})")
        import zmq  # the attack's own context, terminated on exit (fedopt.bus makes the sockets)

        self.name, self.c = name, context
        self.c.ctx = zmq.Context()
        self.c.ctx.set(zmq.MAX_SOCKETS, max(1024, context.count + 64))  # ZeroMQ's default is 1023 sockets
        self._sessions: list[_Session] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"attack-{name}", daemon=True)

    def _run(self) -> None:
        try:
            ATTACKS[self.name](self.c, self._sessions)
        except BaseException as e:  # noqa: BLE001 - reported by __exit__
            self.error = e
        finally:
            for s in self._sessions:
                s.close()

    def __enter__(self) -> "Attack":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.c.stop.set()
        self._thread.join(timeout=30)
        self.c.ctx.term()
