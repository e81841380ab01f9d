"""Simulated clients on a virtual clock, for the buffered asynchronous engine and for synchronous rounds' timing.

:class:`VirtualClients` is :class:`~fedopt.engine.buffered.BufferedEngine`'s executor in simulation: a dispatched
job is trained at once, in this process, from the model version it was sent, and its update is delivered at its
virtual finish time (now + the client's duration on :class:`~fedopt.engine.clock.ClientSpeeds`); arrivals come off a
heap in time order, ties in dispatch order. Without a clock every job takes no time, so arrivals come in dispatch
order. :func:`round_seconds` is a synchronous round's length on the same clock: its slowest selected client.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Mapping

import torch

from fedopt.engine import Job, RoundServer
from fedopt.engine.buffered import Arrival
from fedopt.engine.clock import ClientSpeeds

from clients.simulation.host import ClientHost

__all__ = ["VirtualClients", "round_seconds", "job_seconds"]


def _full_steps(job: Job, samples: int) -> int:
    return job.config.epochs * math.ceil(max(samples, 1) / job.config.batch_size)


def job_seconds(speeds: ClientSpeeds, job: Job, samples: int, steps: int | None = None) -> float:
    """Virtual seconds of ``job`` for a client of ``samples`` samples (its step budget, or ``steps`` when known)."""
    full = _full_steps(job, samples)
    done = steps if steps is not None else min(full, job.config.max_steps or full)
    return speeds.duration(job.client, done, full)


def round_seconds(speeds: ClientSpeeds, jobs: list[Job], sizes: Mapping[str, int], keep_stragglers: bool) -> float:
    """A synchronous round's virtual length: its slowest client (FedAvg does not wait for the stragglers it drops)."""
    return max((job_seconds(speeds, j, sizes[j.client]) for j in jobs if keep_stragglers or not j.straggler),
               default=0.0)


class VirtualClients:
    """Trains each job when it is dispatched; :meth:`collect` hands updates back in virtual time order."""

    def __init__(self, host: ClientHost, server: RoundServer, sizes: Mapping[str, int],
                 speeds: ClientSpeeds | None = None) -> None:
        self.host, self.server, self.sizes, self.speeds = host, server, sizes, speeds
        self._heap: list[tuple[float, int, Arrival]] = []
        self._t = 0.0
        self._seq = 0

    def available(self) -> Mapping[str, int]:
        return self.sizes

    def dispatch(self, job: Job, model: torch.Tensor, version: int) -> None:
        got: list = []

        def keep(update):
            got.append(dataclasses.replace(update, delta=update.delta.clone()))  # the trainer reuses its buffer

        self.host.run(self.server, [job], model, sink=keep)
        update = got[0] if got else None
        seconds = 0.0
        if self.speeds is not None:
            steps = int(update.metrics.get("steps", 0)) if update is not None else None
            seconds = job_seconds(self.speeds, job, self.sizes[job.client], steps or None)
        arrival = Arrival(job.client, version, update, "" if update is not None else "no update")
        heapq.heappush(self._heap, (self._t + seconds, self._seq, arrival))
        self._seq += 1

    def collect(self) -> Arrival:
        self._t, _, arrival = heapq.heappop(self._heap)
        return arrival

    def now(self) -> float:
        return self._t

    def close(self) -> None:
        self.host.close()
