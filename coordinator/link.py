"""The coordinator's side of its connections: registration, messages and the zero-trust rules.

:class:`ClientLink` owns the ROUTER endpoint, the registry of clients and their liveness; the round in progress
(``tracker`` for OFFER/PULL/UPDATE, ``secure`` for SecAgg+, ``evals`` for federated evaluation) is set by the
:class:`~coordinator.server.Coordinator`, the round engine's bus executor, which derives from it.

Anything a client sends that does not fit (malformed, wrong round, unexpected) is logged with its reason and dropped;
the loop never dies on input: a handler that fails on a message logs one line and the loop goes on.

Zero trust (the README's threat model): over CurveZMQ a client's id is the one its key was enrolled under (the ZAP
User-Id, :func:`fedopt.keys.enrolled_id`), so a HELLO naming another id is refused; under ``--insecure`` and ipc the id
is whatever HELLO says, unauthenticated. Either way one id has one live connection: a HELLO for an id held by a
connection that still answers is refused, never a silent takeover. Registrations are capped (``--max-clients``); a
client's weight is its READY count, capped (:class:`~fedopt.engine.Bounds`); a client that keeps missing its
rounds is benched; a client holds at most one unread model message; upload credit a client does not use within
three heartbeats is taken back. Because planning is RoundServer's seeded ``plan`` over the same client ids, a bus run
selects the same clients with the same seeds as ``fedopt simulate`` in-process.
"""

from __future__ import annotations

import logging
import math

import torch
import zmq

from fedopt import bus, wire
from fedopt.aggregators import Update, WeightedMean
from fedopt.compress import Packed, decoded, decompress
from fedopt.config import RunConfig
from fedopt.errors import RoundError, WireError
from fedopt.liveness import Liveness, LogBudget, Ticker
from fedopt.engine import RoundServer

from .registry import Registry, RoundTracker

__all__ = ["ClientLink"]

log = logging.getLogger("fedopt.coordinator")


class ClientLink:
    """Registered clients over one ROUTER endpoint; handlers for every message a client may send."""

    server: RoundServer  # the round the updates are offered to
    round: int  # the round in progress (messages for another one are late)
    welcome: wire.Welcome

    def __init__(self, cfg: RunConfig, ep: bus.Endpoint, security: bus.Security, clock) -> None:
        self.cfg, self.ep, self.clock = cfg, ep, clock
        self.keyed = security.curve  # client ids come from keys, not from HELLO
        # a client holding another coordinator's key fails the handshake before any message: only a monitor sees it
        self.handshakes = bus.handshake_monitor(self.ep.sock) if security.curve else None
        self._handshake_log = LogBudget(3, 10.0, clock)
        self.registry = Registry(cfg.client_cap)
        self.live: Liveness[bytes] = Liveness(cfg.bus.heartbeat, clock=clock)
        self.ticker = Ticker(cfg.bus.heartbeat, clock=clock)
        self.tracker: RoundTracker | None = None
        self.evals: dict | None = None  # federated evaluation in progress: {"pending", "results"}
        self.secure = None  # the secure-aggregation round in progress (coordinator.secure_bus.BusTransport)
        self._failed: set[str] = set()  # clients that failed an attempt at this round: not selected again for it
        #: buffered asynchronous rounds (coordinator.buffered): where an accepted UPDATE and a lost job go instead of
        #: the round's RoundServer
        self.on_update = None
        self.on_lost = None
        self._scratch: torch.Tensor | None = None  # see _scratch_safe
        self.on_held = None  # secure buffered rounds: a finished job whose update its client keeps (client, samples)
        self.dropped_messages = 0  # malformed or unexpected messages, for tests and the summary
        self._drop_log = LogBudget(20, 1.0, clock)  # a flood of bad messages is counted, not logged line by line
        self._refusal_log = LogBudget(20, 1.0, clock)

    def close_link(self) -> None:
        """Close the ROUTER, its handshake monitor and the authenticator (``self.auth``, when one was started)."""
        if self.handshakes is not None:
            self.ep.sock.disable_monitor()
            self.handshakes.close(0)
            self.handshakes = None
        self.ep.close()
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
            self.auth = None

    def _pump(self, timeout: float) -> None:
        """Handle every message that arrives within ``timeout`` (then whatever is already queued)."""
        for _ in range(1000):
            try:
                got = self.ep.recv(timeout)
            except bus.BadMessage as e:
                self._drop(e.peer, str(e))
                continue
            if got is None:
                return
            timeout = 0
            peer, msg = got
            if peer in self.live:
                self.live.heard(peer)
            try:
                self._handle(peer, msg)
            except (KeyboardInterrupt, RoundError):
                raise
            except Exception as e:  # a bug a message exposes must not end the run: drop it, keep serving
                log.exception("handling %s failed", msg.TYPE)
                self._drop(peer, f"handling {msg.TYPE} failed: {type(e).__name__}: {e}")

    def _drop(self, peer: bytes | None, reason: str) -> None:
        self.dropped_messages += 1
        skipped = self._drop_log.take()
        if skipped is None:
            return
        rec = self.registry.get(peer) if peer else None
        who = f"client {rec.client}" if rec else f"peer {bus.describe(peer)}"
        more = f" ({skipped} more dropped messages not logged)" if skipped else ""
        log.warning("dropped a message from %s: %s%s", who, reason, more)

    # ---- messages -----------------------------------------------------------------------------------------------
    def _refuse(self, peer: bytes, reason: str) -> None:
        """Refuse a registration: log it, and tell the peer why (it may retry later)."""
        self.ep.send(wire.Bye(reason=f"refused: {reason}"), to=peer)
        self.dropped_messages += 1
        skipped = self._refusal_log.take()
        if skipped is not None:
            more = f" ({skipped} more refusals not logged)" if skipped else ""
            log.warning("refused a HELLO from peer %s: %s%s", bus.describe(peer), reason, more)

    def _hello(self, peer: bytes, msg: wire.Hello) -> None:
        client = msg.client
        if not client:
            return self._refuse(peer, "HELLO without a client id")
        if self.keyed and client != self.ep.user_id:
            return self._refuse(peer, f"client id {client!r} belongs to another key (this key is enrolled as "
                                      f"{self.ep.user_id!r})")
        holder = self.registry.holder(client)
        if holder is not None and holder != peer:
            # one live connection per id: take over only a connection that is gone (ROUTER_MANDATORY refuses a
            # send to a routing id whose connection closed), e.g. a client that restarted
            if self.ep.send(wire.Heartbeat(), to=holder):
                return self._refuse(peer, f"client {client!r} is already connected from another live connection")
        room = self.registry.room_for(peer, client, self.round, self.clock(), self.cfg.bus.join_timeout)
        if room is False:
            return self._refuse(peer, f"the coordinator holds its maximum of {self.registry.capacity} clients")
        if room is not True:
            evicted = self.registry.get(room)
            log.warning("evicting client %s (not ready or benched) to make room for client %s", evicted.client, client)
            self.ep.send(wire.Bye(reason="evicted: not ready or missing its rounds"), to=room)
            self._forget(room, "evicted")
        again = holder == peer
        if not again:
            replaced = self.registry.hello(peer, client, msg.device, self.clock())
            self._failed.discard(client)  # a new session may retry this round (misses still count toward a bench)
            if replaced is not None:
                self.live.forget(replaced)
                self._lost(client, "reconnected during the round")
            log.info("client %s connected (%s)", client, msg.device)
        self.live.heard(peer)
        self.ep.send(self.welcome, to=peer)  # again for a repeated HELLO: the first WELCOME may have been lost

    def _send_model(self, client: str, msg: wire.Message) -> bool:
        """Send TRAIN or EVALUATE to ``client`` unless it is gone or has not read the last one (a client that stops
        reading costs one queued model, not one per round). False when not sent."""
        rec = self.registry.record(client)
        if rec is None or rec.backlogged or not self.ep.send(msg, to=rec.peer):
            return False
        rec.models_sent += 1
        return True

    def _handle(self, peer: bytes, msg: wire.Message) -> None:
        if isinstance(msg, wire.Hello):
            return self._hello(peer, msg)
        rec = self.registry.get(peer)
        if rec is None:
            # e.g. a client of the coordinator before a restart: tell it to register again
            self.ep.send(wire.Bye(reason="unknown peer: send HELLO"), to=peer)
            return self._drop(peer, f"{msg.TYPE} from a peer that never said HELLO")
        if isinstance(msg, wire.Heartbeat):
            # a client's heartbeat counts the model messages it has read on this connection
            rec.models_read = max(rec.models_read, min(msg.round, rec.models_sent))
            return
        if isinstance(msg, (wire.Offer, wire.UpdateMsg, wire.Result, wire.SecAgg)):
            rec.models_read = rec.models_sent  # a reply: it read what it answers (at most one is ever unread)
        if isinstance(msg, wire.Ready):
            if rec.num_samples is not None and msg.num_samples != rec.num_samples:
                return self._drop(peer, f"READY again with {msg.num_samples} samples (announced "
                                        f"{rec.num_samples}): kept the first")
            # an edge's leaf clients: each weighs at least 1, and there are no more than the run's population
            if msg.clients and not msg.clients <= min(msg.num_samples, self.cfg.federation.clients):
                return self._drop(peer, f"READY for {msg.clients} leaf clients with weight {msg.num_samples}, in a "
                                        f"run of {self.cfg.federation.clients} clients")
            self.registry.ready(peer, msg.num_samples, msg.clients)
        elif isinstance(msg, wire.Offer) and self.secure is not None and (self.on_held is None
                                                                         or msg.round == self.secure.round):
            reason = self.secure.offer(rec.client, msg.round, msg.num_samples, msg.metrics)
            if reason is not None:
                self._drop(peer, reason)
        elif isinstance(msg, wire.Offer):
            t = self.tracker
            if t is None or not t.answers(rec.client, msg.round) or (self.on_held is None
                                                                     and not t.offer(rec.client)):
                return self._drop(peer, f"late or unexpected OFFER for round {msg.round} from client {rec.client} "
                                        f"(current round {self.round})")
            if self.on_held is not None:  # secure buffers: the update stays with the client until its cohort
                t.drop(rec.client)
                self.registry.delivered(rec.client)
                return self.on_held(rec.client, msg.num_samples)
            self._grant()
        elif isinstance(msg, wire.UpdateMsg):
            self._update(peer, rec.client, msg)
        elif isinstance(msg, wire.Result):
            ev = self.evals
            if ev is None or msg.round != self.round or rec.client not in ev["pending"]:
                return self._drop(peer, f"late or unexpected RESULT for round {msg.round}")
            ev["pending"].discard(rec.client)
            acc, loss = msg.metrics.get("accuracy"), msg.metrics.get("loss")
            if not (isinstance(acc, (int, float)) and 0 <= acc <= 1 and isinstance(loss, (int, float))
                    and 0 <= loss < math.inf and msg.num_samples > 0):
                return self._drop(peer, f"RESULT with accuracy {acc!r}, loss {loss!r}, {msg.num_samples} samples")
            # not more than it announced
            weight = min(msg.num_samples, rec.num_samples or 1, self.cfg.bounds.max_samples)
            ev["results"].append((float(acc), float(loss), weight))
        elif isinstance(msg, wire.SecAgg):
            reason = "SECAGG outside a secure round" if self.secure is None else self.secure.deliver(rec.client, msg)
            if reason is not None:
                self._drop(peer, reason)
        elif isinstance(msg, wire.Pass):
            t = self.tracker
            if t is None or not t.answers(rec.client, msg.round):
                return self._drop(peer, f"late or unexpected PASS for round {msg.round} from client {rec.client} "
                                        f"(current round {self.round})")
            # no update is coming (an edge whose cohort aborted): stop waiting for it, as for a client that left
            self._lost(rec.client, f"passed: {msg.reason[:200]}")
        elif isinstance(msg, wire.Bye):
            log.info("client %s left: %s", rec.client, msg.reason[:200])
            self._forget(peer, "left")
        else:
            self._drop(peer, f"a client may not send {msg.TYPE}")

    def _update(self, peer: bytes, client: str, msg: wire.UpdateMsg) -> None:
        t = self.tracker
        if t is None or not t.answers(client, msg.round) or not t.expects(client):
            return self._drop(peer, f"late UPDATE for round {msg.round} from client {client} "
                                    f"(current round {self.round}{'' if t else ', closed'})")
        scattered = None  # positions written into self._scratch, zeroed again once the update is folded in
        try:
            try:  # a compressed update is decoded here (its frames were validated); one of another size is refused
                if not msg.encoding:
                    delta = msg.delta
                else:
                    packed = Packed.from_encoding(msg.encoding, msg.values, msg.indices, msg.scales)
                    if packed.index == "sent" and packed.size == self.spec.size and self._scratch_safe():
                        at, vals = decoded(packed)
                        if self._scratch is None:
                            self._scratch = torch.zeros(self.spec.size)
                        delta, scattered = self._scratch, at
                        delta[at] = vals
                    else:
                        delta = decompress(packed, self.spec.size)
            except WireError as e:
                delta, reason = None, str(e)
                (self.server.reject if self.on_update is None else self.on_lost)(client, reason)
            if delta is not None:
                delta = delta if delta.dtype == self.spec.torch_dtype else delta.to(self.spec.torch_dtype)
                partial = bool(msg.metrics.get("partial", False))
                update = Update(client, delta, msg.num_samples, dict(msg.metrics), partial)
                del delta, msg  # the frame goes with the update: nothing else refers to it
                reason = self.server.offer(update) if self.on_update is None else self.on_update(update)
                del update
        finally:
            if scattered is not None:
                self._scratch[scattered] = 0.0
        t.received(client, accepted=reason is None)
        if reason is not None:
            log.warning("rejected the update of client %s for round %d: %s", client, t.round, reason)
            self._missed(client, t.round)  # a rejected update counts as a missed round: repeated, benched
        else:
            self.registry.delivered(client)
        self._grant()

    def _scratch_safe(self) -> bool:
        """Whether a sparse update may be scattered into the one zeroed vector this link reuses (``_scratch``)
        rather than a fresh dense one (for 10^7 parameters, 13.6 ms of page faults and zeroing per update): only
        when what the update reaches keeps no reference to it. A synchronous round (no buffer journal) into a plain
        streaming weighted mean, which copies the first update and lerps the rest, and float32 deltas."""
        return (self.on_update is None and type(self.server.aggregator) is WeightedMean
                and self.spec.torch_dtype == torch.float32)

    def _grant(self) -> None:
        for client in self.tracker.grants(self.clock()) if self.tracker else ():
            peer = self.registry.peer_of(client)
            if peer is None or not self.ep.send(wire.Pull(round=self.tracker.rounds[client]), to=peer):
                self._lost(client, "unreachable")

    def _lost(self, client: str, reason: str) -> None:
        """A selected client will not deliver this round."""
        if self.tracker is not None and self.tracker.drop(client):
            if self.on_lost is not None:
                self.on_lost(client, reason)
            self.server.reject(client, reason)
            self._missed(client, self.tracker.round)
            log.warning("round %d: client %s dropped (%s)", self.tracker.round, client, reason)
            self._grant()
        if self.secure is not None:
            self.secure.lost(client)
        if self.evals is not None:
            self.evals["pending"].discard(client)

    def _missed(self, client: str, round: int) -> None:
        self.registry.missed(client, round)
        self._failed.add(client)
        misses, until = self.registry.misses(client)
        if until > round:
            log.warning("client %s missed %d rounds in a row: not selected before round %d", client, misses, until)

    def _forget(self, peer: bytes, reason: str) -> None:
        rec = self.registry.remove(peer)
        self.live.forget(peer)
        if rec is not None:
            self._lost(rec.client, reason)

    def _keepalive(self) -> None:
        if self.handshakes is not None and zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL in bus.handshake_failures(
                self.handshakes) and (skipped := self._handshake_log.take()) is not None:
            log.warning("curve: a client failed the handshake: it does not hold this coordinator's public key "
                        "(give it this coordinator.key)%s", f" ({skipped} more not logged)" if skipped else "")
        for peer in self.live.expire():
            rec = self.registry.get(peer)
            log.warning("client %s is silent for %d heartbeats: dead", rec.client if rec else "?", self.live.misses)
            self._forget(peer, "died (no heartbeat)")
        if self.ticker.due():
            for peer in self.registry.peers():
                self.ep.send(wire.Heartbeat(), to=peer)
