"""The Task API: what a user writes once and every mode runs unchanged.

A task gives fedopt four things:

``build_model()``
    a fresh ``nn.Module`` (the same architecture on every client).
``load_data(shard, num_shards, seed, partition=None)``
    the :class:`ClientData` of one client: its private train split and, when the task has one, a local test split.
``train(model, data, config)``
    local training on ``data.train``; returns a metrics dict. Most tasks do not write it: they give
    ``loss(model, batch)`` and inherit :func:`sgd_loop`, fedopt's standard local-SGD loop, which is where the FedProx
    proximal term, the straggler step budget and step counting hook in, and what the vmap backend vectorises.
``evaluate(model, data)``
    ``{"accuracy": …, "loss": …}`` on a split.

plus optionally ``load_test(seed)``: the shared test set the coordinator evaluates the global model on.

Data are tuples of aligned tensors (``(x, y)``) held in memory: batching is indexing, with no DataLoader per client,
which is what lets one process host thousands of virtual clients. :class:`ArrayTask` turns four arrays into a full task
with IID and Dirichlet partitioning for free
(:class:`fedopt.data.ArrayTask`).

A task is named on the command line by a built-in name (``digits``, ``synthetic``, ``synthetic-iid``), as
``package.module:attr`` (importable, or a module in the current folder) or as ``path/to/file.py:attr``, where ``attr``
is a Task instance, a Task class or a zero-argument factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TaskError

__all__ = [
    "Batch",
    "ClientData",
    "TrainConfig",
    "Task",
    "BaseTask",
    "sgd_loop",
    "LocalSGD",
    "evaluate_classifier",
    "register_task",
    "builtin_tasks",
    "resolve_task",
]

Batch = tuple[torch.Tensor, ...]


@dataclass
class ClientData:
    """One client's private data: aligned tensors, already on the device they train on."""

    train: Batch  # e.g. (x, y); every tensor has the same first dimension
    test: Batch | None = None  # the client's local test split, when the task has one

    @property
    def num_samples(self) -> int:
        return int(self.train[0].shape[0])

    def to(self, device: torch.device | str) -> "ClientData":
        mv = lambda b: None if b is None else tuple(t.to(device) for t in b)  # noqa: E731
        return ClientData(mv(self.train), mv(self.test))


@dataclass
class TrainConfig:
    """What one call of local training is asked to do. Built by the engine; read by ``Task.train``."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0  # FedProx proximal coefficient; 0 = plain local SGD
    max_steps: int | None = None  # a straggler's budget: stop after this many steps (partial work)
    seed: int = 0  # seeds the shuffling of this call, so runs are reproducible
    sampler: Any = None  # optional torch Sampler (e.g. DistributedSampler); replaces the seeded shuffle
    extra: dict = field(default_factory=dict)  # task-specific options passed through untouched
    # optional optimizer factory ``(params, config) -> Optimizer`` used by sgd_loop instead of a fresh SGD; lets a
    # runtime keep optimizer state across calls or wrap it (ZeroRedundancyOptimizer, PostLocalSGDOptimizer)
    make_optimizer: Callable[[list, "TrainConfig"], Any] | None = None

    def steps_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.batch_size)


@runtime_checkable
class Task(Protocol):
    """The contract every mode relies on. Subclass :class:`BaseTask` or ``fedopt.data.ArrayTask`` to inherit defaults."""

    name: str

    def build_model(self) -> nn.Module: ...

    def load_data(self, shard: int, num_shards: int, seed: int, partition: Any = None) -> ClientData: ...

    def train(self, model: nn.Module, data: ClientData, config: TrainConfig) -> dict: ...

    def evaluate(self, model: nn.Module, data: Batch) -> dict: ...


class BaseTask:
    """Defaults for a task that gives ``build_model``, ``load_data`` and ``loss``.

    ``train`` is fedopt's standard loop and ``evaluate`` reports accuracy and mean loss for a classifier
    (``loss`` defaults to cross-entropy on ``(x, y)``).
    """

    name = "task"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def train(self, model: nn.Module, data: ClientData, config: TrainConfig) -> dict:
        return sgd_loop(self.loss, model, data.train, config)

    def evaluate(self, model: nn.Module, data: Batch) -> dict:
        return evaluate_classifier(model, data)

    def load_test(self, seed: int) -> Batch | None:
        """The shared test set the coordinator evaluates on; ``None`` when the task has none."""
        return None


def sgd_loop(
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    model: nn.Module,
    train: Batch,
    config: TrainConfig,
) -> dict:
    """fedopt's standard local-SGD loop. Returns ``{"loss", "steps", "samples", "partial"}``.

    * Shuffles with a generator seeded by ``config.seed`` (or iterates ``config.sampler``), so a run is reproducible.
    * FedProx (Li et al., MLSys 2020): with ``config.mu > 0`` the loss gains ``mu/2 * ||w - w_global||^2``, where
      ``w_global`` is the model as it was when this call started (the global model the engine loaded).
    * ``config.make_optimizer``, when given, supplies the optimizer (default: a fresh :class:`LocalSGD` per call, the
      same update as ``torch.optim.SGD``).
    * ``config.max_steps`` cuts the work short (a straggler); ``partial`` reports whether it did.
    * The loss is accumulated on-device and read once at the end, so there is no host sync per step.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if config.make_optimizer is not None:
        opt = config.make_optimizer(params, config)
    else:
        opt = LocalSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    anchor = [p.detach().clone() for p in params] if config.mu > 0 else None
    n = int(train[0].shape[0])
    device = train[0].device
    gen = torch.Generator(device="cpu").manual_seed(int(config.seed) & 0x7FFF_FFFF_FFFF_FFFF)
    total = torch.zeros((), device=device)
    steps, samples = 0, 0
    budget = config.max_steps if config.max_steps is not None else math.inf
    bs = config.batch_size
    for epoch in range(config.epochs):
        if steps >= budget:
            break
        if config.sampler is not None:
            if hasattr(config.sampler, "set_epoch"):
                config.sampler.set_epoch(epoch)
            order = torch.as_tensor(list(iter(config.sampler)), dtype=torch.long)
        else:
            order = torch.randperm(n, generator=gen)
        if order.device != device:
            order = order.to(device)
        for start in range(0, order.numel(), bs):
            if steps >= budget:
                break
            idx = order[start : start + bs]
            batch = tuple(t[idx] for t in train)
            loss = loss_fn(model, batch)
            total += loss.detach()
            if anchor is not None:
                prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
                loss = loss + 0.5 * config.mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            samples += idx.numel()
    full = config.epochs * math.ceil((order.numel() if config.epochs else n) / bs)
    return {
        "loss": float(total) / max(steps, 1),
        "steps": steps,
        "samples": samples,
        "partial": steps < full,
    }


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


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: Batch, batch_size: int = 4096) -> dict:
    """Accuracy and mean cross-entropy of a classifier on ``(x, y)``."""
    was_training = model.training
    model.eval()
    x, y = data[0], data[1]
    correct, loss_sum = 0, 0.0
    for s in range(0, x.shape[0], batch_size):
        logits = model(x[s : s + batch_size])
        loss_sum += float(F.cross_entropy(logits, y[s : s + batch_size], reduction="sum"))
        correct += int((logits.argmax(dim=1) == y[s : s + batch_size]).sum())
    model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


# ---- the registry -------------------------------------------------------------------------------------------------
_BUILTINS: dict[str, Callable[..., Any]] = {}


def register_task(name: str, factory: Callable[..., Any]) -> None:
    """Make ``factory(**options)`` available as the built-in task ``name``."""
    _BUILTINS[name] = factory


def builtin_tasks() -> list[str]:
    _load_builtins()
    return sorted(_BUILTINS)


def _load_builtins() -> None:
    # The bundled tasks register themselves on import; imported lazily so `import fedopt` stays light.
    from .data import digits, synthetic  # noqa: F401


def resolve_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """Turn a built-in name or ``package.module:attr`` into a Task instance.

    ``options`` are keyword arguments for the task's factory (e.g. ``{"alpha": 1.0}`` for ``synthetic``).
    Raises :class:`TaskError` with one line naming the problem (listing the built-ins for an unknown name).
    """
    options = dict(options or {})
    _load_builtins()
    if name in _BUILTINS:
        factory = _BUILTINS[name]
    elif ":" in name:
        mod_name, _, attr = name.rpartition(":")
        mod = _load_module(mod_name)
        try:
            factory = getattr(mod, attr)
        except AttributeError:
            raise TaskError(f"module {mod_name!r} has no attribute {attr!r}") from None
    else:
        raise TaskError(
            f"unknown task {name!r}: use a built-in ({', '.join(builtin_tasks())}) or package.module:attr"
        )
    if isinstance(factory, type) or (callable(factory) and not _looks_like_task(factory)):
        try:
            task = factory(**options)
        except TypeError as e:
            raise TaskError(f"task {name!r} rejected its options {sorted(options)}: {e}") from None
    else:
        if options:
            raise TaskError(f"task {name!r} is an instance and takes no options (got {sorted(options)})")
        task = factory
    missing = [m for m in ("build_model", "load_data", "train", "evaluate") if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task {name!r} does not implement {', '.join(missing)} (see fedopt.task.Task)")
    if not hasattr(task, "name"):
        task.name = name
    return task


def _load_module(where: str) -> Any:
    """A task's module: a file path (``./mytask.py``), or a module name looked up on the Python path and then in the
    current folder (as ``python -m`` would; the ``fedopt`` console script does not put that folder on the path).
    Raises TaskError naming the file and line when the module cannot be found or fails while it is imported."""
    import os
    import sys
    from pathlib import Path

    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise TaskError(f"task file {where} does not exist")
        name = f"fedopt_task_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses and pickling look a class's module up here
        try:
            spec.loader.exec_module(mod)
        except BaseException as e:
            sys.modules.pop(name, None)
            raise _import_failure(str(path), e) from None
        return mod
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
            raise _import_failure(where, e) from None  # the module exists; something it imports does not
    except BaseException as e:
        raise _import_failure(where, e) from None
    cwd = os.getcwd()
    missing = TaskError(f"cannot import task module {where!r}: not on the Python path, nor "
                        f"{where.replace('.', '/')}.py in the current folder")
    if cwd in sys.path:
        raise missing
    sys.path.append(cwd)  # after everything else: a file here never shadows an installed package
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name is not None and (where == e.name or where.startswith(e.name + ".")):
            raise missing from None
        raise _import_failure(where, e) from None
    except BaseException as e:
        raise _import_failure(where, e) from None


def _import_failure(where: str, e: BaseException) -> BaseException:
    """One line for a task module that fails while it is imported: its file, the line, the error."""
    import os
    import traceback

    if isinstance(e, KeyboardInterrupt):
        return e
    if isinstance(e, SyntaxError):
        return TaskError(f"task module {where}: {e.filename}, line {e.lineno}: SyntaxError: {e.msg}")
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "importlib" not in f.filename]
    if where.endswith(".py"):
        own = os.path.abspath(where)
    else:
        try:
            own = os.path.abspath(importlib.util.find_spec(where).origin or "")
        except Exception:
            own = ""
    frames = [f for f in frames if os.path.abspath(f.filename) == own] or frames  # the user's line, when there is one
    at = f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames else ""
    return TaskError(f"task module {where} failed to import: {at}{type(e).__name__}: {e}")


def _looks_like_task(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("build_model", "load_data", "train", "evaluate"))

