"""Simulation across processes on torch.distributed: ``fedopt simulate --nproc N``, or ``torchrun --nproc-per-node N
[--nnodes M ...] -m fedopt simulate ...`` across machines.

The design of pfl-research (Granlund et al., 2024: the cohort is sharded over ranks and the summed statistics are
all-reduced): every rank holds the same :class:`~clients.simulation.run.Simulation` (same seed, so the same initial
model and the same plan each round) and runs the same round engine. Each round's jobs are split across the ranks
(balanced by sample count, as the worker pool does); a rank trains its share with its own executor (sequential, or
vmap) into :meth:`RoundServer.share <fedopt.engine.RoundServer.share>`, which judges each update exactly as the run's
server would, and the shares are exchanged with torch.distributed collectives (gloo on CPU, NCCL on GPUs):

* linear aggregators (fedavg, mean, weighted): one ``all_gather`` of each rank's pre-aggregated mean (plus weight,
  count and loss), merged in rank order, as the worker pool merges its workers' partials;
* aggregators that need every update (median, trimmed mean, secure aggregation, central DP): every accepted update
  (``all_gather_object``), offered in the plan's order, so the aggregator sees what it sees in one process.

Every rank then takes the same server step; each round starts with rank 0's model broadcast, so the replicas cannot
drift, and rank 0 alone evaluates and writes metrics.jsonl, the model, the summary and the checkpoints (with
``--resume`` it reads the checkpoint and tells the other ranks the round to start from). There is no transport of
fedopt's own between ranks. A rank that dies makes the others' collectives fail, and torchrun ends the group.
The ranks are one job and trust each other: ``all_gather_object`` pickles, so the group's rendezvous must never be
reachable by anyone else (``--nproc`` keeps it on 127.0.0.1; a multi-node torchrun needs a private network).
"""

from __future__ import annotations

import copy
import os
import signal
from dataclasses import replace

import torch
import torch.distributed as dist

from fedopt.aggregators import Aggregate, Update
from fedopt.checkpoint import load_checkpoint
from fedopt.config import RunConfig
from fedopt.engine import Job, RoundServer
from fedopt.errors import ConfigError
from fedopt.metrics import RunOutput

from clients.simulation.pool import balance, needs_each

__all__ = ["DistributedClients", "check_distributed", "simulate_rank"]


class _Keep:
    """The share server's aggregator when the run's aggregator needs every update: keeps the accepted ones."""

    linear = False

    def begin(self, round: int, size: int) -> None:
        self.updates: list[Update] = []

    def add(self, update: Update) -> None:
        self.updates.append(replace(update, delta=update.delta.detach().clone()))  # the trainer reuses its buffer

    def result(self) -> Aggregate | None:
        return None


class DistributedClients:
    """The round's executor on each rank: trains this rank's share with ``inner`` and exchanges the shares."""

    def __init__(self, inner, sizes: dict[str, int]) -> None:
        self.inner, self.sizes = inner, sizes
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.trainer = getattr(inner, "trainer", None)  # evaluation reuses the inner executor's model

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        dist.broadcast(server.global_vec, src=0)  # every rank trains from rank 0's model
        mine = balance(jobs, self.sizes, self.world)[self.rank]
        each = needs_each(server.aggregator)
        if each:
            local = server.share(_Keep())
            self.inner.run_round(local, mine)
            shares = [None] * self.world
            dist.all_gather_object(shares, (local.aggregator.updates, local.rejected))
            order = {job.client: i for i, job in enumerate(jobs)}
            updates = sorted((u for kept, _ in shares for u in kept), key=lambda u: order[u.client])
            for _, rejected in shares:
                for client, reason in rejected.items():
                    server.reject(client, reason)
            for u in updates:
                server.offer(u)
            return
        local = server.share(copy.deepcopy(server.aggregator))  # the same kind and options, its own sums
        self.inner.run_round(local, mine)
        agg, loss, loss_weight, rejected = local.partial()
        mean = agg.delta if agg is not None else torch.zeros_like(server.global_vec)
        means = [torch.empty_like(mean) for _ in range(self.world)]
        dist.all_gather(means, mean.contiguous())
        shares = [None] * self.world
        dist.all_gather_object(shares, (0 if agg is None else agg.weight, 0 if agg is None else agg.count, loss,
                                        loss_weight, rejected, local.norms))
        for m, (weight, count, loss, loss_weight, rejected, norms) in zip(means, shares):
            for client, reason in rejected.items():
                server.reject(client, reason)
            if count:
                server.merge(m, weight, count, loss, loss_weight)
            for n in norms:
                server.accepted_norm(n)

    def close(self) -> None:
        self.inner.close()


def check_distributed(cfg: RunConfig) -> None:
    """What a simulation across processes does not do (yet): one ConfigError line each."""
    refused = [why for cond, why in (
        (cfg.train.algorithm == "scaffold", "--algorithm scaffold (each client's control variate lives on one rank)"),
        (cfg.buffered.buffer_size is not None, "--buffer-size (buffered rounds train one client at a time)"),
        ((cfg.sim.workers or 1) > 1, "--workers (each rank is one worker)"),
        (cfg.compression.compress is not None, "--compress (a client's error-feedback residual lives on one rank)"),
        (cfg.compression.compress_down is not None, "--compress-down"),
        (cfg.sim.transport != "inproc" or cfg.sim.mode != "federated", "--transport or --mode gossip")) if cond]
    if refused:
        raise ConfigError(f"--nproc (simulation on torch.distributed) does not combine with {refused[0]}")


def simulate_rank(cfg: RunConfig, resume: bool = False) -> int:
    """One rank of a distributed simulation (this process was started by torchrun); 0 when the run is done.
    ``resume``: rank 0 continues after the run's checkpoint, and tells the others where."""
    from clients.simulation.run import Simulation, summary

    check_distributed(cfg)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the agent stops the group on Ctrl-C and reports once
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        cfg = cfg.replace(workers=1)
        sim = Simulation(cfg)
        rank = dist.get_rank()
        sim.executor = DistributedClients(sim.executor, sim.sizes)
        sim.evaluates = rank == 0  # the other ranks' evaluation would only be thrown away
        if resume:
            if rank == 0:
                sim.resume(load_checkpoint(cfg.out))
            kept = [sim.start, sim.server.state()]
            dist.broadcast_object_list(kept, src=0)  # the model itself comes with each round's broadcast
            sim.start = kept[0]
            sim.server.restore(kept[1])
        output = None
        if rank == 0:
            output = RunOutput(cfg.out, cfg.federation.rounds, cfg.progress, title=f"fedopt simulate: {cfg.task}",
                               resume_after=sim.start - 1 if resume else None, plot=cfg.plot)
        try:
            if output is not None:
                output.setup(cfg, sim.task)
            sim.run(output)
            if output is not None:
                output.finish(sim.spec, sim.server.global_vec,
                              {**summary(cfg, sim), "ranks": f"{dist.get_world_size()} ({dist.get_backend()})"})
        finally:
            if output is not None:
                output.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0
