"""ArrayTask: a full Task from in-memory arrays, with partitioning, caching and a shared test set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..task import Batch, BaseTask, ClientData
from .cache import cached_tensors
from .partition import PartitionSpec, iid_partition, partition_indices

__all__ = ["ArrayTask"]


class ArrayTask(BaseTask):
    """Subclass and give ``build_model()`` and ``arrays(seed)``; partitioning and the test set come for free.

    ``arrays(seed)`` returns ``(x_train, y_train, x_test, y_test)`` as tensors. A data set with its own users also
    overrides ``natural_shards(seed)`` returning a list of train-index arrays, one per user.
    Partitions are computed once per (clients, seed, partition) and cached, so loading 10,000 shards costs one
    partition, not 10,000.
    """

    def __init__(self) -> None:
        self._arrays: dict[int, tuple[torch.Tensor, ...]] = {}
        self._parts: dict[tuple, tuple[list[np.ndarray], list[np.ndarray] | None]] = {}

    def arrays(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must implement arrays(seed)")

    def natural_shards(self, seed: int) -> list[np.ndarray] | None:
        return None

    def cache_key(self) -> dict | None:
        """What this task's arrays depend on besides the seed (JSON-able), so they and their partitions are built
        once per machine and shared by every process (:mod:`fedopt.data.cache`); None (the default) opts out."""
        return None

    def _cache_key(self, **more) -> dict | None:
        key = self.cache_key()
        return None if key is None else {"task": f"{type(self).__module__}.{type(self).__qualname__}", **key, **more}

    def _data(self, seed: int) -> tuple[torch.Tensor, ...]:
        key = self.data_seed(seed)
        if key not in self._arrays:
            names = ("x", "y", "x_test", "y_test")
            got = cached_tensors(self._cache_key(kind="arrays", seed=key),
                                 lambda: dict(zip(names, self.arrays(key))))
            self._arrays[key] = tuple(got[n] for n in names)
        return self._arrays[key]

    def data_seed(self, seed: int) -> int:
        """The seed the data set itself is drawn with; a fixed data set ignores the run's seed."""
        return seed

    def load_test(self, seed: int) -> Batch:
        _, _, xt, yt = self._data(seed)
        return (xt, yt)

    def partition(self, num_shards: int, seed: int, partition: Any = None):
        spec = partition if isinstance(partition, PartitionSpec) else PartitionSpec(**(partition or {}))
        key = (num_shards, seed, spec)
        if key in self._parts:
            return self._parts[key]
        cache = self._cache_key(kind="partition", seed=self.data_seed(seed), run_seed=seed, clients=num_shards,
                                partition=spec.kind, alpha=spec.alpha)
        got = cached_tensors(cache, lambda: _pack(self._partition(num_shards, seed, spec)))
        self._parts[key] = _unpack(got)
        return self._parts[key]

    def _partition(self, num_shards: int, seed: int, spec: PartitionSpec):
        x, y, xt, _ = self._data(seed)
        if spec.kind == "natural":
            train = self.natural_shards(self.data_seed(seed))
            if train is None:
                raise DataError(f"task {self.name!r} has no natural users; use partition iid or dirichlet")
            if len(train) != num_shards:
                raise DataError(f"the natural partition of {self.name!r} has {len(train)} users, "
                                f"so it needs exactly {len(train)} clients, not {num_shards}")
        else:
            train = partition_indices(spec, y.numpy(), num_shards, seed)
        # Local test splits: an IID slice of the shared test set for each client, where there are enough samples.
        test = iid_partition(xt.shape[0], num_shards, seed + 1) if num_shards <= xt.shape[0] else None
        return train, test

    def load_data(self, shard: int, num_shards: int, seed: int, partition: Any = None) -> ClientData:
        if not 0 <= shard < num_shards:
            raise DataError(f"shard {shard} is out of range for {num_shards} shards")
        train_idx, test_idx = self.partition(num_shards, seed, partition)
        x, y, xt, yt = self._data(seed)
        i = torch.from_numpy(train_idx[shard])
        test = None
        if test_idx is not None:
            j = torch.from_numpy(test_idx[shard])
            test = (xt[j], yt[j])
        return ClientData((x[i], y[i]), test)

    def shard_sizes(self, num_shards: int, seed: int, partition: Any = None) -> list[int]:
        return [len(p) for p in self.partition(num_shards, seed, partition)[0]]

    def shard_labels(self, num_shards: int, seed: int, partition: Any = None) -> list[np.ndarray]:
        """Each shard's labels (for the partition statistics a run writes)."""
        y = self._data(seed)[1].numpy()
        return [y[p] for p in self.partition(num_shards, seed, partition)[0]]


def _pack(parts: tuple[list[np.ndarray], list[np.ndarray] | None]) -> dict[str, torch.Tensor]:
    """Index lists as flat tensors plus offsets (what the data cache stores)."""
    out = {}
    for name, lists in zip(("train", "test"), parts):
        if lists is None:
            continue
        out[f"{name}_idx"] = torch.from_numpy(np.concatenate(lists).astype(np.int64))
        out[f"{name}_len"] = torch.tensor([len(p) for p in lists], dtype=torch.int64)
    return out


def _unpack(packed: dict[str, torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    out = []
    for name in ("train", "test"):
        if f"{name}_idx" not in packed:
            out.append(None)
            continue
        flat, lens = packed[f"{name}_idx"].numpy(), packed[f"{name}_len"].numpy()
        out.append(np.split(flat, np.cumsum(lens)[:-1]))
    return out[0], out[1]
