"""Lazy client shards: a virtual client's data is loaded when it trains, not when the simulation starts.

``ShardSource(task, clients, seed, partition, device)`` behaves like a read-only list of :class:`ClientData`
(``source[i]``, ``len(source)``) but materialises a shard only on demand, keeping recently used shards in a small
cache bounded in bytes. For an :class:`~fedopt.data.ArrayTask` a shard is an index view into the one shared array
(the partition is computed once), so memory grows with the data and the cache, not with the number of clients.
The sample counts the round planner needs come from ``task.shard_sizes`` when the task has it; otherwise each shard is
loaded once at start-up to count it and then dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import torch

from fedopt.local_sgd import is_tensors
from fedopt.task import ClientData, Task

__all__ = ["ShardSource"]


def _nbytes(data: ClientData) -> int:
    """Tensor bytes a cached shard holds (a Dataset shard is a Subset: a list of indices, counted as nothing)."""
    parts = [split for split in (data.train, data.test) if split is not None and is_tensors(split)]
    return sum(t.numel() * t.element_size() for split in parts for t in split)


class ShardSource:
    """``source[i]`` is client ``i``'s :class:`ClientData` on ``device``; ``sizes`` maps ``str(i)`` to its train size."""

    def __init__(self, task: Task, clients: int, seed: int, partition: Any, device: torch.device | str = "cpu",
                 cache_bytes: int = 64 << 20) -> None:
        self.task = task
        self.clients = clients
        self.seed = seed
        self.partition = partition
        self.device = torch.device(device)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, ClientData] = OrderedDict()
        self._cached_bytes = 0
        counts = task.shard_sizes(clients, seed, partition) if hasattr(task, "shard_sizes") else None
        if counts is None:
            counts = [self._load(i).num_samples for i in range(clients)]
        self.sizes = {str(i): int(n) for i, n in enumerate(counts)}

    def __len__(self) -> int:
        return self.clients

    def __getitem__(self, i: int) -> ClientData:
        i = int(i)
        if not 0 <= i < self.clients:
            raise IndexError(f"client {i} is out of range for {self.clients} clients")
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        data = self._load(i)
        size = _nbytes(data)
        if size <= self.cache_bytes:
            self._cache[i] = data
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= _nbytes(old)
        return data

    def _load(self, i: int) -> ClientData:
        return self.task.load_data(i, self.clients, self.seed, self.partition).to(self.device)

    def local_tests(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Each client's local test split in turn (for tasks without a shared test set)."""
        for i in range(self.clients):
            test = self[i].test
            if test is not None:
                yield test
