"""How datacenter workers synchronise, built only from torch.distributed pieces.

* ``--sync step``: DDP all-reduces gradients every step with torch's own comm hook: ``default_hooks.allreduce_hook``,
  or with ``--compress`` (:func:`parse_compress`, :func:`step_hook`) ``fp16_compress_hook`` / ``bf16_compress_hook``
  (half the bytes) or PowerSGD (Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
  Distributed Optimization", NeurIPS 2019) through ``powerSGD_hook.PowerSGDState`` + ``powerSGD_hook``, optionally
  inside ``default_hooks.fp16_compress_wrapper`` (``+fp16``, torch's documented composition). The hook is
  handed a :class:`CountingGroup`, so every collective it issues is counted, PowerSGD's P and Q all-reduces included
  (they run later, inside future callbacks, on the group the hook was given).
* ``--sync local:H``: local SGD (Stich, ICLR 2019; Lin et al., "Don't use large mini-batches, use local SGD",
  ICLR 2020): DDP's gradient sync is switched off with torch's ``post_localSGD_hook`` and
  :class:`LocalSGDAverager` (a torch ``ModelAverager``, driven by torch's ``PostLocalSGDOptimizer``) all-reduces the
  model every H optimizer steps. With ``outer_lr`` it is DiLoCo (Douillard et al., arXiv 2311.08105): the averaged
  pseudo-gradient ``anchor - mean_i(theta_i)`` is applied to the last synchronised model by SGD with Nesterov momentum.
* :class:`ShardSampler`: a ``DistributedSampler`` that can skip the padding (every sample exactly once per epoch, uneven
  shards handled by ``Join``) and whose epoch is offset so each outer epoch gets a fresh shuffle.

Traffic: :class:`CommCounter` counts each all-reduce and the bytes of the tensor it reduces (``tensor_bytes``: exact,
what the compression ratio is measured on) and estimates what crosses one rank's links: a ring all-reduce of S bytes
over N ranks sends and receives ``2 (N - 1) / N * S`` bytes per rank (reduce-scatter plus all-gather; NCCL's
bus-bandwidth definition), whatever algorithm the backend actually picks.
"""

# No ``from __future__ import annotations`` here: DDP checks a comm hook's ``bucket`` annotation at runtime.
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager
from torch.utils.data.distributed import DistributedSampler

from fedopt.errors import ConfigError
from fedopt.params import ParamSpec

__all__ = ["parse_sync", "Compress", "parse_compress", "ring_bytes", "CommCounter", "CountingGroup", "step_hook",
           "LocalSGDAverager", "ShardSampler", "steps_per_rank"]


def parse_sync(text: str) -> int | None:
    """``"step"`` -> None (DDP every step); ``"local:H"`` -> H (average every H steps, H >= 1)."""
    if text == "step":
        return None
    kind, sep, h = str(text).partition(":")
    if kind == "local" and sep:
        try:
            period = int(h)
        except ValueError:
            period = 0
        if period >= 1:
            return period
    raise ConfigError(f"sync must be 'step' or 'local:H' with an integer H >= 1, not {text!r}")


class Compress(NamedTuple):
    """A parsed datacenter ``--compress``: ``kind`` fp16 | bf16 | powersgd; ``rank`` and ``warmup`` (plain steps
    before compression, None for the default) for PowerSGD, else 0 and None; ``half`` True when PowerSGD runs inside
    torch's ``fp16_compress_wrapper`` (``+fp16``)."""

    kind: str
    rank: int = 0
    warmup: int | None = None
    half: bool = False


def parse_compress(text: str | None) -> Compress | None:
    """``--compress`` of datacenter mode: None (off) | ``fp16`` | ``bf16`` | ``powersgd:RANK[:WARMUP][+fp16]`` (RANK >= 1;
    WARMUP >= 2 plain steps, None for the default; ``+fp16`` casts the bucket to fp16 around PowerSGD, so warm-up
    steps, biases and the P/Q factors all travel in half precision). ConfigError naming the flag otherwise."""
    if text is None:
        return None
    body, plus, wrap = str(text).partition("+")
    kind, *args = body.split(":")
    if kind in ("fp16", "bf16") and not args and not plus:
        return Compress(kind)
    if kind == "powersgd" and 1 <= len(args) <= 2 and all(a.isdigit() for a in args) and int(args[0]) >= 1 \
            and (len(args) == 1 or int(args[1]) >= 2) and (not plus or wrap == "fp16"):
        return Compress(kind, int(args[0]), int(args[1]) if len(args) == 2 else None, bool(plus))
    raise ConfigError(f"--compress must be fp16, bf16 or powersgd:RANK[:WARMUP][+fp16] (RANK >= 1, WARMUP >= 2 "
                      f"steps), not {text!r}")


def ring_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of an ``nbytes`` buffer over ``world`` ranks."""
    return 0 if world <= 1 else int(2 * (world - 1) * nbytes // world)


@dataclass
class CommCounter:
    """Per-rank tally of synchronisation collectives: ``calls`` all-reduces, ``tensor_bytes`` the bytes of the
    tensors they reduced, and the estimated link traffic ``bytes_sent/received``."""

    world: int
    calls: int = 0
    tensor_bytes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def allreduce(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        b = ring_bytes(nbytes, self.world)
        self.calls += 1
        self.tensor_bytes += nbytes
        self.bytes_sent += b
        self.bytes_received += b

    def broadcast_shards(self, nbytes: int, times: int = 1) -> None:
        """ZeRO's parameter sync after each step: each rank's shard goes to every other rank, so about (N-1)/N of
        the model each way per step (``times`` steps)."""
        b = 0 if self.world <= 1 else int(times * (self.world - 1) * nbytes // self.world)
        self.bytes_sent += b
        self.bytes_received += b

    def reset(self) -> None:
        self.calls = self.tensor_bytes = self.bytes_sent = self.bytes_received = 0


class CountingGroup:
    """A process group that counts: ``allreduce`` tallies every tensor in ``counter`` and then runs on the real
    ``group``; everything else is the real group's. ``dist.all_reduce(t, group=g)`` ends in ``g.allreduce([t],
    opts)``, so a comm hook given this group is counted in full, including collectives it issues later from future
    callbacks, without fedopt reimplementing any collective."""

    def __init__(self, group: dist.ProcessGroup, counter: CommCounter) -> None:
        self.group, self.counter = group, counter

    def allreduce(self, tensors, *args, **kwargs):
        for t in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
            self.counter.allreduce(t)
        return self.group.allreduce(tensors, *args, **kwargs)

    def __getattr__(self, name):  # size(), rank(), ...: the real group's
        return getattr(self.group, name)


def step_hook(compress: Compress | None, group: CountingGroup, steps: int):
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook`` under ``--sync step``: torch's own hooks,
    each handed the counting ``group``.

    PowerSGD (``powerSGD_hook.PowerSGDState`` + ``powerSGD_hook``) runs plain all-reduce for its first WARMUP steps
    (default: 10% of the ``steps`` this process will take, torch's advice, at least the 2 torch requires with error
    feedback or warm start: the first steps are the sensitive ones, and DDP rebuilds its buckets after step 1), keeps
    error feedback and warm start on (torch's defaults), and compresses a matrix only where
    ``(rows + cols) * rank * 2 < rows * cols``; vectors (biases) travel uncompressed, in one all-reduce per bucket.
    What a compressed step sends is therefore, per bucket, ``sum (rows + cols) * rank`` over the compressed matrices
    plus every uncompressed element: for the digits MLP (64-64-10) at rank 2, 256 + 148 factor elements and 74 bias
    elements against 4,810 dense, 10.06x, which caps a whole run (warm-up included) below 10x. ``half``
    (``+fp16``) wraps the hook in torch's ``fp16_compress_wrapper``: the bucket is cast to fp16 before PowerSGD sees
    it, so the warm-up all-reduces, the biases and P and Q all travel in half precision (half of every byte above),
    and the error-feedback memory is kept in fp16 too."""
    if compress is None:
        return group, default_hooks.allreduce_hook
    if compress.kind == "fp16":
        return group, default_hooks.fp16_compress_hook
    if compress.kind == "bf16":
        return group, default_hooks.bf16_compress_hook
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    warmup = max(2, steps // 10) if compress.warmup is None else compress.warmup
    state = psgd.PowerSGDState(process_group=group, matrix_approximation_rank=compress.rank,
                               start_powerSGD_iter=warmup, random_seed=0)
    return state, default_hooks.fp16_compress_wrapper(psgd.powerSGD_hook) if compress.half else psgd.powerSGD_hook


class LocalSGDAverager(ModelAverager):
    """Averages a module's whole flat vector (parameters and float buffers) every ``period`` optimizer steps.

    Used through torch's ``PostLocalSGDOptimizer``, which calls :meth:`average_parameters` after every inner step; the
    ``params`` it passes are ignored because the module's :class:`ParamSpec` (parameters *and* buffers such as BatchNorm
    statistics) is what is averaged, in one ``dist.all_reduce`` of one contiguous vector.

    ``outer_lr`` None: plain local SGD (the average replaces every replica). Otherwise DiLoCo's outer step: with
    ``anchor`` the model after the previous synchronisation, the pseudo-gradient ``anchor - average`` is fed to
    ``torch.optim.SGD(lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)`` on ``anchor``, and the
    result becomes every replica's parameters (buffers take the plain average). outer_lr=1, momentum=0 is plain
    local SGD.

    :meth:`flush` synchronises now if any local step is pending (called at the end of every epoch, so the model that is
    evaluated and checkpointed is the consensus). Every rank must call it the same number of times.
    """

    def __init__(self, module: torch.nn.Module, spec: ParamSpec, period: int, counter: CommCounter,
                 outer_lr: float | None = None, outer_momentum: float = 0.0, process_group=None) -> None:
        super().__init__(process_group)
        if period < 1:
            raise ConfigError(f"local SGD period must be >= 1, not {period}")
        self.module, self.spec, self.period, self.counter = module, spec, period, counter
        self.world = dist.get_world_size(self.process_group)
        self.pending = 0  # inner steps since the last synchronisation
        device = next(iter(module.state_dict().values())).device
        self._vec = torch.empty(spec.size, dtype=spec.torch_dtype, device=device)
        self.outer: torch.optim.SGD | None = None
        if outer_lr is not None:
            if not outer_lr > 0 or not 0 <= outer_momentum < 1:
                raise ConfigError(f"outer-lr must be > 0 and outer-momentum in [0, 1), not {outer_lr}, {outer_momentum}")
            # The anchor starts as the (identical on every rank) current model.
            self.anchor = spec.flatten(module).to(device)
            names = {n for n, _ in module.named_parameters()}
            mask = torch.zeros(spec.size, dtype=torch.bool, device=device)
            for e in spec.entries:
                if e.name in names:
                    mask[e.offset : e.offset + e.numel] = True
            self._param_mask = mask
            self.outer = torch.optim.SGD([self.anchor], lr=outer_lr, momentum=outer_momentum,
                                         nesterov=outer_momentum > 0)

    def average_parameters(self, params) -> None:  # noqa: ARG002 - see class docstring
        self.step += 1
        self.pending += 1
        if self.pending >= self.period:
            self._synchronise()

    def flush(self) -> bool:
        """Synchronise now if there are pending local steps; returns whether it did."""
        if self.pending == 0:
            return False
        self._synchronise()
        return True

    @torch.no_grad()
    def _synchronise(self) -> None:
        vec = self.spec.flatten(self.module, out=self._vec)
        vec.div_(self.world)  # divide first: the sum of N pre-scaled vectors is the mean, no overflow for fp16
        dist.all_reduce(vec, group=self.process_group)
        self.counter.allreduce(vec)
        if self.outer is not None:
            self.anchor.grad = torch.where(self._param_mask, self.anchor - vec, torch.zeros_like(vec))
            self.outer.step()
            self.anchor.grad = None
            # buffers are statistics, not optimised: they take the plain average
            self.anchor.copy_(torch.where(self._param_mask, self.anchor, vec))
            vec = self.anchor
        self.spec.load_into(self.module, vec)
        self.pending = 0

    # ---- checkpoint state ----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.outer is None:
            return {}
        out = {"anchor": self.anchor.detach().clone()}
        buf = self.outer.state.get(self.anchor, {}).get("momentum_buffer")
        if buf is not None:
            out["momentum"] = buf.detach().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.outer is None:
            return
        if "anchor" in tensors:
            self.anchor.copy_(tensors["anchor"])
        if "momentum" in tensors:
            self.outer.state[self.anchor]["momentum_buffer"] = tensors["momentum"].to(self.anchor).clone()


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` over ``range(n)``; ``exact=True`` drops the padding so each sample is seen once per epoch
    (ranks then differ by at most one sample, and the training loop runs under ``Join``). ``epoch_offset`` is added to
    the epoch the training loop sets, so calling the loop once per outer epoch still reshuffles every epoch.

    With ``shuffle`` the permutation depends only on ``(seed, epoch, n)``, not on the world size: rank r takes
    positions r, r+N, r+2N, ..., so step k of N workers with batch b covers the same samples as step k of one worker
    with batch N*b.
    """

    def __init__(self, n: int, num_replicas: int, rank: int, seed: int, exact: bool) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.exact = exact
        self.epoch_offset = 0
        # DistributedSampler.__iter__ checks its own num_samples, so the exact length is kept apart
        self.length = len(range(rank, n, num_replicas)) if exact else self.num_samples

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.epoch_offset + epoch)

    def __iter__(self):
        it = super().__iter__()
        if not self.exact:
            return it
        # positions >= n are DistributedSampler's padding; rank r's first num_samples positions are all < n
        return iter(list(it)[: self.length])

    def __len__(self) -> int:
        return self.length


def steps_per_rank(n: int, world: int, batch_size: int, exact: bool, max_steps: int | None) -> list[int]:
    """Optimizer steps each rank takes in one epoch (the same on every rank unless ``exact`` shards are uneven)."""
    per = [len(range(r, n, world)) if exact else math.ceil(n / world) for r in range(world)]
    steps = [math.ceil(k / batch_size) for k in per]
    return [min(s, max_steps) if max_steps is not None else s for s in steps]
