"""Partitioners: how a data set is split into client shards.

* ``iid`` — a seeded random permutation cut into near-equal parts.
* ``dirichlet`` — label skew: for each class, client proportions drawn from Dirichlet(alpha) (Hsu et al., 2019,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"); small alpha means
  each client sees few classes. Shard sizes vary as they do in the wild.
* ``natural`` — the data set's own users (one user = one client), for data sets that have users (``synthetic``).

Every client gets at least one sample; a partition that cannot be made (more clients than samples) is a
:class:`DataError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["PartitionSpec", "iid_partition", "dirichlet_partition", "partition_indices", "partition_stats"]

KINDS = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class PartitionSpec:
    kind: str = "iid"  # one of KINDS
    alpha: float = 0.5  # Dirichlet concentration (only for kind="dirichlet")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"partition must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, not {self.alpha}")


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"number of clients must be >= 1, not {num_clients}")
    if num_clients > n:
        raise DataError(f"cannot partition {n} samples among {num_clients} clients: every client needs one sample")


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    _check(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed shards. Empty shards (likely when clients outnumber samples per class) are repaired by moving
    one sample from the largest shard, so every client has at least one sample and the skew is otherwise kept."""
    labels = np.asarray(labels)
    _check(labels.shape[0], num_clients)
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props)[:-1] * idx.size).astype(int)
        for shard, part in zip(shards, np.split(idx, cuts)):
            shard.extend(part.tolist())
    sizes = np.array([len(s) for s in shards])
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        shards[empty].append(shards[donor].pop(int(rng.integers(len(shards[donor])))))
        sizes[donor] -= 1
        sizes[empty] += 1
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def partition_indices(spec: PartitionSpec, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    if spec.kind == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if spec.kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, spec.alpha, seed)
    raise DataError("the 'natural' partition needs a data set with its own users (e.g. the synthetic task)")


def partition_stats(task, num_clients: int, seed: int, spec: PartitionSpec) -> dict | None:
    """What each client holds: ``{"partition", "alpha", "clients", "sizes", "classes", "label_counts"}``.

    Label counts need the task's ``shard_labels`` (ArrayTask and DatasetTask have it); sizes need ``shard_sizes``.
    None when the task offers neither (its shards are only known by loading them)."""
    sizes = task.shard_sizes(num_clients, seed, spec) if hasattr(task, "shard_sizes") else None
    if sizes is None:
        return None
    out = {"partition": spec.kind, "alpha": spec.alpha if spec.kind == "dirichlet" else None,
           "clients": num_clients, "sizes": [int(n) for n in sizes]}
    if hasattr(task, "shard_labels"):
        labels = task.shard_labels(num_clients, seed, spec)
        classes = int(max((int(y.max()) for y in labels if len(y)), default=-1)) + 1
        out["classes"] = classes
        out["label_counts"] = [np.bincount(np.asarray(y, dtype=np.int64), minlength=classes).tolist()
                               for y in labels]
    return out
