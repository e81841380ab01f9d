"""A gossip peer's view of the swarm: who is alive, who was heard from directly, and what it tells others.

Peers come from the seed list, discovery beacons, incoming messages and rumours (each reply and push carries the
sender's recently met peers). A peer counts as *met* only once this peer has reached it at the address it dialled;
an address that merely arrives in a message is a *rumour*. :class:`fedopt.liveness.Liveness` expires a peer not heard
from for ``peer_timeout``; a peer whose exchange timed out is dropped at once and ignored in rumours for
``peer_timeout`` (a *tombstone*; direct contact brings it back). Only peers heard from directly within
``peer_timeout`` are passed on, so a dead peer's name stops spreading once nobody has talked to it for that long.

Bounds (any neighbour may lie): a message contributes at most ``RUMOURS_PER_MESSAGE`` new addresses; the table holds
at most ``max_known`` peers (a rumour that finds it full replaces a random unverified entry, never a met one), and
tombstones at most as many; a partner is drawn from met peers and peers *vouched for* (named in the rumours of a met
peer: it passes on only peers it met itself), and an unverified one (seed or other rumour) only when none is alive, or with probability ``explore`` at most once per ``explore_every`` seconds (``peer_timeout`` by
default), preferring one that contacted this peer itself over one only rumoured. So a message listing 20,000 dead addresses costs O(1) work and
at most a few timed-out exchanges. Used only by the socket thread; nothing here is locked.
"""

from __future__ import annotations

import math
import random
import time

from fedopt.liveness import Liveness

__all__ = ["Membership", "RUMOURS_PER_MESSAGE", "valid_address"]

#: new addresses taken from one message's rumours (the rest are ignored)
RUMOURS_PER_MESSAGE = 8
_MAX_ADDRESS = 256


def valid_address(addr: object) -> bool:
    """A plausible peer address: a short tcp:// or ipc:// URL string."""
    return isinstance(addr, str) and 0 < len(addr) <= _MAX_ADDRESS and addr.startswith(("tcp://", "ipc://"))


class Membership:
    def __init__(self, address: str, seeds: list[str], peer_timeout: float, max_known: int = 64,
                 explore: float = 0.2, explore_every: float | None = None, rng: random.Random | None = None) -> None:
        self.address, self.peer_timeout = address, peer_timeout
        self.max_known, self.explore = max_known, explore
        self.explore_every = peer_timeout if explore_every is None else explore_every
        self.contacted: set[str] = set()  # unverified peers whose own messages named them (not only rumours)
        self.vouched: set[str] = set()  # unverified peers named in a met peer's rumours
        self.explored = -math.inf  # when an unverified peer was last picked while met ones were alive
        self.rng = rng or random.Random()
        self.seeds = [s for s in seeds if s != address][:max_known]
        self.live: Liveness[str] = Liveness(peer_timeout, 1)
        self.tombstones: dict[str, float] = {}
        self.direct: dict[str, float] = {}  # when each peer was last heard from directly (not by rumour)
        for s in self.seeds:
            self.live.heard(s)

    def live_peers(self) -> list[str]:
        now = time.monotonic()
        return [p for p in list(self.live._last) if self.live.alive(p) and p != self.address
                and self.tombstones.get(p, 0) < now]

    def _met(self, p: str, now: float) -> bool:
        return now - self.direct.get(p, -math.inf) < self.peer_timeout

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

    def pick(self) -> str | None:
        """A partner: a random met peer, or (with probability ``explore``, or when none is met) an unverified one."""
        found = self.candidates()
        if not found:
            return None
        now = time.monotonic()
        met = [p for p in found if self._met(p, now) or p in self.vouched]
        other = [p for p in found if not (self._met(p, now) or p in self.vouched)]
        if met and (not other or now - self.explored < self.explore_every or self.rng.random() >= self.explore):
            return self.rng.choice(met)
        if met:
            self.explored = now
        first = [p for p in other if p in self.contacted]
        return self.rng.choice(first or other)

    def heard(self, addr: str, direct: bool = True) -> None:
        if not valid_address(addr) or addr == self.address:
            return
        now = time.monotonic()
        if direct:
            self.tombstones.pop(addr, None)
            if addr not in self.live and not self._make_room(now, for_direct=True):
                return
            self.live.heard(addr)
            self.direct[addr] = now
        elif addr not in self.live and self.tombstones.get(addr, 0) < now and self._make_room(now):
            self.live.heard(addr)  # a rumour adds a peer we do not know; it never refreshes one we do

    def rumours(self, peers: object, vouched: bool = False) -> int:
        """Take at most ``RUMOURS_PER_MESSAGE`` new addresses from a message's ``peers`` map; returns how many.
        ``vouched``: the map came from a met peer (a reply on a socket this peer dialled)."""
        if not isinstance(peers, dict):
            return 0
        taken = 0
        for addr in peers:  # stops early: a huge map costs no more than a small one
            if taken >= RUMOURS_PER_MESSAGE:
                break
            if valid_address(addr) and addr != self.address and addr not in self.live:
                before = len(self.live)
                self.heard(addr, direct=False)
                taken += len(self.live) > before
                if vouched and addr in self.live:
                    self.vouched.add(addr)
        return taken

    def _make_room(self, now: float, for_direct: bool = False) -> bool:
        """Whether one more peer fits, evicting a random unverified one when full (a met peer is never evicted)."""
        if len(self.live) < self.max_known:
            return True
        unverified = [p for p in self.live._last if not self._met(p, now) and p not in self.seeds]
        if not unverified:
            return False
        victim = self.rng.choice(unverified)
        self.live.forget(victim)
        self.direct.pop(victim, None)
        self.contacted.discard(victim)
        self.vouched.discard(victim)
        return True

    def heard_inbound(self, addr: str) -> None:
        """A message came in claiming to be from ``addr``. Unless the socket bound the address to the sender's key,
        the claim is unverified, so it refreshes only a peer this one has reached itself, and otherwise counts as a
        rumour: a bogus address costs this peer at most one timed-out exchange and is never passed on."""
        if addr in self.direct:
            self.heard(addr)
        else:
            self.heard(addr, direct=False)
            if addr in self.live:
                self.contacted.add(addr)

    def drop(self, addr: str) -> None:
        self.live.forget(addr)
        self.contacted.discard(addr)
        self.vouched.discard(addr)
        self.direct.pop(addr, None)
        if len(self.tombstones) >= self.max_known:  # the oldest tombstone goes first
            del self.tombstones[min(self.tombstones, key=self.tombstones.__getitem__)]
        self.tombstones[addr] = time.monotonic() + self.peer_timeout

    def rumour(self) -> dict:
        now = time.monotonic()
        fresh = [p for p in self.live_peers() if self._met(p, now)]
        return {p: 1 for p in fresh[:16]}

    def expire(self) -> list[str]:
        """Peers silent for ``peer_timeout`` (forgotten now; the caller closes their sockets); old tombstones go."""
        gone = list(self.live.expire())
        for addr in gone:
            self.direct.pop(addr, None)
        now = time.monotonic()
        for addr in [a for a, t in self.tombstones.items() if t < now]:
            del self.tombstones[addr]
        # a peer forgotten by drop() keeps a 'direct' entry no longer; entries of forgotten peers go too
        for addr in [a for a in self.direct if a not in self.live]:
            del self.direct[addr]
        self.contacted &= set(self.live._last)
        self.vouched &= set(self.live._last)
        return gone


class AddressKeys:
    """Which CurveZMQ key owns which claimed address: the key that first announced an address keeps it.

    Over CurveZMQ a message's sender is the key that authenticated its connection (the ZAP User-Id); a message whose
    ``addr`` is held by another key is refused. Bounded: a key holds at most ``per_key`` addresses (announcing one
    more releases its oldest), and the book holds at most ``max_keys`` keys (a new key beyond that is refused). Without
    keys (``ipc://``, ``--insecure``, ``--swarm-secret``) there is no key to bind to and claims are unauthenticated.
    """

    def __init__(self, per_key: int = 4, max_keys: int = 1024) -> None:
        self.per_key, self.max_keys = per_key, max_keys
        self.owner: dict[str, str] = {}
        self.held: dict[str, list[str]] = {}

    def claim(self, addr: str, key: str | None) -> bool:
        """Whether ``key`` may speak as ``addr`` (binding it on first use); True without a key."""
        if key is None:
            return True
        holder = self.owner.get(addr)
        if holder is not None:
            return holder == key
        mine = self.held.get(key)
        if mine is None:
            if len(self.held) >= self.max_keys:
                return False
            mine = self.held[key] = []
        if len(mine) >= self.per_key:
            del self.owner[mine.pop(0)]
        mine.append(addr)
        self.owner[addr] = key
        return True
