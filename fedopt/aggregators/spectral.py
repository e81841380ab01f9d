"""``dnc``: Divide-and-Conquer (Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021): drop the updates that lie farthest along the round's main
direction of spread, average the rest.

Why a spectral rule. A coordinated attack moves the aggregate only if its updates share a shift away from the honest
mean; ALIE (Baruch et al. 2019) sends ``mu - z sigma`` from every attacker, the same vector. Each such update can
stay inside the honest spread by distance, per coordinate and by angle, so distance, rank and cosine rules keep it
(measured in ``benchmarks/robust.py``: on digits with 50 clients, ALIE with z = 1 takes 3.7-10.9 points from
median, trimmed mean, Multi-Krum, Bulyan, geometric median with or without bucketing, centered clipping and
``cosine_filter``; ``dnc`` loses 0.3). But f updates shifted the same way add
``f * ||shift||^2``-worth of variance along one direction, and honest non-IID spread is not concentrated there: the
top singular vector of the centred updates finds the shift, and the attackers have the largest projections on it.

The rule, per round, for the n updates (uniform weights):

1. ``iterations`` times: take ``dims`` coordinates drawn at random (with replacement; every coordinate when the
   model has no more than ``dims``, and then one pass is enough); centre those columns on their mean; take the top
   right singular vector ``v`` of the centred n x dims matrix; score each update by its squared projection on
   ``v``; keep the n - k lowest scores, ``k = ceil(c f)``;
2. the updates kept in every pass; their uniform mean (the coordinate-wise median if no update was kept in all).

``f`` is the number of Byzantine updates assumed per round (``None``: the most a majority tolerates,
floor((n - 1) / 2)); ``c`` (the paper's filtering fraction, 1) scales how many are dropped. The singular vector
comes from the n x n Gram matrix (an eigendecomposition in float64), so a pass costs O(n^2 dims). The coordinates
are drawn from ``seed`` when given (reproducible runs), else from the operating system's entropy each round: an
attacker who knew which coordinates will be looked at could put its shift elsewhere.

What it does not stop: an attack that does not move the updates coherently (sign flipping of non-IID updates,
whose flipped copies spread as the honest ones do; see ``cosine_filter``); huge independent updates (scaling,
Gaussian), each of which spans a direction of its own (the engine's norm bound, on by default, stops those first);
and a shift no stronger than the honest spread's own top direction, which happens with few honest updates (3 ALIE
attackers of 10 clients with z = 1: 50.8 against 84.7 clean, where FedAvg kept 79.2; in that case it drops honest
updates and the attackers' share grows). It always drops k updates, honest ones included when there is no attack.

* Secure aggregation: not here (``needs_plaintext``): the projections need every update in the clear.
* FedBuff: composes: the rule runs on each buffer's staleness-weighted updates (then f counts per buffer).
"""

from __future__ import annotations

import logging
import math
import secrets

import torch

from ..errors import ConfigError
from .krum import _check_f
from .robust import _Collecting, coordinate_median

__all__ = ["DivideAndConquer", "dnc_keep"]

log = logging.getLogger("fedopt.aggregators")


def _top_projections(block: torch.Tensor) -> torch.Tensor:
    """Each row's squared projection on the top right singular vector of the column-centred ``block`` (n x d)."""
    centred = (block - block.mean(dim=0)).to(torch.float64)
    gram = centred @ centred.T
    values, vectors = torch.linalg.eigh(gram)  # ascending; centred @ v_top = sqrt(lambda_top) * u_top
    return values[-1].clamp(min=0.0) * vectors[:, -1].square()


def dnc_keep(rows: torch.Tensor, drop: int, dims: int, iterations: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask of the rows DnC keeps: in each pass the n - ``drop`` rows of lowest score on ``dims``
    coordinates drawn with ``generator`` (all coordinates, one pass, when the rows have no more than ``dims``)."""
    n, p = rows.shape
    keep = torch.ones(n, dtype=torch.bool)
    if drop <= 0:
        return keep
    passes = 1 if p <= dims else iterations
    for _ in range(passes):
        # drawn with replacement: a repeat is harmless, and no O(P) permutation per pass on a large model
        block = rows if p <= dims else rows[:, torch.randint(p, (dims,), generator=generator)]
        scores = _top_projections(block)
        lowest = torch.zeros(n, dtype=torch.bool)
        lowest[torch.argsort(scores, stable=True)[: n - drop]] = True
        keep &= lowest
    return keep


class DivideAndConquer(_Collecting):
    """Drop the ``ceil(c f)`` updates with the largest projection on the top singular direction, average the rest
    (see the module docstring)."""

    name = "dnc"

    def __init__(self, f: int | None = None, c: float = 1.0, dims: int = 10_000, iterations: int = 5,
                 seed: int | None = None) -> None:
        _check_f(self.name, f)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 2:
            raise ConfigError(f"dnc c (filtering fraction) must be a number in (0, 2], not {c!r} "
                              f"(--aggregator-option c=...)")
        for flag, value in (("dims", dims), ("iterations", iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dnc {flag} must be an integer >= 1, not {value!r} (--aggregator-option {flag}=...)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"dnc seed must be an integer >= 0, not {seed!r} (--aggregator-option seed=...)")
        self.f, self.c, self.dims, self.iterations = f, float(c), dims, iterations
        self._generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self._seeded = seed is not None
        self.dropped = 0  # updates dropped in the last round

    def check_round_size(self, n: int) -> None:
        """Refuse an ``f`` that would drop every update (or half of them or more) from rounds of ``n``."""
        if self.f is not None and n >= 2 and not 2 * self._drop(n) < n:
            raise ConfigError(f"dnc with f={self.f} and c={self.c:g} drops {self._drop(n)} of {n} updates per round: "
                              f"fewer than half must go (lower --aggregator-option f=... or c=..., or select more "
                              f"clients with --clients-per-round)")

    def _drop(self, n: int) -> int:
        f = (n - 1) // 2 if self.f is None else self.f
        return math.ceil(self.c * f - 1e-9)

    def _combine(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        if not self._seeded:  # a fresh draw each round, unknown to the clients
            self._generator.manual_seed(secrets.randbits(63))
        # a round closed on its quorum may be smaller than planned: still keep a majority
        try:
            keep = dnc_keep(rows, min(self._drop(n), (n - 1) // 2), self.dims, self.iterations, self._generator)
        except torch.linalg.LinAlgError as e:  # an eigendecomposition that did not converge: the median instead
            log.warning("dnc: no top singular direction this round (%s): the coordinate median instead", e)
            keep = torch.zeros(n, dtype=torch.bool)
        self.dropped = n - int(keep.sum())
        if not bool(keep.any()):
            return coordinate_median(rows)
        return rows[keep].mean(dim=0)
