"""ArrayTask: a full Task from in-memory arrays, with partitioning, caching and a shared test set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..task import Batch, BaseTask, ClientData
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

    def _data(self, seed: int) -> tuple[torch.Tensor, ...]:
        key = self.data_seed(seed)
        if key not in self._arrays:
            self._arrays[key] = tuple(self.arrays(key))
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
        if key not in self._parts:
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
            self._parts[key] = (train, test)
        return self._parts[key]

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
