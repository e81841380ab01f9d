"""CHOCO-Gossip: D-PSGD's mixing step with compressed messages. Pure tensor math, no I/O.

Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed
Communication", ICML 2019 (arXiv 1902.00340), Algorithm 1 (CHOCO-Gossip; with local SGD steps in between it is
CHOCO-SGD, their Algorithm 2). Every node ``i`` holds, besides its model ``x_i``, *public copies* ``x^_j`` of itself
and of each graph neighbour, all starting at zero. One round::

    q_i   = C(x_i - x^_i)                          sent to every neighbour (the only traffic: compressed)
    x^_j += D(q_j)                                 for i itself and each neighbour j whose q_j arrived
    x_i  += gamma * sum_j W_ij (x^_j - x^_i)       Metropolis-Hastings row W (clients.gossip.topology)

Because every node applies the same decoded ``D(q_j)`` to its copy of ``x^_j`` that ``j`` applies to its own, the
copies stay bit-identical, and ``x^_j`` tracks ``x_j`` ever closer (the compression error of ``x_j - x^_j`` shrinks
round by round: an error-feedback memory shared by both ends). With ``C`` exact and ``gamma = 1`` a round is exactly
D-PSGD's ``x_i <- sum_j W_ij x_j``; the paper proves linear consensus for any compressor with
``E||C(x) - x||^2 <= (1 - delta) ||x||^2`` and ``gamma`` small enough (of order ``delta``): top-k at 1% needs a small
``gamma``, 8- or 4-bit quantisation tolerates one near 1.

A copy is only good while no increment is lost. A neighbour whose ``q_j`` misses a round (the deadline passed) or
fails its check can never be followed again: its copy is dropped, and from then on its weight goes to the node
itself (as D-PSGD does for a missing neighbour); the node logs it once. ``W`` is symmetric, so with no losses the
swarm's mean is kept exactly (``sum_i sum_j W_ij (x^_j - x^_i) = 0``).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from fedopt.compress import Compressor, Packed, decompress
from fedopt.errors import ConfigError, WireError

__all__ = ["ChocoGossip"]


class ChocoGossip:
    """One node's CHOCO state: the copies ``hat[j]`` for itself (``rank``) and its ``neighbours``, dense float32."""

    def __init__(self, compressor: Compressor, size: int, rank: int, neighbours: list[int], gamma: float) -> None:
        if not 0 < gamma <= 1:
            raise ConfigError(f"--choco-gamma must be in (0, 1], not {gamma}")
        self.compressor, self.size, self.rank, self.gamma = compressor, size, rank, gamma
        self.hat = {j: torch.zeros(size) for j in (rank, *neighbours)}

    def outgoing(self, x: torch.Tensor, seed: int) -> Packed:
        """``q = C(x - x^_self)``, applied to this node's own copy at once; send it to every neighbour."""
        q = self.compressor.compress(x.detach().reshape(-1).float() - self.hat[self.rank], seed)
        self.hat[self.rank] += decompress(q, self.size)
        return q

    def receive(self, j: int, q: Packed, max_norm: float = float("inf")) -> None:
        """Apply neighbour ``j``'s ``q``. WireError (copy dropped, nothing applied) when ``j`` is not followed, ``q``
        is of another size, or the copy would stop being finite or grow past ``max_norm``."""
        if j not in self.hat:
            raise WireError(f"no CHOCO copy of node {j} (not a neighbour, or dropped after a loss)")
        try:
            new = self.hat[j] + decompress(q, self.size)
            norm = float(torch.linalg.vector_norm(new))
            if not (math.isfinite(norm) and norm <= max_norm):
                raise WireError(f"the copy of node {j} would have norm {norm:.4g}, over {max_norm:.4g}")
        except WireError:
            self.drop(j)
            raise
        self.hat[j] = new

    def drop(self, j: int) -> None:
        """Stop following ``j`` (its copy missed an increment); its weight goes to this node from now on."""
        if j != self.rank:
            self.hat.pop(j, None)

    def mix(self, x: torch.Tensor, row: Mapping[int, float], heard: set[int]) -> torch.Tensor:
        """``x + gamma * sum_j W_ij (x^_j - x^_i)`` over the neighbours in ``heard`` (their ``q`` of this round
        applied); every other neighbour is dropped first, since its copy missed this round's increment."""
        for j in [j for j in self.hat if j != self.rank and j not in heard]:
            self.drop(j)
        own = self.hat[self.rank]
        step = torch.zeros(self.size, dtype=torch.float64)
        for j in sorted(self.hat):  # rank order: the same inputs give bit-identical results
            if j != self.rank and j in row:
                step += (self.hat[j] - own).to(torch.float64) * row[j]
        return (x.to(torch.float64) + self.gamma * step).to(x.dtype)

    def followed(self) -> list[int]:
        """Neighbours whose copies are still in step."""
        return sorted(j for j in self.hat if j != self.rank)
