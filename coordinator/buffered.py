"""Buffered asynchronous rounds over the bus: the coordinator as :class:`~fedopt.engine.buffered.BufferedEngine`'s
executor.

A job is a TRAIN whose wire ``round`` is the job's own id (a counter, under an epoch that every start of the
coordinator advances and the checkpoint keeps, so a client never sees an id twice); the client answers it with OFFER,
then UPDATE on PULL, exactly as in synchronous rounds, so clients need no change. Upload credit (``--upload-slots``) bounds the updates held at once. A job fails,
and frees its slot at once, when its client dies (silent for 3 heartbeats, or gone), is unreachable, misses
``--deadline`` seconds from its TRAIN, or holds upload credit without uploading. The engine never waits for a
round: a finished client is given the newest model as soon as it is drawn again.

With ``--aggregator secagg`` an update never leaves its client in the clear: a client that finished its job keeps
the update and says OFFER; it is not started again until its update has been aggregated. When K clients wait, the
engine closes the buffer as one SecAgg+ cohort (:meth:`BusJobs.secure_cohort`): each gets COHORT (its job, the
secure round, its staleness weight), scales its update and masks it, and the secure round runs as in synchronous
rounds (:func:`coordinator.secure_bus.secure_sum`), its ids drawn from the job counter. A client that dies in its
cohort is a dropout of the protocol.

Each server step writes its metrics line and then the checkpoint (version, optimizer state, job counter, norm
reference), and each update the buffer accepts is written to the run's :class:`~fedopt.checkpoint.BufferJournal`
before the next message is handled, so after a ``kill -9`` of the coordinator, ``--resume`` continues from the
last applied step with the buffer as it was: no applied or accepted update is lost. (Secure buffers hold no update
here: those their clients still hold are trained again.)
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import torch

from fedopt import wire
from fedopt.aggregators import Update
from fedopt.engine import Job
from fedopt.engine.buffered import Arrival

from .registry import RoundTracker
from .secure_bus import secure_sum

if TYPE_CHECKING:
    from .server import Coordinator

__all__ = ["BusJobs"]

log = logging.getLogger("fedopt.coordinator")


class BusJobs:
    """Jobs in flight on the coordinator's clients; arrivals in the order their updates land."""

    clock_field = "elapsed_seconds"  # the metrics field of now(): real seconds here, not a virtual clock

    def __init__(self, coord: Coordinator, first_id: int) -> None:
        self.coord = coord
        self.next_id = first_id  # the next job's wire round
        self.jobs: dict[str, tuple[int, int, float]] = {}  # client -> (job id, version trained from, deadline)
        self.arrivals: deque[Arrival] = deque()
        coord.tracker = RoundTracker(coord.round, [], float("inf"), coord.cfg.bus.upload_slots,
                                     pull_timeout=coord.live.timeout)
        coord.on_update, coord.on_lost = self._update, self._lost
        self.waiting: dict[str, int] = {}  # secure buffers: client -> the job whose update it holds for a cohort
        if coord.server.external:
            coord.on_held = self._held
        self.t0 = coord.clock()
        self.joined = False
        self._bytes0 = (coord.ep.bytes_in, coord.ep.bytes_out)

    def available(self) -> dict[str, int]:
        """The ready clients. Like a synchronous run's first round, the first jobs wait until every client is ready,
        or --join-timeout passed with at least --min-clients (so C = K = O = every client is synchronous FedAvg)."""
        coord, cfg = self.coord, self.coord.cfg
        ready = coord.registry.sizes(coord.round)
        if not self.joined:
            waited = coord.clock() - self.t0 >= cfg.bus.join_timeout
            if len(ready) < cfg.federation.clients and not (waited and len(ready) >= cfg.bus.min_clients):
                return {}
            self.joined = True
            self.t0 = coord.clock()  # elapsed_seconds count from the first jobs, not from the wait for clients
        return ready

    def dispatch(self, job: Job, model: torch.Tensor, version: int) -> None:
        coord, job_id = self.coord, self.next_id
        self.next_id += 1
        self.jobs[job.client] = (job_id, version, coord.clock() + coord.cfg.bus.deadline)
        coord.tracker.add(job.client, job_id)
        config = {k: v for k, v in job.config.__dict__.items() if k != "sampler"}
        if not coord._send_model(job.client, wire.Train(round=job_id, config=config, model=model)):
            coord._lost(job.client, "unreachable, or has not read its last model")

    def _update(self, update: Update) -> None:
        """An UPDATE answering a job: it joins the arrivals; the engine weighs and validates it."""
        job = self.jobs.pop(update.client, None)
        if job is not None:
            self.arrivals.append(Arrival(update.client, job[1], update))

    def _held(self, client: str, num_samples: int) -> None:
        """A job's update is ready and stays with its client until a cohort names it."""
        job = self.jobs.pop(client, None)
        if job is not None:
            self.waiting[client] = job[0]
            self.arrivals.append(Arrival(client, job[1], None, held=num_samples))

    def secure_cohort(self, round: int, members: dict[str, tuple[float, int]]) -> tuple[tuple[str, ...], dict]:
        """Aggregate the waiting updates of ``members`` (client -> (staleness weight, weight)) into the server's round
        ``round`` with one secure round; returns its survivors and metrics fields."""
        coord = self.coord
        cohort, self.next_id = self.next_id, self.next_id + 1
        participants = {}
        for client, (scale, weight) in members.items():
            job, peer = self.waiting.pop(client, None), coord.registry.peer_of(client)
            if job is None or peer is None or not coord.ep.send(wire.Cohort(round=job, cohort=cohort, scale=scale),
                                                                  to=peer):
                coord.server.reject(client, "gone before its cohort")
                continue
            participants[client] = weight
        log.info("version %d: secure cohort %d of %d clients", round, cohort, len(participants))
        info, survivors = secure_sum(coord, cohort, participants)
        return survivors, {**info, "cohort": cohort}

    def _lost(self, client: str, reason: str) -> None:
        job = self.jobs.pop(client, None)
        if job is not None:
            self.arrivals.append(Arrival(client, job[1], None, reason))

    def collect(self) -> Arrival | None:
        """The next arrival; None after a quiet heartbeat interval (the engine then starts clients that joined)."""
        coord = self.coord
        coord.tracker.round = coord.round
        until = coord.clock() + coord.cfg.bus.heartbeat
        while not self.arrivals and coord.clock() < until:
            coord._pump(min(0.05, coord.ticker.remaining()))
            coord._keepalive()
            now = coord.clock()
            for client in coord.tracker.overdue(now):
                coord._lost(client, f"held upload credit for {coord.tracker.pull_timeout:.1f}s without uploading")
            for client in [c for c, (_, _, deadline) in self.jobs.items() if now >= deadline]:
                coord._lost(client, f"missed the deadline of {coord.cfg.bus.deadline:g}s")
        return self.arrivals.popleft() if self.arrivals else None

    def now(self) -> float:
        return self.coord.clock() - self.t0

    def fields(self) -> dict:
        """The step's bytes as counted at the socket (heartbeats included)."""
        ep, (b_in, b_out) = self.coord.ep, self._bytes0
        self._bytes0 = (ep.bytes_in, ep.bytes_out)
        return {"bytes_up": ep.bytes_in - b_in, "bytes_down": ep.bytes_out - b_out}

    def close(self) -> None:
        self.coord.tracker, self.coord.on_update, self.coord.on_lost, self.coord.on_held = None, None, None, None
