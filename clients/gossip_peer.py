"""The gossip peer's socket side: one thread owns every socket; exchanges are atomic and never deadlock.

Sockets, all owned by the thread that calls :meth:`PeerSockets.serve`: one ROUTER bound at the peer's address
(incoming pushes and fetches, answered in place), one DEALER per neighbour it initiates exchanges with (replies come
back there), an inproc PAIR pipe from the training thread, and the discovery beacon's UDP socket when ``--discover``.

Random pairwise gossip (the default), in three messages. When the training thread asks for an exchange, this
thread picks a random live neighbour ``b`` and proposes (GOSSIP_FETCH kind="exchange"). ``b`` answers GOSSIP_BUSY, or
reserves itself for this exchange and answers GOSSIP_REPLY with its model ``x_b``. ``a`` mixes ``x_b`` in under its
model lock and sends GOSSIP_PUSH with its own model as it was before mixing; ``b`` mixes that in and is free again
(:class:`~clients.gossip_state.ModelState`). A refusal therefore moves no model. A peer answers BUSY while its own
proposal is in flight, while it is reserved, and after it has accepted ``max_accept`` exchanges in its current round;
two peers that pick each other at once both refuse, back off a random 20-150 ms (during which they accept others)
and pick again, so nothing waits on a peer that is itself waiting, and every wait has a deadline (a reservation whose
PUSH never comes is released without mixing). The cap bounds the busiest node's traffic: per round it sends and
receives at most ``2 (1 + max_accept)`` models, whatever the swarm's size.

Synchronous D-PSGD (``--topology``): in round ``t`` each peer sends its model to its graph neighbours, waits for
theirs (or the deadline: a missing neighbour's weight goes to itself and it is not waited for again until it is heard
from), and mixes with Metropolis-Hastings weights (:mod:`clients.topology`).

Membership: peers come from the seed list, discovery beacons and rumours (each push/reply carries the sender's live
peers). Liveness (:class:`fedopt.liveness.Liveness`) expires a peer not heard from for ``peer_timeout``; a peer whose
exchange times out is dropped at once and ignored in rumours for ``peer_timeout`` (direct contact brings it back).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch
import zmq

from fedopt import bus, wire
from fedopt.errors import WireError
from fedopt.liveness import Liveness

from .gossip_state import ModelState
from .topology import mh_weights, mix_row, neighbours

__all__ = ["Request", "PeerSockets"]

log = logging.getLogger("fedopt.gossip")


@dataclass
class Request:
    """A job from the training thread: ``push`` (one exchange), ``fetch`` (pull a newer model), ``sync`` (a D-PSGD
    round), ``done`` (training finished: linger, then stop). ``result`` is filled before ``event`` is set."""

    kind: str
    round: int = 0
    budget: float = 10.0  # seconds this request may take in all
    event: threading.Event = field(default_factory=threading.Event)
    result: dict = field(default_factory=dict)


@dataclass
class _Pending:
    req: Request
    give_up: float  # monotonic time the whole request ends
    xid: int = 0
    peer: str = ""
    deadline: float = 0.0  # this attempt's deadline
    retry_at: float | None = None  # when to pick again after BUSY / nobody to ask


class PeerSockets:
    def __init__(self, ctx: zmq.Context, address: str, bind: str, state: ModelState, server: bus.Security,
                 client: bus.Security, seeds: list[str], *, exchange_timeout: float = 3.0, peer_timeout: float = 15.0,
                 max_accept: int = 1, linger: float = 2.0, members: list[str] | None = None,
                 topology: str | None = None, beacon=None, exit_with_parent: int | None = None) -> None:
        self.ctx, self.address, self.state = ctx, address, state
        self.client_sec = client
        self.seeds = [s for s in seeds if s != address]
        self.exchange_timeout, self.peer_timeout = exchange_timeout, peer_timeout
        self.max_accept, self.linger, self.beacon = max_accept, linger, beacon
        self.exit_with_parent = exit_with_parent
        self.requests: queue.Queue[Request] = queue.Queue()
        self.router = bus.Endpoint(bus.router(ctx, bind, server))
        self.pipe = ctx.socket(zmq.PAIR)
        self.pipe.setsockopt(zmq.LINGER, 0)
        self.pipe_url = f"inproc://fedopt-gossip-{id(self)}"
        self.pipe.bind(self.pipe_url)
        self.poller = zmq.Poller()
        self.poller.register(self.router.sock, zmq.POLLIN)
        self.poller.register(self.pipe, zmq.POLLIN)
        if beacon is not None:
            self.poller.register(beacon.fileno(), zmq.POLLIN)
        self.dealers: dict[str, bus.Endpoint] = {}
        self.live: Liveness[str] = Liveness(peer_timeout, 1)
        self.tombstones: dict[str, float] = {}
        self.direct: dict[str, float] = {}  # when each peer was last heard from directly (not by rumour)
        for s in self.seeds:
            self.live.heard(s)
        # D-PSGD: fixed members ordered by rank
        self.topology, self.members = topology, list(members or [])
        if topology:
            self.rank = self.members.index(address)
            n = len(self.members)
            self.row = mh_weights(self.rank, n, topology)
            self.graph = [self.members[j] for j in neighbours(self.rank, n, topology)]
            self.missing: set[str] = set()
            self.inbox: dict[int, dict[int, torch.Tensor]] = {}
        self.pending: _Pending | None = None
        self.reserved: dict | None = None  # the exchange this peer agreed to and awaits the PUSH of
        self.sync: dict | None = None
        self.accepted = 0
        self.training = True
        self.last_inbound = time.monotonic()
        self.stats = {"exchanges": 0, "accepted": 0, "busy_sent": 0, "busy_got": 0, "timeouts": 0, "refused": 0,
                      "distances": []}
        self._retired_in = self._retired_out = 0
        self._xid = random.getrandbits(31)
        self._poke: zmq.Socket | None = None
        self.sync_done = 0  # last completed D-PSGD round

    # ---- counters read by the training thread ------------------------------------------------------------------
    @property
    def bytes_in(self) -> int:
        return self._retired_in + self.router.bytes_in + sum(d.bytes_in for d in list(self.dealers.values()))

    @property
    def bytes_out(self) -> int:
        return self._retired_out + self.router.bytes_out + sum(d.bytes_out for d in list(self.dealers.values()))

    def live_peers(self) -> list[str]:
        now = time.monotonic()
        return [p for p in list(self.live._last) if self.live.alive(p) and p != self.address
                and self.tombstones.get(p, 0) < now]

    def submit(self, req: Request) -> dict:
        """Called from the training thread: hand ``req`` to the socket thread and wait for its result."""
        self.requests.put(req)
        if self._poke is None:  # the calling thread's end of the pipe, made (and later closed) in that thread
            self._poke = self.ctx.socket(zmq.PAIR)
            self._poke.setsockopt(zmq.LINGER, 0)
            self._poke.connect(self.pipe_url)
        try:
            self._poke.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the pipe is full of pokes already: the socket thread is awake
        if not req.event.wait(req.budget + 10.0):
            return {"status": "lost"}
        return req.result

    def release(self) -> None:
        """Called by the submitting thread when it is finished: closes its end of the pipe."""
        if self._poke is not None:
            self._poke.close(0)
            self._poke = None

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until the training thread says ``done`` and the peer has been quiet for ``linger`` seconds."""
        try:
            while True:
                now = time.monotonic()
                waits = [0.2]
                if self.pending is not None:
                    waits.append((self.pending.retry_at or self.pending.deadline) - now)
                if self.sync is not None:
                    waits.append(self.sync["deadline"] - now)
                if self.beacon is not None:
                    waits.append(self.beacon.remaining())
                events = dict(self.poller.poll(max(1, int(min(waits) * 1000))))
                if self.pipe in events:
                    while self.pipe.poll(0):
                        self.pipe.recv()
                self._take_requests()
                if self.router.sock in events:
                    self._drain(self.router, self._on_inbound)
                for ep in list(self.dealers.values()):
                    if ep.sock in events:
                        self._drain(ep, self._on_reply)
                if self.beacon is not None:
                    if self.beacon.fileno() in events:
                        for addr in self.beacon.receive():
                            self._heard(addr)
                    self.beacon.tick()
                self._timers()
                if not self.training and self.pending is None and self.reserved is None \
                        and time.monotonic() - self.last_inbound > self.linger:
                    return
                if self.exit_with_parent is not None and os.getppid() != self.exit_with_parent:
                    return
        finally:
            self.close()

    def close(self) -> None:
        for ep in self.dealers.values():
            ep.close()
        self.dealers.clear()
        self.router.close()
        self.pipe.close(0)
        if self.beacon is not None:
            self.beacon.close()

    def _drain(self, ep: bus.Endpoint, handler) -> None:
        for _ in range(64):  # bounded, so one chatty peer cannot starve the others
            try:
                got = ep.recv(0)
            except bus.BadMessage as e:
                who = bus.describe(e.peer) if e.peer is not None else "a neighbour"
                log.warning("refused a message from %s: %s", who, e)
                self.stats["refused"] += 1
                continue
            if got is None:
                return
            try:
                handler(ep, *got)
            except WireError as e:
                log.warning("refused a model: %s", e)
                self.stats["refused"] += 1

    # ---- membership -------------------------------------------------------------------------------------------------
    def _heard(self, addr: str, direct: bool = True) -> None:
        if not addr or addr == self.address or len(addr) > 512:
            return
        if direct:
            self.tombstones.pop(addr, None)
            self.live.heard(addr)
            self.direct[addr] = time.monotonic()
        elif addr not in self.live and self.tombstones.get(addr, 0) < time.monotonic():
            self.live.heard(addr)  # a rumour adds a peer we do not know; it never refreshes one we do

    def _drop(self, addr: str) -> None:
        self.live.forget(addr)
        self.direct.pop(addr, None)
        self.tombstones[addr] = time.monotonic() + self.peer_timeout
        ep = self.dealers.pop(addr, None)
        if ep is not None:
            self.poller.unregister(ep.sock)
            self._retired_in += ep.bytes_in
            self._retired_out += ep.bytes_out
            ep.close()

    def _rumour(self) -> dict:
        """Peers heard from directly within ``peer_timeout`` (hearsay is not passed on, so a dead peer's name
        stops spreading once nobody has talked to it for that long)."""
        now = time.monotonic()
        fresh = [p for p in self.live_peers() if now - self.direct.get(p, -math.inf) < self.peer_timeout]
        return {p: 1 for p in fresh[:16]}

    def _dealer(self, addr: str) -> bus.Endpoint:
        ep = self.dealers.get(addr)
        if ep is None:
            ep = bus.Endpoint(bus.dealer(self.ctx, addr, self.client_sec))
            self.dealers[addr] = ep
            self.poller.register(ep.sock, zmq.POLLIN)
        return ep

    # ---- requests from the training thread -------------------------------------------------------------------------
    def _take_requests(self) -> None:
        while True:
            try:
                req = self.requests.get_nowait()
            except queue.Empty:
                return
            if req.kind == "done":
                self.training = False
                self.last_inbound = time.monotonic()
                self._finish(req, status="ok")
            elif req.kind == "sync":
                self._start_sync(req)
            else:
                self.accepted = 0  # a new round: this peer may accept pushes again
                self.pending = _Pending(req, time.monotonic() + req.budget)
                self._attempt()

    def _finish(self, req: Request, **result) -> None:
        req.result = result
        req.event.set()

    def _attempt(self) -> None:
        p = self.pending
        now = time.monotonic()
        candidates = self.live_peers()
        if not candidates and self.seeds:
            for s in self.seeds:  # nobody known: try the seeds again
                if self.tombstones.get(s, 0) < now:
                    self.live.heard(s)
            candidates = self.live_peers()
        if not candidates:
            if now >= p.give_up or p.req.kind == "push":  # nobody to mix with: this round trains alone
                self.pending = None
                self._finish(p.req, status="alone")
            else:
                p.retry_at = now + 0.25
            return
        self._xid = (self._xid + 1) & 0x7FFF_FFFF
        p.xid, p.peer, p.retry_at = self._xid, random.choice(candidates), None
        p.deadline = min(p.give_up, now + self.exchange_timeout)
        kind = "fetch" if p.req.kind == "fetch" else "exchange"
        if not self._dealer(p.peer).send(wire.GossipFetch(xid=p.xid, addr=self.address, kind=kind,
                                                          sender=self.address)):
            p.deadline = now  # queue full: the peer is gone; the timer drops it

    def _timers(self) -> None:
        now = time.monotonic()
        p = self.pending
        if p is not None:
            if p.retry_at is not None and now >= p.retry_at:
                self._attempt()
            elif p.retry_at is None and now >= p.deadline:
                log.warning("exchange with %s timed out: dropping it", p.peer)
                self.stats["timeouts"] += 1
                self._drop(p.peer)
                if now >= p.give_up:
                    self.pending = None
                    self._finish(p.req, status="timeout")
                else:
                    self._attempt()
        r = self.reserved
        if r is not None and now >= r["deadline"]:
            log.warning("%s reserved an exchange but never pushed: released without mixing", r["addr"])
            self.reserved = None
        if self.sync is not None:
            self._check_sync()
        for addr in self.live.expire():
            log.info("peer %s silent for %.0fs: expired", addr, self.peer_timeout)
            self._drop(addr)
        for addr in [a for a, t in self.tombstones.items() if t < now]:
            del self.tombstones[addr]

    # ---- inbound: pushes and fetches on the ROUTER -----------------------------------------------------------------
    def _busy(self) -> bool:
        in_flight = self.pending is not None and self.pending.retry_at is None
        return in_flight or self.reserved is not None or (self.training and self.accepted >= self.max_accept)

    def _on_inbound(self, ep: bus.Endpoint, peer: bytes, msg: wire.Message) -> None:
        self.last_inbound = time.monotonic()
        addr = getattr(msg, "addr", "")
        if isinstance(msg, wire.GossipFetch):
            self._heard(addr)
            if msg.kind == "exchange" and self._busy():
                self.stats["busy_sent"] += 1
                ep.send(wire.GossipBusy(xid=msg.xid, addr=self.address, sender=self.address), to=peer)
                return
            vec, version = self.state.snapshot()
            if msg.kind == "exchange":
                self.reserved = {"xid": msg.xid, "addr": addr, "before": vec, "version": version,
                                 "deadline": time.monotonic() + self.exchange_timeout}
                self.accepted += 1
            ep.send(wire.GossipReply(xid=msg.xid, version=version, num_samples=self.state.num_samples,
                                     addr=self.address, peers=self._rumour(), model=vec, sender=self.address), to=peer)
        elif isinstance(msg, wire.GossipPush) and not isinstance(msg, wire.GossipReply):
            self._heard(addr)
            for a in msg.peers:
                self._heard(a, direct=False)
            r = self.reserved
            if not self.topology and (r is None or r["xid"] != msg.xid or r["addr"] != addr):
                raise WireError(f"push from {addr!r} matches no exchange this peer agreed to")
            model = self.state.check(msg.model)  # raises WireError: wrong shape, NaN/Inf
            if msg.num_samples < 0:
                raise WireError(f"push from {addr} declares {msg.num_samples} samples")
            if self.topology:
                self._on_sync_push(addr, msg.round, model)
                return
            self.reserved = None
            outcome = self.state.complete_push(r["before"], r["version"], model.clone(), msg.num_samples,
                                               msg.version)
            self.stats["accepted"] += 1
            self.stats["distances"].append(outcome.distance)
        else:
            log.warning("refused a %s message on the peer socket from %s", msg.TYPE, addr or bus.describe(peer))
            self.stats["refused"] += 1

    # ---- replies on the DEALERs ------------------------------------------------------------------------------------
    def _on_reply(self, ep: bus.Endpoint, _peer, msg: wire.Message) -> None:
        p = self.pending
        if isinstance(msg, (wire.GossipReply, wire.GossipBusy)):
            self._heard(msg.addr)
        if p is None or getattr(msg, "xid", None) != p.xid or p.retry_at is not None:
            if isinstance(msg, wire.GossipReply):
                log.info("late reply from %s dropped (exchange already closed)", msg.addr)
            return
        if isinstance(msg, wire.GossipBusy):
            self.stats["busy_got"] += 1
            p.retry_at = time.monotonic() + random.uniform(0.02, 0.15)
            return
        if not isinstance(msg, wire.GossipReply):
            log.warning("refused a %s message from neighbour %s", msg.TYPE, p.peer)
            return
        for a in msg.peers:
            self._heard(a, direct=False)
        try:
            model = self.state.check(msg.model)
        except WireError:
            p.retry_at = time.monotonic()  # ask someone else
            raise
        self.pending = None
        if p.req.kind == "fetch":
            outcome = self.state.adopt(model.clone(), msg.version)
        else:
            before, v_before, outcome = self.state.accept_push(model.clone(), msg.num_samples, msg.version)
            ep.send(wire.GossipPush(round=p.req.round, xid=p.xid, version=v_before,
                                    num_samples=self.state.num_samples, addr=self.address, peers=self._rumour(),
                                    model=before, sender=self.address))
            self.stats["exchanges"] += 1
            self.stats["distances"].append(outcome.distance)
        self._finish(p.req, status="ok", peer=p.peer, action=outcome.action, distance=outcome.distance,
                     version=outcome.version)

    # ---- D-PSGD rounds ---------------------------------------------------------------------------------------------
    def _start_sync(self, req: Request) -> None:
        vec, version = self.state.snapshot()
        for addr in self.graph:
            self._dealer(addr).send(wire.GossipPush(round=req.round, version=version,
                                                    num_samples=self.state.num_samples, addr=self.address,
                                                    model=vec, sender=self.address))
        self.sync = {"req": req, "vec": vec, "deadline": time.monotonic() + req.budget}
        self._check_sync()

    def _on_sync_push(self, addr: str, rnd: int, model: torch.Tensor) -> None:
        if addr not in self.members or addr == self.address:
            raise WireError(f"D-PSGD push from {addr!r}, which is not a member of this topology")
        self.missing.discard(addr)
        if rnd > self.sync_done:
            self.inbox.setdefault(rnd, {})[self.members.index(addr)] = model.clone()
        if self.sync is not None:
            self._check_sync()

    def _check_sync(self) -> None:
        s = self.sync
        rnd = s["req"].round
        got = self.inbox.get(rnd, {})
        waiting = [a for a in self.graph if a not in self.missing and self.members.index(a) not in got]
        if waiting and time.monotonic() < s["deadline"]:
            return
        for a in waiting:
            log.warning("D-PSGD round %d: no model from %s by the deadline; mixing without it", rnd, a)
            self.missing.add(a)
        mixed = mix_row(self.rank, s["vec"], got, self.row)
        with self.state.lock:
            self.state.vec.copy_(mixed)
            self.state.version += 1
        self.inbox = {r: v for r, v in self.inbox.items() if r > rnd}
        self.sync_done = rnd
        self.sync = None
        self.stats["exchanges"] += len(got)
        self.stats["distances"] += [float(torch.linalg.vector_norm(s["vec"] - v)) for v in got.values()]
        self._finish(s["req"], status="ok", received=len(got))
