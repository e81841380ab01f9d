"""Secure aggregation over the bus: one :func:`fedopt.secagg.run_round` carried by the coordinator's ROUTER.

When the run's aggregator is ``secagg``, a round of :class:`~coordinator.server.Coordinator` goes::

    plan (seeded selection, as for FedAvg) -> TRAIN to each selected client
    SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) among the clients that got TRAIN, every message a
    wire SECAGG: Setup -> AdvertiseKeys -> ShareKeys -> MaskedInput (sent when training is done) -> Unmask
    global step with the decoded weighted mean of the survivors' updates

The protocol driver blocks the coordinator's loop for the round, but its ``recv`` pumps the ROUTER: heartbeats go
out, silent clients are declared dead (and the protocol stops waiting for them at once), and any other message is
handled as usual. Each stage waits at most ``--deadline`` seconds. The protocol's own quorum is the threshold t:

- enough survivors -> the global model takes the server optimizer's step with their weighted mean;
- too few at any stage (SecAggError) -> every participant gets Abort, one error line is logged, the round is recorded
  in metrics.jsonl with ``clients: 0`` and its ``aborted`` reason, the global model stays unchanged, and the run goes
  on to the next round (a retry would meet the same dead clients; the next round selects among the live ones).

The coordinator only ever holds masked vectors and the survivors' sum; clients' unmasked updates never reach it.
Buffered asynchronous rounds run the same secure round on each full buffer (:func:`secure_sum`, from
:meth:`coordinator.buffered.BusJobs.secure_cohort`), among the K clients that hold their finished updates.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedopt import wire
from fedopt.aggregators import Aggregate, make_aggregator
from fedopt.aggregators.secure import round_encoding, round_parameters
from fedopt.errors import ConfigError, SecAggError
from fedopt.secagg import RoundConfig, run_round

from .registry import RoundTracker

if TYPE_CHECKING:
    from .server import Coordinator

__all__ = ["BusTransport", "secure_round", "secure_sum", "secure_aggregator", "SECAGG_EDGE_OPTIONS"]

log = logging.getLogger("fedopt.coordinator")
_SLICE = 0.05  # seconds: how often recv comes back to let the protocol see clients that died
_MAX_QUEUED = 4  # SECAGG messages one client may have waiting in the inbox (a stage needs one)
#: secagg's options an edge aggregator's own cohorts take from the root (WELCOME's ``secagg_options``)
SECAGG_EDGE_OPTIONS = ("clip", "bits", "neighbours", "threshold", "weighting", "inner", "max_weight")


def secure_aggregator(options, where: str):
    """The :class:`~fedopt.aggregators.SecureAggregator` an edge's cohorts run, from the root's ``secagg_options``
    (only :data:`SECAGG_EDGE_OPTIONS`, each a plain value, checked by the aggregator itself). ConfigError naming
    ``where`` (the root) when they are missing or invalid."""
    if not isinstance(options, dict) or not set(options) <= set(SECAGG_EDGE_OPTIONS) or not all(
            isinstance(v, (int, float, str)) for v in options.values()):
        raise ConfigError(f"{where} runs --aggregator secagg without valid secagg_options for an edge's cohorts "
                          f"(plain values of {', '.join(SECAGG_EDGE_OPTIONS)}): {str(options)[:200]}")
    if options.get("inner", "fedavg") not in ("fedavg", "mean"):
        raise ConfigError(f"{where} runs secagg over {options['inner']!r}: an edge's cohort sums only fedavg or mean")
    try:
        return make_aggregator("secagg", **options)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{where} sent secagg options an edge cannot use: {e}") from None


class BusTransport:
    """``send``/``recv`` of :func:`run_round` over a :class:`Coordinator`'s socket, for one round.

    Masked inputs take upload credit like plain updates: a client whose masked vector is ready sends OFFER and
    uploads it on PULL, and at most ``--upload-slots`` are pulled at once, so the coordinator holds that many masked
    vectors plus the running sum however many clients finish together. A slot comes back when the client's next
    SECAGG message is taken off the inbox (its masked input, added to the sum and released at once), when it is
    gone, or when its credit expires (``credit_s`` after the PULL: a client that OFFERs and never uploads holds a
    slot that long, once per round). Zero trust on the inbox: SECAGG only from participants, at most
    ``_MAX_QUEUED`` waiting per client, and a message with a vector frame (a masked input) only under credit.
    """

    def __init__(self, coord: Coordinator, round: int, participants, slots: int, credit_s: float = float("inf"),
                 max_weight: int | None = None) -> None:
        self.coord, self.round = coord, round
        self.participants = frozenset(participants)
        self.inbox: deque[tuple[str, tuple]] = deque()
        self.queued: dict[str, int] = {}  # client -> messages of it waiting in the inbox
        self.gone: set[str] = set()  # participants known dead or unreachable
        self.uploads = RoundTracker(round, list(participants), float("inf"), slots)
        self.credit_s = credit_s
        self.granted: dict[str, float] = {}  # client -> when it was PULLed (its upload credit runs from then)
        self.max_weight = max_weight  # the run's cap on a weight; bounds the sample counts OFFERs claim
        self.losses: dict[str, tuple[float, int]] = {}  # client -> (training loss, num_samples) from its OFFER

    def send(self, client: str, parts: list) -> None:
        self._send(client, wire.SecAgg(round=self.round, parts=parts))

    def _send(self, client: str, msg: wire.Message) -> None:
        peer = self.coord.registry.peer_of(client)
        if peer is None or not self.coord.ep.send(msg, to=peer):
            self.lost(client)

    def lost(self, client: str) -> None:
        self.gone.add(client)
        if self.uploads.drop(client):
            self._grant()

    def offer(self, client: str, round: int, num_samples: int = 0, metrics: dict | None = None) -> str | None:
        """A participant's masked input is ready; the reason the OFFER is refused, or None. Its training loss is kept
        for :meth:`train_loss`."""
        if round != self.round or not self.uploads.offer(client):
            return f"unexpected OFFER for round {round} during secure round {self.round}"
        loss = (metrics or {}).get("loss")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool):
            num_samples = 0
        if self.max_weight is not None:
            num_samples = min(num_samples, self.max_weight)  # a claim weighs no more than the cap
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss) and num_samples > 0:
            self.losses[client] = (float(loss), num_samples)
        self._grant()
        return None

    def train_loss(self, survivors) -> float | None:
        """The sample-weighted mean training loss the survivors reported with their OFFERs (None if none did)."""
        got = [self.losses[c] for c in survivors if c in self.losses]
        weight = sum(n for _, n in got)
        return sum(loss * n for loss, n in got) / weight if weight else None

    def _grant(self) -> None:
        for client in self.uploads.grants():
            self.granted[client] = self.coord.clock()
            self._send(client, wire.Pull(round=self.round))

    def _expire(self) -> None:
        """Take back the slots of clients PULLed more than ``credit_s`` ago that have not uploaded."""
        now = self.coord.clock()
        late = [c for c in self.uploads.uploading if now - self.granted.get(c, now) >= self.credit_s]
        for client in late:
            log.warning("secure round %d: %s was PULLed %.1f s ago and sent nothing; its upload credit is revoked",
                        self.round, client, now - self.granted[client])
            self.uploads.drop(client)  # no second OFFER this round
        if late:
            self._grant()

    def deliver(self, client: str, msg: wire.SecAgg) -> str | None:
        """Queue a SECAGG message from ``client``; the reason it was refused, or None."""
        if msg.round != self.round:
            return f"SECAGG for round {msg.round} during secure round {self.round}"
        if client not in self.participants:
            return f"SECAGG from {client}, not a participant of secure round {self.round}"
        if self.queued.get(client, 0) >= _MAX_QUEUED:
            return f"SECAGG from {client}: {_MAX_QUEUED} of its messages are already waiting"
        if len(msg.parts) > 1 and client not in self.uploads.uploading:
            return f"masked input from {client} without upload credit (OFFER, then wait for PULL)"
        self.queued[client] = self.queued.get(client, 0) + 1
        self.inbox.append((client, msg.parts))
        return None

    def recv(self, timeout: float):
        end = self.coord.clock() + min(timeout, _SLICE * 4)
        while not self.inbox:
            self._expire()
            left = end - self.coord.clock()
            if left <= 0:
                return None
            self.coord._pump(min(left, _SLICE))
            self.coord._keepalive()
        client, parts = self.inbox.popleft()
        self.queued[client] -= 1
        if client in self.uploads.uploading:
            self.uploads.received(client, accepted=True)
            self._grant()
        return client, parts


def secure_round(coord: Coordinator, r: int, jobs) -> dict:
    """Send TRAIN to round ``r``'s selected clients, run SecAgg+ among them over the bus and hand the survivors' sum
    to the coordinator's RoundServer (``absorb``); returns the round's extra metrics fields.

    Never raises for a protocol failure: an aborted round absorbs nothing (the global model stays) and its fields say
    ``aborted`` with the reason.
    """
    server = coord.server
    participants: dict[str, int] = {}
    for client, msg in coord._train(jobs, r).items():
        peer = coord.registry.peer_of(client)
        if peer is None or not coord.ep.send(msg, to=peer):
            server.reject(client, "unreachable")
            continue
        participants[client] = coord._sizes[client]
    log.info("round %d (attempt %d): %d clients selected of %d ready, secure aggregation among %d", r,
             coord._attempt, len(jobs), len(coord._sizes), len(participants))
    return secure_sum(coord, r, participants)[0]


def secure_sum(coord: Coordinator, r: int, participants: dict[str, int]) -> tuple[dict, tuple[str, ...]]:
    """Run secure round ``r`` (SecAgg+) among ``participants`` (client -> announced samples), whose updates are on
    their way, and hand the survivors' sum to the coordinator's RoundServer (``absorb``). Returns the round's extra
    metrics fields and the survivors (none when the protocol aborted: the global model then stays)."""
    server, cfg = coord.server, coord.cfg
    info: dict = {"aborted": None}

    def aborted(reason: str) -> tuple[dict, tuple[str, ...]]:
        info["aborted"] = reason
        for c in participants:
            server.reject(c, "secure aggregation aborted")
        if server.privacy is not None:  # --dp distributed: every round counts, aborted or not
            server.privacy.release(None)
        return info, ()

    agg = server.aggregator
    try:
        k, t = round_parameters(len(participants), agg.neighbours, agg.threshold)
        # W: the public cap, or the largest claim below it; under --dp distributed, room for the noise
        quant = round_encoding(agg, len(participants), participants, coord.spec.size)
        rcfg = RoundConfig.create(r, list(participants), quant.vector_length(coord.spec.size),
                                  modulus_bits=quant.modulus_bits, k=k, t=t)
    except SecAggError as e:  # e.g. fewer than 2 clients: no protocol message went out
        log.error("secure aggregation round %d aborted, global model unchanged: %s", r, e)
        return aborted(str(e))
    info.update(k=k, t=t, modulus_bits=quant.modulus_bits)
    # an honest client uploads as soon as it is PULLed; a quarter of the stage deadline is ample
    transport = BusTransport(coord, r, participants, cfg.bus.upload_slots,
                             credit_s=max(cfg.bus.deadline / 4, 3 * cfg.bus.heartbeat),
                             max_weight=agg.max_weight)
    coord.secure = transport
    try:
        out = run_round(rcfg, quant, transport.send, transport.recv, stage_timeout=cfg.bus.deadline,
                        identities=coord.pinned, clock=coord.clock, gone=lambda: transport.gone)
    except SecAggError as e:  # run_round has sent Abort to every participant and logged one error line
        return aborted(str(e))
    finally:
        coord.secure = None
    for c in participants:
        if c not in out.survivors:
            server.reject(c, "dropped out of secure aggregation")
    aggregate = Aggregate(torch.from_numpy(out.mean), out.weight, len(out.survivors))
    if server.privacy is not None:  # --dp distributed: the noised sum over the expected cohort, counted
        aggregate = server.privacy.release(aggregate)
    server.absorb(aggregate, transport.train_loss(out.survivors), 1)
    info.update(survivors=len(out.survivors), secagg_dropped=len(out.dropped))
    log.info("secure round %d: sum of %d survivors (%d dropped after sharing keys)", r, len(out.survivors),
             len(out.dropped))
    if coord.secagg_dump is not None:  # Fault.SECAGG_DUMP: the sum the coordinator learns, checked bit for bit
        d = Path(coord.secagg_dump)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"sum-{r}.npy", out.total)
        (d / f"sum-{r}.json").write_text(json.dumps({"survivors": list(out.survivors), "dropped": list(out.dropped),
                                                     "modulus_bits": quant.modulus_bits}))
    return info, tuple(out.survivors)
