"""Who is connected, and where the current round stands: pure bookkeeping with no sockets and no clock of its own.

:class:`Registry` maps ZeroMQ routing ids to stable client ids (a client that reconnects gets a new routing id but
keeps its client id, so seeded selection stays the same). :class:`RoundTracker` follows one round's selected clients
through OFFER -> PULL -> UPDATE and hands out upload credit (``slots``), which bounds how many update frames the
coordinator holds at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["ClientRecord", "Registry", "RoundTracker"]


@dataclass
class ClientRecord:
    client: str  # stable id from HELLO
    peer: bytes  # current routing id
    device: str = "cpu"
    num_samples: int | None = None  # known once the client said READY

    @property
    def ready(self) -> bool:
        return self.num_samples is not None


class Registry:
    """Connected clients by routing id and by client id; one routing id per client id."""

    def __init__(self) -> None:
        self._by_peer: dict[bytes, ClientRecord] = {}
        self._by_id: dict[str, ClientRecord] = {}

    def hello(self, peer: bytes, client: str, device: str) -> bytes | None:
        """Register ``client`` at ``peer``; returns the routing id it replaced (a reconnect), if any."""
        old = self._by_id.get(client)
        replaced = None
        if old is not None and old.peer != peer:
            replaced = old.peer
            self._by_peer.pop(old.peer, None)
        prior = self._by_peer.get(peer)
        if prior is not None and prior.client != client:
            self._by_id.pop(prior.client, None)
        rec = ClientRecord(client, peer, device)
        self._by_peer[peer] = rec
        self._by_id[client] = rec
        return replaced

    def ready(self, peer: bytes, num_samples: int) -> ClientRecord | None:
        rec = self._by_peer.get(peer)
        if rec is not None:
            rec.num_samples = num_samples
        return rec

    def remove(self, peer: bytes) -> ClientRecord | None:
        rec = self._by_peer.pop(peer, None)
        if rec is not None and self._by_id.get(rec.client) is rec:
            del self._by_id[rec.client]
        return rec

    def get(self, peer: bytes) -> ClientRecord | None:
        return self._by_peer.get(peer)

    def peer_of(self, client: str) -> bytes | None:
        rec = self._by_id.get(client)
        return None if rec is None else rec.peer

    def sizes(self) -> dict[str, int]:
        """``client id -> num_samples`` of every ready client: what RoundServer.plan selects from."""
        return {c: r.num_samples for c, r in self._by_id.items() if r.num_samples is not None}

    def peers(self) -> list[bytes]:
        return list(self._by_peer)

    def __len__(self) -> int:
        return len(self._by_peer)


class RoundTracker:
    """One attempt at one round: the selected clients that still owe an update, and the upload queue.

    A selected client is *pending* until its UPDATE arrives or it is dropped (it died, was unreachable, or missed
    the deadline). Finished clients OFFER; :meth:`grants` pulls at most ``slots`` uploads at a time.
    """

    def __init__(self, round: int, selected: list[str], deadline_at: float, slots: int) -> None:
        self.round = round
        self.deadline_at = deadline_at
        self.slots = slots
        self.pending: set[str] = set(selected)
        self.accepted = 0
        self._queue: deque[str] = deque()
        self.uploading: set[str] = set()

    def offer(self, client: str) -> bool:
        """A pending client's update is ready; False when it is not expected (not selected, or already done)."""
        if client not in self.pending or client in self.uploading or client in self._queue:
            return False
        self._queue.append(client)
        return True

    def grants(self) -> list[str]:
        """Clients to PULL now, keeping at most ``slots`` uploads in flight."""
        out = []
        while self._queue and len(self.uploading) < self.slots:
            c = self._queue.popleft()
            if c in self.pending:
                self.uploading.add(c)
                out.append(c)
        return out

    def expects(self, client: str) -> bool:
        """Whether an UPDATE from ``client`` belongs to this round (it was pulled and has not arrived)."""
        return client in self.uploading

    def received(self, client: str, accepted: bool) -> None:
        self.pending.discard(client)
        self.uploading.discard(client)
        self.accepted += bool(accepted)

    def drop(self, client: str) -> bool:
        """Stop waiting for ``client``; True when it was still owed."""
        was = client in self.pending
        self.pending.discard(client)
        self.uploading.discard(client)
        return was

    @property
    def complete(self) -> bool:
        return not self.pending
