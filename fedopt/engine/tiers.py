"""Per-round sampling of leaf clients through a tier of edge aggregators: pure functions, seeded, no sockets.

A root whose "clients" include edges (``fedopt aggregator``, each standing for the ``c`` leaf clients it announced in
READY) samples *leaf clients*, as a flat coordinator does: ``--clients-per-round K`` is K leaves, not K edges. The
root gives each candidate ``c`` slots (a plain client: one) and draws K of all the slots uniformly without
replacement, which is a multivariate hypergeometric draw of how many slots fall in each candidate
(:func:`leaf_quotas`): every leaf is in the round's cohort with probability K / N, as under flat fixed sampling. The
draw costs O(candidates), never O(leaves) (numpy's ``marginals`` method), so a root with four edges of 2,500 clients
does no per-round work in the number of leaves. An edge whose quota is 0 is not selected.

Each selected edge gets its quota ``q`` and the count ``n`` it announced in its TRAIN config (``leaf_sample``,
``leaf_of``), and asks ``q * ready / n`` of its ready clients, seeded by (run seed, round, edge id)
(:func:`edge_sample`): exactly ``q`` while it holds the clients it announced, proportionally more when a failed edge's
clients moved to it. Bounds: a quota never exceeds the announced count, the edge never asks more clients than it holds,
and the root grants an edge at most ``ceil(W * q / n)`` of weight, W its announced (capped) weight: the weight its
share of the round's leaves carries on average. An honest edge whose sample is heavier than its average is weighed
at that share (the stratified estimate of its clients' weight, exact when its clients weigh alike); a lying edge
gains nothing by claiming more.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np

__all__ = ["leaf_quotas", "edge_sample", "parse_leaf_sample"]


def leaf_quotas(seed: int, round: int, leaves: Mapping[str, int], k: int) -> dict[str, int]:
    """How many of the ``k`` leaf clients of ``round`` each candidate holds: candidate -> quota >= 1 (candidates with
    none are left out). ``leaves`` maps each candidate to its leaf count (>= 1). Seeded by (seed, round); the same
    candidates and counts give the same quotas. ``k`` above the total takes every leaf."""
    pool = sorted(leaves)
    counts = np.array([max(1, int(leaves[c])) for c in pool], dtype=np.int64)
    total = int(counts.sum())
    k = max(0, min(int(k), total))
    if k == total:
        drawn = counts
    else:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, round, 4])
        drawn = rng.multivariate_hypergeometric(counts, k, method="marginals")
    return {c: int(q) for c, q in zip(pool, drawn) if q > 0}


def edge_sample(seed: int, round: int, edge: str, pool: list[str], quota: int, announced: int) -> list[str]:
    """The clients an edge asks in ``round``: ``quota * len(pool) / announced`` of ``pool`` (rounded half up, at most
    all of them), uniformly without replacement, seeded by (seed, round, edge); sorted. ``quota >= announced`` asks
    every client."""
    pool = sorted(pool)
    if quota >= announced:
        return pool
    k = min(len(pool), (2 * quota * len(pool) + announced) // (2 * announced))
    rng = np.random.default_rng([seed & 0xFFFFFFFF, round, 5, zlib.crc32(edge.encode())])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]


def parse_leaf_sample(config: dict, most: int = 1 << 40) -> tuple[int, int] | None:
    """A TRAIN config's ``(leaf_sample, leaf_of)`` from the root, checked: ints with ``0 <= leaf_sample <= leaf_of``
    and ``1 <= leaf_of <= most``. None when the root sent neither (it asks every client); ValueError naming the fields
    when they are malformed."""
    q, n = config.get("leaf_sample"), config.get("leaf_of")
    if q is None and n is None:
        return None
    ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (q, n))
    if not (ok and 1 <= n <= most and 0 <= q <= n):
        raise ValueError(f"leaf_sample {q!r} of leaf_of {n!r}: need ints with 0 <= leaf_sample <= leaf_of <= {most}")
    return q, n
