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
    """Holds the round's updates as the rows of one n x P float32 matrix for ``_combine``. Each update is copied in
    as it arrives (the caller may reuse its tensor). The matrix is kept from round to round (warm pages: no fresh
    n x P allocation per round) and grows by doubling, so a round no larger than the last copies each update once
    and stacks nothing; a result that shares the matrix's memory is copied out before the next round reuses it."""

    linear = False
    needs_all_updates = True
    needs_plaintext = True
    _buffer: torch.Tensor | None = None  # the matrix, from the last round on

    def begin(self, round: int, size: int) -> None:
        self._size, self._count, self._samples, self._weight = size, 0, [], 0.0
        if self._buffer is not None and self._buffer.shape[1] != size:
            self._buffer = None

    def add(self, update: Update) -> None:
        d = update.delta
        if d.dim() != 1 or d.numel() != self._size:
            raise ConfigError(f"update has {d.numel()} elements, the model has {self._size}")
        buf = self._buffer
        if buf is None or buf.device != d.device:
            buf = self._buffer = torch.empty((4, self._size), dtype=torch.float32, device=d.device)
        if self._count == buf.shape[0]:
            grown = torch.empty((2 * self._count, self._size), dtype=torch.float32, device=d.device)
            grown[: self._count] = buf[: self._count]
            self._buffer = buf = grown
        buf[self._count].copy_(d.detach())
        self._count += 1
        self._samples.append(update.num_samples)
        self._weight += update.num_samples

    def result(self) -> Aggregate | None:
        """The rule's combination of the round's rows; None when nothing was added or the rule declined the round
        (``_combine`` returned None: too few updates for what it assumes)."""
        if not self._count:
            return None
        delta = self._combine(self._buffer[: self._count])
        if delta is not None and delta.untyped_storage().data_ptr() == self._buffer.untyped_storage().data_ptr():
            delta = delta.clone()  # a view of a row: the next round overwrites the matrix
        return None if delta is None else Aggregate(delta, self._weight, self._count)


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
