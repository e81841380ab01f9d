"""Distance-based selection rules: ``krum``, ``multi_krum`` and ``bulyan``.

**Krum and Multi-Krum** — Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent" (NeurIPS 2017). With at most ``f`` Byzantine updates among n, update i scores
``s(i) = sum of ||x_i - x_j||^2 over its n - f - 2 nearest other updates``; Krum returns the update of lowest
score, Multi-Krum the plain average of the ``m`` lowest-scoring ones (m = n - f by default; m = 1 is Krum). The
guarantee needs n >= 2f + 3. Ties go to the update that arrived first.

**Bulyan** — El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium"
(ICML 2018). Krum picks theta = n - 2f updates one at a time (each pick scored among the updates not yet picked,
with max(1, r - f - 2) neighbours out of the r left, as Flower does); then, coordinate by coordinate, the
beta = theta - 2f values closest to the picked updates' median are averaged. Needs n >= 4f + 3.

``f`` is the number of Byzantine updates assumed per round; ``None`` assumes the most the round allows
(Krum: floor((n - 3) / 2), Bulyan: floor((n - 3) / 4); :func:`max_byzantine`). All three ignore sample
weights (a selected update counts once however much data it claims) and cost O(n^2 P) per round.

* Secure aggregation: no (``needs_plaintext``): the distances need every update in the clear.
* FedBuff: they run on each buffer of K updates, so they need K >= 2f + 3 (Bulyan K >= 4f + 3); a buffer or round
  with fewer updates than that is declined (logged; the model does not move). Stale updates are shrunk by their
  staleness weight before they arrive here, which Krum reads as distance: useful only with large buffers.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .robust import _Collecting, coordinate_median

__all__ = ["Krum", "MultiKrum", "Bulyan", "krum_scores", "krum_select", "bulyan_picks", "bulyan_combine",
           "max_byzantine"]

log = logging.getLogger("fedopt.aggregators")


def max_byzantine(n: int, per_byzantine: int) -> int:
    """The largest f with n >= per_byzantine * f + 3 (Krum: 2, Bulyan: 4); 0 when n is smaller."""
    return max(0, (n - 3) // per_byzantine)


def squared_distances(rows: torch.Tensor) -> torch.Tensor:
    """n x n squared L2 distances between the rows (no matrix-product shortcut: exact for near-identical rows)."""
    return torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist").square()


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's Krum score from the n x n squared distances: the sum over its max(1, n - f - 2) nearest others."""
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=dist.dtype)
    k = min(max(1, n - f - 2), n - 1)
    others = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype))
    return others.topk(k, dim=1, largest=False).values.sum(dim=1)


def krum_select(rows: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Indices of the ``m`` rows of lowest Krum score, best first (ties: the earlier row)."""
    scores = krum_scores(squared_distances(rows), f)
    return torch.argsort(scores, stable=True)[:m]


def bulyan_picks(rows: torch.Tensor, f: int) -> list[int]:
    """The n - 2f rows Bulyan's repeated Krum picks, in the order picked."""
    n = rows.shape[0]
    dist = squared_distances(rows)
    left, picked = list(range(n)), []
    while len(picked) < n - 2 * f:
        sub = dist[left][:, left]
        picked.append(left.pop(int(torch.argsort(krum_scores(sub, f), stable=True)[0])))
    return picked


def bulyan_combine(rows: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan of the n x P ``rows`` with ``f`` assumed Byzantine (n >= 4f + 3)."""
    theta = rows.shape[0] - 2 * f
    chosen = rows[bulyan_picks(rows, f)]
    med = coordinate_median(chosen)
    beta = theta - 2 * f
    nearest = (chosen - med).abs().argsort(dim=0, stable=True)[:beta]
    return chosen.gather(0, nearest).mean(dim=0)


def _check_f(name: str, f) -> int | None:
    if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
        raise ConfigError(f"{name} f (Byzantine updates assumed per round) must be an integer >= 0, not {f!r} "
                          f"(--aggregator-option f=...)")
    return f


class _Selecting(_Collecting):
    per_byzantine = 2  # n >= per_byzantine * f + 3

    def _f(self, n: int) -> int | None:
        """The f this round assumes; None (logged) when ``n`` updates are too few for the configured f."""
        if self.f is None:
            return max_byzantine(n, self.per_byzantine)
        if n < self.per_byzantine * self.f + 3:
            log.warning("%s with f=%d needs at least %d updates, the round has %d: declined, the model does not "
                        "move", self.name, self.f, self.per_byzantine * self.f + 3, n)
            return None
        return self.f

    def check_round_size(self, n: int) -> None:
        """Refuse rounds of ``n`` updates too small for the configured f. Raises ConfigError naming the flags."""
        if self.f is not None and n < self.per_byzantine * self.f + 3:
            raise ConfigError(f"{self.name} with f={self.f} needs at least {self.per_byzantine * self.f + 3} updates "
                              f"per round (n >= {self.per_byzantine}f+3), not {n}: lower f (--aggregator-option f=...) "
                              f"or select more clients (--clients-per-round)")


class Krum(_Selecting):
    """Multi-Krum with ``m`` selected (Krum: m = 1); ``m=None`` selects n - f. See the module docstring."""

    name = "krum"

    def __init__(self, f: int | None = None, m: int | None = 1) -> None:
        self.f = _check_f(self.name, f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"{self.name} m (updates selected) must be an integer >= 1, not {m!r} "
                              f"(--aggregator-option m=...)")
        self.m = m

    def check_round_size(self, n: int) -> None:
        super().check_round_size(n)
        if self.m is not None and self.m > n:
            raise ConfigError(f"{self.name} selects m={self.m} updates, more than the {n} per round "
                              f"(--aggregator-option m=...)")

    def _combine(self, rows: torch.Tensor) -> torch.Tensor | None:
        n = rows.shape[0]
        f = self._f(n)
        if f is None:
            return None
        m = min(n - f if self.m is None else self.m, n)
        return rows[krum_select(rows, f, m)].mean(dim=0)


class MultiKrum(Krum):
    name = "multi_krum"

    def __init__(self, f: int | None = None, m: int | None = None) -> None:
        super().__init__(f, m)


class Bulyan(_Selecting):
    """Bulyan (see the module docstring); refuses rounds with n < 4f + 3."""

    name = "bulyan"
    per_byzantine = 4

    def __init__(self, f: int | None = None) -> None:
        self.f = _check_f(self.name, f)

    def _combine(self, rows: torch.Tensor) -> torch.Tensor | None:
        f = self._f(rows.shape[0])
        return None if f is None else bulyan_combine(rows, f)
