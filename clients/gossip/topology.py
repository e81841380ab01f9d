"""Fixed topologies and mixing weights for synchronous decentralized SGD (D-PSGD). Pure functions, no I/O.

D-PSGD (Lian et al., NeurIPS 2017, arXiv 1705.09056): every round each node takes local SGD steps, then replaces its
model by ``x_i <- sum_j W_ij x_j`` over its graph neighbours ``j`` (and itself), with ``W`` symmetric and doubly
stochastic. We use Metropolis-Hastings weights (Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004)::

    W_ij = 1 / (1 + max(d_i, d_j))   for each edge (i, j)
    W_ii = 1 - sum_{j != i} W_ij

which need only the degrees of the two ends, so each node computes its own row locally. Topologies:

* ``ring``         i talks to i-1 and i+1 (mod n): degree 2, slow mixing (spectral gap O(1/n^2));
* ``exponential``  i talks to i +- 2^k (mod n) for 2^k < n: degree O(log n), spectral gap O(1/log n)
                   (the static exponential graph of Ying et al., NeurIPS 2021);
* ``complete``     everyone talks to everyone: one round is exact averaging.

When a neighbour is missing from a round (crashed, late), :func:`mix_row` gives its weight to the node itself, so the
row still sums to one and the round never waits forever.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["TOPOLOGIES", "neighbours", "mh_weights", "mixing_matrix", "mix_row", "second_eigenvalue"]

TOPOLOGIES = ("ring", "exponential", "complete")


def neighbours(rank: int, n: int, kind: str) -> list[int]:
    """The sorted neighbours of ``rank`` (itself excluded) in an ``n``-node graph of the given kind."""
    if kind not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, not {kind!r}")
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is out of range for {n} nodes")
    if kind == "complete":
        out = set(range(n))
    elif kind == "ring":
        out = {(rank - 1) % n, (rank + 1) % n}
    else:
        out, step = set(), 1
        while step < n:
            out |= {(rank + step) % n, (rank - step) % n}
            step *= 2
    out.discard(rank)
    return sorted(out)


def mh_weights(rank: int, n: int, kind: str) -> dict[int, float]:
    """Row ``rank`` of the Metropolis-Hastings mixing matrix as ``{node: weight}`` (itself included)."""
    d_i = len(neighbours(rank, n, kind))
    row = {j: 1.0 / (1 + max(d_i, len(neighbours(j, n, kind)))) for j in neighbours(rank, n, kind)}
    row[rank] = 1.0 - sum(row.values())
    return row


def mixing_matrix(n: int, kind: str) -> torch.Tensor:
    """The full ``n x n`` matrix (float64), for tests and benchmarks."""
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j, v in mh_weights(i, n, kind).items():
            w[i, j] = v
    return w


def mix_row(rank: int, own: torch.Tensor, received: Mapping[int, torch.Tensor], row: Mapping[int, float]) -> torch.Tensor:
    """``sum_j W_ij x_j`` over the neighbours that delivered, their missing weight given to ``rank`` itself.

    Summed in rank order, so every run with the same inputs gives bit-identical results.
    """
    self_w = row[rank] + sum(w for j, w in row.items() if j != rank and j not in received)
    out = own.to(torch.float64) * self_w
    for j in sorted(received):
        if j in row and j != rank:
            out += received[j].to(torch.float64) * row[j]
    return out.to(own.dtype)


def second_eigenvalue(w: torch.Tensor) -> float:
    """The second-largest eigenvalue modulus of a symmetric mixing matrix (its mixing rate per round)."""
    ev = torch.linalg.eigvalsh(w.to(torch.float64)).abs().sort(descending=True).values
    return float(ev[1]) if ev.numel() > 1 else 0.0
