"""Sparsification: keep k of a vector's P coordinates.

* top-k keeps the k largest magnitudes (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent",
  EMNLP 2017; Lin et al., "Deep Gradient Compression", ICLR 2018). Its indices depend on the data, so they travel
  (int32, strictly increasing).
* random-k keeps k coordinates drawn uniformly without replacement (Stich, Cordonnier, Jaggi, "Sparsified SGD with
  Memory", NeurIPS 2018). The draw depends only on a seed, so only the seed travels and the receiver draws the same
  indices: no index bytes at all.

Neither rescales what it keeps, so both are biased *contractions* (``E||C(x) - x||^2 <= (1 - k/P) ||x||^2``): the
compressors error feedback is proven for (Stich et al. 2018; Karimireddy et al. 2019), and on by default with them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["keep_count", "top_k", "random_k"]


def keep_count(size: int, fraction: float) -> int:
    """Coordinates kept of ``size`` at ``fraction`` in (0, 1]: at least one."""
    return min(size, max(1, math.ceil(fraction * size - 1e-9)))


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, increasing) of the ``k`` largest ``|x|``; ties broken by torch.topk."""
    if k >= x.numel():
        return torch.arange(x.numel())
    return torch.topk(x.detach().abs(), k, sorted=False).indices.sort().values


def random_k(size: int, k: int, seed: int) -> torch.Tensor:
    """``k`` indices of ``range(size)`` drawn without replacement from ``seed`` (int64, increasing). Deterministic
    for a given torch version: both ends of the wire draw the same set."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=g)[:k].sort().values
