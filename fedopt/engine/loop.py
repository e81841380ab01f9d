"""The round loop every federated mode runs, written once: select -> dispatch -> collect -> aggregate -> step ->
evaluate -> record -> checkpoint.

:class:`Engine` owns the loop and :class:`~fedopt.engine.RoundServer` owns the round (the global model, the
aggregator, the server optimizer, bounded influence). What differs between modes is the :class:`Executor`, the part
that reaches the clients::

    SequentialExecutor   in this process, one reused model (clients.simulation.run)
    VmapExecutor         a batch of clients at once with torch.func (clients.simulation.vmap)
    PoolExecutor         worker processes that pre-aggregate their share (clients.simulation.pool)
    Coordinator          client processes over the ZeroMQ bus (coordinator.server)

A round::

    sizes = executor.available(round, attempt)   # who can train now (the bus waits for its clients)
    jobs  = server.plan(round, sizes); server.begin(round)
    executor.run_round(server, jobs)                      # results reach the server by offer() or merge()
    quorum: fewer than min_clients accepted -> discard, retry without the clients that failed (bus only in practice)
    outcome = server.close()                              # the server optimizer's step
    evaluate (every eval_every rounds and after the last), federated evaluation when the executor can
    record one metrics.jsonl line, then the checkpoint (so --resume never repeats or loses a round)

Asynchronous buffers, differential-privacy noise, compression and robust rules vary the round object or the
aggregator; the executors do not change. Under differential privacy (``server.privacy``) each round's line carries
``epsilon`` and ``delta``, the checkpoint keeps the ledger (:meth:`RoundServer.state`), and with a budget the run
stops, with one logged line, before a round that would exceed it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch

from ..metrics import RunOutput
from .round import Job, RoundOutcome, RoundServer

__all__ = ["Engine", "Executor", "RoundHook"]

log = logging.getLogger("fedopt.engine")


class Executor(Protocol):
    """Reaches the clients of one mode. ``run_round`` trains ``jobs`` from ``server.global_vec`` and feeds every result
    into ``server`` (``offer`` per update, ``merge`` per pre-aggregated partial, ``absorb`` for a secure sum).
    ``available`` may wait for clients; on a retry (``attempt`` > 1) it leaves out the clients that failed the round,
    and it raises :class:`~fedopt.errors.RoundError` when it gives up."""

    def available(self, round: int, attempt: int) -> Mapping[str, int]: ...

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None: ...

    def fields(self, jobs: list[Job], outcome: RoundOutcome) -> dict: ...

    def close(self) -> None: ...


class RoundHook(Protocol):
    """Server-side state an algorithm keeps beside the global model (SCAFFOLD's control variate)."""

    def begin(self) -> None: ...

    def step(self) -> None: ...


@dataclass
class Engine:
    """Runs rounds ``start .. rounds`` of ``server`` through ``executor``, writing each round to ``output``."""

    server: RoundServer
    executor: Executor
    rounds: int
    output: RunOutput | None = None
    start: int = 1
    min_clients: int = 0  # quorum: fewer accepted updates and the round is retried (0: no quorum)
    eval_every: int = 1
    evaluate: Callable[[torch.Tensor], dict] | None = None  # global model -> {"accuracy", "loss"}
    extra_eval: Callable[[torch.Tensor], dict] | None = None  # more fields on evaluation rounds (--eval-clients)
    fed_eval_every: int = 0  # federated evaluation on the clients (executors with ``federated_eval``)
    checkpoint: Callable[[int, dict], None] | None = None  # (round, state) after the round's metrics line
    hooks: Sequence[RoundHook] = ()
    records: list[dict] = field(default_factory=list)
    _budget_s: float = field(default=0.0, init=False, repr=False)  # the last budget check's seconds (next round's)

    def run(self) -> list[dict]:
        dp = self.server.privacy
        if dp is not None and dp.accountant.rounds < self.start - 1:
            # resumed without the checkpoint's ledger: every completed round released once, so count them (the
            # budget never restarts; an adaptive clip restarts from its initial value)
            log.warning("privacy ledger not restored from the checkpoint: counting rounds 1-%d as released",
                        self.start - 1)
            dp.accountant.rounds = self.start - 1
        for r in range(self.start, self.rounds + 1):
            if dp is not None:
                t = time.perf_counter()
                why = dp.stop_reason()
                self._budget_s = time.perf_counter() - t  # the round's seconds count its budget check
                if why is not None:
                    log.warning("stopping before round %d: %s", r, why)
                    break
            self.run_round(r)
        return self.records

    def run_round(self, r: int) -> dict:
        server = self.server
        for attempt in range(1, 1 << 30):
            sizes = self.executor.available(r, attempt)
            if attempt == 1:
                t0 = time.perf_counter()  # a round's seconds do not count the wait for its clients
            jobs = server.plan(r, sizes)
            server.begin(r)
            for hook in self.hooks:
                hook.begin()
            self.executor.run_round(server, jobs)
            if server.accepted >= self.min_clients or not server.retryable:
                break  # else the next attempt's begin() discards this one's partial aggregate
        outcome = server.close()
        if outcome.applied:
            for hook in self.hooks:
                hook.step()
        due = r % self.eval_every == 0 or r == self.rounds
        test = self.evaluate(server.global_vec) if due and self.evaluate is not None else {}
        privacy = server.privacy.fields() if server.privacy is not None else {}  # ε: the accountant's work
        seconds, self._budget_s = time.perf_counter() - t0 + self._budget_s, 0.0
        record = {
            "round": r, "accuracy": test.get("accuracy"), "loss": test.get("loss"), "clients": outcome.count,
            "selected": len(jobs), "stragglers": sum(j.straggler for j in jobs), "rejected": len(outcome.rejected),
            "train_loss": outcome.train_loss, "seconds": seconds, "attempts": attempt,
            **self.executor.fields(jobs, outcome), **privacy,
        }
        if due and self.extra_eval is not None:
            record.update(self.extra_eval(server.global_vec))
        fed_eval = getattr(self.executor, "federated_eval", None)
        if fed_eval is not None and self.fed_eval_every and r % self.fed_eval_every == 0:
            record.update(_weighted_results(fed_eval(r, server.global_vec)))
        self.records.append(record)
        if self.output is not None:  # the metrics line first, then the checkpoint: resume cuts back to it
            self.output.round_done(record, (server.spec, server.global_vec))
        if self.checkpoint is not None:
            self.checkpoint(r, {"attempts": attempt, **server.state()})
        return record


def _weighted_results(results: list[tuple[float, float, int]]) -> dict:
    """Sample-weighted mean accuracy and loss of the clients' (accuracy, loss, samples) evaluation results."""
    if not results:
        return {}
    n = sum(k for _, _, k in results)
    return {"fed_accuracy": sum(a * k for a, _, k in results) / n,
            "fed_loss": sum(lo * k for _, lo, k in results) / n, "fed_clients": len(results)}
