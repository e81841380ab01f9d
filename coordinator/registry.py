"""Who is connected, and where the current round stands: pure bookkeeping with no sockets and no clock of its own.

:class:`Registry` maps ZeroMQ routing ids to stable client ids (a client that reconnects gets a new routing id but
keeps its client id, so seeded selection stays the same). It holds at most ``capacity`` registrations, one live
connection per client id, and remembers which clients keep missing their rounds (they are benched: not selected for
a while). Each record also counts model messages (TRAIN, EVALUATE) sent and not yet read, so a client that stops
reading its socket costs the coordinator one queued model, not one per round.

:class:`RoundTracker` follows one round's selected clients through OFFER -> PULL -> UPDATE and hands out upload
credit (``slots``), which bounds how many update frames the coordinator holds at once; credit that a PULLed client
does not use within its deadline is taken back.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = ["ClientRecord", "Registry", "RoundTracker"]


@dataclass
class ClientRecord:
    client: str  # stable id: from the key that authenticated it, else (--insecure, ipc) from HELLO
    peer: bytes  # current routing id
    device: str = "cpu"
    num_samples: int | None = None  # known once the client said READY
    clients: int = 0  # an edge aggregator: the leaf clients it announced with READY (0: a leaf client)
    models_sent: int = 0  # TRAIN/EVALUATE messages sent on this connection
    models_read: int = 0  # of those, how many the client has shown it read (heartbeat count, or a reply)
    since: float = 0.0  # when it registered (the caller's clock)

    @property
    def ready(self) -> bool:
        return self.num_samples is not None

    @property
    def backlogged(self) -> bool:
        """A model message sent to it is still unread: another one would only queue behind it."""
        return self.models_read < self.models_sent


class Registry:
    """Connected clients by routing id and by client id; one routing id per client id, at most ``capacity``.

    ``bench_after``: a client that misses this many rounds in a row (selected, then dropped: silent, unreachable,
    late, backlogged, or its update rejected) is not selected for 2, 4, 8 ... (at most 32) rounds; an accepted update clears its record.
    """

    def __init__(self, capacity: int = 1 << 30, bench_after: int = 2) -> None:
        self.capacity = capacity
        self.bench_after = bench_after
        self._by_peer: dict[bytes, ClientRecord] = {}
        self._by_id: dict[str, ClientRecord] = {}
        self._edges: dict[str, ClientRecord] = {}  # ready edge aggregators by client id (few: selection reads them)
        # client id -> (consecutive misses, benched until round); bounded LRU, so churning ids cannot grow it
        self._misses: OrderedDict[str, tuple[int, int]] = OrderedDict()

    # ---- registration -----------------------------------------------------------------------------------------------
    def holder(self, client: str) -> bytes | None:
        """The routing id now registered under ``client``, if any."""
        rec = self._by_id.get(client)
        return None if rec is None else rec.peer

    def room_for(self, peer: bytes, client: str, round: int, now: float = 0.0,
                 grace: float = float("inf")) -> bytes | bool:
        """Whether a HELLO for ``client`` at ``peer`` fits: True when there is room (or it replaces a registration
        of the same id or connection), else the routing id of a registration to evict (benched, or still not ready
        ``grace`` seconds after registering: loading data takes a while, so a newcomer never evicts one that may
        still be loading), else False (full)."""
        if client in self._by_id or peer in self._by_peer or len(self._by_peer) < self.capacity:
            return True
        for rec in self._by_peer.values():
            if self.benched(rec.client, round) or (not rec.ready and now - rec.since > grace):
                return rec.peer
        return False

    def hello(self, peer: bytes, client: str, device: str, now: float = 0.0) -> bytes | None:
        """Register ``client`` at ``peer``; returns the routing id it replaced (a reconnect), if any.

        The caller has already decided that the replaced connection is gone (see ``Coordinator``): a live one is
        never taken over."""
        old = self._by_id.get(client)
        replaced = None
        if old is not None and old.peer != peer:
            replaced = old.peer
            self._by_peer.pop(old.peer, None)
        prior = self._by_peer.get(peer)
        if prior is not None and prior.client != client:
            self._by_id.pop(prior.client, None)
            self._edges.pop(prior.client, None)
        self._edges.pop(client, None)  # a new registration says READY again
        rec = ClientRecord(client, peer, device, since=now)
        self._by_peer[peer] = rec
        self._by_id[client] = rec
        return replaced

    def ready(self, peer: bytes, num_samples: int, clients: int = 0) -> ClientRecord | None:
        """Record a client's announced sample count (and, for an edge aggregator, its leaf clients), once per
        registration (a later READY cannot change them). The caller has bounded ``clients``."""
        rec = self._by_peer.get(peer)
        if rec is not None and rec.num_samples is None:
            rec.num_samples, rec.clients = num_samples, clients
            if clients:
                self._edges[rec.client] = rec
        return rec

    def remove(self, peer: bytes) -> ClientRecord | None:
        rec = self._by_peer.pop(peer, None)
        if rec is not None and self._by_id.get(rec.client) is rec:
            del self._by_id[rec.client]
            self._edges.pop(rec.client, None)
        return rec

    def get(self, peer: bytes) -> ClientRecord | None:
        return self._by_peer.get(peer)

    def record(self, client: str) -> ClientRecord | None:
        return self._by_id.get(client)

    def peer_of(self, client: str) -> bytes | None:
        rec = self._by_id.get(client)
        return None if rec is None else rec.peer

    # ---- selection ----------------------------------------------------------------------------------------------------
    def missed(self, client: str, round: int) -> None:
        """``client`` was selected in ``round`` and did not deliver."""
        n, _ = self._misses.pop(client, (0, 0))
        n += 1
        until = round + min(2 ** (n - self.bench_after + 1), 32) if n >= self.bench_after else 0
        self._misses[client] = (n, until)
        while len(self._misses) > max(self.capacity, 1024):
            self._misses.popitem(last=False)

    def delivered(self, client: str) -> None:
        self._misses.pop(client, None)

    def misses(self, client: str) -> tuple[int, int]:
        """(consecutive misses, the round it is benched until) of ``client``."""
        return self._misses.get(client, (0, 0))

    def pardon(self, client: str) -> None:
        """Lift ``client``'s bench (its count of misses stays): when no other client is ready, a benched one that is
        alive may try the round again rather than the round waiting for clients that may never come."""
        n, until = self._misses.get(client, (0, 0))
        if until:
            self._misses[client] = (n, 0)

    def benched(self, client: str, round: int) -> bool:
        return self._misses.get(client, (0, 0))[1] > round

    def sizes(self, round: int | None = None) -> dict[str, int]:
        """``client id -> num_samples`` of every ready client (that may be selected in ``round``, when given):
        what RoundServer.plan selects from."""
        return {c: r.num_samples for c, r in self._by_id.items()
                if r.num_samples is not None and (round is None or not self.benched(c, round))}

    def edges(self) -> dict[str, int]:
        """``client id -> leaf clients`` of every ready edge aggregator: O(edges), not O(clients)."""
        return {c: r.clients for c, r in self._edges.items()}

    def peers(self) -> list[bytes]:
        return list(self._by_peer)

    def __len__(self) -> int:
        return len(self._by_peer)


class RoundTracker:
    """The clients that owe an update, and the upload queue: one attempt at one round, or (buffered asynchronous
    rounds) every job in flight, each answering its own wire round.

    A client is *pending* until its UPDATE arrives or it is dropped (it died, was unreachable, missed the deadline,
    or held upload credit past ``pull_timeout``). Finished clients OFFER; :meth:`grants` pulls at most ``slots``
    uploads at a time.
    """

    def __init__(self, round: int, selected: list[str], deadline_at: float, slots: int,
                 pull_timeout: float = float("inf")) -> None:
        self.round = round
        self.deadline_at = deadline_at
        self.slots = slots
        self.pull_timeout = pull_timeout
        self.rounds: dict[str, int] = {c: round for c in selected}  # pending client -> the wire round it answers
        self.accepted = 0
        self._queue: deque[str] = deque()
        self.uploading: dict[str, float] = {}  # client -> when it was pulled

    @property
    def pending(self) -> set[str]:
        return set(self.rounds)

    def add(self, client: str, round: int) -> None:
        """A job in flight: ``client`` owes the update of wire round ``round``."""
        self.rounds[client] = round

    def answers(self, client: str, round: int) -> bool:
        """Whether a message of ``client`` for wire ``round`` answers the job it owes."""
        return self.rounds.get(client) == round

    def offer(self, client: str) -> bool:
        """A pending client's update is ready; False when it is not expected (not selected, or already done)."""
        if client not in self.rounds or client in self.uploading or client in self._queue:
            return False
        self._queue.append(client)
        return True

    def grants(self, now: float = 0.0) -> list[str]:
        """Clients to PULL now, keeping at most ``slots`` uploads in flight."""
        out = []
        while self._queue and len(self.uploading) < self.slots:
            c = self._queue.popleft()
            if c in self.rounds:
                self.uploading[c] = now
                out.append(c)
        return out

    def overdue(self, now: float) -> list[str]:
        """Pulled clients whose upload has not arrived within ``pull_timeout``: their credit is to be taken back."""
        return [c for c, t in self.uploading.items() if now - t > self.pull_timeout]

    def expects(self, client: str) -> bool:
        """Whether an UPDATE from ``client`` is due now (it was pulled and has not arrived)."""
        return client in self.uploading

    def received(self, client: str, accepted: bool) -> None:
        self.rounds.pop(client, None)
        self.uploading.pop(client, None)
        self.accepted += bool(accepted)

    def drop(self, client: str) -> bool:
        """Stop waiting for ``client``; True when it was still owed."""
        was = self.rounds.pop(client, None) is not None
        self.uploading.pop(client, None)
        return was

    @property
    def complete(self) -> bool:
        return not self.rounds
