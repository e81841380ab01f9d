"""DatasetTask: a full Task from a torch ``Dataset`` (an image folder, a Hugging Face dataset in torch format).

The Dataset is read lazily through the standard loop's ``DataLoader``; a client's shard is a ``Subset`` of it (a list
of indices), so partitioning never decodes an item: it needs only the labels, which :meth:`DatasetTask.labels`
reads from a ``targets`` attribute (torchvision's convention), a ``"label"`` column (Hugging Face) or the items.

A site-local task (``fedopt client --data DIR``) is the same class built with ``data_path=DIR``: the whole Dataset is
that site's data, and ``load_data(0, 1, seed)`` returns all of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import DataError
from ..task import BaseTask, ClientData
from .partition import PartitionSpec, iid_partition, partition_indices

__all__ = ["DatasetTask", "dataset_labels"]


def dataset_labels(dataset: Any) -> np.ndarray:
    """Integer labels of every item of ``dataset``, read without decoding items where the dataset allows it."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        try:  # a Hugging Face dataset: one column read, no image decoded
            targets = dataset["label"]
        except (KeyError, TypeError, IndexError, ValueError):
            targets = None
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray([int(t) for t in targets], dtype=np.int64)


class DatasetTask(BaseTask):
    """Subclass and give ``build_model()`` and ``datasets(seed)`` → ``(train, test or None)``.

    ``load_data`` partitions ``train`` among the clients (``iid`` or ``dirichlet`` by label; ``natural`` is the
    data set's own users when ``natural_shards`` gives them) and hands each a ``Subset``; local test splits are an IID
    slice of ``test``. Partitions are computed once per (clients, seed, partition) and kept.
    """

    name = "dataset"

    def __init__(self) -> None:
        self._sets: dict[int, tuple[Dataset, Dataset | None]] = {}
        self._parts: dict[tuple, tuple[list[np.ndarray], list[np.ndarray] | None]] = {}

    def datasets(self, seed: int) -> tuple[Dataset, Dataset | None]:
        raise TypeError(f"{type(self).__name__} must implement datasets(seed)")

    def natural_shards(self, seed: int) -> list[np.ndarray] | None:
        return None

    def labels(self, dataset: Dataset) -> np.ndarray:
        return dataset_labels(dataset)

    def _data(self, seed: int) -> tuple[Dataset, Dataset | None]:
        if seed not in self._sets:
            train, test = self.datasets(seed)
            if len(train) == 0:
                raise DataError(f"task {self.name!r} has an empty training set")
            self._sets[seed] = (train, test)
        return self._sets[seed]

    def load_test(self, seed: int) -> Dataset | None:
        return self._data(seed)[1]

    def partition(self, num_shards: int, seed: int, partition: Any = None):
        spec = partition if isinstance(partition, PartitionSpec) else PartitionSpec(**(partition or {}))
        key = (num_shards, seed, spec)
        if key not in self._parts:
            train, test = self._data(seed)
            if num_shards == 1:
                shards = [np.arange(len(train), dtype=np.int64)]
            elif spec.kind == "natural":
                shards = self.natural_shards(seed)
                if shards is None or len(shards) != num_shards:
                    raise DataError(f"task {self.name!r} has no natural partition into {num_shards} users")
            else:
                shards = partition_indices(spec, self.labels(train), num_shards, seed)
            tests = None
            if test is not None and num_shards <= len(test):
                tests = iid_partition(len(test), num_shards, seed + 1)
            self._parts[key] = (shards, tests)
        return self._parts[key]

    def load_data(self, shard: int, num_shards: int, seed: int, partition: Any = None) -> ClientData:
        if not 0 <= shard < num_shards:
            raise DataError(f"shard {shard} is out of range for {num_shards} shards")
        shards, tests = self.partition(num_shards, seed, partition)
        train, test = self._data(seed)
        local = None if tests is None else Subset(test, tests[shard].tolist())
        return ClientData(Subset(train, shards[shard].tolist()), local)

    def shard_sizes(self, num_shards: int, seed: int, partition: Any = None) -> list[int]:
        return [len(p) for p in self.partition(num_shards, seed, partition)[0]]

    def shard_labels(self, num_shards: int, seed: int, partition: Any = None) -> list[np.ndarray]:
        """Each shard's labels (for the partition statistics a run writes)."""
        labels = self.labels(self._data(seed)[0])
        return [labels[p] for p in self.partition(num_shards, seed, partition)[0]]
