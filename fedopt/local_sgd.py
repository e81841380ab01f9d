"""fedopt's standard local loop: the one place a client's steps are taken, whatever the mode.

:func:`sgd_loop` trains on either kind of :class:`~fedopt.task.ClientData`:

* a tuple of aligned tensors (the fast path: batching is indexing, no DataLoader; what simulation and the vmap
  backend rely on), or
* a torch ``Dataset`` (an image folder, a Hugging Face dataset with ``with_format("torch")``, anything with
  ``__len__`` and ``__getitem__``), read through a ``DataLoader``; batches are moved to the model's device.

Training choices are fields of :class:`~fedopt.task.TrainConfig`: the optimizer (``sgd``, ``adam``, ``adamw``),
weight decay, gradient clipping by global L2 norm, FedProx's proximal term and a straggler's step budget. A learning-rate
schedule runs over *rounds*, not steps: the server computes the round's rate with :func:`scheduled_lr` and sends it
as ``TrainConfig.lr``, so a client needs no clock and every mode (in-process, worker pool, the bus) sees the same rate.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from .schedules import OPTIMIZERS, SCHEDULES, scheduled_lr

if TYPE_CHECKING:  # task.py imports this module; the names are only needed for annotations
    from .task import TrainConfig

__all__ = ["OPTIMIZERS", "SCHEDULES", "LocalSGD", "sgd_loop", "make_local_optimizer", "scheduled_lr",
           "is_tensors", "num_samples", "move_batch", "iterate_batches"]

# ---- data of either kind ------------------------------------------------------------------------------------------
def is_tensors(data: Any) -> bool:
    """True for the tensor fast path (a tuple of aligned tensors), False for a torch Dataset."""
    return isinstance(data, tuple)


def num_samples(data: Any) -> int:
    return int(data[0].shape[0]) if is_tensors(data) else len(data)


def move_batch(batch: Any, device: torch.device) -> Any:
    """A collated batch (tensor, tuple/list of tensors, or dict of them) on ``device``; other leaves untouched."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return tuple(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 0


def iterate_batches(data: Any, batch_size: int, device: torch.device, *, sampler: Any = None,
                    generator: torch.Generator | None = None, num_workers: int = 0) -> Iterator[Any]:
    """One pass over ``data``: in order (no sampler, no generator), shuffled by ``generator``, or in ``sampler``'s
    order. Tensors are indexed; a Dataset goes through a ``DataLoader`` (``num_workers`` loader processes)."""
    if is_tensors(data):
        n = int(data[0].shape[0])
        if sampler is not None:
            order = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
        elif generator is not None:
            order = torch.randperm(n, generator=generator)
        else:
            order = None
        if order is not None and order.device != data[0].device:
            order = order.to(data[0].device)
        total = n if order is None else order.numel()
        for start in range(0, total, batch_size):
            if order is None:
                yield tuple(t[start : start + batch_size] for t in data)
            else:
                idx = order[start : start + batch_size]
                yield tuple(t[idx] for t in data)
        return
    from torch.utils.data import DataLoader

    if sampler is None and generator is not None:
        # the same permutation the tensor path draws, so a Dataset of the same tensors trains identically
        sampler = torch.randperm(len(data), generator=generator).tolist()
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for batch in loader:
        yield move_batch(batch, device)


# ---- optimizers -------------------------------------------------------------------------------------------------------
class LocalSGD:
    """Plain SGD with momentum and weight decay — the update of ``torch.optim.SGD`` (no dampening, no Nesterov) — as
    a few foreach ops.

    Why not ``torch.optim.SGD``: constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (over a second
    of start-up on a small machine), and its ``step`` wrapper costs tens of microseconds, which matters when a virtual
    client does a single step. Same arithmetic: ``d = g + wd * p``; ``b = d`` on the first step, else
    ``b = momentum * b + d``; ``p -= lr * b``.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params, self.lr, self.momentum, self.weight_decay = list(params), lr, momentum, weight_decay
        self._bufs: list[torch.Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [p for p in self.params if p.grad is not None]
        if not live:
            return
        grads = [p.grad for p in live]
        if self.weight_decay:
            grads = torch._foreach_add(grads, live, alpha=self.weight_decay)
        if self.momentum:
            if self._bufs is None:
                self._bufs = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self._bufs, self.momentum)
                torch._foreach_add_(self._bufs, grads)
            grads = self._bufs
        torch._foreach_add_(live, grads, alpha=-self.lr)


def make_local_optimizer(params: list[torch.Tensor], config: "TrainConfig"):
    """A fresh optimizer for one call of local training (client optimizer state starts anew each round, as in
    FedAvg; Reddi et al., ICLR 2021, use the same convention for adaptive client optimizers)."""
    name = getattr(config, "optimizer", "sgd")
    if name == "sgd":
        return LocalSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")


# ---- the loop ---------------------------------------------------------------------------------------------------------
def sgd_loop(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    model: nn.Module,
    train: Any,
    config: "TrainConfig",
) -> dict:
    """fedopt's standard local loop. Returns ``{"loss", "steps", "samples", "partial"}``.

    * ``train`` is a tuple of tensors or a torch Dataset (see the module docstring).
    * Shuffles with a generator seeded by ``config.seed`` (or iterates ``config.sampler``), so a run is reproducible.
    * FedProx (Li et al., MLSys 2020): with ``config.mu > 0`` the loss gains ``mu/2 * ||w - w_global||^2``, where
      ``w_global`` is the model as it was when this call started (the global model the engine loaded).
    * ``config.make_optimizer``, when given, supplies the optimizer; otherwise ``config.optimizer`` names a fresh one
      (:func:`make_local_optimizer`; ``sgd`` is :class:`LocalSGD`, the update of ``torch.optim.SGD``).
    * ``config.clip_norm`` clips the gradient's global L2 norm before each step.
    * ``config.max_steps`` cuts the work short (a straggler); ``partial`` reports whether it did.
    * The loss is accumulated on-device and read once at the end, so there is no host sync per step.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (config.make_optimizer or make_local_optimizer)(params, config)
    anchor = [p.detach().clone() for p in params] if config.mu > 0 else None
    n = num_samples(train)
    device = train[0].device if is_tensors(train) else _device_of(model)
    gen = torch.Generator(device="cpu").manual_seed(int(config.seed) & 0x7FFF_FFFF_FFFF_FFFF)
    total = torch.zeros((), device=device)
    steps, samples = 0, 0
    budget = config.max_steps if config.max_steps is not None else math.inf
    clip = getattr(config, "clip_norm", None)
    workers = int(config.extra.get("num_workers", 0)) if isinstance(config.extra, dict) else 0
    per_epoch = math.ceil(n / config.batch_size)
    for epoch in range(config.epochs):
        if steps >= budget:
            break
        if config.sampler is not None:
            if hasattr(config.sampler, "set_epoch"):
                config.sampler.set_epoch(epoch)
            per_epoch = math.ceil(len(config.sampler) / config.batch_size)
        for batch in iterate_batches(train, config.batch_size, device, sampler=config.sampler,
                                     generator=None if config.sampler is not None else gen, num_workers=workers):
            if steps >= budget:
                break
            loss = loss_fn(model, batch)
            total += loss.detach()
            if anchor is not None:
                prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
                loss = loss + 0.5 * config.mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            steps += 1
            samples += _batch_len(batch)
    full = config.epochs * per_epoch
    return {
        "loss": float(total) / max(steps, 1),
        "steps": steps,
        "samples": samples,
        "partial": steps < full,
    }


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
