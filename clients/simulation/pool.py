"""PoolExecutor: W worker processes host the virtual clients; a round costs O(W) messages, not O(clients).

Workers are *spawned* (never forked: a forked copy of an initialised torch/OpenMP runtime is not safe), each resolves
the task by name, builds its own lazy :class:`~clients.shards.ShardSource` and one model, and runs ``torch`` with one
thread when W >= cores. Data never crosses processes; neither do large tensors as pickles:

* the global model (and SCAFFOLD's server control variate) lie in shared-memory tensors the engine writes before each
  round and workers only read;
* a worker pre-aggregates its clients with its own :class:`RoundServer` (same validation, same aggregator) and writes
  the partial mean into its row of a shared result tensor; the engine folds it in with ``RoundServer.merge``;
* when the aggregator needs every update (``needs_all_updates`` or ``needs_plaintext``: median, trimmed mean, secure
  aggregation) a worker writes per-client deltas into its shared slab, ``SLAB`` rows at a time, and waits for the
  engine to ``offer`` them and acknowledge before reusing the slab.

Control messages are small tuples on ordinary multiprocessing queues (local only). Every wait has a deadline; a worker
that dies or errs ends the run with a :class:`RoundError` naming it, and :meth:`close` stops every worker it started.
"""

from __future__ import annotations

import os
import queue
import traceback

import torch
import torch.multiprocessing as tmp

from fedopt.aggregators import Update, make_aggregator
from fedopt.config import RunConfig
from fedopt.errors import FedoptError, RoundError
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.engine import Job, RoundServer

from clients.simulation.scaffold import ScaffoldServer

__all__ = ["PoolExecutor", "SLAB", "balance", "needs_each"]

SLAB = 32  # per-client update rows a worker hands over at a time when the aggregator needs every update
START_TIMEOUT = 120.0  # seconds for a spawned worker to import torch and load its task
POLL = 0.5  # seconds between liveness checks while waiting on workers


def needs_each(aggregator) -> bool:
    """Whether ``aggregator`` needs every update (it cannot merge pre-aggregated partials)."""
    return not getattr(aggregator, "linear", False) or getattr(aggregator, "needs_all_updates", False) \
        or getattr(aggregator, "needs_plaintext", False)


def balance(jobs: list[Job], sizes, workers: int) -> list[list[Job]]:
    """``jobs`` split over ``workers`` by sample count: longest first onto the least loaded (deterministic)."""
    shares: list[list[Job]] = [[] for _ in range(workers)]
    load = [0] * workers
    for job in sorted(jobs, key=lambda j: -sizes.get(j.client, 1)):
        w = load.index(min(load))
        shares[w].append(job)
        load[w] += sizes.get(job.client, 1) + 8  # + a per-client fixed cost
    return shares


class PoolExecutor:
    """``run_round(server, jobs)`` over W spawned workers; ``close()`` stops them (also on interpreter exit)."""

    def __init__(self, cfg: RunConfig, spec: ParamSpec, workers: int, sizes: dict[str, int],
                 scaffold: ScaffoldServer | None = None, round_timeout: float = 3600.0) -> None:
        # With --device cuda every worker opens its own CUDA context on the shared GPU (spawned, so none is inherited);
        # the shared tensors stay in host memory and each worker copies the global model to its device once a round.
        self.workers = workers
        self.sizes = sizes
        self.scaffold = scaffold
        self.round_timeout = round_timeout
        self.compressing = cfg.compression.compress is not None
        self.sticky = scaffold is not None or (self.compressing and cfg.compression.error_feedback)
        self._bytes_up = 0  # compressed update bytes the workers reported since take_bytes_up()
        P = spec.size
        dt = spec.torch_dtype
        self._global = torch.zeros(P, dtype=dt).share_memory_()
        self._control = torch.zeros(P).share_memory_()
        self._result = torch.zeros(workers, P, dtype=dt).share_memory_()
        self._dc = torch.zeros(workers, P).share_memory_()
        self._slab = torch.zeros(workers, SLAB, P, dtype=dt).share_memory_()
        cores = len(os.sched_getaffinity(0))
        threads = 1 if workers >= cores else max(1, cores // workers)
        budget = int(cfg.sim.state_budget_mb * (1 << 20)) // workers
        ctx = tmp.get_context("spawn")
        self._out = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(workers)]
        self._procs = []
        for rank in range(workers):
            p = ctx.Process(target=_worker_main, name=f"fedopt-sim-worker-{rank}", daemon=True,
                            args=(rank, cfg, spec.to_dict(), threads, budget, self._global, self._control,
                                  self._result[rank], self._dc[rank], self._slab[rank], self._inboxes[rank],
                                  self._out))
            p.start()
            self._procs.append(p)
        self._ready = False

    # ---- plumbing ---------------------------------------------------------------------------------------------------
    def _get(self, timeout: float):
        """Next worker message within ``timeout`` s; a dead worker or a worker's error ends the run."""
        waited = 0.0
        while True:
            try:
                msg = self._out.get(timeout=POLL)
            except queue.Empty:
                waited += POLL
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    raise RoundError(f"simulation worker {dead[0]} exited unexpectedly")
                if waited >= timeout:
                    raise RoundError(f"no word from the simulation workers for {timeout:.0f} s")
                continue
            if msg[0] == "error":
                raise RoundError(f"simulation worker {msg[1]} failed: {msg[2]}")
            return msg

    def _wait_ready(self) -> None:
        pending = set(range(self.workers))
        while pending:
            msg = self._get(START_TIMEOUT)
            if msg[0] == "ready":
                pending.discard(msg[1])
        self._ready = True

    def assign(self, jobs: list[Job], sizes) -> list[list[Job]]:
        """Which worker trains which job. With client state (SCAFFOLD's c_i, an error-feedback residual) a client
        always goes to the same worker, where its state lives; otherwise jobs are balanced by sample count
        (:func:`balance`)."""
        if not self.sticky:
            return balance(jobs, sizes, self.workers)
        shares: list[list[Job]] = [[] for _ in range(self.workers)]
        for job in jobs:
            shares[int(job.client) % self.workers].append(job)
        return shares

    # ---- the round --------------------------------------------------------------------------------------------------
    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        if not self._ready:
            self._wait_ready()
        self._global.copy_(server.global_vec.detach())
        if self.scaffold is not None:
            self._control.copy_(self.scaffold.control.cpu())
        each = needs_each(server.aggregator)
        shares = self.assign(jobs, self.sizes)
        busy = 0
        for rank, share in enumerate(shares):
            self._inboxes[rank].put(("round", server._round, share, each))
            busy += 1
        while busy:
            msg = self._get(self.round_timeout)
            kind, rank = msg[0], msg[1]
            if kind == "chunk":
                for row, (client, n, metrics, partial) in enumerate(msg[2]):
                    server.offer(Update(client, self._slab[rank, row], n, metrics, partial))
                self._inboxes[rank].put(("ack",))
            elif kind == "done":
                info = msg[2]
                for client, reason in info["rejected"].items():
                    server.reject(client, reason)
                if info["count"]:
                    server.merge(self._result[rank], info["weight"], info["count"], info["loss"],
                                 info["loss_weight"])
                if self.scaffold is not None:
                    self.scaffold.add(self._dc[rank], info["dc_count"])
                self._bytes_up += info["bytes_up"]
                busy -= 1

    def take_bytes_up(self) -> int:
        """Compressed update bytes the workers produced since the last call (``--compress``)."""
        n, self._bytes_up = self._bytes_up, 0
        return n

    def close(self) -> None:
        for box in self._inboxes:
            try:
                box.put(("stop",))
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []


# ---- the worker process -------------------------------------------------------------------------------------------------
def _worker_main(rank, cfg: RunConfig, spec_dict, threads, budget, global_vec, control, result, dc, slab, inbox,
                 out) -> None:
    try:
        torch.set_num_threads(threads)
        from fedopt.data import PartitionSpec
        from fedopt.task import TrainConfig, resolve_task

        from clients.simulation.host import ClientHost, make_uplink
        from fedopt.trainer import pick_device
        from clients.simulation.scaffold import ScaffoldClients
        from clients.simulation.shards import ShardSource

        spec = ParamSpec.from_dict(spec_dict)
        task = resolve_task(cfg.task, cfg.task_options)
        device = pick_device(cfg.device)
        fed = cfg.federation
        shards = ShardSource(task, fed.clients, cfg.seed, PartitionSpec(fed.partition, fed.alpha), device)
        clients = ScaffoldClients(task, spec, budget) if cfg.train.algorithm == "scaffold" else None
        host = ClientHost(task, spec, shards, device, cfg.train.buffers, clients, make_uplink(cfg, spec, budget))
        # the worker's own RoundServer validates and pre-aggregates with the run's aggregator; it never steps
        local = RoundServer(spec, torch.zeros(spec.size, dtype=spec.torch_dtype),
                            make_aggregator(cfg.federation.aggregator, **cfg.aggregator_options),
                            make_server_optimizer("fedavg"), TrainConfig(), per_round=1,
                            keep_stragglers=cfg.keep_stragglers)
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which ends the run with one line
        out.put(("error", rank, f"{type(e).__name__}: {e}"))
        return
    out.put(("ready", rank, os.getpid()))
    while True:
        try:
            msg = inbox.get(timeout=3600)
        except queue.Empty:
            return  # the engine has been silent for an hour: it is gone
        if msg[0] == "stop":
            break
        if msg[0] != "round":
            continue
        _, rnd, jobs, each = msg
        try:
            _run_share(host, local, rnd, jobs, each, global_vec, control, result, dc, slab, inbox, out, rank)
        except BaseException as e:  # noqa: BLE001
            detail = str(e) if isinstance(e, FedoptError) else traceback.format_exc(limit=3).strip().splitlines()[-1]
            out.put(("error", rank, f"{type(e).__name__}: {detail}"))
            return
    host.close()


def _run_share(host, local, rnd, jobs, each, global_vec, control, result, dc, slab, inbox, out, rank) -> None:
    local.begin(rnd)
    sc = host.scaffold
    if sc is not None:
        sc.begin()
    pending: list[tuple] = []

    def flush() -> None:
        out.put(("chunk", rank, list(pending)))
        pending.clear()
        msg = inbox.get(timeout=3600)
        if msg[0] != "ack":
            raise RoundError(f"worker {rank} expected an ack, got {msg[0]!r}")

    def to_slab(update: Update) -> str | None:
        reason = local.check(update)
        if reason is not None:
            local.reject(update.client, reason)
            return reason
        slab[len(pending)].copy_(update.delta)
        pending.append((update.client, update.num_samples, update.metrics, update.partial))
        if len(pending) == slab.shape[0]:
            flush()
        return None

    host.run(local, jobs, global_vec, control if sc is not None else None, to_slab if each else None)
    if pending:
        flush()
    agg, loss, loss_weight, rejected = local.partial()
    count = weight = 0
    if agg is not None and not each:
        result.copy_(agg.delta)
        count, weight = agg.count, agg.weight
    if sc is not None:
        dc.copy_(sc.sum)
    out.put(("done", rank, {"count": count, "weight": weight, "loss": loss, "loss_weight": loss_weight,
                            "rejected": rejected, "dc_count": 0 if sc is None else sc.count,
                            "bytes_up": host.take_bytes_up()}))
