"""A gossip peer's view of the swarm: who is alive, who was heard from directly, and what it tells others.

Peers come from the seed list, discovery beacons, incoming messages and rumours (each reply and push carries the
sender's recently met peers). A peer counts as *met* only once this peer has reached it at the address it dialled;
an address that merely arrives in a message is treated as a rumour. :class:`fedopt.liveness.Liveness` expires a peer not heard from for ``peer_timeout``; a peer whose exchange
timed out is dropped at once and ignored in rumours for ``peer_timeout`` (a *tombstone*; direct contact brings it
back). Only peers heard from directly within ``peer_timeout`` are passed on, so a dead peer's name stops spreading once
nobody has talked to it for that long. Used only by the socket thread; nothing here is locked.
"""

from __future__ import annotations

import math
import time

from fedopt.liveness import Liveness

__all__ = ["Membership"]


class Membership:
    def __init__(self, address: str, seeds: list[str], peer_timeout: float) -> None:
        self.address, self.peer_timeout = address, peer_timeout
        self.seeds = [s for s in seeds if s != address]
        self.live: Liveness[str] = Liveness(peer_timeout, 1)
        self.tombstones: dict[str, float] = {}
        self.direct: dict[str, float] = {}  # when each peer was last heard from directly (not by rumour)
        for s in self.seeds:
            self.live.heard(s)

    def live_peers(self) -> list[str]:
        now = time.monotonic()
        return [p for p in list(self.live._last) if self.live.alive(p) and p != self.address
                and self.tombstones.get(p, 0) < now]

    def candidates(self) -> list[str]:
        """Live peers to pick a partner from; when none is known, the seeds are tried again (unless tombstoned)."""
        found = self.live_peers()
        if not found and self.seeds:
            now = time.monotonic()
            for s in self.seeds:
                if self.tombstones.get(s, 0) < now:
                    self.live.heard(s)
            found = self.live_peers()
        return found

    def heard(self, addr: str, direct: bool = True) -> None:
        if not addr or addr == self.address or len(addr) > 512:
            return
        if direct:
            self.tombstones.pop(addr, None)
            self.live.heard(addr)
            self.direct[addr] = time.monotonic()
        elif addr not in self.live and self.tombstones.get(addr, 0) < time.monotonic():
            self.live.heard(addr)  # a rumour adds a peer we do not know; it never refreshes one we do

    def heard_inbound(self, addr: str) -> None:
        """A message came in claiming to be from ``addr``. The claim is unverified (any allow-listed key can write any
        address), so it refreshes only a peer this one has reached itself, and otherwise counts as a rumour: a bogus
        address costs this peer at most one timed-out exchange and is never passed on."""
        if addr in self.direct:
            self.heard(addr)
        else:
            self.heard(addr, direct=False)

    def drop(self, addr: str) -> None:
        self.live.forget(addr)
        self.direct.pop(addr, None)
        self.tombstones[addr] = time.monotonic() + self.peer_timeout

    def rumour(self) -> dict:
        now = time.monotonic()
        fresh = [p for p in self.live_peers() if now - self.direct.get(p, -math.inf) < self.peer_timeout]
        return {p: 1 for p in fresh[:16]}

    def expire(self) -> list[str]:
        """Peers silent for ``peer_timeout`` (forgotten now; the caller closes their sockets); old tombstones go."""
        gone = list(self.live.expire())
        for addr in gone:
            self.direct.pop(addr, None)
        now = time.monotonic()
        for addr in [a for a, t in self.tombstones.items() if t < now]:
            del self.tombstones[addr]
        return gone
