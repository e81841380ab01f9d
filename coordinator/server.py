"""The coordinator: the ROUTER side of federated mode, driving :class:`~fedopt.rounds.RoundServer`.

The coordinator is the round engine's bus executor (:class:`fedopt.engine.Engine` runs the rounds): one thread owns
the socket, and while the engine waits on it (for clients, for a round's updates, for federated evaluation) it
receives with a short poll timeout, sends heartbeats and expires silent clients. Its part of a round::

    available  the first round (of this process) waits until every client is ready, or --join-timeout passed with at
               least --min-clients ready; every later round starts at once with the clients ready (at least
               --min-clients). While it waits, the coordinator says so, and each round records the seconds it waited
    run_round  TRAIN to each selected client -> OFFER/PULL/UPDATE, each update folded into the aggregator as it
               arrives and its frame released (streaming; see fedopt.wire on upload credit), until every selected
               client answered or dropped, or --deadline passed. Below the quorum (--min-clients) the engine retries
               the round with the clients alive now, without those that failed it
    federated_eval  EVALUATE every --fed-eval-every rounds, on the clients' local test splits

The engine then evaluates, writes the metrics line and the checkpoint (atomic), so --resume never repeats or loses
a round.

With ``--aggregator secagg`` the train step is SecAgg+ over the bus instead of OFFER/PULL/UPDATE (see
:mod:`coordinator.secure_bus`): clients send only masked vectors, and a round the protocol aborts is recorded with
its reason while the run goes on. The coordinator pins the clients' identity keys from ``--identities`` (default:
``--keys`` when it holds ``identities/``), so a forged key advertisement is refused on arrival.

Anything a client sends that does not fit (malformed, wrong round, unexpected) is logged with its reason and dropped;
the loop never dies on input: a handler that fails on a message logs one line and the loop goes on.

Zero trust (the README's threat model): over CurveZMQ a client's id is the one its key was enrolled under (the ZAP
User-Id, :func:`fedopt.keys.enrolled_id`), so a HELLO naming another id is refused; under ``--insecure`` and ipc the id
is whatever HELLO says, unauthenticated. Either way one id has one live connection: a HELLO for an id held by a
connection that still answers is refused, never a silent takeover. Registrations are capped (``--max-clients``); a
client's weight is its READY count, capped (:class:`~fedopt.rounds.Bounds`); a client that keeps missing its
rounds is benched; a client holds at most one unread model message; upload credit a client does not use within
three heartbeats is taken back. Because planning is RoundServer's seeded ``plan`` over the same client ids, a bus run
selects the same clients with the same seeds as ``fedopt simulate`` in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
import zmq

from fedopt import bus, wire
from fedopt.aggregators import Update, make_aggregator
from fedopt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedopt.engine import Engine
from fedopt.config import RunConfig
from fedopt.errors import ConfigError, RoundError
from fedopt.liveness import Liveness, LogBudget, Ticker
from fedopt.metrics import RunOutput
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.rounds import Bounds, RoundServer
from fedopt.task import resolve_task, to_device
from fedopt.trainer import LocalTrainer, pick_device  # evaluation reuses the trainer's model object

from .registry import Registry, RoundTracker

__all__ = ["Coordinator"]

log = logging.getLogger("fedopt.coordinator")
#: a round that misses its quorum this many times in a row, with no client left that has not failed it, ends the run
MAX_ATTEMPTS = 5
#: what a client needs to load its shard and train: sent in WELCOME
CLIENT_SETTINGS = ("task", "task_options", "clients", "partition", "alpha", "seed", "buffers", "heartbeat", "max_samples")


class Coordinator:
    """A federated run over one ROUTER socket. ``serve()`` returns when every round is done."""

    def __init__(self, cfg: RunConfig, bind: str, security: bus.Security, resume: bool = False,
                 ctx: zmq.Context | None = None, clock=time.monotonic, identities: dict[str, bytes] | None = None,
                 secagg_dump: str | None = None, all_shards_here: bool = False) -> None:
        if cfg.min_clients > cfg.per_round:
            raise ConfigError(f"min-clients ({cfg.min_clients}) exceeds the clients selected per round "
                              f"({cfg.per_round}): no round could ever close")
        self.cfg, self.clock = cfg, clock
        self.pinned = identities  # client id -> pinned Ed25519 identity (secure aggregation), or None
        self.secagg_dump = secagg_dump  # Fault.SECAGG_DUMP: where secure rounds write the sum they learn
        self.secure = None  # the secure-aggregation round in progress (coordinator.secure_bus.BusTransport)
        self._round_info: dict = {}  # extra metrics fields of the round being closed
        self._sizes: dict[str, int] = {}  # the clients ready for the round in progress (announced sample counts)
        self.task = resolve_task(cfg.task, cfg.task_options)
        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # the same initial model as the in-process engine
        model = self.task.build_model()
        self.spec = ParamSpec.from_module(model, cfg.buffers)
        self.server = RoundServer(
            self.spec, self.spec.flatten(model).to(device),
            make_aggregator(cfg.aggregator, **cfg.aggregator_options),
            make_server_optimizer(cfg.server_opt, cfg.server_lr, **cfg.server_options),
            cfg.train_config(),
            per_round=cfg.per_round, seed=cfg.seed, stragglers=cfg.stragglers, keep_stragglers=cfg.keep_stragglers,
            bounds=Bounds.from_config(cfg), lr_at=cfg.lr_at)
        self.server.external = cfg.aggregator == "secagg"  # SecAgg+ over the bus: coordinator.secure_bus
        test = self.task.load_test(cfg.seed) if hasattr(self.task, "load_test") else None
        self.test = to_device(test, device)
        self.evaluator = LocalTrainer(self.task, self.spec, device, cfg.buffers) if self.test is not None else None
        self.round = 1
        ckpt = load_checkpoint(cfg.out) if resume else None
        if ckpt is not None:
            if ckpt.spec.to_dict() != self.spec.to_dict():
                raise ConfigError(f"checkpoint in {cfg.out} is for a different model than task {cfg.task!r}")
            self.server.global_vec.copy_(ckpt.global_vec)
            self.server.optimizer.load_state_dict(ckpt.optimizer_state)
            self.round = ckpt.round + 1
            log.info("resuming after round %d from %s", ckpt.round, cfg.out)
        self.output = RunOutput(cfg.out, cfg.rounds, cfg.progress, title=f"fedopt coordinator: {cfg.task}",
                                resume_after=ckpt.round if ckpt else None, plot=cfg.plot)
        self.output.setup(cfg, task=self.task if all_shards_here else None)
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.auth = bus.start_authenticator(self.ctx, security)
        self.ep = bus.Endpoint(bus.router(self.ctx, bind, security), wire_dtype=cfg.wire_dtype)
        self.keyed = security.curve  # client ids come from keys, not from HELLO
        # a client holding another coordinator's key fails the handshake before any message: only a monitor sees it
        self.handshakes = bus.handshake_monitor(self.ep.sock) if security.curve else None
        self._handshake_log = LogBudget(3, 10.0, clock)
        log.info("listening on %s (%s); waiting for %d clients", bind,
                 "CurveZMQ" if security.curve else "no encryption", cfg.clients)
        self.registry = Registry(cfg.client_cap)
        self.live: Liveness[bytes] = Liveness(cfg.heartbeat, clock=clock)
        self.ticker = Ticker(cfg.heartbeat, clock=clock)
        self.welcome = wire.Welcome(spec=self.spec.to_dict(),
                                    config={**{k: getattr(cfg, k) for k in CLIENT_SETTINGS},
                                            "secagg": cfg.aggregator == "secagg"})
        self.tracker: RoundTracker | None = None
        self.evals: dict | None = None  # federated evaluation in progress: {"pending", "deadline", "results"}
        self._wait_since = clock()
        self._idle_since = clock()  # when the coordinator became free to start the next round
        self._waited = 0.0  # how long the round in progress waited for clients
        self._joined = False  # the join timeout applies once: to the first round this process runs
        self._waiting_said: tuple | None = None  # (ready, when) of the last "waiting for clients" line
        self._attempt = 0
        self._failed: set[str] = set()  # clients that failed an attempt at this round: not selected again for it
        self._bytes0 = (0, 0)
        self.dropped_messages = 0  # malformed or unexpected messages, for tests and the summary
        self._drop_log = LogBudget(20, 1.0, clock)  # a flood of bad messages is counted, not logged line by line
        self._refusal_log = LogBudget(20, 1.0, clock)

    # ---- the run ------------------------------------------------------------------------------------------------
    def serve(self) -> int:
        cfg, started = self.cfg, time.perf_counter()
        try:
            Engine(self.server, self, cfg.rounds, self.output, start=self.round, min_clients=cfg.min_clients,
                   eval_every=cfg.eval_every, evaluate=self._evaluate, fed_eval_every=cfg.fed_eval_every,
                   checkpoint=self._checkpoint).run()
            for peer in self.registry.peers():
                self.ep.send(wire.Bye(reason="done"), to=peer)
            self.output.finish(self.spec, self.server.global_vec,
                               {"clients": f"{cfg.clients} ({cfg.per_round} per round)",
                                "wall time": f"{time.perf_counter() - started:.1f} s (waits for clients included)",
                                "out": str(self.output.dir), "dropped messages": self.dropped_messages})
            time.sleep(0.2)  # let the BYEs leave before the socket closes (linger is 0)
            return 0
        finally:
            self.close()

    def _evaluate(self, global_vec: torch.Tensor) -> dict:
        return self.evaluator.evaluate(global_vec, self.test) if self.evaluator is not None else {}

    def _checkpoint(self, round: int, state: dict) -> None:
        save_checkpoint(self.cfg.out, Checkpoint(round, self.server.global_vec, self.server.optimizer.state_dict(),
                                                 self.spec, {"config": self.cfg.to_dict(), **state}))
        self.round = round + 1
        self._idle_since = self.clock()

    def close(self) -> None:
        self.output.close()
        if self.handshakes is not None:
            self.ep.sock.disable_monitor()
            self.handshakes.close(0)
            self.handshakes = None
        self.ep.close()
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self._own_ctx:
            self.ctx.term()

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
        room = self.registry.room_for(peer, client, self.round, self.clock(), self.cfg.join_timeout)
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
            self.registry.ready(peer, msg.num_samples)
        elif isinstance(msg, wire.Offer) and self.secure is not None:
            reason = self.secure.offer(rec.client, msg.round, msg.num_samples, msg.metrics)
            if reason is not None:
                self._drop(peer, reason)
        elif isinstance(msg, wire.Offer):
            t = self.tracker
            if t is None or msg.round != t.round or not t.offer(rec.client):
                return self._drop(peer, f"late or unexpected OFFER for round {msg.round} from client {rec.client} "
                                        f"(current round {self.round})")
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
            weight = min(msg.num_samples, rec.num_samples or 1, self.cfg.max_samples)  # not more than it announced
            ev["results"].append((float(acc), float(loss), weight))
        elif isinstance(msg, wire.SecAgg):
            reason = "SECAGG outside a secure round" if self.secure is None else self.secure.deliver(rec.client, msg)
            if reason is not None:
                self._drop(peer, reason)
        elif isinstance(msg, wire.Bye):
            log.info("client %s left: %s", rec.client, msg.reason[:200])
            self._forget(peer, "left")
        else:
            self._drop(peer, f"a client may not send {msg.TYPE}")

    def _update(self, peer: bytes, client: str, msg: wire.UpdateMsg) -> None:
        t = self.tracker
        if t is None or msg.round != t.round or not t.expects(client):
            return self._drop(peer, f"late UPDATE for round {msg.round} from client {client} "
                                    f"(current round {self.round}{'' if t else ', closed'})")
        delta = msg.delta if msg.delta.dtype == self.spec.torch_dtype else msg.delta.to(self.spec.torch_dtype)
        partial = bool(msg.metrics.get("partial", False))
        reason = self.server.offer(Update(client, delta, msg.num_samples, dict(msg.metrics), partial))
        del delta, msg  # the frame is released here: nothing else refers to it
        t.received(client, accepted=reason is None)
        if reason is not None:
            log.warning("rejected the update of client %s for round %d: %s", client, t.round, reason)
            self._missed(client, t.round)  # a rejected update counts as a missed round: repeated, benched
        else:
            self.registry.delivered(client)
        self._grant()

    def _grant(self) -> None:
        for client in self.tracker.grants(self.clock()) if self.tracker else ():
            peer = self.registry.peer_of(client)
            if peer is None or not self.ep.send(wire.Pull(round=self.tracker.round), to=peer):
                self._lost(client, "unreachable")

    def _lost(self, client: str, reason: str) -> None:
        """A selected client will not deliver this round."""
        if self.tracker is not None and self.tracker.drop(client):
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

    # ---- the engine's executor -----------------------------------------------------------------------------------
    def _serve_until(self, done, deadline: float = math.inf) -> None:
        """Run the socket loop until ``done()`` holds or the clock passes ``deadline``."""
        while not done() and self.clock() < deadline:
            self._pump(min(0.05, self.ticker.remaining(), max(0.0, deadline - self.clock())))
            self._keepalive()

    def available(self, round: int, attempt: int) -> dict[str, int]:
        """Wait for the clients round ``round`` may select (see the module docstring); raises RoundError when a round
        keeps missing its quorum and no other client is ready within --join-timeout."""
        cfg = self.cfg
        if attempt == 1:
            self._failed = set()  # clients that failed an attempt at this round: not selected again for it
        self._wait_since = self.clock()
        while True:
            now = self.clock()
            sizes = {c: n for c, n in self.registry.sizes(round).items() if c not in self._failed}
            # the first round waits for every client (or the join timeout); a retry, and every later round, goes on
            # at once with whoever is ready
            waited = self._joined or attempt > 1 or now - self._wait_since >= cfg.join_timeout
            if len(sizes) >= cfg.clients or (waited and len(sizes) >= cfg.min_clients):
                break
            if attempt > MAX_ATTEMPTS and now - self._wait_since >= cfg.join_timeout:
                raise RoundError(f"round {round} missed its quorum of {cfg.min_clients} in {attempt - 1} attempts, "
                                 f"and no other client is ready")
            self._say_waiting(round, now, len(sizes), waited)
            self._pump(min(0.05, self.ticker.remaining()))
            self._keepalive()
        self._joined = True
        self._waiting_said = None
        if attempt == 1:
            self._waited = self.clock() - self._idle_since
            self._bytes0 = (self.ep.bytes_in, self.ep.bytes_out)
        self._attempt, self._sizes = attempt, sizes
        return sizes

    def _say_waiting(self, round: int, now: float, ready: int, waited: bool) -> None:
        """One line when the number of ready clients changes, and every 10 s, so a wait is never silent."""
        said = self._waiting_said
        if said is not None and said[0] == ready and now - said[1] < 10.0:
            return
        self._waiting_said = (ready, now)
        if waited:
            log.info("round %d: waiting for clients (%d ready, %d needed: --min-clients)", round, ready,
                     self.cfg.min_clients)
        else:
            left = self.cfg.join_timeout - (now - self._wait_since)
            log.info("round %d: waiting for %d clients (%d ready); starts with at least %d in %.0fs (--join-timeout)",
                     round, self.cfg.clients, ready, self.cfg.min_clients, max(0.0, left))

    def _train(self, jobs, round: int) -> dict[str, wire.Train]:
        """TRAIN for each selected client (FedAvg drops stragglers up front: their partial work would be discarded)."""
        # one snapshot for every TRAIN: sends are zero-copy, and the global vector changes in place at close
        snapshot = self.server.global_vec.detach().to("cpu", copy=True)
        out = {}
        for job in jobs:
            if job.straggler and not self.server.keep_stragglers:
                self.server.reject(job.client, "straggler dropped")
                continue
            config = {f.name: getattr(job.config, f.name) for f in dataclasses.fields(job.config)
                      if f.name != "sampler"}
            out[job.client] = wire.Train(round=round, config=config, model=snapshot)
        return out

    def run_round(self, server: RoundServer, jobs) -> None:
        r = server.round
        if server.external:
            from .secure_bus import secure_round

            self._round_info = secure_round(self, r, jobs)
            return
        trains = self._train(jobs, r)
        self.tracker = RoundTracker(r, list(trains), self.clock() + self.cfg.deadline, self.cfg.upload_slots,
                                    pull_timeout=self.live.timeout)
        for client, msg in trains.items():
            if not self._send_model(client, msg):
                self._lost(client, "unreachable, or has not read its last model")
        log.info("round %d (attempt %d): %d clients selected of %d ready", r, self._attempt, len(jobs), len(self._sizes))
        t = self.tracker

        def settled() -> bool:
            for client in t.overdue(self.clock()):
                self._lost(client, f"held upload credit for {t.pull_timeout:.1f}s without uploading")
            return t.complete

        self._serve_until(settled, t.deadline_at)
        self.tracker = None
        for client in sorted(t.pending):
            server.reject(client, "missed the deadline")
            self._missed(client, r)
            log.warning("round %d: client %s missed the deadline; its update will be dropped", r, client)
        if t.accepted < self.cfg.min_clients:
            log.warning("round %d: %d updates, below the quorum of %d: retrying without the %d clients that failed "
                        "it", r, t.accepted, self.cfg.min_clients, len(self._failed))

    def federated_eval(self, round: int, global_vec: torch.Tensor) -> list[tuple[float, float, int]]:
        """EVALUATE to every ready client; their (accuracy, loss, weight) results within --deadline."""
        self.evals = {"pending": set(), "results": []}
        model = global_vec.detach().to("cpu", copy=True)
        for client in self.registry.sizes(round):
            if self._send_model(client, wire.Evaluate(round=round, model=model)):
                self.evals["pending"].add(client)
        self._serve_until(lambda: not self.evals["pending"], self.clock() + self.cfg.deadline)
        results, self.evals = self.evals["results"], None
        return results

    def fields(self, jobs, outcome) -> dict:
        info, self._round_info = self._round_info, {}
        return {"waited": round(self._waited, 3),  # seconds this round waited for clients before its first attempt
                "bytes_up": self.ep.bytes_in - self._bytes0[0], "bytes_down": self.ep.bytes_out - self._bytes0[1],
                **info}
