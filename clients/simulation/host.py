"""ClientHost: trains the virtual clients one process hosts, one after another, with one reused model.

It is the body of the in-process :class:`~clients.simulation.SequentialExecutor` and of every pool worker
(:mod:`clients.simulation.pool`), so both train, validate and (for SCAFFOLD) keep client state the same way. Updates go to a
``sink(update) -> reason | None``: the engine's :meth:`RoundServer.offer` in-process, a worker's own RoundServer when
it pre-aggregates, or a shared-memory slab when the aggregator needs every update.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from fedopt.aggregators import Update
from fedopt.params import ParamSpec
from fedopt.engine import Job, RoundServer
from fedopt.task import ClientData, Task
from fedopt.trainer import LocalTrainer

from fedopt.compress import decompress, uplink

from clients.simulation.scaffold import ScaffoldClients
from clients.simulation.state import ClientStateStore

__all__ = ["ClientHost", "make_uplink"]


def make_uplink(cfg, spec: ParamSpec, budget_bytes: int):
    """The clients' side of ``--compress`` in a simulation (None when off), error-feedback residuals held in a
    ClientStateStore of float32 rows (``budget_bytes`` in memory, the rest spilled to disk)."""
    return uplink(cfg.compression.compress, cfg.compression.error_feedback,
                  lambda: ClientStateStore(spec.size, budget_bytes, torch.float32))


class _SwitchableTrain:
    """The task as LocalTrainer sees it, with ``train`` swappable per call (SCAFFOLD's corrected loop)."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self.override = None

    def __getattr__(self, name):
        return getattr(self._task, name)

    def train(self, model, data, config):
        return (self.override or self._task.train)(model, data, config)


class ClientHost:
    """One model object; ``run`` trains a list of jobs and feeds each update to ``sink``."""

    def __init__(self, task: Task, spec: ParamSpec, shards: Sequence[ClientData], device: torch.device,
                 buffers: str = "average", scaffold: ScaffoldClients | None = None, uplink=None) -> None:
        self._task = _SwitchableTrain(task)
        self.trainer = LocalTrainer(self._task, spec, device, buffers)
        self.shards = shards
        self.scaffold = scaffold
        self.uplink = uplink  # fedopt.compress.ErrorFeedback, or None: updates travel dense
        self.bytes_up = 0  # compressed bytes since take_bytes_up()

    def take_bytes_up(self) -> int:
        """Compressed update bytes produced since the last call."""
        n, self.bytes_up = self.bytes_up, 0
        return n

    def _compressed(self, update: Update, seed: int) -> Update:
        packed = self.uplink.compress(update.client, update.delta, seed)
        dense = decompress(packed, update.delta.numel())  # what the coordinator decodes
        self.bytes_up += packed.nbytes
        return dataclasses.replace(update, delta=dense.to(update.delta.device, update.delta.dtype))

    def run(self, server: RoundServer, jobs: list[Job], global_vec: torch.Tensor,
            control: torch.Tensor | None = None, sink: Callable[[Update], str | None] | None = None) -> None:
        """Train ``jobs`` from ``global_vec``. ``server`` decides straggler policy and validity; ``sink`` defaults to
        ``server.offer``. With SCAFFOLD, a client's state is committed only when its update was accepted."""
        sink = sink or server.offer
        sc = self.scaffold
        for job in jobs:
            if job.straggler and not server.keep_stragglers:
                # FedAvg drops a straggler at the deadline; its work would be discarded, so it is not done here.
                server.reject(job.client, "straggler dropped")
                continue
            if sc is not None:
                self._task.override = sc.train_fn(job.client, control)
            try:
                update = self.trainer.train(job.client, global_vec, self.shards[int(job.client)], job.config)
            finally:
                self._task.override = None
            dc = None
            if sc is not None and server.check(update) is None:
                dc = sc.control_delta(update.delta, control, int(update.metrics.get("steps", 0)), job.config.lr)
            if self.uplink is not None:
                update = self._compressed(update, job.config.seed)
            if sink(update) is None and dc is not None:
                sc.commit(job.client, dc)

    def evaluate(self, global_vec: torch.Tensor, data) -> dict:
        return self.trainer.evaluate(global_vec, data)

    def close(self) -> None:
        if self.scaffold is not None:
            self.scaffold.close()
        store = getattr(self.uplink, "store", None)
        if store is not None:
            store.close()
