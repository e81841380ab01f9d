"""``fedopt simulate``: N virtual clients on one machine, driven by the same RoundServer as the real coordinator.

A virtual client is its data shard plus whatever state its algorithm needs: no process, socket or model object per
client. Shards are loaded lazily (:class:`~clients.shards.ShardSource`), so memory grows with the data and the number
of workers, not with the number of clients. The engine plans each round with :class:`~fedopt.engine.RoundServer`,
hands the jobs to an executor that trains them, and records metrics exactly as the other modes do.

Executors (``run_round(server, jobs)`` feeds the round's results into ``server``, by ``offer`` or ``merge``):

* :class:`SequentialExecutor` — in this process, one reused model object, updates streamed into the aggregator.
  The default for small models: on a few cores the worker processes' messaging costs more than it saves.
* :class:`~clients.pool.PoolExecutor` (``--workers W``, W > 1) — W spawned worker processes; each trains its share of
  the round with one model and pre-aggregates, so a round costs O(W) messages (per-client updates when the aggregator
  needs every one). The global model and results travel through shared memory.
* :class:`~clients.vmap.VmapExecutor` (``--backend vmap``) — a whole batch of clients at once with ``torch.func``.

``--algorithm scaffold`` keeps SCAFFOLD's server control variate here, in the engine, and each client's ``c_i`` in a
:class:`~clients.state.ClientStateStore` where the client trains (see :mod:`clients.simulation.scaffold`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Protocol

import torch

from fedopt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedopt.compress import Compressor, decompress, downlink
from fedopt.config import RunConfig
from fedopt.errors import ConfigError
from fedopt.data import PartitionSpec
from fedopt.engine import Engine, Job, RoundServer
from fedopt.engine.buffered import BufferedEngine
from fedopt.engine.clock import ClientSpeeds, parse_speeds
from fedopt.schedules import parse_staleness
from fedopt.metrics import RunOutput
from fedopt.params import ParamSpec
from fedopt.local_sgd import num_samples
from fedopt.task import BaseTask, Task, evaluate_classifier, resolve_task, to_device
from fedopt.trainer import SMALL_MODEL, LocalTrainer, pick_device

from clients.simulation.asynchronous import VirtualClients, round_seconds
from clients.simulation.host import ClientHost, make_uplink
from clients.simulation.scaffold import ScaffoldClients, ScaffoldServer, check_scaffold_task
from clients.simulation.shards import ShardSource

__all__ = ["Simulation", "SequentialExecutor", "simulate", "SimResult", "default_workers"]

class Executor(Protocol):
    """Trains a round's jobs and feeds the results into ``server`` (``offer`` per update or ``merge`` partials)."""

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None: ...

    def close(self) -> None: ...


def default_workers(cfg: RunConfig, spec: ParamSpec) -> int:
    """``--workers`` when given; otherwise 1 (in-process) for small models and the number of cores for large ones."""
    if cfg.sim.workers is not None:
        return cfg.sim.workers
    return 1 if spec.size < SMALL_MODEL else max(1, len(os.sched_getaffinity(0)))


class SequentialExecutor:
    """In this process: one reused model trains the jobs one after another, each update offered to the server."""

    def __init__(self, task: Task, spec: ParamSpec, shards, device: torch.device, buffers: str = "average",
                 scaffold: ScaffoldServer | None = None, state_budget_bytes: int = 256 << 20, uplink=None) -> None:
        self.control = scaffold
        clients = ScaffoldClients(task, spec, state_budget_bytes) if scaffold is not None else None
        self.host = ClientHost(task, spec, shards, device, buffers, clients, uplink)
        self.compressing = uplink is not None
        self.take_bytes_up = self.host.take_bytes_up
        self.trainer = self.host.trainer
        self.shards = shards

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        sc = self.host.scaffold
        if sc is not None:
            sc.begin()
        self.host.run(server, jobs, server.global_vec, None if self.control is None else self.control.control)
        if sc is not None:
            self.control.add(sc.sum, sc.count)

    def close(self) -> None:
        self.host.close()


@dataclass
class SimResult:
    records: list[dict]
    global_vec: torch.Tensor
    spec: ParamSpec


def _note(message: str) -> None:
    print(f"fedopt simulate: {message}", file=sys.stderr, flush=True)


class Simulation:
    """Builds everything a simulated run needs from a RunConfig; ``run()`` trains and writes the outputs."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task = resolve_task(cfg.task, cfg.task_options)
        self.device = pick_device(cfg.device)
        if cfg.train.dp_sgd:
            from fedopt.dpsgd import require_opacus

            require_opacus()  # one ConfigError naming the extra, before anything starts
        if cfg.train.algorithm == "scaffold":
            check_scaffold_task(self.task)
        self.server = RoundServer.for_run(cfg, self.task, self.device)
        self.spec = self.server.spec
        self.partition = PartitionSpec(cfg.federation.partition, cfg.federation.alpha)
        self.shards = ShardSource(self.task, cfg.federation.clients, cfg.seed, self.partition, self.device)
        test = self.task.load_test(cfg.seed) if hasattr(self.task, "load_test") else None
        self.test = to_device(test, self.device)
        self.sizes = self.shards.sizes
        self.scaffold = ScaffoldServer(self.spec.size, cfg.federation.clients, self.device) \
            if cfg.train.algorithm == "scaffold" else None
        self.speeds = parse_speeds(cfg.sim.client_speed, cfg.sim.comm_seconds, cfg.seed) \
            if cfg.sim.client_speed is not None else None
        self.executor: Executor = self._make_executor()
        self.evaluates = True  # False: evaluation is another process's (a distributed simulation's other ranks)
        self.start = 1  # the first round this process runs (after a checkpoint's, with --resume)
        self._eval_trainer = getattr(self.executor, "trainer", None) or \
            LocalTrainer(self.task, self.spec, self.device, cfg.train.buffers)

    def resume(self, ckpt: Checkpoint | None) -> None:
        """Continue after ``ckpt`` (the run's own checkpoint): its model, optimizer and server state. A simulation is
        seeded per round and client, so the rounds after it are the ones an uninterrupted run trains."""
        refused = [why for cond, why in (
            (self.cfg.train.algorithm == "scaffold", "--algorithm scaffold (client control variates are not kept)"),
            (self.cfg.buffered.buffer_size is not None, "--buffer-size (clients in flight are not kept)"),
            (self.cfg.compression.compress is not None and self.cfg.compression.error_feedback,
             "--compress with error feedback (client residuals are not kept)")) if cond]
        if refused:
            raise ConfigError(f"simulate --resume does not combine with {refused[0]}")
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {self.cfg.out}")
        if ckpt.spec.to_dict() != self.spec.to_dict():
            raise ConfigError(f"checkpoint in {self.cfg.out} is for a different model than task {self.cfg.task!r}")
        self.server.global_vec.copy_(ckpt.global_vec)
        self.server.optimizer.load_state_dict(ckpt.optimizer_state)
        self.server.restore(ckpt.state)
        self.start = ckpt.round + 1

    def checkpoint(self, round: int, state: dict) -> None:
        """Every --checkpoint-every rounds and after the last: the model, optimizer and server state, atomically."""
        if round % self.cfg.sim.checkpoint_every == 0 or round == self.cfg.federation.rounds:
            save_checkpoint(self.cfg.out, Checkpoint(round, self.server.global_vec, self.server.optimizer.state_dict(),
                                                     self.spec, {"config": self.cfg.to_dict(), **state}))

    def _make_executor(self) -> Executor:
        cfg = self.cfg
        budget = int(cfg.sim.state_budget_mb * (1 << 20))
        if cfg.robust.active:  # Byzantine clients or client momentum: what each client sends is its own
            from clients.simulation.byzantine import ByzantineClients

            if cfg.sim.backend == "vmap" or (cfg.sim.workers or 1) > 1:
                _note("Byzantine clients and client momentum train one client at a time in this process (--backend "
                      "and --workers apply to honest runs)")
            return ByzantineClients(self.task, self.spec, self.shards, self.device, cfg, budget)
        if cfg.buffered.buffer_size is not None:
            if cfg.sim.backend == "vmap" or (cfg.sim.workers or 1) > 1:
                _note("buffered asynchronous rounds train one client at a time in this process (--backend and "
                      "--workers apply to synchronous rounds)")
            return SequentialExecutor(self.task, self.spec, self.shards, self.device, cfg.train.buffers, None, budget)
        if cfg.train.dp_sgd:  # Opacus trains one client at a time, in this process (its ledgers live here)
            if cfg.sim.backend == "vmap" or (cfg.sim.workers or 1) > 1:
                _note("--dp-sgd trains one client at a time with Opacus; using the sequential backend")
            return SequentialExecutor(self.task, self.spec, self.shards, self.device, cfg.train.buffers, None, budget,
                                      make_uplink(cfg, self.spec, budget))
        if cfg.sim.backend == "vmap":
            from clients.simulation.vmap import VmapExecutor, vmap_unsupported

            reason = vmap_unsupported(self.task, self.spec, self.shards, self.server.train, self.device)
            if reason is None:
                return VmapExecutor(self.task, self.spec, self.shards, self.device, self.scaffold, budget)
            _note(f"vmap backend unavailable ({reason}); using the sequential backend")
        workers = default_workers(cfg, self.spec)
        if workers > 1:
            from clients.simulation.pool import PoolExecutor

            return PoolExecutor(cfg, self.spec, workers, self.sizes, self.scaffold)
        return SequentialExecutor(self.task, self.spec, self.shards, self.device, cfg.train.buffers, self.scaffold,
                                  budget, make_uplink(cfg, self.spec, budget))

    def evaluate(self) -> dict:
        """The global model on the shared test set; without one, the sample-weighted mean over clients' local tests."""
        if not self.evaluates:
            return {}
        if self.test is not None:
            return self._eval_trainer.evaluate(self.server.global_vec, self.test)
        acc = loss = n = 0.0
        for test in self.shards.local_tests():
            m = self._eval_trainer.evaluate(self.server.global_vec, test)
            k = num_samples(test)
            acc, loss, n = acc + m["accuracy"] * k, loss + m["loss"] * k, n + k
        return {"accuracy": acc / n, "loss": loss / n} if n else {"accuracy": None, "loss": None}

    def evaluate_clients(self) -> dict:
        """``--eval-clients``: per-class accuracy on the shared test set (classifiers with fedopt's evaluation) and
        each client's accuracy on its local test split, or on its training shard when it has none."""
        out: dict = {}
        trainer = self._eval_trainer
        if self.test is not None and getattr(type(self.task), "evaluate", None) is BaseTask.evaluate:
            trainer.binding.load(self.server.global_vec)
            out["per_class"] = evaluate_classifier(trainer.model, self.test, per_class=True)["per_class"]
        per_client = {}
        for i in range(self.cfg.federation.clients):
            shard = self.shards[i]
            split = shard.test if shard.test is not None else shard.train
            per_client[str(i)] = trainer.evaluate(self.server.global_vec, split)["accuracy"]
        out["per_client"] = per_client
        return out

    def run(self, output: RunOutput | None = None) -> SimResult:
        cfg = self.cfg
        threads = torch.get_num_threads()
        if self.spec.size < SMALL_MODEL and self.device.type == "cpu":
            # A small model's ops are microseconds long: a second intra-op thread only adds hand-off and spinning
            # (30x slower per step on a loaded 2-core machine). Restored when the run ends.
            torch.set_num_threads(1)
        fed, b = cfg.federation, cfg.buffered
        if b.buffer_size is not None:
            engine = BufferedEngine(
                self.server, VirtualClients(self.executor.host, self.server, self.sizes, self.speeds), fed.rounds, cfg.concurrency, b.buffer_size, b.max_staleness, b.dispatch_threshold,
                parse_staleness(b.staleness), output, eval_every=fed.eval_every, evaluate=lambda _: self.evaluate())
        else:
            engine = Engine(self.server, InProcessClients(self.executor, self.sizes, self.spec, self.speeds,
                                                          self.server.keep_stragglers,
                                                          downlink(cfg.compression.compress_down)), fed.rounds, output,
                            start=self.start, checkpoint=self.checkpoint if output is not None else None,
                            eval_every=fed.eval_every, evaluate=lambda _: self.evaluate(),
                            extra_eval=(lambda _: self.evaluate_clients()) if fed.eval_clients else None,
                            hooks=[self.scaffold] if self.scaffold is not None else ())
        try:
            records = engine.run()
        finally:
            self.executor.close()
            torch.set_num_threads(threads)
        return SimResult(records, self.server.global_vec, self.spec)


class InProcessClients:
    """The engine's view of a simulation executor: every client is always available (no quorum), a round's bytes
    are what its messages' tensors would carry on the bus (the model down to each selected client, a delta back: with
    ``--compress`` the compressed tensors of every update sent, accepted or not), and with a
    virtual clock (``--client-speed``) a round lasts as long as its slowest client.

    ``downlink`` (``--compress-down``): the clients train from the model as the coordinator's compressed TRAIN
    decodes (the same codes, from the round as seed), and ``bytes_down`` counts those codes; the server's own model
    stays exact (it is swapped back before the round closes)."""

    def __init__(self, executor: Executor, sizes: dict[str, int], spec: ParamSpec, speeds: ClientSpeeds | None = None,
                 keep_stragglers: bool = False, downlink: Compressor | None = None) -> None:
        self.executor, self.sizes, self.speeds, self.keep_stragglers = executor, sizes, speeds, keep_stragglers
        self.itemsize = spec.size * torch.empty((), dtype=spec.torch_dtype).element_size()
        self.downlink, self.model_bytes = downlink, self.itemsize
        self._aggregator = None  # the last round's aggregator: a secure one reports its protocol's bytes
        self.virtual = 0.0

    def available(self, round: int, attempt: int) -> dict[str, int]:
        return self.sizes

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        self._aggregator = server.aggregator
        if self.downlink is None:
            return self.executor.run_round(server, jobs)
        exact = server.global_vec.clone()
        packed = self.downlink.compress(exact, server.round)
        self.model_bytes = packed.nbytes
        server.global_vec.copy_(decompress(packed, exact.numel()))
        try:
            self.executor.run_round(server, jobs)
        finally:
            server.global_vec.copy_(exact)

    def fields(self, jobs: list[Job], outcome) -> dict:
        up = self.executor.take_bytes_up() if getattr(self.executor, "compressing", False) \
            else outcome.count * self.itemsize
        out = {"bytes_down": len(jobs) * self.model_bytes, "bytes_up": up}
        secure = getattr(self._aggregator, "last_round", None) or {}
        if "bytes_up" in secure:  # SecAgg+: every protocol message the clients sent, masked vectors packed at k bits
            out.update(bytes_up=secure["bytes_up"], modulus_bits=secure["modulus_bits"])
        executor = getattr(self.executor, "inner", self.executor)
        dp_sgd = getattr(getattr(executor, "trainer", None), "dp_sgd", None)
        if dp_sgd is not None:  # --dp-sgd: the ε of this round's clients (each one's run-long Opacus ledger)
            eps = [dp_sgd.epsilon[j.client] for j in jobs if j.client in dp_sgd.epsilon]
            if eps:
                out.update(dp_sgd_epsilon_mean=sum(eps) / len(eps), dp_sgd_epsilon_max=max(eps))
        if self.speeds is not None:
            self.virtual += round_seconds(self.speeds, jobs, self.sizes, self.keep_stragglers)
            out["virtual_seconds"] = self.virtual
        return out

    def close(self) -> None:
        self.executor.close()


def simulate(cfg: RunConfig, resume: bool = False) -> SimResult:
    """Run a simulation with outputs in ``cfg.out`` (metrics.jsonl, model.safetensors, accuracy.png, summary,
    checkpoint); ``resume``: continue after the run's last checkpoint."""
    sim = Simulation(cfg)
    if resume:
        sim.resume(load_checkpoint(cfg.out))
    output = RunOutput(cfg.out, cfg.federation.rounds, cfg.progress, title=f"fedopt simulate: {cfg.task}",
                       resume_after=sim.start - 1 if resume else None, plot=cfg.plot)
    try:
        output.setup(cfg, sim.task)
        result = sim.run(output)
        output.finish(sim.spec, sim.server.global_vec, {**summary(cfg, sim), "out": str(output.dir)})
    finally:
        output.close()
    return result


def summary(cfg: RunConfig, sim: Simulation) -> dict:
    """The run's lines in the end-of-run summary beside the metrics."""
    extra = {"clients": f"{cfg.federation.clients} ({cfg.federation.per_round} per round)",
             "executor": type(getattr(sim.executor, "inner", sim.executor)).__name__}
    if (dp := sim.server.privacy) is not None:
        from fedopt.privacy import privacy_summary

        extra["privacy"] = privacy_summary(dp)
    return extra
