"""Heartbeats, liveness and reconnect backoff: small pure classes with an injected clock, no sockets.

The ZeroMQ guide's Paranoid Pirate pattern (Hintjens, *ZeroMQ*, chapter 4): every message heard from a peer counts as
a heartbeat; a peer silent for ``misses`` heartbeat intervals (3 by default) is dead; a side that loses its peer
reconnects with a fresh socket after a capped exponential backoff. The coordinator keeps one :class:`Liveness` for all
its clients; a client keeps one for its coordinator. Both use :class:`Ticker` to know when to send a heartbeat.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Generic, Hashable, TypeVar

__all__ = ["Liveness", "Ticker", "Backoff"]

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)


class Liveness(Generic[K]):
    """When each peer was last heard from; a peer silent for ``misses * interval`` seconds is dead."""

    def __init__(self, interval: float, misses: int = 3, clock: Clock = time.monotonic) -> None:
        if not interval > 0:
            raise ValueError(f"heartbeat interval must be > 0, not {interval}")
        if misses < 1:
            raise ValueError(f"misses must be >= 1, not {misses}")
        self.interval = interval
        self.misses = misses
        self.clock = clock
        self._last: dict[K, float] = {}  # in the order last heard (oldest first), so expire() is O(dead)

    @property
    def timeout(self) -> float:
        """Seconds of silence after which a peer is dead."""
        return self.interval * self.misses

    def heard(self, peer: K) -> None:
        """Any message from ``peer`` (a heartbeat or real traffic) proves it alive now."""
        self._last.pop(peer, None)  # re-inserted at the end: the dict stays in order of last heard
        self._last[peer] = self.clock()

    def forget(self, peer: K) -> None:
        self._last.pop(peer, None)

    def alive(self, peer: K) -> bool:
        last = self._last.get(peer)
        return last is not None and self.clock() - last < self.timeout

    def silent_for(self, peer: K) -> float | None:
        last = self._last.get(peer)
        return None if last is None else self.clock() - last

    def expire(self) -> list[K]:
        """Remove and return the peers that are dead now (in the order they were last heard)."""
        now = self.clock()
        dead = []
        for p, t in self._last.items():  # oldest first: stop at the first peer still alive
            if now - t < self.timeout:
                break
            dead.append(p)
        for p in dead:
            del self._last[p]
        return dead

    def __contains__(self, peer: object) -> bool:
        return peer in self._last

    def __len__(self) -> int:
        return len(self._last)


class Ticker:
    """Says when the next heartbeat is due: ``due()`` is True once per ``interval`` (and resets itself)."""

    def __init__(self, interval: float, clock: Clock = time.monotonic) -> None:
        if not interval > 0:
            raise ValueError(f"heartbeat interval must be > 0, not {interval}")
        self.interval = interval
        self.clock = clock
        self._next = clock() + interval

    def due(self) -> bool:
        now = self.clock()
        if now < self._next:
            return False
        # skip missed ticks instead of bursting: one heartbeat per interval at most
        self._next = now + self.interval
        return True

    def remaining(self) -> float:
        """Seconds until the next heartbeat is due (0 when it is due now): a poll timeout."""
        return max(0.0, self._next - self.clock())


class Backoff:
    """Capped exponential backoff for reconnects: ``initial, 2*initial, ...`` up to ``cap``; ``reset()`` on success."""

    def __init__(self, initial: float = 0.25, cap: float = 8.0, factor: float = 2.0) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, got initial={initial}, cap={cap}")
        if factor < 1:
            raise ValueError(f"backoff factor must be >= 1, not {factor}")
        self.initial, self.cap, self.factor = initial, cap, factor
        self._next = initial

    def next(self) -> float:
        """The delay to wait before this attempt; the following one waits longer, up to the cap."""
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class LogBudget:
    """At most ``lines`` log lines per ``interval`` seconds; what is over the budget is counted, not logged, and the
    count is reported with the next line that fits (a flood of bad messages must not become a flood of log lines)."""

    def __init__(self, lines: int = 20, interval: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.lines, self.interval, self.clock = lines, interval, clock
        self._window = -math.inf
        self._used = 0
        self.suppressed = 0  # not logged since the last line that was

    def take(self) -> int | None:
        """None when this line is over the budget (it is counted); else how many were suppressed before it."""
        now = self.clock()
        if now - self._window >= self.interval:
            self._window, self._used = now, 0
        if self._used >= self.lines:
            self.suppressed += 1
            return None
        self._used += 1
        skipped, self.suppressed = self.suppressed, 0
        return skipped
