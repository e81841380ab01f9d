"""Weighted means: ``fedavg`` (weight = num_samples; McMahan et al., AISTATS 2017), ``weighted`` (a weight per client
from config or a callable) and ``mean`` (uniform).

They stream: the running mean is updated in place as each update arrives,
``mean <- mean + (w / W_total) * (delta - mean)`` (one ``lerp_``), so memory is one vector however many clients report,
and averaging identical updates returns that update bit-exactly.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import ConfigError
from .base import Aggregate, Update

__all__ = ["WeightedMean", "fedavg", "mean", "weighted"]


class WeightedMean:
    """Streaming weighted mean of flat deltas; ``weight_of(update) -> float`` chooses each update's weight."""

    linear = True
    needs_all_updates = False
    needs_plaintext = False

    def __init__(self, weight_of: Callable[[Update], float], name: str = "weighted") -> None:
        self.name = name
        self._weight_of = weight_of
        self._mean: torch.Tensor | None = None
        self._size = 0
        self._weight = 0.0
        self._count = 0

    def begin(self, round: int, size: int) -> None:
        self._size, self._mean, self._weight, self._count = size, None, 0.0, 0

    def weight(self, update: Update) -> float:
        """The weight this aggregator gives ``update`` (lets an engine pre-aggregate many deltas in one matmul)."""
        return float(self._weight_of(update))

    def add(self, update: Update) -> None:
        self.merge(update.delta, self.weight(update), 1)

    def merge(self, delta: torch.Tensor, weight: float, count: int) -> None:
        """Fold in a (pre-aggregated) mean ``delta`` that carries ``weight`` over ``count`` client updates."""
        if delta.dim() != 1 or delta.numel() != self._size:
            raise ConfigError(f"update has {delta.numel()} elements, the model has {self._size}")
        if not (weight >= 0 and weight < float("inf")):
            raise ConfigError(f"update weight must be finite and >= 0, not {weight}")
        if weight == 0:
            return
        self._weight += weight
        self._count += count
        if self._mean is None:
            self._mean = delta.detach().to(dtype=torch.float32, copy=True) if delta.dtype != torch.float64 \
                else delta.detach().clone()
        else:
            self._mean.lerp_(delta.to(self._mean.dtype), weight / self._weight)

    def result(self) -> Aggregate | None:
        if self._mean is None:
            return None
        return Aggregate(self._mean, self._weight, self._count)


def fedavg() -> WeightedMean:
    return WeightedMean(lambda u: u.num_samples, "fedavg")


def mean() -> WeightedMean:
    return WeightedMean(lambda u: 1.0, "mean")


def weighted(weights: Mapping[str, float] | Callable[[Update], float], default: float | None = None) -> WeightedMean:
    """A weight per client: a mapping ``client id -> weight`` (clients it does not name get ``default``, or are an
    error when ``default`` is None) or a callable ``update -> weight``."""
    if callable(weights):
        return WeightedMean(weights, "weighted")
    table = {str(k): float(v) for k, v in dict(weights).items()}
    for k, v in table.items():
        if not v >= 0:
            raise ConfigError(f"weight for client {k!r} must be >= 0, not {v}")

    def weight_of(u: Update) -> float:
        if u.client in table:
            return table[u.client]
        if default is None:
            raise ConfigError(f"no weight configured for client {u.client!r}")
        return default

    return WeightedMean(weight_of, "weighted")
