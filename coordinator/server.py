"""The coordinator: the ROUTER side of federated mode, driving :class:`~fedopt.engine.RoundServer`.

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
its reason while the run goes on. When the selected clients are edge aggregators (``fedopt aggregator``), each runs
its own SecAgg+ cohort and sends its cohort's decoded mean by OFFER/PULL/UPDATE; the coordinator combines them as
weighted clients (:meth:`Coordinator._edge_sums`).

Edge aggregators announce their leaf clients with READY; a round then samples ``--clients-per-round`` leaf clients
through them (:mod:`fedopt.engine.tiers`) and tells each edge its quota in TRAIN. The coordinator pins the clients' identity keys from ``--identities`` (default:
``--keys`` when it holds ``identities/``), so a forged key advertisement is refused on arrival.

Messages, registration and the zero-trust rules: :mod:`coordinator.link`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
import zmq

from fedopt import bus, wire
from fedopt.checkpoint import BufferJournal, Checkpoint, load_checkpoint, save_checkpoint
from fedopt.engine import Engine, RoundServer
from fedopt.config import RunConfig
from fedopt.compress import downlink
from fedopt.errors import ConfigError, RoundError
from fedopt.metrics import RunOutput
from fedopt.task import resolve_task, to_device
from fedopt.trainer import LocalTrainer, pick_device  # evaluation reuses the trainer's model object

from .link import ClientLink
from .registry import RoundTracker
from .secure_bus import SECAGG_EDGE_OPTIONS

__all__ = ["Coordinator"]

log = logging.getLogger("fedopt.coordinator")
#: a round that misses its quorum this many times in a row, with no client left that has not failed it, ends the run
MAX_ATTEMPTS = 5
#: what a client needs to load its shard and train: sent in WELCOME
CLIENT_SETTINGS = ("task", "task_options", "clients", "partition", "alpha", "seed", "buffers", "heartbeat", "max_samples",
                   "compress", "error_feedback")


class Coordinator(ClientLink):
    """A federated run over one ROUTER socket. ``serve()`` returns when every round is done."""

    def __init__(self, cfg: RunConfig, bind: str, security: bus.Security, resume: bool = False,
                 ctx: zmq.Context | None = None, clock=time.monotonic, identities: dict[str, bytes] | None = None,
                 secagg_dump: str | None = None, all_shards_here: bool = False) -> None:
        if cfg.bus.min_clients > cfg.federation.per_round:
            raise ConfigError(f"min-clients ({cfg.bus.min_clients}) exceeds the clients selected per round "
                              f"({cfg.federation.per_round}): no round could ever close")
        self.cfg, self.clock = cfg, clock
        self.pinned = identities  # client id -> pinned Ed25519 identity (secure aggregation), or None
        self.secagg_dump = secagg_dump  # Fault.SECAGG_DUMP: where secure rounds write the sum they learn
        self._round_info: dict = {}  # extra metrics fields of the round being closed
        self._sizes: dict[str, int] = {}  # the clients ready for the round in progress (announced sample counts)
        self.task = resolve_task(cfg.task, cfg.task_options)
        device = pick_device(cfg.device)
        self.server = RoundServer.for_run(cfg, self.task, device)  # the same initial model as fedopt simulate
        self.spec = self.server.spec
        self.server.external = cfg.federation.aggregator == "secagg"  # SecAgg+ over the bus: coordinator.secure_bus
        test = self.task.load_test(cfg.seed) if hasattr(self.task, "load_test") else None
        self.test = to_device(test, device)
        self.evaluator = LocalTrainer(self.task, self.spec, device, cfg.train.buffers) if self.test is not None else None
        self.round = 1
        self.resuming = resume
        ckpt = load_checkpoint(cfg.out) if resume else None
        self._resumed = ckpt.state if ckpt is not None else {}  # what the run's last checkpoint kept
        if ckpt is not None:
            if ckpt.spec.to_dict() != self.spec.to_dict():
                raise ConfigError(f"checkpoint in {cfg.out} is for a different model than task {cfg.task!r}")
            self.server.global_vec.copy_(ckpt.global_vec)
            self.server.optimizer.load_state_dict(ckpt.optimizer_state)
            self.server.restore(ckpt.state)  # the privacy ledger: --resume never resets the budget
            self.round = ckpt.round + 1
            log.info("resuming after round %d from %s", ckpt.round, cfg.out)
        self.output = RunOutput(cfg.out, cfg.federation.rounds, cfg.progress, title=f"fedopt coordinator: {cfg.task}",
                                resume_after=ckpt.round if ckpt else None, plot=cfg.plot)
        self.output.setup(cfg, task=self.task if all_shards_here else None)
        # one descriptor per connected client (and a few of ZeroMQ's own): a default soft limit of 1024 would refuse
        # connections long before --max-clients
        fds = bus.raise_fd_limit(cfg.client_cap + 256)
        if fds < cfg.client_cap + 64:
            log.warning("this process may open %d files, which holds about %d client connections, fewer than "
                        "--max-clients %d: raise the hard limit (ulimit -Hn)", fds, fds - 64, cfg.client_cap)
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.auth = bus.start_authenticator(self.ctx, security)
        ClientLink.__init__(self, cfg, bus.Endpoint(bus.router(self.ctx, bind, security), wire_dtype=cfg.bus.wire_dtype),
                            security, clock)
        log.info("listening on %s (%s); waiting for %d clients", bind,
                 "CurveZMQ" if security.curve else "no encryption", cfg.federation.clients)
        flat = cfg.flat()
        self.welcome = wire.Welcome(spec=self.spec.to_dict(),
                                    config={**{k: flat[k] for k in CLIENT_SETTINGS},
                                            "secagg": cfg.federation.aggregator == "secagg",
                                            # an edge aggregator pre-aggregates only under a linear rule
                                            "aggregator": cfg.federation.aggregator,
                                            "buffered": cfg.buffered.buffer_size is not None,
                                            "dp": cfg.privacy.dp, **self._dp_settings(), **self._secagg_settings()})
        self._wait_since = clock()
        self._idle_since = clock()  # when the coordinator became free to start the next round
        self._waited = 0.0  # how long the round in progress waited for clients
        self._joined = False  # the join timeout applies once: to the first round this process runs
        self._waiting_said: tuple | None = None  # (ready, when) of the last "waiting for clients" line
        self._attempt = 0
        self._bytes0 = (0, 0)

    def _dp_settings(self) -> dict:
        """``--dp distributed``: the public noise parameters every client adds its share with (WELCOME)."""
        noise = getattr(self.server.aggregator, "dp_noise", None)
        return {"dp_noise": noise.to_dict()} if noise is not None else {}

    def _secagg_settings(self) -> dict:
        """``--aggregator secagg``: the encoding's public options, for edge aggregators that run their own cohorts
        (coordinator.edge); a plain client takes the encoding from each round's Setup instead."""
        if self.cfg.federation.aggregator != "secagg":
            return {}
        opts = {k: v for k, v in self.cfg.aggregator_options.items()
                if k in SECAGG_EDGE_OPTIONS and isinstance(v, (int, float, str)) and v is not None}
        return {"secagg_options": opts}

    # ---- the run ------------------------------------------------------------------------------------------------
    def serve(self) -> int:
        cfg, started = self.cfg, time.perf_counter()
        try:
            if cfg.buffered.buffer_size is not None:
                self._serve_buffered()
            else:
                Engine(self.server, self, cfg.federation.rounds, self.output, start=self.round,
                       min_clients=cfg.bus.min_clients, eval_every=cfg.federation.eval_every, evaluate=self._evaluate,
                       fed_eval_every=cfg.bus.fed_eval_every, checkpoint=self._checkpoint).run()
            for peer in self.registry.peers():
                self.ep.send(wire.Bye(reason="done"), to=peer)
            summary = {"clients": f"{cfg.federation.clients} ({cfg.federation.per_round} per round)",
                       "wall time": f"{time.perf_counter() - started:.1f} s (waits for clients included)",
                       "out": str(self.output.dir), "dropped messages": self.dropped_messages}
            if self.server.privacy is not None:
                from fedopt.privacy import privacy_summary

                summary["privacy"] = privacy_summary(self.server.privacy)
            self.output.finish(self.spec, self.server.global_vec, summary)
            time.sleep(0.2)  # let the BYEs leave before the socket closes (linger is 0)
            return 0
        finally:
            self.close()

    def _serve_buffered(self) -> None:
        """Buffered asynchronous rounds (FedBuff): :mod:`coordinator.buffered` is the engine's executor."""
        from fedopt.engine.buffered import BufferedEngine
        from fedopt.schedules import parse_staleness

        from .buffered import BusJobs

        cfg, b = self.cfg, self.cfg.buffered
        epoch = int(self._resumed.get("epoch", 0)) + 1  # job ids of this start: epoch << 32 | counter
        journal = BufferJournal(cfg.out)  # the buffer's accepted updates, restored by --resume
        if not self.resuming:
            journal.clear()
        jobs = BusJobs(self, (epoch << 32) + 1)
        try:
            BufferedEngine(self.server, jobs, cfg.federation.rounds, cfg.concurrency, b.buffer_size, b.max_staleness,
                           b.dispatch_threshold, parse_staleness(b.staleness), self.output, start=self.round,
                           eval_every=cfg.federation.eval_every, evaluate=self._evaluate,
                           checkpoint=lambda v, state: self._checkpoint(v, {**state, "epoch": epoch}),
                           resumed=self._resumed, journal=journal).run()
        finally:
            jobs.close()

    def _evaluate(self, global_vec: torch.Tensor) -> dict:
        return self.evaluator.evaluate(global_vec, self.test) if self.evaluator is not None else {}

    def _checkpoint(self, round: int, state: dict) -> None:
        save_checkpoint(self.cfg.out, Checkpoint(round, self.server.global_vec, self.server.optimizer.state_dict(),
                                                 self.spec, {"config": self.cfg.to_dict(), **state}))
        self.round = round + 1
        self._idle_since = self.clock()

    def close(self) -> None:
        self.output.close()
        self.close_link()
        if self._own_ctx:
            self.ctx.term()

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
            edges = {c: n for c, n in self.registry.edges().items() if c in sizes}
            # the first round waits for every client (or the join timeout); a retry, and every later round, goes on
            # at once with whoever is ready. An edge counts its leaf clients
            waited = self._joined or attempt > 1 or now - self._wait_since >= cfg.bus.join_timeout
            leaves = len(sizes) + sum(edges.values()) - len(edges)
            if leaves >= cfg.federation.clients or (waited and len(sizes) >= cfg.bus.min_clients):
                break
            if attempt > 1 and now - self._wait_since >= cfg.bus.join_timeout:
                if attempt > MAX_ATTEMPTS:
                    raise RoundError(f"round {round} missed its quorum of {cfg.bus.min_clients} in {attempt - 1} "
                                     f"attempts, and no other client is ready")
                back = self._failed & set(self.registry.sizes())  # ready, benched or not
                if back:  # no other client came: those that failed it (alive, maybe only slow) may try it again
                    log.warning("round %d: no other client is ready after --join-timeout; retrying with the %d that "
                                "failed it", round, len(back))
                    self._failed -= back
                    for c in back:  # two misses bench a client: the round would otherwise wait for others forever
                        self.registry.pardon(c)
                    continue
            self._say_waiting(round, now, leaves, waited)
            self._pump(min(0.05, self.ticker.remaining()))
            self._keepalive()
        self._joined = True
        self._waiting_said = None
        if attempt == 1:
            self._waited = self.clock() - self._idle_since
            self._bytes0 = (self.ep.bytes_in, self.ep.bytes_out)
        self._attempt, self._sizes = attempt, sizes
        self.server.leaves = edges  # the round samples leaf clients through these (fedopt.engine.tiers)
        return sizes

    def _say_waiting(self, round: int, now: float, ready: int, waited: bool) -> None:
        """One line when the number of ready clients changes, and every 10 s, so a wait is never silent."""
        said = self._waiting_said
        if said is not None and said[0] == ready and now - said[1] < 10.0:
            return
        self._waiting_said = (ready, now)
        if waited:
            log.info("round %d: waiting for clients (%d ready, %d needed: --min-clients)", round, ready,
                     self.cfg.bus.min_clients)
        else:
            left = self.cfg.bus.join_timeout - (now - self._wait_since)
            log.info("round %d: waiting for %d clients (%d ready); starts with at least %d in %.0fs (--join-timeout)",
                     round, self.cfg.federation.clients, ready, self.cfg.bus.min_clients, max(0.0, left))

    def _train(self, jobs, round: int) -> dict[str, wire.Train]:
        """TRAIN for each selected client (FedAvg drops stragglers up front: their partial work would be discarded)."""
        # one snapshot for every TRAIN: sends are zero-copy, and the global vector changes in place at close
        snapshot = self.server.global_vec.detach().to("cpu", copy=True)
        model = {"model": snapshot}
        codec = downlink(self.cfg.compression.compress_down)
        if codec is not None:  # --compress-down: one set of codes for the round, decoded by each client
            p = codec.compress(snapshot, round)
            model = dict(encoding=p.encoding(), values=p.values, indices=p.indices, scales=p.scales)
        out = {}
        for job in jobs:
            if job.straggler and not self.server.keep_stragglers:
                self.server.reject(job.client, "straggler dropped")
                continue
            config = {f.name: getattr(job.config, f.name) for f in dataclasses.fields(job.config)
                      if f.name != "sampler"}
            if job.sample is not None:  # an edge: how many of its clients to ask (fedopt.engine.tiers)
                config["leaf_sample"], config["leaf_of"] = job.sample
            out[job.client] = wire.Train(round=round, config=config, **model)
        return out

    def run_round(self, server: RoundServer, jobs) -> None:
        r = server.round
        edges = [j for j in jobs if j.client in server.leaves]
        if server.external and not edges:
            from .secure_bus import secure_round

            self._round_info = secure_round(self, r, jobs)
            return
        if server.external:  # secagg behind edges: each edge sends the sum its own SecAgg+ cohort learned
            share = self._edge_sums(server, jobs)
            jobs = edges
            try:
                return self._plain_round(server, jobs)
            finally:
                self.on_update = self.on_lost = None
                agg, loss, weight, _ = share.partial()
                if agg is not None:
                    server.absorb(agg, loss, weight)
                for norm in share.norms:
                    server.accepted_norm(norm)
        self._plain_round(server, jobs)

    def _edge_sums(self, server: RoundServer, jobs) -> RoundServer:
        """A secure round whose selected clients are edge aggregators (``fedopt aggregator``): each runs SecAgg+
        among its own sampled clients and sends only its cohort's decoded weighted mean and total weight (under
        ``uniform`` weighting: its survivors' count), as a plain update; the root never sees one client's update.
        The edges' updates are judged like any client's (the weight the plan granted, the norm bound) and combined
        into their weighted mean, which is what a flat secure round over all their survivors decodes; the secure
        server absorbs it. A leaf client selected beside edges is not asked (it would be a cohort of its own)."""
        from fedopt.aggregators import make_aggregator

        for j in jobs:
            if j.client not in server.leaves:
                server.reject(j.client, "a plain client beside edge aggregators in a secure round is not asked")
        share = server.share(make_aggregator("fedavg"))
        self.on_update, self.on_lost = share.offer, share.reject
        return share

    def _plain_round(self, server: RoundServer, jobs) -> None:
        """TRAIN, then OFFER/PULL/UPDATE until every selected client answered or dropped, or --deadline passed."""
        r = server.round
        trains = self._train(jobs, r)
        self.tracker = RoundTracker(r, list(trains), self.clock() + self.cfg.bus.deadline, self.cfg.bus.upload_slots,
                                    pull_timeout=self.live.timeout)
        for client, msg in trains.items():
            if not self._send_model(client, msg):
                self._lost(client, "unreachable, or has not read its last model")
        # the model snapshot goes once zmq has sent it: holding it through the round would cost one model of memory
        trains = msg = None
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
        if t.accepted < self.cfg.bus.min_clients and server.retryable:
            log.warning("round %d: %d updates, below the quorum of %d: retrying without the %d clients that failed "
                        "it", r, t.accepted, self.cfg.bus.min_clients, len(self._failed))

    def federated_eval(self, round: int, global_vec: torch.Tensor) -> list[tuple[float, float, int]]:
        """EVALUATE to every ready client; their (accuracy, loss, weight) results within --deadline."""
        self.evals = {"pending": set(), "results": []}
        model = global_vec.detach().to("cpu", copy=True)
        for client in self.registry.sizes(round):
            if self._send_model(client, wire.Evaluate(round=round, model=model)):
                self.evals["pending"].add(client)
        self._serve_until(lambda: not self.evals["pending"], self.clock() + self.cfg.bus.deadline)
        results, self.evals = self.evals["results"], None
        return results

    def fields(self, jobs, outcome) -> dict:
        info, self._round_info = self._round_info, {}
        return {"waited": round(self._waited, 3),  # seconds this round waited for clients before its first attempt
                "bytes_up": self.ep.bytes_in - self._bytes0[0], "bytes_down": self.ep.bytes_out - self._bytes0[1],
                **info}
