"""Buffered asynchronous aggregation: FedBuff (Nguyen et al., AISTATS 2022), and FedAsync as its K = 1 case.

No rounds to wait for: the engine keeps ``concurrency`` (C) clients training at once, each from whatever model
version it was sent. An update that comes back is weighted by a staleness function s(tau) of how many server steps
it missed, tau = version now - version trained from, and buffered; every ``buffer`` (K) arrivals the buffered mean
goes through the server optimizer and the version advances. An update more than ``max_staleness`` (H) steps old is
dropped and counted. Clients are started as soon as ``dispatch_threshold`` (O, NVIDIA FLARE's ``min_hole_to_fill``)
slots are free, each drawn uniformly among the idle clients and sent the newest model.

The buffer is a :class:`~fedopt.engine.round.RoundServer` round (round = version + 1), so bounded influence, the
aggregator and the server optimizer are the synchronous ones: a delta enters as s(tau) * delta with its capped
sample weight w, and the buffer's step is sum(w s delta) / sum(w) (the paper's division by K when weights are
equal). Synchronous FedAvg is the special case C = K = O = every client with no delays: same clients, same seeds,
same order of arrival, the same model bit for bit.

Staleness functions (``--staleness``)::

    polynomial[:A]  (1 + tau) ** -A, A = 0.5 by default (the paper's 1 / sqrt(1 + tau))
    sqrt            1 / (1 + sqrt(tau))  (NVIDIA FLARE's edge FedBuff)
    hinge[:A,B]     1 when tau <= B, else 1 / (A (tau - B) + 1); A = 10, B = 4 by default (FedAsync's hinge)
    constant        1

An executor here reaches clients one job at a time::

    executor.available() -> {client: samples}  # who may be started now (in flight or not)
    executor.dispatch(job, model, version)     # start a client on the model of ``version``
    executor.collect() -> Arrival | None       # the next client to finish (earliest virtual or real time); None: no
                                               # arrival for a while (the bus: clients may have joined since)
    executor.now() -> float                    # seconds since the run began (virtual in simulation)

Secure aggregation (an aggregator that ``needs_participants``): each full buffer is one SecAgg+ cohort of its K
clients, keyed when it is full, each client masking its staleness-weighted update. In simulation the engine holds the
K updates and the in-process aggregator runs the protocol. Over the bus (``server.external``) an update never leaves
its client in the clear: the arrival only says it is ready (``Arrival.held``), the client is not started again until
its cohort has run, and the executor runs the cohort::

    executor.secure_cohort(round, {client: (scale, weight)}) -> (survivors, fields)
        # each client multiplies its update by ``scale`` = s(tau) and masks it; the survivors' sum is absorbed into
        # the server's round ``round``; ``fields`` go into the step's metrics line

A client that becomes ready while a cohort runs joins the next one, with the staleness it has when that one closes.

Differential privacy (``--dp central``, :class:`~fedopt.privacy.CentralDP` as the server's aggregator): each buffer
is one release, its K staleness-weighted updates clipped to C, summed, noised and divided by K; the accountant counts
buffer closings, without amplification by sampling (see :func:`fedopt.privacy.central_for_run`), each metrics line
carries ε, the checkpoint keeps the ledger, and a budget stops the run before a buffer that would exceed it.
"""


from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from ..aggregators import Update
from ..checkpoint import BufferJournal
from ..errors import ConfigError, RoundError
from ..metrics import RunOutput
from .round import Job, RoundServer

__all__ = ["Arrival", "AsyncExecutor", "BufferedEngine"]

log = logging.getLogger("fedopt.engine")


@dataclass
class Arrival:
    client: str
    version: int  # the model version the client trained from
    update: Update | None  # None: the client failed (died, timed out) or holds it; else it owns its delta
    reason: str = ""  # why there is no update
    held: int | None = None  # the update stays with its client until its cohort runs: its num_samples


class AsyncExecutor(Protocol):
    def available(self) -> Mapping[str, int]: ...

    def dispatch(self, job: Job, model: torch.Tensor, version: int) -> None: ...

    def collect(self) -> Arrival | None: ...

    def now(self) -> float: ...

    def close(self) -> None: ...


@dataclass
class BufferedEngine:
    """Runs ``steps`` server steps (versions ``start`` .. ``steps``) of FedBuff over ``executor``."""

    server: RoundServer
    executor: AsyncExecutor
    steps: int
    concurrency: int
    buffer: int
    max_staleness: int | None = None
    dispatch_threshold: int = 1  # O: start clients only when at least this many slots are free (C = all: sync-like)
    staleness: Callable[[int], float] = field(default=lambda tau: (1.0 + tau) ** -0.5)
    output: RunOutput | None = None
    start: int = 1
    eval_every: int = 1
    evaluate: Callable[[torch.Tensor], dict] | None = None
    checkpoint: Callable[[int, dict], None] | None = None  # (version, state) after the step's metrics line
    resumed: dict = field(default_factory=dict)  # the state the last checkpoint kept (jobs started, the server's)
    journal: BufferJournal | None = None  # where accepted updates wait for their step (restored on resume)
    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.buffer <= self.concurrency:
            raise ConfigError(f"--buffer-size ({self.buffer}) must be between 1 and --concurrency "
                              f"({self.concurrency}): a buffer larger than the clients in flight would never fill")
        if not 1 <= self.dispatch_threshold <= self.concurrency:
            raise ConfigError(f"--dispatch-threshold ({self.dispatch_threshold}) must be between 1 and --concurrency "
                              f"({self.concurrency})")
        self.server.norm_window = max(32, 4 * self.buffer)  # the norm bound's reference: recent accepted updates
        self.version = self.start - 1  # server steps applied so far
        self.in_flight: dict[str, int] = {}  # client -> version it trains from
        self._dispatched = int(self.resumed.get("dispatched", 0))  # jobs started before: seeds the draws
        self.server.restore(self.resumed)  # the norm bound's reference (and a privacy ledger)
        self._traffic = [0, 0]  # models sent, updates received since the last step (bytes as the bus carries them)
        # secure aggregation: each buffer is one cohort, keyed when it is full (see :meth:`_secure_close`)
        self.secure = bool(getattr(self.server.aggregator, "needs_participants", False))
        # (client, weight, tau, staleness-weighted update or None when its client holds it), until K are in
        self._cohort: list[tuple[str, int, int, Update | None]] = []
        self._info: dict = {}  # the executor's fields for the step being closed (a secure cohort's)
        self._refused: dict[str, str] = {}  # the cohort's rejections before its round begins
        spec = self.server.spec
        self._model_bytes = spec.size * torch.empty((), dtype=spec.torch_dtype).element_size()

    def run(self) -> list[dict]:
        server = self.server
        dp = server.privacy  # DP-FedAvg: each buffer is one release (fedopt.privacy.central_for_run)
        if dp is not None and dp.accountant.rounds < self.version:
            log.warning("privacy ledger not restored from the checkpoint: counting buffers 1-%d as released",
                        self.version)
            dp.accountant.rounds = self.version
        if dp is not None and self._over_budget():
            return self.records
        self._begin(self.version + 1)
        server.grant(self.version + 1, self.executor.available())
        stale, hist, t0, wall0 = 0, Counter(), self.executor.now(), time.perf_counter()
        fruitless = 0  # arrivals since the last update the buffer accepted
        self._restore(hist)
        self._fill()
        while self.version < self.steps:
            got = self.executor.collect()
            if got is None:
                self._fill()
                continue
            held = self._held()
            self._traffic[1] += got.update is not None
            trained_from = self.in_flight.pop(got.client, got.version)
            tau = self.version - trained_from
            if got.update is None and got.held is None:
                self._reject(got.client, got.reason or "failed")
            elif self.max_staleness is not None and tau > self.max_staleness:
                stale += 1
                self._reject(got.client, f"{tau} versions stale (max {self.max_staleness})")
            elif got.held is not None:  # secure buffers over the bus: the client masks it when its cohort runs
                if self.secure and server.external:
                    self._cohort.append((got.client, server.granted(got.client, got.held), tau, None))
                else:
                    self._reject(got.client, "an update held by its client, in a run without secure aggregation")
            else:
                u = got.update
                scaled = replace(u, delta=u.delta * self.staleness(tau)) if tau else u
                if self.secure:  # held for the cohort: the client masks it when the buffer is full
                    reason = server.check(scaled)
                    if reason is None:
                        self._cohort.append((u.client, u.num_samples, tau, scaled))
                    else:
                        self._reject(u.client, reason)
                elif server.offer(scaled) is None:
                    hist[tau] += 1
                    if self.journal is not None:
                        self.journal.add(self.version + 1, scaled.delta, {
                            "client": u.client, "num_samples": server.granted(u.client, u.num_samples), "tau": tau,
                            "loss": u.metrics.get("loss"), "partial": u.partial})
            fruitless = 0 if self._held() > held else fruitless + 1
            if fruitless > 50 * self.concurrency:
                reasons = sorted(set(self._refused.values()) | set(server.rejected.values()))[:3]
                raise RoundError(f"no update accepted in the last {fruitless} arrivals (version {self.version}): "
                                 f"{'; '.join(reasons) or 'every client failed'}")
            if self._held() >= self.buffer:
                if self.secure:
                    self._secure_close(hist)
                self._step(hist, stale, t0, wall0)
                stale, hist, wall0 = 0, Counter(), time.perf_counter()
                if dp is not None and self._over_budget():
                    break
            self._fill()
        return self.records

    def _over_budget(self) -> bool:
        """Whether the next buffer would take ε over the run's budget (logged once: the run stops)."""
        why = self.server.privacy.stop_reason()
        if why is not None and self.version < self.steps:
            log.warning("stopping before version %d: %s", self.version + 1, why)
            return True
        return False

    def _step(self, hist: Counter, stale: int, t0: float, wall0: float) -> None:
        """Apply the full buffer: the server optimizer's step, then version + 1, its metrics line and evaluation."""
        server = self.server
        outcome = server.close()
        self.version += 1
        v = self.version
        due = v % self.eval_every == 0 or v == self.steps
        test = self.evaluate(server.global_vec) if due and self.evaluate is not None else {}
        record = {
            "round": v, "accuracy": test.get("accuracy"), "loss": test.get("loss"), "clients": outcome.count,
            "rejected": len(outcome.rejected), "train_loss": outcome.train_loss,
            "seconds": time.perf_counter() - wall0,
            getattr(self.executor, "clock_field", "virtual_seconds"): self.executor.now() - t0,
            "version": v, "staleness": {str(k): n for k, n in sorted(hist.items())}, "stale_dropped": stale,
            "concurrency": len(self.in_flight), "bytes_down": self._traffic[0] * self._model_bytes,
            "bytes_up": self._traffic[1] * self._model_bytes, **self._info,
            **(server.privacy.fields() if server.privacy is not None else {}),
        }
        self._traffic, self._info = [0, 0], {}
        fields = getattr(self.executor, "fields", None)
        if fields is not None:  # what the executor measured (the bus: bytes at the socket)
            record.update(fields())
        self.records.append(record)
        if self.output is not None:  # the metrics line first, then the checkpoint: resume cuts back to it
            self.output.round_done(record, (server.spec, server.global_vec))
        if self.checkpoint is not None:
            self.checkpoint(v, {"dispatched": self._dispatched, **server.state()})
        if self.journal is not None:
            self.journal.clear(v)
        if v < self.steps:
            self._begin(v + 1)
            server.grant(v + 1, self.executor.available())

    def _restore(self, hist: Counter) -> None:
        """Offer again the updates the buffer held when the last process stopped (:class:`BufferJournal`)."""
        if self.journal is None or self.secure:
            return
        for delta, info in self.journal.load(self.version + 1):
            u = Update(str(info["client"]), delta, int(info["num_samples"]),
                       {} if info.get("loss") is None else {"loss": float(info["loss"])}, bool(info.get("partial")))
            if self.server.offer(u) is None:  # its file stays until the step: a second crash restores it again
                hist[int(info["tau"])] += 1
        if self.server.accepted:
            log.info("version %d: %d updates restored to the buffer", self.version + 1, self.server.accepted)

    def _held(self) -> int:
        return len(self._cohort) if self.secure else self.server.accepted

    def _begin(self, round: int) -> None:
        """A plaintext buffer opens its round now; a secure one when its cohort is known (:meth:`_secure_close`)."""
        if not self.secure:
            self.server.begin(round)

    def _reject(self, client: str, reason: str) -> None:
        if self.secure:
            self._refused[client] = reason
        else:
            self.server.reject(client, reason)

    def _secure_close(self, hist: Counter) -> None:
        """The full buffer as one SecAgg+ round among its K clients (Nguyen et al.'s design): keys are shared, each
        client masks its staleness-weighted update, the server learns only their sum. An update the round's bounds
        refuse now, or a client that drops out, is a dropout of the protocol, handled as in synchronous secure
        rounds."""
        server, cohort = self.server, self._cohort
        self._cohort = []
        server.begin(self.version + 1, participants={c: n for c, n, _, _ in cohort})
        for client, reason in self._refused.items():
            server.reject(client, reason)
        self._refused = {}
        if server.external:  # over the bus: the clients hold their updates and mask them when named
            survivors, self._info = self.executor.secure_cohort(
                self.version + 1, {c: (self.staleness(tau), n) for c, n, tau, _ in cohort})
            for c, _, tau, _ in cohort:
                if c in survivors:
                    hist[tau] += 1
            return
        for _, _, tau, u in cohort:
            if server.offer(u) is None:
                hist[tau] += 1

    def _fill(self) -> None:
        """Start idle clients until ``concurrency`` are in flight, once ``dispatch_threshold`` slots are free: a seeded
        uniform draw among the idle, in id order (so C = K = O = every client dispatches as a synchronous round)."""
        free = self.concurrency - len(self.in_flight)
        if free < self.dispatch_threshold or self.version >= self.steps:
            return
        available = self.executor.available()
        waiting = {c for c, _, _, u in self._cohort if u is None}  # clients holding an update for the next cohort
        idle = sorted(c for c in available if c not in self.in_flight and c not in waiting)
        if not idle:
            return
        # the weights this version's updates may carry: each client's count, capped among the clients that may train
        self.server.grant(self.version + 1, available)
        rng = np.random.default_rng([self.server.seed & 0xFFFFFFFF, self.version, self._dispatched, 3])
        chosen = sorted(rng.choice(len(idle), size=min(free, len(idle)), replace=False).tolist())
        model = self.server.global_vec.detach().clone()  # the clients of this version train from this snapshot
        for i in chosen:
            client = idle[i]
            self.in_flight[client] = self.version
            self._dispatched += 1
            self._traffic[0] += 1
            self.executor.dispatch(self.server.job(self.version + 1, client), model, self.version)
