"""The pairwise exchange protocol of a gossip peer, the socket-thread half: a mixin of
:class:`clients.gossip.peer.PeerSockets`, which owns the sockets and calls these handlers from its loop.

Random pairwise gossip (Boyd et al. 2006), in three messages. For one *exchange slot* the training thread asks for an
exchange; the socket thread picks a random live neighbour ``b`` and proposes (GOSSIP_FETCH kind="exchange"). ``b`` answers
GOSSIP_BUSY, or reserves itself and answers GOSSIP_REPLY with its model ``x_b``. ``a`` mixes ``x_b`` in and sends
GOSSIP_PUSH with its model as it was just before mixing; ``b`` mixes that in and is free again. Two peers that pick each
other at once both refuse, back off 5-40 ms (accepting others meanwhile) and pick again; a slot gives up after
``max_tries`` refusals, and every wait has a deadline. *Final* slots (kind="final", after the last round's training)
pair only peers whose training is over (a training peer refuses them), so the consensus they reach is what each peer
records, instead of being undone by a partner's last local epoch; they retry until their deadline.

Atomicity. Each side mixes exactly once, under its model lock, and only on receipt of the other side's whole model
(:class:`~clients.gossip.state.ModelState`), so no peer is ever in a half-applied state. The two sides' updates are
``+w_b (x_b - x_a)`` and ``+w_a (x_a - x_b)`` with ``n_a w_b = n_b w_a``: together they keep ``sum_i n_i x_i``; each alone
is a convex step towards a neighbour's model. No finite protocol makes two peers agree on a lossy link (the two
generals), so we choose the rule whose one-sided completion is still valid: if ``b`` never receives the PUSH (``a``
crashed after mixing), ``a`` has taken a convex step, every model stays in the convex hull of the swarm's models and
consensus is unaffected; only the weighted mean moves, by at most ``w_b ||x_a - x_b||`` once. A PUSH that arrives after
``b`` released its reservation (a slow ``a``) is still mixed against the snapshot ``b`` sent, which restores the sum
exactly; likewise a REPLY that arrives after ``a`` gave up is completed when ``a`` is idle. A commit message would
only move the same window to the other side.

Traffic bound (no hotspot): a training round has ``slots`` exchange slots, opened by a ``round`` request that also
reads the counters, so the budget's window and the window the metrics report coincide. The budget is
``2 (1 + max_accept)`` model messages per slot (4 with the default ``max_accept`` = 1), counted at the sockets: every
model sent or received, wanted or not (a late reply, a stray push). In a slot a peer initiates at most one exchange
(two messages; after a timeout the slot ends), and it accepts a proposal (two messages) or completes a late reply
(one more) only while the messages moved so far plus those, plus two for each of its own slots still to
come, fit the budget; so the busiest node moves at most 4 models per slot whatever the swarm's size (plus headers,
about 3% of a 19 KB model). A fetch (a newcomer's or restarted peer's pull: one model, once per join) is always
answered and falls outside the budget. After training a lingering peer accepts freely. D-PSGD is not budgeted (degree-bound).

Zero trust. Every message is validated before use and a handler that fails (any exception) drops its message with
one log line; the loop goes on. Over CurveZMQ an inbound message's sender is the key that authenticated its
connection (the ZAP User-Id), and a claimed ``addr`` belongs to the key that first announced it
(:class:`~clients.gossip.members.AddressKeys`); without keys claims are unauthenticated. Models are screened and
weights, versions and rumours bounded (:mod:`clients.gossip.state`, :mod:`clients.gossip.members`) only once the whole
message is valid. A fetch collects up to ``fetch_quorum`` neighbours' models and takes their coordinate-wise median.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from fedopt import bus, wire
from fedopt.compress import Packed
from fedopt.errors import WireError

__all__ = ["Request", "PairwiseExchange"]

log = logging.getLogger("fedopt.gossip")


@dataclass
class Request:
    """A job from the training thread: ``round`` (open a training round of ``slots`` exchange slots; returns the byte
    counters), ``push`` (one exchange slot), ``final`` (a final-mix slot: only with peers whose training is over), ``fetch`` (pull a newer model), ``sync`` (a D-PSGD round), ``done``
    (training finished: linger, then stop). ``result`` is filled before ``event`` is set."""

    kind: str
    round: int = 0
    budget: float = 10.0  # seconds this request may take in all
    slots: int = 1
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
    busy: int = 0  # BUSY answers so far
    asked: set = field(default_factory=set)  # a fetch's peers asked so far
    fetched: list = field(default_factory=list)  # a fetch's replies: (peer, model, version, num_samples)


class PairwiseExchange:
    """Needs ``self.state``, ``self.address``, ``self.members_view``, ``self.keys``, ``self.requests``,
    ``self.stats``, ``self._dealer(addr)``, ``self._close_dealer(addr)`` and ``self._finish`` (the host), plus
    D-PSGD's ``self._start_sync`` / ``self._on_sync_push`` / ``self._check_sync``."""

    def _init_exchange(self) -> None:
        self.pending: _Pending | None = None
        self.abandoned: tuple[str, int] | None = None  # (peer, xid) of the last exchange this peer gave up on
        self.reserved: dict | None = None  # the exchange this peer agreed to and awaits the PUSH of
        self.released: dict[tuple[str, int], dict] = {}  # reservations that expired: a late PUSH still completes
        # the current training round's budget of model messages (None before the first round: then one accept)
        self.window: dict | None = None
        self.accepted = 0
        self.training = True
        self.finishing = False  # in the final mixes: training is over, the model is not recorded yet
        self.last_inbound = time.monotonic()
        self._xid = random.getrandbits(31)

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
            elif req.kind == "round":  # a new training round: a fresh budget, and the counters it starts at
                self.round_open = req.round
                b_in, b_out, m = self.bytes_in, self.bytes_out, self.stats["models"]
                self.window = {"start": m, "slots_left": max(1, req.slots),
                               "budget": 2 * (1 + self.max_accept) * max(1, req.slots)}
                self._finish(req, status="ok", bytes_in=b_in, bytes_out=b_out, models=m)
            elif req.kind == "sync":
                self._start_sync(req)
            else:
                self.finishing = self.finishing or req.kind == "final"
                if req.kind in ("push", "final") and self.window is not None:
                    self.window["slots_left"] = max(0, self.window["slots_left"] - 1)
                self.abandoned = None
                self.pending = _Pending(req, time.monotonic() + req.budget)
                self._attempt()

    def _attempt(self) -> None:
        p = self.pending
        now = time.monotonic()
        if p.req.kind == "fetch":
            fresh = [c for c in self.members_view.candidates() if c not in p.asked]
            peer = random.choice(fresh) if fresh else None
            if peer is None and p.fetched:  # everyone reachable has answered: combine what came
                self._conclude_fetch(p)
                return
        else:
            peer = self.members_view.pick()
        if peer is None:
            if now >= p.give_up or p.req.kind in ("push", "final"):  # nobody to mix with: this slot trains alone
                self.pending = None
                self._finish(p.req, status="alone")
            else:
                p.retry_at = now + 0.25
            return
        p.asked.add(peer)
        self._xid = (self._xid + 1) & 0x7FFF_FFFF
        p.xid, p.peer, p.retry_at = self._xid, peer, None
        p.deadline = min(p.give_up, now + self.exchange_timeout)
        kind = {"fetch": "fetch", "final": "final"}.get(p.req.kind, "exchange")
        if not self._dealer(p.peer).send(wire.GossipFetch(xid=p.xid, addr=self.address, kind=kind,
                                                          sender=self.address)):
            p.deadline = now  # queue full: the peer is gone; the timer drops it

    def _timers(self) -> None:
        now = time.monotonic()
        p = self.pending
        if p is not None:
            if p.retry_at is not None and now >= p.retry_at:
                if now >= p.give_up and p.fetched:
                    self._conclude_fetch(p)
                elif now >= p.give_up:  # only BUSY answers until the end: this slot trains alone
                    self.pending = None
                    self._finish(p.req, status="busy")
                else:
                    self._attempt()
            elif p.retry_at is None and now >= p.deadline:
                log.warning("exchange with %s timed out: dropping it", p.peer)
                self.stats["timeouts"] += 1
                self.members_view.drop(p.peer)  # its DEALER stays open: a late reply can still complete the exchange
                # a push slot ends here (at most one late reply may still arrive); a fetch tries someone else
                if p.fetched and now >= p.give_up:
                    self._conclude_fetch(p)
                elif now >= p.give_up or p.req.kind in ("push", "final"):
                    self.pending = None
                    self.abandoned = (p.peer, p.xid) if p.req.kind != "fetch" else None
                    self._finish(p.req, status="timeout")
                else:
                    self._attempt()
        r = self.reserved
        if r is not None and now >= r["deadline"]:
            log.warning("%s reserved an exchange but has not pushed yet: released (a late push still completes it)",
                        r["addr"])
            self.reserved = None
            self.released[(r["addr"], r["xid"])] = {**r, "deadline": now + self.peer_timeout}
        for key in [k for k, v in self.released.items() if v["deadline"] < now]:
            del self.released[key]
        if self.sync is not None:
            self._check_sync()
        for addr in self.members_view.expire():
            log.info("peer %s silent for %.0fs: expired", addr, self.peer_timeout)
            self._close_dealer(addr)
        # a dropped peer's DEALER stays open while its tombstone lasts (a late reply may still come), then goes: the
        # sockets this peer holds are bounded by the membership table
        keep = set(self.members_view.live._last) | set(self.members_view.tombstones) | set(self.graph_peers())
        if self.pending is not None:
            keep.add(self.pending.peer)
        for addr in [a for a in self.dealers if a not in keep]:
            self._close_dealer(addr)

    # ---- inbound: proposals, pushes and fetches on the ROUTER ------------------------------------------------------
    def _over_budget(self, models: int) -> bool:
        """Would a request that moves ``models`` more model messages break this round's budget, keeping room for
        this peer's own slots still to come (two each)? Every model message sent or received counts, wanted or not."""
        if not self.training:
            return False  # training is over: a lingering peer helps whoever still mixes
        w = self.window
        if w is None:
            return self.accepted >= self.max_accept
        own = w["slots_left"] + (self.pending is not None and self.pending.req.kind in ("push", "final"))
        return self.stats["models"] - w["start"] + models + 2 * own > w["budget"]

    def _busy(self, kind: str) -> bool:
        if kind == "fetch":
            return False  # a newcomer's pull (one model, once per join) is always answered, outside the budget
        over = self._over_budget(2)
        if kind == "final" and self.training and not self.finishing:
            return True  # final mixes pair only peers whose training is over, so the consensus they reach lasts
        in_flight = self.pending is not None and self.pending.retry_at is None
        return in_flight or self.reserved is not None or over

    def graph_peers(self) -> list[str]:
        return list(getattr(self, "graph", []))

    def _on_inbound(self, ep: bus.Endpoint, peer: bytes, msg: wire.Message, key: str | None = None) -> None:
        self.last_inbound = time.monotonic()
        if isinstance(msg, wire.GossipPush):
            self.stats["models"] += 1
        addr = getattr(msg, "addr", "")
        if isinstance(msg, (wire.GossipFetch, wire.GossipPush)) and not self.keys.claim(addr, key):
            raise WireError(f"a {msg.TYPE} claims address {addr!r}, which is bound to another key (sent by key "
                            f"{key}): refused")
        if isinstance(msg, wire.GossipFetch):
            self.members_view.heard_inbound(addr)
            if self._busy(msg.kind):
                self.stats["busy_sent"] += 1
                ep.send(wire.GossipBusy(xid=msg.xid, addr=self.address, sender=self.address), to=peer)
                return
            vec, version = self.state.snapshot()
            self.accepted += 1  # counts only before the first round opens a byte budget
            if msg.kind in ("exchange", "final"):
                self.reserved = {"xid": msg.xid, "addr": addr, "before": vec, "version": version,
                                 "deadline": time.monotonic() + self.exchange_timeout}
            ep.send(wire.GossipReply(xid=msg.xid, version=version, num_samples=self.state.num_samples,
                                     addr=self.address, peers=self.members_view.rumour(), model=vec,
                                     sender=self.address), to=peer)
            self.stats["models"] += 1
        elif isinstance(msg, wire.GossipPush) and not isinstance(msg, wire.GossipReply):
            r = self.reserved
            late = None
            if not self.topology and (r is None or r["xid"] != msg.xid or r["addr"] != addr):
                late = self.released.get((addr, msg.xid))
                if late is None:
                    raise WireError(f"push from {addr!r} matches no exchange this peer agreed to")
            try:
                if msg.encoding:  # a CHOCO round's compressed difference: D-PSGD with --compress only
                    if not self.topology or self.choco is None:
                        raise WireError(f"compressed push from {addr!r}, but this peer runs no compressed D-PSGD")
                    model = Packed.from_encoding(msg.encoding, msg.values, msg.indices, msg.scales)
                else:
                    model = self.state.check(msg.model)  # raises WireError: wrong shape, NaN/Inf
                if msg.num_samples < 1:
                    raise WireError(f"push from {addr} declares {msg.num_samples} samples")
                if self.topology:
                    self._on_sync_push(addr, msg.round, model)
                    self.members_view.heard_inbound(addr)
                    return
                if late is not None:
                    del self.released[(addr, msg.xid)]
                    r = late
                    self.stats["late"] += 1
                else:
                    self.reserved = None
                # screened against the snapshot sent; raises WireError (nothing mixed) when out of bounds
                outcome = self.state.complete_push(r["before"], r["version"], model.clone(), msg.num_samples,
                                                   msg.version)
            finally:
                if late is None and not self.topology and self.reserved is r:
                    self.reserved = None  # the exchange ends here, mixed or not, and this peer is free at once
            self.stats["accepted"] += 1
            self.stats["distances"].append(outcome.distance)
            self.members_view.heard_inbound(addr)  # the whole message was valid: now its claims count
            self.members_view.rumours(msg.peers)
        else:
            log.warning("refused a %s message on the peer socket from %s", msg.TYPE, addr or bus.describe(peer))
            self.stats["refused"] += 1

    # ---- replies on the DEALERs ------------------------------------------------------------------------------------
    def _on_reply(self, ep: bus.Endpoint, dialled: str, msg: wire.Message) -> None:
        p = self.pending
        if isinstance(msg, (wire.GossipReply, wire.GossipBusy)):
            self.members_view.heard(dialled)  # reached at the address this peer dialled: met
        if isinstance(msg, wire.GossipPush):
            self.stats["models"] += 1
        if p is None and isinstance(msg, wire.GossipReply) and self.abandoned == (dialled, msg.xid) \
                and not self._over_budget(1):
            self.abandoned = None  # the reply to the exchange this peer gave up on, and nothing else in flight
            self.stats["late"] += 1
            self._mix_reply(ep, msg, msg.xid, 0)
            return
        if p is None or getattr(msg, "xid", None) != p.xid or p.retry_at is not None:
            if isinstance(msg, wire.GossipReply):
                log.info("late reply from %s dropped (exchange already closed)", msg.addr)
            return
        if isinstance(msg, wire.GossipBusy):
            self.stats["busy_got"] += 1
            p.busy += 1
            if p.req.kind == "push" and p.busy >= self.max_tries:  # everyone asked is full: this slot trains alone
                self.pending = None
                self._finish(p.req, status="busy")
                return
            # an exchange takes milliseconds, so a short random wait is enough to break the tie; a 20-150 ms backoff
            # made refusals most of a round's time (8 peers on 2 cores: 0.6 s rounds against 0.15 s now, with as many
            # slots completing: 95% against 95-97%)
            p.retry_at = time.monotonic() + random.uniform(0.005, 0.04)
            return
        if not isinstance(msg, wire.GossipReply):
            log.warning("refused a %s message from neighbour %s", msg.TYPE, p.peer)
            return
        try:
            self.state.check(msg.model)
            if msg.num_samples < 1:
                raise WireError(f"reply from {dialled} declares {msg.num_samples} samples")
            if p.req.kind == "fetch":
                with self.state.lock:
                    self.state.screen(msg.model, motion=False)
                p.fetched.append((dialled, msg.model.clone(), msg.version, msg.num_samples))
                self.members_view.rumours(msg.peers, vouched=True)
                if len(p.fetched) >= self.fetch_quorum:
                    self._conclude_fetch(p)
                else:
                    p.retry_at = time.monotonic()  # ask one more neighbour
                return
            self.pending = None
            outcome = self._mix_reply(ep, msg, p.xid, p.req.round)
        except Exception:
            if self.pending is p:
                p.retry_at = time.monotonic()  # ask someone else
            else:
                self.pending = None
                self._finish(p.req, status="refused", peer=p.peer)
            raise
        self._finish(p.req, status="ok", peer=p.peer, action=outcome.action, distance=outcome.distance,
                     version=outcome.version)

    def _conclude_fetch(self, p: _Pending) -> None:
        """Combine a fetch's replies: the median of two or more, one bounded mix for a single one."""
        self.pending = None
        try:
            if len(p.fetched) >= 2:
                outcome = self.state.adopt_agreed([m for _, m, _, _ in p.fetched], [v for _, _, v, _ in p.fetched])
            else:
                _, model, version, n = p.fetched[0]
                outcome = self.state.adopt(model, version, n)
        except WireError as e:
            log.warning("fetched models refused: %s", e)
            self._finish(p.req, status="refused")
            return
        peers = ", ".join(a for a, _, _, _ in p.fetched)
        self._finish(p.req, status="ok", peer=peers, action=outcome.action, distance=outcome.distance,
                     version=outcome.version)

    def _mix_reply(self, ep: bus.Endpoint, msg: wire.GossipReply, xid: int, rnd: int):
        """Mix the replier's model in, then push ours as it was before mixing (the exchange's last message).
        Raises WireError (nothing mixed, nothing sent) when the model fails the state's screen."""
        model = self.state.check(msg.model)
        before, v_before, outcome = self.state.accept_push(model.clone(), msg.num_samples, msg.version)
        self.members_view.rumours(msg.peers, vouched=True)  # a reply on the DEALER this peer dialled: a met peer
        ep.send(wire.GossipPush(round=rnd, xid=xid, version=v_before, num_samples=self.state.num_samples,
                                addr=self.address, peers=self.members_view.rumour(), model=before,
                                sender=self.address))
        self.stats["models"] += 1
        self.stats["exchanges"] += 1
        self.stats["distances"].append(outcome.distance)
        return outcome
