"""An in-memory transport for a secure-aggregation round: every participant is a real client in this process.

A real implementation, not a mock: it holds one :class:`~fedopt.secagg.participant.SecAggClient` per participant
and carries the same packed messages (``codec.pack``: msgpack body + raw vector frame) as the bus::

    transport = MemoryTransport({u: SecAggClient(u, identity[u], pinned) for u in ids})
    driver = SecAggDriver(config, quant, transport.send, identities=pinned)
    driver.start()                                  # each Setup is handled at once; the replies wait in the inbox
    transport.pump(driver)                          # AdvertiseKeys, ShareKeys: now the driver waits for masked inputs
    transport.provide_update(u, delta, num_samples) # client u's training is done: its masked input joins the inbox
    transport.deliver(driver)                       # ... and reaches the driver
    driver.close_stage()                            # no more updates: whoever sent none has dropped
    transport.pump(driver)                          # Unmask; driver.outcome is the round's result

Delivery is synchronous: :meth:`~MemoryTransport.send` runs the client's ``handle`` before it returns, so once
:meth:`~MemoryTransport.recv` returns None every client has answered all it was sent; a client that did not answer
has left the round (it refused a message), and :meth:`~MemoryTransport.pump` closes the driver's stage at once
instead of at a deadline. Parts are handed over, not copied (a sender must not reuse a buffer it sent: the clients
and the driver never do).

It counts what the bus would carry (the bytes each client received and sent, as packed) and the seconds spent
inside client code, by the kind of message handled (``setup``, ``keys``, ``deliver``, ``unmask``, ``abort``, and
``update`` for :meth:`~MemoryTransport.provide_update`), so a benchmark can tell client time from server time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgpack

from fedopt.secagg.participant import SecAggClient

if TYPE_CHECKING:
    from fedopt.secagg.driver import SecAggDriver

__all__ = ["MemoryTransport"]

log = logging.getLogger("fedopt.secagg")


def _nbytes(parts: Sequence) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def _kind(parts: Sequence) -> str:
    """The ``kind`` field of a packed message's body (``"malformed"`` when it has none)."""
    try:
        kind = msgpack.unpackb(bytes(parts[0]), raw=False).get("kind")
    except Exception:  # whatever it is, the client's own decoding refuses it; only the label is wanted here
        return "malformed"
    return kind if isinstance(kind, str) else "malformed"


class MemoryTransport:
    """``send``/``recv`` of a :class:`~fedopt.secagg.driver.SecAggDriver` over in-process clients.

    ``participants`` maps each client id to its :class:`SecAggClient`; ``timer`` gives the seconds that
    :attr:`client_seconds` adds up (``time.perf_counter`` by default). Not thread-safe.
    """

    def __init__(self, participants: Mapping[str, SecAggClient], *,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.participants = dict(participants)
        self._timer = timer
        self._inbox: deque[tuple[str, list]] = deque()
        self.sent: dict[str, int] = {u: 0 for u in self.participants}  # bytes each client sent to the server
        self.received: dict[str, int] = {u: 0 for u in self.participants}  # bytes each client was sent
        self.client_seconds: dict[str, float] = {}  # seconds inside client code, by the kind of message handled
        self.client_calls: dict[str, int] = {}  # calls into client code, by kind

    @property
    def bytes_up(self) -> int:
        """Bytes the clients sent to the server, in all."""
        return sum(self.sent.values())

    @property
    def bytes_down(self) -> int:
        """Bytes the server sent to the clients, in all."""
        return sum(self.received.values())

    def send(self, client: str, parts: list) -> None:
        """Hand one message to ``client``; its replies wait in the inbox. A message for a client this transport
        does not hold is logged and dropped."""
        sa = self.participants.get(client)
        if sa is None:
            log.warning("secagg: dropped a message for %r, which is not a participant of this transport", client)
            return
        self.received[client] += _nbytes(parts)
        self._run(client, _kind(parts), sa.handle, parts)

    def provide_update(self, client: str, delta, num_samples: int, round: int | None = None) -> int:
        """Client ``client``'s update is ready (see :meth:`SecAggClient.provide_update`): how many messages it
        queued (1 when its masked input went out, 0 when it waits for its share delivery or left the round)."""
        sa = self.participants.get(client)
        if sa is None:
            raise KeyError(f"{client!r} is not a participant of this transport")
        return self._run(client, "update", sa.provide_update, delta, num_samples, round)

    def recv(self, timeout: float = 0.0) -> tuple[str, list] | None:
        """The next ``(client id, parts)`` a client sent, or None when there is none. Never waits: every reply is
        queued by the time :meth:`send` returns, so ``timeout`` is not needed."""
        return self._inbox.popleft() if self._inbox else None

    def deliver(self, driver: SecAggDriver) -> None:
        """Feed ``driver`` every message waiting in the inbox."""
        while self._inbox:
            driver.feed(*self._inbox.popleft())

    def pump(self, driver: SecAggDriver) -> None:
        """Run ``driver``'s round until it waits for masked inputs (they come through :meth:`provide_update`) or is
        done: deliver the replies, close each stage as it completes. A stage still waiting once the inbox is empty
        waits for clients that left the round: it closes at once. Raises SecAggError when the round aborts."""
        while not driver.done:
            self.deliver(driver)
            if driver.poll():
                continue
            if driver.stage == "mask":
                return
            driver.close_stage()

    def _run(self, client: str, kind: str, fn: Callable, *args) -> int:
        t = self._timer()
        replies = fn(*args)
        self.client_seconds[kind] = self.client_seconds.get(kind, 0.0) + (self._timer() - t)
        self.client_calls[kind] = self.client_calls.get(kind, 0) + 1
        for parts in replies:
            self.sent[client] += _nbytes(parts)
            self._inbox.append((client, parts))
        return len(replies)
