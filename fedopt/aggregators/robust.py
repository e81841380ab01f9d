"""Robust aggregators that need every update in the clear: coordinate-wise ``median`` and ``trimmed_mean``
(Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

They hold all of a round's updates (O(n·P) memory) and cannot run under secure masking (``needs_plaintext``).
Under FedBuff they run on each buffer of K staleness-weighted updates (a trimmed mean needs K large enough to trim).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import Aggregate, Update

__all__ = ["CoordinateMedian", "TrimmedMean", "coordinate_median"]


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the n x P ``rows`` (the mean of the two middle values when n is even)."""
    return rows.median(dim=0).values if rows.shape[0] % 2 else rows.quantile(0.5, dim=0)


class _Collecting:
    linear = False
    needs_all_updates = True
    needs_plaintext = True

    def begin(self, round: int, size: int) -> None:
        self._size, self._rows, self._samples, self._weight = size, [], [], 0.0

    def add(self, update: Update) -> None:
        if update.delta.dim() != 1 or update.delta.numel() != self._size:
            raise ConfigError(f"update has {update.delta.numel()} elements, the model has {self._size}")
        self._rows.append(update.delta.detach().to(torch.float32, copy=True))
        self._samples.append(update.num_samples)
        self._weight += update.num_samples

    def result(self) -> Aggregate | None:
        """The rule's combination of the round's rows; None when nothing was added or the rule declined the round
        (``_combine`` returned None: too few updates for what it assumes)."""
        if not self._rows:
            return None
        delta = self._combine(torch.stack(self._rows))
        return None if delta is None else Aggregate(delta, self._weight, len(self._rows))


class CoordinateMedian(_Collecting):
    name = "median"

    def _combine(self, rows: torch.Tensor) -> torch.Tensor:
        return coordinate_median(rows)


class TrimmedMean(_Collecting):
    """Drop the ``beta`` fraction of largest and of smallest values per coordinate, average the rest."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ConfigError(f"trim fraction beta must be in [0, 0.5), not {beta}")
        self.beta = beta

    def check_round_size(self, n: int) -> None:
        """Refuse a ``beta`` that trims nothing from rounds of ``n`` updates: it would be a plain mean, which one
        client moves as far as it likes. Raises ConfigError naming the smallest ``beta`` that trims one."""
        if math.floor(self.beta * n) == 0 and n >= 3:
            raise ConfigError(f"trimmed_mean with beta {self.beta} trims nothing from {n} updates per round: "
                              f"use beta >= {1 / n:.3g} (--aggregator-option beta=...)")

    def _combine(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        # a round closed on its quorum may have fewer updates than planned: still trim one from each end when it can
        k = max(math.floor(self.beta * n), 1 if self.beta > 0 and n >= 3 else 0)
        s = rows.sort(dim=0).values
        return s[k : rows.shape[0] - k].mean(dim=0)
