"""Bucketing: a pre-aggregation step for robust rules on heterogeneous (non-IID) clients.

Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing" (ICLR 2022, arXiv
2006.09365), Algorithm 1: shuffle the round's n updates at random, average them in ``ceil(n / s)`` buckets of ``s``
(the last bucket may be smaller), and give the bucket means to the robust rule in place of the updates. A bucket
mean's spread around the honest mean is about 1/sqrt(s) of an update's, so the rule sees honest inputs that look
more alike, while each Byzantine update sits in one bucket: at most f of the buckets are corrupted, a fraction of at
most s * f / n. The paper takes s = 2 (``s <= delta_max / delta``: the rule must tolerate s times the fraction of
Byzantine clients) and pairs it with worker momentum.

``make_aggregator(NAME, bucketing=s)`` (``--aggregator-option bucketing=s``) wraps any aggregator NAME; it is useful
for the rules that keep every update (median, trimmed_mean, centered_clip, krum, multi_krum, bulyan, geomed). The
rule's own parameters are about buckets: Krum's and Bulyan's ``f`` counts Byzantine *buckets* (at most the Byzantine
clients), and their ``n >= 2f + 3`` (``4f + 3``) applies to ``ceil(n / s)`` buckets.

The shuffle is a function of (``seed``, round, the set of client ids): the same round gets the same buckets
whatever the order updates arrived in. A bucket's weight is the sum of its updates' ``num_samples`` (geomed
weights by it; the rules that ignore weights ignore it). The result counts the client updates, not the buckets.

* Secure aggregation: no (``needs_plaintext``): buckets are formed from updates in the clear.
* FedBuff: each buffer of K updates is bucketed before the rule sees it (not exercised by a test or a benchmark).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from ..errors import ConfigError
from .base import Aggregate, Aggregator, Update

__all__ = ["Bucketing", "bucket_order", "buckets"]


def bucket_order(clients: list[str], seed: int, round: int) -> list[int]:
    """Indices into ``clients`` in bucket order: sorted by id, then permuted by (seed, round, the ids)."""
    by_id = sorted(range(len(clients)), key=lambda i: clients[i])
    key = hashlib.sha256(f"{seed}/{round}/{','.join(sorted(clients))}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    return [by_id[i] for i in torch.randperm(len(clients), generator=g).tolist()]


def buckets(order: list[int], s: int) -> list[list[int]]:
    """The buckets of ``order`` (consecutive runs of ``s``; the last may be shorter) as lists of row indices."""
    return [order[i:i + s] for i in range(0, len(order), s)]


class Bucketing:
    """``inner`` applied to the means of random buckets of ``s`` updates (see the module docstring)."""

    linear = False
    needs_all_updates = True
    needs_plaintext = True

    def __init__(self, inner: Aggregator, s: int = 2, seed: int = 0) -> None:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"bucketing s (updates per bucket) must be an integer >= 1, not {s!r} "
                              f"(--aggregator-option bucketing=...)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"bucketing seed must be an integer, not {seed!r} (--aggregator-option bucket_seed=...)")
        self.inner, self.s, self.seed = inner, s, seed
        self.name = f"{inner.name}+bucketing"
        self._round, self._size = 0, 0
        self._updates: list[Update] = []

    def check_round_size(self, n: int) -> None:
        """The inner rule's check, for the ``ceil(n / s)`` buckets a round of ``n`` updates makes."""
        if hasattr(self.inner, "check_round_size"):
            self.inner.check_round_size(math.ceil(n / self.s))

    def begin(self, round: int, size: int) -> None:
        self._round, self._size, self._updates = round, size, []

    def add(self, update: Update) -> None:
        d = update.delta
        if d.dim() != 1 or d.numel() != self._size:
            raise ConfigError(f"update has {d.numel()} elements, the model has {self._size}")
        self._updates.append(dataclasses.replace(update, delta=d.detach().to(torch.float32, copy=True)))

    def result(self) -> Aggregate | None:
        """The inner rule's result over the bucket means; None when nothing was added or the inner declined."""
        if not self._updates:
            return None
        ups = self._updates
        order = bucket_order([u.client for u in ups], self.seed, self._round)
        self.inner.begin(self._round, self._size)
        for k, bucket in enumerate(buckets(order, self.s)):
            mean = torch.stack([ups[i].delta for i in bucket]).mean(dim=0)
            self.inner.add(Update(f"bucket{k}", mean, sum(ups[i].num_samples for i in bucket)))
        res = self.inner.result()
        if res is None:
            return None
        return Aggregate(res.delta, float(sum(u.num_samples for u in ups)), len(ups))
