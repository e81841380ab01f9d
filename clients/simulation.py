"""``fedopt simulate``: N virtual clients on one machine, driven by the same RoundServer as the real coordinator.

A virtual client is its data shard and nothing else: no process, socket or model object per client. The engine
plans each round with :class:`~coordinator.rounds.RoundServer`, hands the jobs to an executor that trains them, and
records metrics exactly as the other modes do.

Executors:

* :class:`SequentialExecutor` — in this process, one reused model object, updates streamed into the aggregator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from coordinator.rounds import Job, RoundServer
from fedopt.aggregators import make_aggregator
from fedopt.config import RunConfig
from fedopt.data import PartitionSpec
from fedopt.metrics import RunOutput
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.task import ClientData, Task, TrainConfig, resolve_task

from .runner import LocalTrainer, pick_device

__all__ = ["Simulation", "SequentialExecutor", "simulate", "SimResult"]


class Executor(Protocol):
    """Trains a round's jobs and feeds the results into ``server`` (``offer`` per update or ``merge`` partials)."""

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None: ...

    def close(self) -> None: ...


class SequentialExecutor:
    def __init__(self, task: Task, spec: ParamSpec, shards: list[ClientData], device: torch.device,
                 buffers: str = "average") -> None:
        self.trainer = LocalTrainer(task, spec, device, buffers)
        self.shards = shards

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        for job in jobs:
            if job.straggler and not server.keep_stragglers:
                # FedAvg drops a straggler at the deadline; its work would be discarded, so it is not done here.
                server.reject(job.client, "straggler dropped")
                continue
            update = self.trainer.train(job.client, server.global_vec, self.shards[int(job.client)], job.config)
            server.offer(update)

    def close(self) -> None:
        pass


@dataclass
class SimResult:
    records: list[dict]
    global_vec: torch.Tensor
    spec: ParamSpec


class Simulation:
    """Builds everything a simulated run needs from a RunConfig; ``run()`` trains and writes the outputs."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task = resolve_task(cfg.task, cfg.task_options)
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = self.task.build_model()
        self.spec = ParamSpec.from_module(model, cfg.buffers)
        global_vec = self.spec.flatten(model).to(self.device)
        partition = PartitionSpec(cfg.partition, cfg.alpha)
        self.shards = [self.task.load_data(i, cfg.clients, cfg.seed, partition).to(self.device)
                       for i in range(cfg.clients)]
        test = self.task.load_test(cfg.seed) if hasattr(self.task, "load_test") else None
        self.test = None if test is None else tuple(t.to(self.device) for t in test)
        self.sizes = {str(i): s.num_samples for i, s in enumerate(self.shards)}
        opt_lr = cfg.server_lr
        self.server = RoundServer(
            self.spec, global_vec,
            make_aggregator(cfg.aggregator, **cfg.aggregator_options),
            make_server_optimizer(cfg.server_opt, opt_lr, **cfg.server_options),
            TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                        mu=cfg.mu),
            per_round=cfg.per_round, seed=cfg.seed, stragglers=cfg.stragglers, keep_stragglers=cfg.keep_stragglers,
        )
        self.executor: Executor = SequentialExecutor(self.task, self.spec, self.shards, self.device, cfg.buffers)
        self._eval_trainer = self.executor.trainer if isinstance(self.executor, SequentialExecutor) else \
            LocalTrainer(self.task, self.spec, self.device, cfg.buffers)

    def evaluate(self) -> dict:
        """The global model on the shared test set; without one, the sample-weighted mean over clients' local tests."""
        if self.test is not None:
            return self._eval_trainer.evaluate(self.server.global_vec, self.test)
        acc = loss = n = 0.0
        for s in self.shards:
            if s.test is None:
                continue
            m = self._eval_trainer.evaluate(self.server.global_vec, s.test)
            k = s.test[0].shape[0]
            acc, loss, n = acc + m["accuracy"] * k, loss + m["loss"] * k, n + k
        return {"accuracy": acc / n, "loss": loss / n} if n else {"accuracy": None, "loss": None}

    def run(self, output: RunOutput | None = None) -> SimResult:
        cfg = self.cfg
        P = self.spec.size
        itemsize = torch.empty((), dtype=self.spec.torch_dtype).element_size()
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            jobs = self.server.plan(r, self.sizes)
            self.server.begin(r)
            self.executor.run_round(self.server, jobs)
            outcome = self.server.close()
            ev = self.evaluate() if (r % cfg.eval_every == 0 or r == cfg.rounds) else {}
            seconds = time.perf_counter() - t0
            record = {
                "round": r,
                "accuracy": ev.get("accuracy"),
                "loss": ev.get("loss"),
                "clients": outcome.count,
                "selected": len(jobs),
                "stragglers": sum(j.straggler for j in jobs),
                "rejected": len(outcome.rejected),
                "train_loss": outcome.train_loss,
                "seconds": seconds,
                # what the round's messages carry on the bus: the model down to each selected client, a delta back
                "bytes_down": len(jobs) * P * itemsize,
                "bytes_up": outcome.count * P * itemsize,
            }
            if output is not None:
                output.round_done(record)
        self.executor.close()
        records = output.records if output is not None else []
        return SimResult(records, self.server.global_vec, self.spec)


def simulate(cfg: RunConfig) -> SimResult:
    """Run a simulation with outputs in ``cfg.out`` (metrics.jsonl, model.safetensors, accuracy.png, summary)."""
    sim = Simulation(cfg)
    output = RunOutput(cfg.out, cfg.rounds, cfg.progress, title=f"fedopt simulate: {cfg.task}")
    try:
        result = sim.run(output)
        output.finish(sim.spec, sim.server.global_vec,
                      {"clients": f"{cfg.clients} ({cfg.per_round} per round)", "out": str(output.dir)})
    finally:
        output.close()
    return result
