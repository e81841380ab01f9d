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

A client's data (:class:`ClientData`) are either tuples of aligned tensors (``(x, y)``) held in memory — batching is
indexing, with no DataLoader per client, which is what lets one process host thousands of virtual clients and what the
vmap backend needs — or a torch ``Dataset`` (an image folder, a Hugging Face dataset in torch format), which the
standard loop reads through a ``DataLoader`` (:mod:`fedopt.local_sgd`). :class:`fedopt.data.ArrayTask` turns four
arrays into a full task, :class:`fedopt.data.DatasetTask` does the same for a Dataset with labels; both partition IID
or by Dirichlet label skew for free.

Site-local data: ``fedopt client --data PATH`` (and ``--task-option data_path=PATH`` in every mode) passes
``data_path=PATH`` to the task's factory. A task that accepts ``data_path`` reads that site's own files from it;
``load_data(0, 1, seed)`` is then the whole of that site's data.

A task is named on the command line by a built-in name (``digits``, ``synthetic``, ``synthetic-iid``), as
``package.module:attr`` (importable, or a module in the current folder) or as ``path/to/file.py:attr``, where ``attr``
is a Task instance, a Task class or a zero-argument factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TaskError
from .local_sgd import LocalSGD, is_tensors, iterate_batches, num_samples, sgd_loop

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = [
    "Batch",
    "ClientData",
    "TrainConfig",
    "Task",
    "BaseTask",
    "sgd_loop",
    "LocalSGD",
    "to_device",
    "evaluate_classifier",
    "BUILTIN_TASKS",
    "register_task",
    "builtin_tasks",
    "resolve_task",
]

Batch = tuple[torch.Tensor, ...]


@dataclass
class ClientData:
    """One client's private data: aligned tensors (already on the device they train on), or a torch ``Dataset``.

    A Dataset yields items the default collate turns into a batch the task's ``loss`` understands (``(x, y)`` for the
    default loss and :func:`evaluate_classifier`); the standard loop reads it through a ``DataLoader`` and moves each
    batch to the model's device, so ``to(device)`` leaves a Dataset as it is."""

    train: "Batch | Dataset"  # e.g. (x, y), every tensor with the same first dimension; or a Dataset
    test: "Batch | Dataset | None" = None  # the client's local test split, when the task has one

    @property
    def num_samples(self) -> int:
        return num_samples(self.train)

    @property
    def tensors(self) -> bool:
        """True when train (and test) are tensors: the fast path that simulation's vmap backend needs."""
        return is_tensors(self.train)

    def to(self, device: torch.device | str) -> "ClientData":
        return ClientData(to_device(self.train, device), to_device(self.test, device))


def to_device(data: "Batch | Dataset | None", device: torch.device | str) -> "Batch | Dataset | None":
    """Tensors moved to ``device``; a Dataset (or None) as it is (its batches move when they are read)."""
    if data is None or not is_tensors(data):
        return data
    return tuple(t.to(device) for t in data)


@dataclass
class TrainConfig:
    """What one call of local training is asked to do. Built by the engine; read by ``Task.train``."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0  # L2 penalty for sgd and adam, decoupled decay for adamw
    optimizer: str = "sgd"  # sgd | adam | adamw: a fresh one per call (fedopt.local_sgd.make_local_optimizer)
    clip_norm: float | None = None  # clip the gradient's global L2 norm to this before every step
    mu: float = 0.0  # FedProx proximal coefficient; 0 = plain local SGD
    max_steps: int | None = None  # a straggler's budget: stop after this many steps (partial work)
    seed: int = 0  # seeds the shuffling of this call, so runs are reproducible
    dp_sgd_noise: float | None = None  # sample-level DP-SGD through Opacus (fedopt.dpsgd): noise multiplier; None: off
    dp_sgd_clip: float = 1.0  # DP-SGD: each example's gradient L2 bound
    sampler: Any = None  # optional torch Sampler (e.g. DistributedSampler); replaces the seeded shuffle
    extra: dict = field(default_factory=dict)  # task-specific options passed through untouched
    # optional optimizer factory ``(params, config) -> Optimizer`` used by sgd_loop instead of a fresh one; lets a
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


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: "Batch | Dataset", batch_size: int = 4096,
                        per_class: bool = False) -> dict:
    """Accuracy and mean cross-entropy of a classifier on ``(x, y)`` tensors or a Dataset of ``(x, y)`` items.

    With ``per_class`` the result also holds ``per_class``: each class's accuracy (None for a class absent here)."""
    was_training = model.training
    model.eval()
    device = data[0].device if is_tensors(data) else next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, 0
    hits = seen = None
    for x, y, *_ in iterate_batches(data, batch_size, device):
        logits = model(x)
        classes = int(logits.shape[1])
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        right = logits.argmax(dim=1) == y
        correct += int(right.sum())
        n += int(y.shape[0])
        if per_class:
            yc = y.cpu()
            if seen is None:
                seen = torch.zeros(classes, dtype=torch.long)
                hits = torch.zeros_like(seen)
            seen += torch.bincount(yc, minlength=classes)[:classes]
            hits += torch.bincount(yc[right.cpu()], minlength=classes)[:classes]
    model.train(was_training)
    n = max(n, 1)
    out = {"accuracy": correct / n, "loss": loss_sum / n}
    if per_class:
        out["per_class"] = [] if seen is None else [None if int(s) == 0 else int(h) / int(s)
                                                    for h, s in zip(hits, seen)]
    return out


# ---- the registry -------------------------------------------------------------------------------------------------
#: The bundled tasks: each name stands for the ``package.module:attr`` of its factory and is resolved like any other
#: task module, so :mod:`fedopt.data` builds on this module without this module importing it back.
BUILTIN_TASKS: dict[str, str] = {
    "digits": "fedopt.data.digits:DigitsTask",
    "synthetic": "fedopt.data.synthetic:SyntheticTask",
    "synthetic-iid": "fedopt.data.synthetic:synthetic_iid",
}
_REGISTERED: dict[str, Callable[..., Any]] = {}


def register_task(name: str, factory: Callable[..., Any]) -> None:
    """Make ``factory(**options)`` available as the task ``name`` in this process (it shadows a bundled task)."""
    _REGISTERED[name] = factory


def builtin_tasks() -> list[str]:
    return sorted({*BUILTIN_TASKS, *_REGISTERED})


def resolve_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """Turn a built-in name or ``package.module:attr`` into a Task instance.

    ``options`` are keyword arguments for the task's factory (e.g. ``{"alpha": 1.0}`` for ``synthetic``).
    Raises :class:`TaskError` with one line naming the problem (listing the built-ins for an unknown name).
    """
    options = dict(options or {})
    if name in _REGISTERED:
        factory = _REGISTERED[name]
    elif name in BUILTIN_TASKS or ":" in name:
        mod_name, _, attr = BUILTIN_TASKS.get(name, name).rpartition(":")
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

