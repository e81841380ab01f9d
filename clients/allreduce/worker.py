"""One datacenter worker: a torchrun rank that trains the Task's model under DDP, epoch by epoch.

Data design: every rank loads the *whole* train split as one shard (``task.load_data(0, 1, seed, iid)``) and a
:class:`~clients.allreduce_sync.ShardSampler` (a ``DistributedSampler``) gives rank r the positions r, r+N, ... of one
shuffled permutation per epoch. Sharding by sampler rather than by ``load_data(rank, N)`` is what makes N workers with
batch b step through exactly the samples one worker with batch N*b does (the permutation depends on the seed and the
epoch, not on N), so data-parallel training is the same optimisation whatever the world size.

Per epoch, every rank calls the Task's own unchanged ``train(model, data, config)`` (for most tasks
``BaseTask.train`` -> ``fedopt.task.sgd_loop``, the very function the other modes call) with the DDP-wrapped model and a
``TrainConfig`` whose ``sampler`` is the rank's ShardSampler and whose ``make_optimizer`` returns this worker's
long-lived optimizer (plain SGD, torch's ZeroRedundancyOptimizer, or torch's PostLocalSGDOptimizer for local SGD).
Then rank 0 evaluates on ``task.load_test(seed)``, appends one line to ``metrics.jsonl`` (round = epoch) and writes an
atomic checkpoint, in that order, so a crash between the two only makes the resumed run redo (and rewrite) the epoch.

Restart: under torchrun ``--max-restarts`` a failed worker restarts the whole group; the restarted workers see
``TORCHELASTIC_RESTART_COUNT > 0`` and resume from ``OUT/checkpoint.safetensors`` by themselves. Rank 0 reads the
checkpoint and broadcasts it, so only rank 0 needs the output directory.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from fedopt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedopt.data import PartitionSpec
from fedopt.errors import ConfigError, TaskError
from fedopt.metrics import RunOutput
from fedopt.params import ParamSpec
from fedopt.task import TrainConfig, resolve_task, to_device
from fedopt.trainer import SMALL_MODEL

from clients.allreduce.config import AllreduceConfig
from clients.allreduce.sync import (CommCounter, CountingGroup, LocalSGDAverager, ShardSampler, parse_compress,
                                    step_hook, steps_per_rank)

__all__ = ["dist_env", "pick_backend", "train_worker", "AllreduceWorker"]


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets; a ConfigError when they are missing."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("RANK/WORLD_SIZE are not set: start workers with `fedopt allreduce --nproc N` "
                          "or `torchrun ... -m fedopt allreduce`") from None


def pick_backend(backend: str, device: str, local_rank: int, compress: str | None = None) -> tuple[str, torch.device]:
    """NCCL and one GPU per process when CUDA is present (or asked for), gloo on CPU; ``backend`` forces one.
    ``compress`` is ``--compress``, checked against the backend."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available")
    use_cuda = cuda if device == "auto" else device == "cuda"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend nccl needs CUDA devices; use --backend gloo on CPU")
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise ConfigError(f"torch.distributed backend {backend!r} is not available in this torch build")
    if compress is not None and parse_compress(compress).kind == "bf16" and backend != "nccl":
        # DDP refuses torch's bf16_compress_hook on anything but NCCL 2.10+ (or XCCL)
        raise ConfigError("--compress bf16 needs the nccl backend (CUDA); on gloo use --compress fp16")
    if not use_cuda:
        return backend, torch.device("cpu")
    if backend == "nccl" and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                          "NCCL needs one process per GPU")
    return backend, torch.device("cuda", local_rank % torch.cuda.device_count())


def train_worker(cfg: AllreduceConfig) -> dict:
    """Join the process group torchrun describes, train, leave. Returns this rank's last epoch record."""
    rank, world, local_rank = dist_env()
    backend, device = pick_backend(cfg.backend, cfg.device, local_rank, cfg.compress)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = not dist.is_initialized()
    store: dict = {}
    if own_group:
        timeout = datetime.timedelta(seconds=cfg.timeout)
        store = _attempt_store(rank, world, timeout)
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None, **store)
    try:
        record = AllreduceWorker(cfg, rank, world, device).run()
        # leave together: a rank tearing its gloo context down while rank 0 still writes the model and summary was
        # seen to abort ("terminate called without an active exception") now and then
        dist.barrier()
        return record
    finally:
        if own_group:
            dist.destroy_process_group()
            store.clear()  # drop our store client now, not during interpreter shutdown


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun's agent store, a store namespace of this restart attempt's own (else: plain env://).

    The elastic agent keeps one TCPStore (same MASTER_PORT) across restarts, and the process group's keys from the
    failed attempt are still in it: restarted workers would read a dead peer's gloo address and fail to connect
    (seen with torch 2.13 and a c10d rendezvous). Prefixing the keys with the restart count gives every attempt a clean
    namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"fedopt/allreduce/attempt_{attempt}", store), "rank": rank,
            "world_size": world}


class AllreduceWorker:
    def __init__(self, cfg: AllreduceConfig, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.task = resolve_task(cfg.task, cfg.task_options)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
        self.module = self.task.build_model().to(device)
        self.spec = ParamSpec.from_module(self.module, "average")
        if self.spec.size < SMALL_MODEL and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # as every other mode does for small models (see fedopt.trainer.SMALL_MODEL)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.data = self.task.load_data(0, 1, cfg.seed, PartitionSpec("iid")).to(device)
        self.test = None
        if rank == 0:
            test = self.task.load_test(cfg.seed) if hasattr(self.task, "load_test") else None
            test = test if test is not None else self.data.test
            self.test = to_device(test, device)
        self.start_epoch, restored = self._restore()

        period = cfg.period
        self.counter = CommCounter(world)
        self.ddp = DDP(self.module, device_ids=[device.index] if device.type == "cuda" else None,
                       bucket_cap_mb=cfg.bucket_cap_mb, forward_sync_buffers=period is None)
        exact = period is None  # local SGD needs equal step counts on every rank: padded shards, no Join
        steps = steps_per_rank(self.data.num_samples, world, cfg.batch_size, exact, cfg.max_steps)
        if period is None:
            # PowerSGD counts its warm-up from this process's first step (a resumed run warms up again: PowerSGD's
            # error and P/Q memories are not checkpointed)
            self.ddp.register_comm_hook(*step_hook(parse_compress(cfg.compress),
                                                   CountingGroup(dist.group.WORLD, self.counter),
                                                   (cfg.epochs - self.start_epoch) * max(steps)))
        else:
            # torch's post-local-SGD hook from iteration 0 with no gradient all-reduce: steps stay local
            self.ddp.register_comm_hook(PostLocalSGDState(None, None, 0, post_local_gradient_allreduce=False),
                                        post_localSGD_hook)
        inner = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        hyper = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, **({"momentum": cfg.momentum} if inner is
                                                                  torch.optim.SGD else {}))
        self.averager: LocalSGDAverager | None = None
        # torch.distributed.optim is imported only when used: it costs most of a second per worker to import
        if cfg.zero:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer = ZeroRedundancyOptimizer(self.params, optimizer_class=inner, **hyper)
        elif period is not None:
            from torch.distributed.optim import PostLocalSGDOptimizer

            self.averager = LocalSGDAverager(self.module, self.spec, period, self.counter,
                                             cfg.outer_lr, cfg.outer_momentum)
            self.optimizer = PostLocalSGDOptimizer(inner(self.params, **hyper), self.averager)
        else:
            self.optimizer = inner(self.params, **hyper)
        self._load_optimizer_state(restored)

        self.sampler = ShardSampler(self.data.num_samples, world, rank, cfg.seed, exact=exact)
        self.uneven = len(set(steps)) > 1
        self._optimizer_asked = False
        self.train_config = TrainConfig(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                                        clip_norm=cfg.clip_norm, max_steps=cfg.max_steps, seed=cfg.seed,
                                        sampler=self.sampler, make_optimizer=self._make_optimizer)

    # ---- training ---------------------------------------------------------------------------------------------------
    def _make_optimizer(self, params, config):
        if [id(p) for p in params] != [id(p) for p in self.params]:
            raise TaskError("train() asked for an optimizer over parameters other than the model's trainable ones")
        self._optimizer_asked = True
        return self.optimizer

    def run(self) -> dict:
        cfg = self.cfg
        output = None
        if self.rank == 0:
            resumed = self.start_epoch > 0 or cfg.resume or self.restarts > 0
            output = RunOutput(cfg.out, cfg.epochs, cfg.progress, title=f"fedopt allreduce: {cfg.task}",
                               resume_after=self.start_epoch if resumed else None, plot=cfg.plot)
        record: dict = {}
        try:
            for epoch in range(self.start_epoch + 1, cfg.epochs + 1):
                record = self._epoch(epoch)
                if output is not None:
                    output.round_done(record, (self.spec, self.spec.flatten(self.module)))
                self._checkpoint(epoch)
            if output is not None:
                output.finish(self.spec, self.spec.flatten(self.module),
                              {"workers": f"{self.world} x {self.device.type} ({dist.get_backend()})",
                               "sync": cfg.sync + (" + zero" if cfg.zero else ""), "out": str(output.dir)})
        finally:
            if output is not None:
                output.close()
        return record

    def _epoch(self, epoch: int) -> dict:
        t0 = time.perf_counter()
        self.sampler.epoch_offset = epoch - 1
        for group in self.optimizer.param_groups:  # the epoch's rate under --lr-schedule (epoch = round)
            group["lr"] = self.cfg.lr_at(epoch)
        self.counter.reset()
        t_train = time.perf_counter()
        if self.averager is None:
            joinables = [self.ddp] + ([self.optimizer] if self.cfg.zero else [])
            with Join(joinables, enable=self.uneven):
                metrics = self.task.train(self.ddp, self.data, self.train_config)
        else:
            metrics = self.task.train(self.ddp, self.data, self.train_config)
        if (self.cfg.zero or self.averager is not None) and not self._optimizer_asked:
            raise TaskError(f"task {self.cfg.task!r} trains with its own optimizer; --zero and --sync local:H "
                            "need its train() to use TrainConfig.make_optimizer (fedopt.task.sgd_loop does)")
        if self.averager is not None:
            self.averager.flush()  # end every epoch on the consensus model
        train_seconds = time.perf_counter() - t_train
        if self.cfg.zero:  # ZeRO broadcasts the updated shards once per step
            self.counter.broadcast_shards(sum(p.numel() * p.element_size() for p in self.params),
                                          int(metrics.get("steps", 0)))
        ev = self.task.evaluate(self.module, self.test) if self.test is not None else {}
        return {
            "round": epoch,
            "epoch": epoch,  # plots label their x axis "epoch" for runs whose records carry it
            "accuracy": ev.get("accuracy"),
            "loss": ev.get("loss"),
            "clients": self.world,
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,  # this rank's training part of the epoch (no evaluation)
            # estimated ring all-reduce traffic of this rank (see clients.allreduce.sync)
            "bytes_up": self.counter.bytes_sent,
            "bytes_down": self.counter.bytes_received,
            "allreduce_calls": self.counter.calls,
            "allreduce_bytes": self.counter.tensor_bytes,  # bytes of the tensors this rank all-reduced, exactly
            "steps": int(metrics.get("steps", 0)),
            "train_loss": metrics.get("loss"),
            "sync": self.cfg.sync,
            "compress": self.cfg.compress,
            "restarts": self.restarts,
        }

    # ---- checkpoint and resume ----------------------------------------------------------------------------------------
    def _momentum_vector(self) -> torch.Tensor | None:
        """The inner optimizer's momentum over ``self.params`` as one vector (ZeRO: gathered to rank 0; a collective)."""
        if self.cfg.momentum == 0:
            return None
        if self.cfg.zero:
            self.optimizer.consolidate_state_dict(to=0)
            if self.rank != 0:
                return None
            state = self.optimizer.state_dict()["state"]
            bufs = [state.get(i, {}).get("momentum_buffer") for i in range(len(self.params))]
        else:
            # step sync: identical on every rank; local SGD: rank 0's (per-rank momenta differ slightly)
            bufs = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        if any(b is None for b in bufs):
            return None
        return torch.cat([b.detach().reshape(-1).to(self.device) for b in bufs])

    def _checkpoint(self, epoch: int) -> None:
        momentum = self._momentum_vector()
        if self.rank != 0:
            return
        tensors = {} if momentum is None else {"inner_momentum": momentum.cpu()}
        if self.averager is not None:
            tensors.update({f"outer_{k}": v.cpu() for k, v in self.averager.state_tensors().items()})
        state = {"epoch": epoch, "world": self.world, "sync": self.cfg.sync, "task": self.cfg.task}
        save_checkpoint(self.cfg.out, Checkpoint(epoch, self.spec.flatten(self.module).cpu(), tensors, self.spec,
                                                 state))

    _KEYS = ("inner_momentum", "outer_anchor", "outer_momentum")

    def _restore(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Rank 0 reads the checkpoint and broadcasts it; returns the last completed epoch and optimizer tensors."""
        if not (self.cfg.resume or self.restarts > 0):
            return 0, {}
        header = torch.zeros(2 + len(self._KEYS), dtype=torch.int64, device=self.device)
        ckpt = None
        if self.rank == 0:
            try:
                ckpt = load_checkpoint(self.cfg.out)
                if ckpt is not None and ckpt.spec != self.spec:
                    raise ConfigError(f"checkpoint in {self.cfg.out} was written for another model")
                header[0] = 1 if ckpt is not None else 0
            except ConfigError:
                header[0] = -1
                dist.broadcast(header, 0)
                raise
            if ckpt is not None:
                header[1] = ckpt.round
                for i, k in enumerate(self._KEYS):
                    header[2 + i] = ckpt.optimizer_state[k].numel() if k in ckpt.optimizer_state else -1
        dist.broadcast(header, 0)
        if header[0] < 0:
            raise ConfigError(f"rank 0 could not read the checkpoint in {self.cfg.out}")
        if header[0] == 0:
            if self.cfg.resume and self.restarts == 0:
                raise ConfigError(f"--resume: no checkpoint in {self.cfg.out}")
            return 0, {}  # a restart before the first checkpoint starts over
        vec = ckpt.global_vec.to(self.device) if ckpt else torch.empty(self.spec.size, dtype=self.spec.torch_dtype,
                                                                         device=self.device)
        dist.broadcast(vec, 0)
        self.spec.load_into(self.module, vec)
        tensors = {}
        for i, k in enumerate(self._KEYS):
            n = int(header[2 + i])
            if n < 0:
                continue
            t = ckpt.optimizer_state[k].to(self.device) if ckpt else torch.empty(n, dtype=vec.dtype, device=self.device)
            dist.broadcast(t, 0)
            tensors[k] = t
        return int(header[1]), tensors

    def _load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "inner_momentum" in tensors:
            flat, off, owned = tensors["inner_momentum"], 0, None
            if self.cfg.zero:  # ZeRO keeps state only for the parameters this rank owns
                owned = {id(p) for g in self.optimizer.optim.param_groups for p in g["params"]}
            inner = self.optimizer.optim if self.cfg.zero or self.averager is not None else self.optimizer
            for p in self.params:
                piece = flat[off : off + p.numel()].view_as(p)
                off += p.numel()
                if owned is None or id(p) in owned:
                    inner.state[p]["momentum_buffer"] = piece.clone()
        if self.averager is not None:
            self.averager.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("outer_")})
