"""The gossip peer's socket side: one thread owns every socket, and the training thread talks to it by requests.

Sockets, all owned by the thread that calls :meth:`PeerSockets.serve`: one ROUTER bound at the peer's address
(incoming proposals, pushes and fetches, answered in place), one DEALER per neighbour it initiates exchanges with
(replies come back there), an inproc PAIR pipe from the training thread, and the discovery beacon's UDP socket.

The exchange protocol these sockets carry, with its atomicity, traffic bound and zero-trust rules, is in
:mod:`clients.gossip.exchange`. A handler that fails drops its message with one log line and the loop goes on; if
this thread dies anyway, it closes its sockets and :meth:`PeerSockets.submit` answers ``stopped`` at once, so the
training thread ends instead of waiting.

Synchronous D-PSGD (``--topology``) lives in :mod:`clients.gossip.dpsgd`; membership in :mod:`clients.gossip.members`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import zmq

from fedopt import bus
from fedopt.compress import Compressor
from fedopt.errors import WireError

from clients.gossip.choco import ChocoGossip
from clients.gossip.dpsgd import SyncRounds
from clients.gossip.exchange import PairwiseExchange, Request
from clients.gossip.members import AddressKeys, Membership
from clients.gossip.state import ModelState
from clients.gossip.topology import neighbours

__all__ = ["Request", "PeerSockets"]

log = logging.getLogger("fedopt.gossip")


class PeerSockets(PairwiseExchange, SyncRounds):
    """The socket thread of one peer: :meth:`serve` runs its loop; the training thread calls :meth:`submit`."""

    def __init__(self, ctx: zmq.Context, address: str, bind: str, state: ModelState, server: bus.Security,
                 client: bus.Security, seeds: list[str], *, exchange_timeout: float = 3.0, peer_timeout: float = 15.0,
                 max_accept: int = 1, linger: float = 2.0, members: list[str] | None = None,
                 topology: str | None = None, beacon=None, exit_with_parent: int | None = None,
                 max_tries: int = 6, fetch_quorum: int = 3, compress: Compressor | None = None,
                 choco_gamma: float = 1.0) -> None:
        self.ctx, self.address, self.state = ctx, address, state
        self.client_sec = client
        self.exchange_timeout, self.peer_timeout = exchange_timeout, peer_timeout
        self.max_accept, self.linger, self.beacon = max_accept, linger, beacon
        self.exit_with_parent = exit_with_parent
        self.max_tries = max_tries  # BUSY answers after which an exchange slot gives up (refusals cost bytes too)
        self.fetch_quorum = fetch_quorum  # neighbours a fetch asks before it combines their models
        self.keys = AddressKeys()
        self.stopped = threading.Event()  # set when this thread's loop has ended (and its sockets are closed)
        self.round_open = 0  # the training round the training thread opened last
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
        self.members_view = Membership(address, seeds, peer_timeout)
        self.topology, self.members = topology, list(members or [])
        self.choco: ChocoGossip | None = None  # D-PSGD with --compress: CHOCO-Gossip's public copies
        if topology:
            self._init_sync(self.members, topology)
            if compress is not None:
                self.choco = ChocoGossip(compress, state.size, self.rank, neighbours(self.rank, len(self.members),
                                                                                       topology), choco_gamma)
        self._init_exchange()
        self.sync: dict | None = None
        self.stats = {"exchanges": 0, "accepted": 0, "busy_sent": 0, "busy_got": 0, "timeouts": 0, "refused": 0,
                      "late": 0, "models": 0, "failed": 0, "distances": []}  # models: model messages sent + received
        self._retired_in = self._retired_out = 0
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
        return self.members_view.live_peers()

    def submit(self, req: Request) -> dict:
        """Called from the training thread: hand ``req`` to the socket thread and wait for its result.

        Never raises: ``{"status": "stopped"}`` once the socket thread has ended, ``{"status": "lost"}`` when no
        answer came within the request's budget (plus a margin)."""
        if self.stopped.is_set():
            return {"status": "stopped"}
        self.requests.put(req)
        try:
            if self._poke is None:  # the calling thread's end of the pipe, made (and later closed) in that thread
                self._poke = self.ctx.socket(zmq.PAIR)
                self._poke.setsockopt(zmq.LINGER, 0)
                self._poke.connect(self.pipe_url)
            self._poke.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the pipe is full of pokes already: the socket thread is awake
        except zmq.ZMQError as e:  # the context is closing: the socket thread is gone or going
            log.warning("cannot reach the socket thread: %s", e)
            return {"status": "stopped"}
        end = time.monotonic() + req.budget + 10.0
        while not req.event.wait(0.2):
            if self.stopped.is_set():
                return {"status": "stopped"}
            if time.monotonic() > end:
                return {"status": "lost"}
        return req.result

    def release(self) -> None:
        """Called by the submitting thread when it is finished: closes its end of the pipe."""
        if self._poke is not None:
            self._poke.close(0)
            self._poke = None

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until the training thread says ``done`` and the peer has been quiet for ``linger`` seconds.

        A failure outside the message handlers (a bug) propagates after the sockets are closed and ``stopped`` set."""
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
                for addr, ep in list(self.dealers.items()):
                    if ep.sock in events:
                        self._drain(ep, lambda e, _peer, msg, _key, addr=addr: self._on_reply(e, addr, msg))
                if self.beacon is not None:
                    if self.beacon.fileno() in events:
                        for addr in self.beacon.receive()[:8]:
                            self.members_view.heard(addr)
                    self.beacon.tick()
                self._timers()
                if not self.training and self.pending is None and self.reserved is None \
                        and time.monotonic() - self.last_inbound > self.linger:
                    return
                if self.exit_with_parent is not None and os.getppid() != self.exit_with_parent:
                    return
        finally:
            self.close()
            self.stopped.set()

    def close(self) -> None:
        for ep in self.dealers.values():
            ep.close()
        self.dealers.clear()
        self.router.close()
        self.pipe.close(0)
        if self.beacon is not None:
            self.beacon.close()

    def _drain(self, ep: bus.Endpoint, handler) -> None:
        """Handle up to 64 waiting messages; one that fails to decode or to be handled is dropped with one line."""
        for _ in range(64):  # bounded, so one chatty peer cannot starve the others
            try:
                got = ep.recv(0)
            except bus.BadMessage as e:
                who = bus.describe(e.peer) if e.peer is not None else "a neighbour"
                log.warning("refused a message from %s: %s", who, e)
                self.stats["refused"] += 1
                continue
            except zmq.ZMQError:
                raise  # the socket itself failed: nothing more can be read from it
            except Exception as e:  # decoding must raise WireError only; anything else is dropped the same way
                log.warning("refused a message that failed to decode (%s: %s)", type(e).__name__, e)
                self.stats["refused"] += 1
                continue
            if got is None:
                return
            peer, msg = got
            key = ep.user_id  # the enrolled id of the key that authenticated this connection, or None
            try:
                handler(ep, peer, msg, key)
            except WireError as e:
                log.warning("refused a message: %s", e)
                self.stats["refused"] += 1
            except Exception as e:  # a handler bug must not take the peer down: drop the message, carry on
                log.warning("dropped a %s message whose handling failed (%s: %s)", getattr(msg, "TYPE", "?"),
                            type(e).__name__, e)
                self.stats["failed"] += 1

    def _close_dealer(self, addr: str) -> None:
        ep = self.dealers.pop(addr, None)
        if ep is not None:
            self.poller.unregister(ep.sock)
            self._retired_in += ep.bytes_in
            self._retired_out += ep.bytes_out
            ep.close()

    def _dealer(self, addr: str) -> bus.Endpoint:
        ep = self.dealers.get(addr)
        if ep is None:
            ep = bus.Endpoint(bus.dealer(self.ctx, addr, self.client_sec))
            self.dealers[addr] = ep
            self.poller.register(ep.sock, zmq.POLLIN)
        return ep

    def _finish(self, req: Request, **result) -> None:
        req.result = result
        req.event.set()
