"""The dialling side of a bus connection: one DEALER session at a time with a coordinator, Paranoid Pirate style.

A federated client and an edge aggregator (``fedopt aggregator``, upstream) both hold one :class:`Uplink`. It opens a
DEALER to the current endpoint and says HELLO; every message heard counts as a heartbeat; it sends a heartbeat every
interval (carrying how many model messages it has read, see :mod:`coordinator.link`); a coordinator silent for 3
intervals ends the session. The owner then calls :meth:`Uplink.lost`, which closes the socket, moves to the next
listed endpoint (``--connect URL1,URL2``: failover) and says how long to wait before :meth:`Uplink.open` (capped
exponential backoff, reset by a WELCOME); after ``give_up`` seconds without a session that was welcomed it raises.

It owns no thread and never blocks: the owner polls :attr:`sockets` together with its own (a client's training pipe,
an edge's ROUTER) and calls :meth:`recv` and :meth:`keepalive` from the thread that made the socket. Sockets come
from :mod:`fedopt.bus`; zmq is imported here for its handshake event constants only.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import zmq

from . import bus, wire
from .errors import AuthError, FedoptError
from .liveness import Backoff, Liveness, Ticker

__all__ = ["Uplink"]


class Uplink:
    """Sessions with the coordinator at ``urls[0]``, then ``urls[1]``... (round robin after each lost session).

    ``hello`` is sent first on every session; ``heartbeat`` is the interval until WELCOME gives the coordinator's;
    ``who`` names this side in log lines ("client 3"). Raises :class:`~fedopt.errors.AuthError` from :meth:`recv`
    when a CurveZMQ handshake fails (retrying cannot mend wrong keys) and FedoptError from :meth:`lost` on giving up.
    """

    def __init__(self, ctx, urls: Sequence[str], security: bus.Security, hello: wire.Hello, heartbeat: float,
                 give_up: float, who: str, log: logging.Logger, clock=time.monotonic) -> None:
        if not urls:
            raise FedoptError("no coordinator endpoint to connect to")
        self.ctx, self.urls, self.security, self.hello = ctx, list(urls), security, hello
        self.heartbeat, self.give_up, self.who, self.log, self.clock = heartbeat, give_up, who, log, clock
        self.index = 0  # the endpoint of the current (or next) session
        self.ep: bus.Endpoint | None = None
        self.monitor = None
        self.welcomed = False  # this session got WELCOME
        self.models_read = 0  # TRAIN/EVALUATE read on this session: heartbeats carry it
        self.backoff = Backoff(0.25, cap=8.0)
        self.last_contact = clock()  # when the last welcomed session ended (or when this side started)
        self._live: Liveness[str] = Liveness(heartbeat, clock=clock)
        self._ticker = Ticker(heartbeat, clock=clock)

    @property
    def url(self) -> str:
        return self.urls[self.index]

    @property
    def sockets(self) -> list:
        """The sockets to poll for this session (none between sessions)."""
        return [] if self.ep is None else [s for s in (self.ep.sock, self.monitor) if s is not None]

    def open(self) -> bus.Endpoint:
        """A fresh session with the current endpoint: a new DEALER, HELLO sent, the silence clock started."""
        sock = bus.dealer(self.ctx, self.url, self.security)
        self.monitor = bus.handshake_monitor(sock) if self.security.curve else None
        self.ep = bus.Endpoint(sock)
        self.welcomed, self.models_read = False, 0
        self._live = Liveness(self.heartbeat, clock=self.clock)
        self._live.heard("coordinator")
        self._ticker = Ticker(self.heartbeat, clock=self.clock)
        self.ep.send(self.hello)
        return self.ep

    def recv(self) -> wire.Message | None:
        """The next message of this session if one is waiting (a malformed one is logged and dropped: None)."""
        if self.monitor is not None:
            self._check_handshake(bus.handshake_failures(self.monitor))
        try:
            got = self.ep.recv(0)
        except bus.BadMessage as e:
            self.log.warning("%s: dropped a message from the coordinator: %s", self.who, e)
            return None
        if got is None:
            return None
        self._live.heard("coordinator")
        return got[1]

    def welcome(self, msg: wire.Welcome) -> None:
        """WELCOME: adopt the coordinator's heartbeat interval (both sides then count misses alike)."""
        hb = msg.config.get("heartbeat")
        if isinstance(hb, (int, float)) and not isinstance(hb, bool) and 0.01 <= hb <= 3600:
            self.heartbeat = float(hb)
        self.welcomed = True
        self._live = Liveness(self.heartbeat, clock=self.clock)
        self._live.heard("coordinator")
        self._ticker = Ticker(self.heartbeat, clock=self.clock)

    def timeout(self) -> float:
        """Seconds until the next heartbeat is due: the longest a poll may wait."""
        return self._ticker.remaining()

    def keepalive(self) -> bool:
        """Send a heartbeat when one is due; False when the coordinator has been silent for its liveness window."""
        if self._ticker.due():
            self.ep.send(wire.Heartbeat(round=self.models_read, sender=self.hello.client))
        if self._live.expire():
            self.log.warning("%s: no answer from the coordinator at %s for %d heartbeats (%.0fs)", self.who, self.url,
                             self._live.misses, self._live.misses * self.heartbeat)
            return False
        return True

    def lost(self) -> float:
        """End this session; the seconds to wait before opening the next one, at the next listed endpoint. Raises
        FedoptError when no session was welcomed for ``give_up`` seconds."""
        if self.welcomed:
            self.backoff.reset()
            self.last_contact = self.clock()
        self.close()
        if self.clock() - self.last_contact > self.give_up:
            raise FedoptError(f"no coordinator at {', '.join(self.urls)} for {self.give_up:.0f}s: giving up")
        self.index = (self.index + 1) % len(self.urls)
        delay = self.backoff.next()
        left = self.give_up - (self.clock() - self.last_contact)
        self.log.info("%s: reconnecting to %s in %.2fs (giving up in %.0fs)", self.who, self.url, delay, left)
        return delay

    def close(self) -> None:
        self.welcomed = False
        if self.ep is None:
            return
        if self.monitor is not None:
            self.ep.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None
        self.ep.close()
        self.ep = None

    def _check_handshake(self, events: list[int]) -> None:
        """A CurveZMQ handshake failed: the keys are wrong, which retrying cannot mend. Raises AuthError."""
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in events:
            raise AuthError(f"the coordinator at {self.url} refused this client's key (it is not in the "
                            f"coordinator's allow-list)")
        if events:
            raise AuthError(f"the CurveZMQ handshake with {self.url} failed: the coordinator.key this client holds "
                            f"is not that coordinator's key (were the keys generated again?)")
