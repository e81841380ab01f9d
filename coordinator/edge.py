"""``fedopt aggregator``: an edge tier between clients and the root coordinator (hierarchical federation).

Clients join an edge exactly as they join a coordinator: downstream the edge is a :class:`~coordinator.link.
ClientLink` (the same registration, identities bound to keys, registration cap, upload credit, liveness and
benching). Upstream it is one client of the root (:class:`~fedopt.uplink.Uplink`: HELLO with its own id, heartbeats,
reconnect with backoff), whose weight is the sum of its clients' capped sample counts. Its part of a run::

    WELCOME    from the root: checked (a linear rule or secagg; not buffered, not DP), then given to every client
               unchanged,
               so the clients load the run's shards and settings; READY to the root with the sum of the weights its
               ready clients would get (capped_weights) and their number, once --clients are ready or --join-timeout
               passed
    TRAIN r    from the root: the clients the root's sample gives this edge (its quota of the round's leaf clients,
               drawn seeded among its ready clients: fedopt.engine.tiers; every ready client when the root sends no
               quota) get TRAIN with the root's config and the seed the flat coordinator
               would give it (client_seed(run seed, r, client)); OFFER/PULL/UPDATE downstream until every client
               answered or dropped, or --deadline passed; the edge's RoundServer judges each update (bounds: weights
               capped, norms bounded) and folds it into a running weighted mean
    answer     OFFER, then UPDATE on the root's PULL: delta = the mean of the accepted updates, num_samples = their
               total weight, metrics = the weighted training loss and the number of clients. Below --min-clients
               accepted updates the edge sends PASS (no update this round), and the root counts it as missing the
               round at once rather than at its deadline

Under FedAvg the root's mean of the edges' means, weighted by their totals, is the flat FedAvg of all their clients
(while no cap binds: the edge's weight at the root is capped like any client's, and fixed at what it announced when it
joined). Under ``mean`` it is a mean of the edges' means: the flat mean when edges hold equally many clients.
Secure aggregation (the root runs ``--aggregator secagg``): the edge never sees an update in the clear. Each round
it runs its own SecAgg+ cohort among the clients it asked, with the flat coordinator's driver
(:func:`coordinator.secure_bus.secure_sum`, the encoding from the root's ``secagg_options``, its clients' identities
pinned from ``--identities``); dropouts are the protocol's business, as on a flat coordinator (a round the protocol
aborts is answered with PASS). Its answer is the cohort's decoded weighted mean and total weight (under ``uniform``
weighting: the plain mean and the survivors' count), which the root combines with the other edges' as weighted
clients. The secure round blocks this loop; meanwhile :meth:`Edge._keepalive` hears the root and sends it
heartbeats, and keeps the root's other messages for after the round. The root's ``--deadline`` must cover an edge's
four protocol stages (each up to the edge's ``--deadline``).

Not relayed: federated evaluation (``--fed-eval-every``), buffered rounds and DP (refused at WELCOME).

One thread owns both sockets; it polls them together, so downstream heartbeats go on while the root is away.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import torch
import zmq

from fedopt import bus, wire
from fedopt.aggregators import make_aggregator
from fedopt.config import RunConfig
from fedopt.engine import RoundServer
from fedopt.engine.round import capped_weights, client_seed
from fedopt.engine.tiers import edge_sample, parse_leaf_sample
from fedopt.compress import Packed, decompress
from fedopt.errors import ConfigError, WireError
from fedopt.liveness import Liveness, Ticker
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.task import TrainConfig
from fedopt.uplink import Uplink

from .link import ClientLink
from .registry import RoundTracker
from .secure_bus import secure_aggregator, secure_sum

__all__ = ["EdgeConfig", "Edge", "EDGE_AGGREGATORS"]

log = logging.getLogger("fedopt.edge")
#: the root's rules an edge may pre-aggregate for: linear means
EDGE_AGGREGATORS = ("fedavg", "mean")
_DEFERRED = 8  # the root's messages kept while a secure round blocks the loop (a round needs one or two)


def pinned_identities(directory: str) -> dict[str, bytes]:
    from fedopt.identity import find_identity_dir, load_pinned

    return load_pinned(find_identity_dir(directory, None))


@dataclass(frozen=True)
class EdgeConfig:
    """What one edge aggregator is asked to do; field names are the ``fedopt aggregator`` flags."""

    bind: str  # where its clients connect
    upstream: str  # the root coordinator; several, comma-separated: tried in turn
    id: str  # its client id at the root (with upstream keys: the id its key is enrolled under)
    run: RunConfig  # its clients (federation.clients: expected), bus (deadline, quorum, join timeout) and bounds
    keys: str | None = None  # its own coordinator key folder: clients pin its coordinator.key (CurveZMQ)
    upstream_keys: str | None = None  # a client key folder for the root (its coordinator.key and this edge's secret)
    key_name: str | None = None  # this edge's key name in upstream_keys
    insecure: bool = False
    give_up: float = 300.0  # seconds without the root before the edge exits
    identities: str | None = None  # secagg: a folder with identities/*.pub, its clients' pinned identity keys

    def __post_init__(self) -> None:
        if not (isinstance(self.id, str) and self.id.isprintable() and 0 < len(self.id) <= 256):
            raise ConfigError(f"--id {self.id!r} must be a printable name of at most 256 characters")
        if not all(u.startswith(("tcp://", "ipc://", "inproc://")) for u in self.urls):
            raise ConfigError(f"--upstream {self.upstream!r} must be addresses that start with tcp://, ipc:// or "
                              f"inproc://, separated by commas")
        if not (isinstance(self.give_up, (int, float)) and self.give_up > 0):
            raise ConfigError(f"--give-up must be a number of seconds > 0, not {self.give_up!r}")

    @property
    def urls(self) -> list[str]:
        return self.upstream.split(",")


class Edge(ClientLink):
    """One edge aggregator: ``serve()`` returns 0 when the root says the run is done."""

    def __init__(self, cfg: EdgeConfig, clock=time.monotonic, secagg_dump: str | None = None) -> None:
        self.edge = cfg
        down = bus.security_for(cfg.bind, cfg.keys, cfg.insecure, "coordinator")
        up = [bus.security_for(u, cfg.upstream_keys, cfg.insecure, "client", cfg.key_name) for u in cfg.urls][0]
        self.ctx = zmq.Context()
        self.auth = bus.start_authenticator(self.ctx, down)
        ClientLink.__init__(self, cfg.run, bus.Endpoint(bus.router(self.ctx, cfg.bind, down)), down, clock)
        self.uplink = Uplink(self.ctx, cfg.urls, up, wire.Hello(client=cfg.id, device="edge", sender=cfg.id),
                             cfg.run.bus.heartbeat, cfg.give_up, f"edge {cfg.id}", log, clock)
        self.welcome: wire.Welcome | None = None  # the root's, given to every client; None until it came
        self.spec: ParamSpec | None = None
        self.server: RoundServer | None = None  # pre-aggregates one root round at a time (bounds applied)
        self.round = 0  # the root round in progress
        self._seed = 0  # the run's seed: each client's training seed is derived from it as the flat coordinator does
        self._welcomed_at = 0.0  # when the current upstream session was welcomed
        self._ready_sent = False
        self._answer: dict | None = None  # the round's pre-aggregated update, waiting for the root's PULL
        self._reopen_at = clock()
        self.pinned = pinned_identities(cfg.identities) if cfg.identities else None  # secure cohorts: client keys
        self.secagg_dump = secagg_dump  # Fault.SECAGG_DUMP: where secure rounds write the sum they learn
        self._deferred: deque[wire.Message] = deque()  # the root's messages that came during a secure round
        self._root_gone = False  # the root fell silent during a secure round

    # ---- the loop -----------------------------------------------------------------------------------------------
    def serve(self) -> int:
        log.info("edge %s: clients connect at %s; the root is %s", self.edge.id, self.edge.bind, self.edge.upstream)
        up = self.uplink
        try:
            while True:
                if up.ep is None and self.clock() >= self._reopen_at:
                    up.open()
                poller = zmq.Poller()
                for s in (*up.sockets, *([self.ep.sock] if self.welcome is not None else [])):
                    poller.register(s, zmq.POLLIN)
                events = dict(poller.poll(int(min(0.05, up.timeout()) * 1000)))
                while any(s in events for s in up.sockets) and (msg := up.recv()) is not None:
                    if self._from_root(msg) == "done":
                        return 0
                while self._deferred:  # what the root sent during a secure round
                    if self._from_root(self._deferred.popleft()) == "done":
                        return 0
                if self._root_gone:
                    self._root_gone = False
                    self._root_lost()
                if self.welcome is not None:
                    self._pump(0)
                    self._keepalive()
                    self._progress()
                if up.ep is not None and not up.keepalive():
                    self._root_lost()
        finally:
            self.close()

    def close(self) -> None:
        self.uplink.close()
        self.close_link()
        self.ctx.term()

    def _root_lost(self) -> None:
        """The root went silent or sent us away: the round in progress is abandoned (the root has dropped it)."""
        self.tracker, self._answer = None, None
        self._reopen_at = self.clock() + self.uplink.lost()

    # ---- upstream -----------------------------------------------------------------------------------------------
    def _from_root(self, msg: wire.Message) -> str | None:
        up = self.uplink
        if isinstance(msg, wire.Welcome):
            up.welcome(msg)
            self._welcomed(msg)
            self._welcomed_at, self._ready_sent = self.clock(), False
        elif isinstance(msg, (wire.Train, wire.Evaluate)):
            up.models_read += 1  # read, so the root may send the next one
            if isinstance(msg, wire.Train):
                self._start_round(msg)
        elif isinstance(msg, wire.Pull):
            a = self._answer
            if a is not None and a["round"] == msg.round:
                up.ep.send(wire.UpdateMsg(round=a["round"], num_samples=a["num_samples"], metrics=a["metrics"],
                                          delta=a["delta"], sender=self.edge.id))
                self._answer = None
        elif isinstance(msg, wire.Bye):
            if msg.reason == "done":
                log.info("edge %s: the run is done", self.edge.id)
                for peer in self.registry.peers():
                    self.ep.send(wire.Bye(reason="done"), to=peer)
                time.sleep(0.2)  # let the BYEs leave before the socket closes (linger is 0)
                return "done"
            log.info("edge %s: the coordinator said %r", self.edge.id, msg.reason)
            self._root_lost()
        elif not isinstance(msg, wire.Heartbeat):
            log.warning("edge %s: dropped a %s from the coordinator (not relayed by an edge)", self.edge.id, msg.TYPE)
        return None

    def _welcomed(self, msg: wire.Welcome) -> None:
        """Check the root's WELCOME (the first one sets the edge up; a later one must be the same run)."""
        if self.welcome is not None:
            if (msg.spec, msg.config) != (self.welcome.spec, self.welcome.config):
                raise ConfigError(f"the coordinator at {self.uplink.url} now runs another run than the one this "
                                  f"edge's clients joined: restart the edge")
            return
        c, where = msg.config, f"the coordinator at {self.uplink.url}"
        if c.get("buffered"):
            raise ConfigError(f"{where} runs buffered asynchronous rounds (--buffer-size), which edges do not relay")
        if c.get("dp"):
            raise ConfigError(f"{where} runs --dp {c['dp']}: its guarantee is per client, and the root would clip and "
                              f"count an edge's pre-aggregate as one client")
        if c.get("secagg"):
            aggregator = secure_aggregator(c.get("secagg_options"), where)
        elif c.get("aggregator") not in EDGE_AGGREGATORS:
            raise ConfigError(f"{where} runs aggregator {c.get('aggregator')!r}: an edge pre-aggregates its clients, "
                              f"which only {' or '.join(EDGE_AGGREGATORS)} allows")
        else:
            aggregator = make_aggregator(c["aggregator"])
        seed = c.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{where} sent WELCOME without an integer seed")
        spec = ParamSpec.from_dict(msg.spec)
        self.spec, self._seed, self.welcome = spec, seed, msg
        zeros = torch.zeros(spec.size, dtype=spec.torch_dtype)  # each TRAIN's model replaces it
        self.server = RoundServer(spec, zeros, aggregator, make_server_optimizer("fedavg", 1.0), TrainConfig(),
                                  per_round=1, bounds=self.cfg.bounds)
        self.server.external = bool(c.get("secagg"))  # its own SecAgg+ cohorts: coordinator.secure_bus.secure_sum
        # the clients take the root's heartbeat from WELCOME: count their silence in the same interval
        self.live = Liveness(self.uplink.heartbeat, clock=self.clock)
        self.ticker = Ticker(self.live.interval, clock=self.clock)
        log.info("edge %s: joined the run (task %s, %d parameters, aggregator %s)", self.edge.id, c.get("task"),
                 spec.size, c["aggregator"])

    def _start_round(self, msg: wire.Train) -> None:
        """TRAIN for every ready client, each with the seed the flat coordinator would give it."""
        if self.tracker is not None:
            log.warning("edge %s: round %d superseded by round %d before it closed", self.edge.id, self.round,
                        msg.round)
        self.tracker, self._answer = None, None
        model = msg.model
        if msg.encoding:  # the root's --compress-down: decoded here, sent on dense to this edge's clients
            try:
                model = decompress(Packed.from_encoding(msg.encoding, msg.values, msg.indices, msg.scales),
                                   self.spec.size)
            except WireError:
                model = None
        if not (isinstance(model, torch.Tensor) and model.dim() == 1 and model.numel() == self.spec.size
                and isinstance(msg.config, dict)):
            log.warning("edge %s: dropped TRAIN for round %d: its model does not fit the run's spec", self.edge.id,
                        msg.round)
            return
        try:
            sample = parse_leaf_sample(msg.config)
        except ValueError as e:
            log.warning("edge %s: dropped TRAIN for round %d: %s", self.edge.id, msg.round, e)
            return
        r, sizes = msg.round, self.registry.sizes(msg.round)
        if sample is not None:  # the root's per-round sample of leaf clients: this edge's share of it
            asked = edge_sample(self._seed, r, self.edge.id, list(sizes), *sample)
            sizes = {c: sizes[c] for c in asked}
        if not sizes:
            log.warning("edge %s: round %d: no ready client to train", self.edge.id, r)
            return
        self.round = r
        self.server.global_vec = model.to(self.spec.torch_dtype, copy=True)  # the norm bound's reference
        self.server.grant(r, sizes)
        self.server.begin(r)
        config = {k: v for k, v in msg.config.items() if k not in ("leaf_sample", "leaf_of")}
        if self.server.external:
            return self._secure_round(r, config, model, sizes)
        self.tracker = RoundTracker(r, sorted(sizes), self.clock() + self.cfg.bus.deadline, self.cfg.bus.upload_slots,
                                    pull_timeout=self.live.timeout)
        for client in sorted(sizes):
            train = wire.Train(round=r, config={**config, "seed": client_seed(self._seed, r, client)}, model=model)
            if not self._send_model(client, train):
                self._lost(client, "unreachable, or has not read its last model")

    def _progress(self) -> None:
        """READY when due; close the round in progress once settled (or at its deadline) and OFFER its update."""
        now, up = self.clock(), self.uplink
        if not self._ready_sent and up.welcomed:
            sizes = self.registry.sizes()
            if len(sizes) >= self.cfg.federation.clients or (sizes and now - self._welcomed_at
                                                              >= self.cfg.bus.join_timeout):
                weight = sum(capped_weights(sizes, self.cfg.bounds.max_samples, self.cfg.bounds.max_share).values())
                up.ep.send(wire.Ready(num_samples=weight, clients=len(sizes), sender=self.edge.id))
                self._ready_sent = True
                log.info("edge %s: ready with %d clients, weight %d", self.edge.id, len(sizes), weight)
        t = self.tracker
        if t is None:
            return
        for client in t.overdue(now):
            self._lost(client, f"held upload credit for {t.pull_timeout:.1f}s without uploading")
        if not t.complete and now < t.deadline_at:
            return
        self.tracker = None
        for client in sorted(t.pending):
            self.server.reject(client, "missed the deadline")
            self._missed(client, t.round)
        agg, loss, _, _ = self.server.partial()
        self.server.close()  # the round's norms bound the next round's updates; its step moves only the edge's copy
        if agg is None or t.accepted < self.cfg.bus.min_clients:
            return self._pass(t.round, f"{t.accepted} updates, below this edge's quorum of {self.cfg.bus.min_clients}")
        self._offer_up(t.round, agg, loss)

    def _pass(self, r: int, why: str) -> None:
        """No answer for round ``r``: PASS tells the root, which stops waiting for this edge (not its deadline)."""
        log.warning("edge %s: round %d: %s: no update, PASS", self.edge.id, r, why)
        if self.uplink.ep is not None:
            self.uplink.ep.send(wire.Pass(round=r, reason=why[:1000], sender=self.edge.id))

    def _offer_up(self, r: int, agg, loss: float | None) -> None:
        """OFFER round ``r``'s aggregate to the root; its UPDATE goes on the root's PULL."""
        metrics = {"clients": agg.count, **({"loss": loss} if loss is not None and math.isfinite(loss) else {})}
        n = max(1, round(agg.weight))
        delta = agg.delta.to(self.spec.torch_dtype)
        self._answer = {"round": r, "delta": delta, "num_samples": n, "metrics": metrics}
        if self.uplink.ep is not None:
            self.uplink.ep.send(wire.Offer(round=r, num_samples=n, sender=self.edge.id))
        log.info("edge %s: round %d: %d clients aggregated, weight %d", self.edge.id, r, agg.count, n)

    # ---- secure aggregation: this edge's own SecAgg+ cohort ---------------------------------------------------------
    def _secure_round(self, r: int, config: dict, model: torch.Tensor, sizes: dict[str, int]) -> None:
        """TRAIN to the round's clients, SecAgg+ among them (the flat coordinator's driver, secure_sum, over this
        edge's ROUTER), and OFFER the decoded weighted mean of the survivors and their weight to the root. The loop
        is blocked meanwhile: :meth:`_keepalive` keeps the root's session (heartbeats both ways)."""
        participants = {}
        for client in sorted(sizes):
            train = wire.Train(round=r, config={**config, "seed": client_seed(self._seed, r, client)}, model=model)
            if self._send_model(client, train):
                participants[client] = sizes[client]
            else:
                self.server.reject(client, "unreachable, or has not read its last model")
        info, survivors = secure_sum(self, r, participants)
        agg, loss = self.server.absorbed
        self.server.close()
        if agg is None or len(survivors) < self.cfg.bus.min_clients:
            return self._pass(r, "secure round: " + (info.get("aborted") or f"{len(survivors)} survivors, below "
                                                     f"this edge's quorum of {self.cfg.bus.min_clients}"))
        if self.server.aggregator.weighting == "uniform":  # the plain mean: the root weighs it by its clients
            agg = type(agg)(agg.delta, float(agg.count), agg.count)
        self._offer_up(r, agg, loss)

    def _keepalive(self) -> None:
        ClientLink._keepalive(self)
        if self.secure is not None:  # a secure round blocks the loop: hear the root and beat meanwhile
            self._tend_root()

    def _tend_root(self) -> None:
        """Read the root's messages during a secure round (its heartbeats keep the session; anything else waits for
        the round's end, at most _DEFERRED of them) and send heartbeats; a silent root is dealt with after it."""
        up = self.uplink
        if up.ep is None or self._root_gone:
            return
        while (msg := up.recv()) is not None:
            if isinstance(msg, wire.Heartbeat):
                continue
            if len(self._deferred) < _DEFERRED:
                self._deferred.append(msg)
            else:
                log.warning("edge %s: dropped a %s from the coordinator during a secure round", self.edge.id,
                            msg.TYPE)
        if not up.keepalive():
            self._root_gone = True
