"""Neighbour graphs for SecAgg (complete) and SecAgg+ (sparse, near-regular, O(log n) degree).

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020) replace
the complete graph of Bonawitz et al. (CCS 2017) by a random k-regular graph with k = O(log n): each
client agrees keys, masks and Shamir-shares only with its k neighbours.

Construction (a Harary graph over a random relabelling): sort the clients by
SHA-256(public seed || id); client i on that ring is joined to the k/2 clients on either side. For
odd k (n even) each client is also joined to the one opposite. Every party (coordinator and
clients) derives the same graph from the same public seed and id list, so the coordinator cannot
choose anyone's neighbours once the seed is fixed. k = n - 1 gives the complete graph (plain SecAgg).

Defaults: k = 2*ceil(log2 n) rounded to an even number, capped at n - 1 (so n <= 8 gets the complete
graph), and threshold t = floor(k/2) + 1, the smallest t with 2t > k. A client's k neighbours hold its
shares; an honest neighbour releases either the b-share or the sk-share of a peer, never both, so with
2t > k the server cannot collect t shares of both kinds even by telling different neighbours
different stories. Up to k - t = ceil(k/2) - 1 of a client's neighbours may drop.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from fedopt.errors import SecAggError

__all__ = ["default_neighbours", "default_threshold", "neighbour_graph"]


def default_neighbours(n: int) -> int:
    """Default degree k for n clients: even 2*ceil(log2 n), at most n - 1 (complete graph)."""
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
    k = 2 * math.ceil(math.log2(n))
    return min(k, n - 1)


def default_threshold(k: int) -> int:
    """Default Shamir threshold for degree k: floor(k/2) + 1, the smallest t with 2t > k."""
    if k < 1:
        raise SecAggError(f"neighbour count k must be >= 1, got {k}")
    return k // 2 + 1


def neighbour_graph(ids: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """``{id: neighbours}`` of the k-regular Harary graph over the seed-shuffled ring of ``ids``.

    Raises SecAggError on duplicate ids, k outside [1, n-1], or odd k with odd n (no such graph).
    """
    n = len(ids)
    if len(set(ids)) != n:
        raise SecAggError("duplicate client ids in the neighbour graph")
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
    if not isinstance(k, int) or not 1 <= k <= n - 1:
        raise SecAggError(f"neighbour count k={k!r} must be in [1, {n - 1}] for {n} clients")
    if k == n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if k % 2 and n % 2:
        raise SecAggError(f"no {k}-regular graph on {n} clients (k and n both odd); use an even k")
    ring = sorted(ids, key=lambda u: (hashlib.sha256(seed + b"\0" + u.encode("utf-8")).digest(), u))
    out: dict[str, set[str]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for d in range(1, k // 2 + 1):
            out[u].add(ring[(i + d) % n])
            out[u].add(ring[(i - d) % n])
        if k % 2:
            out[u].add(ring[(i + n // 2) % n])
    return {u: frozenset(v) for u, v in out.items()}
