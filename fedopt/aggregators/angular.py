"""``cosine_filter``: keep the updates that point the way a robust reference points, clip them to the median norm,
average them.

Why a rule that looks at angles. Distance-based rules (clipping radius, Krum scores, geometric median, coordinate
ranks) separate a Byzantine update only when it lies farther from the centre than honest ones. Under non-IID data
the honest updates differ mostly in what their clients' label mixes differ in: on digits with 50 clients
(Dirichlet 0.5, client momentum 0.9) each honest momentum lies 0.35-0.75 from the centre while their mean is only
0.13-0.18 long, so a sign-flipped update ``-m`` (0.40-0.53 away) or an inner-product-manipulation update
``-eps * mean`` (Xie, Koyejo, Gupta, UAI 2019) sits inside the honest spread and every distance rule keeps it (see
``benchmarks/robust.py``). What they cannot hide is their direction: they point against the descent direction the
honest majority shares.

The rule, per round, for the n updates ``x_i``:

1. a reference direction ``r``: the coordinate-wise median of the round's updates (``reference="median"``, the
   default), which no coalition of fewer than half the clients moves outside the honest range of any coordinate;
   or the previous round's aggregate (``reference="previous"``; the first round uses the median);
2. keep ``x_i`` when ``cos(x_i, r) > threshold`` (default 0);
3. scale each kept update down to at most the median L2 norm of all n updates (FLAME's clipping bound, Nguyen et
   al., USENIX Security 2022), so a kept update cannot weigh more than a typical one;
4. the uniform mean of the kept, clipped updates.

This is FLTrust's trust score (Cao, Fang, Liu, Gong, NDSS 2021: ``ReLU(cos(x_i, r))`` with ``r`` the server's own
update on a trusted root dataset, and updates normalised to ``||r||``) with two changes: fedopt has no trusted data,
so ``r`` is estimated robustly from the round itself, and a kept update counts fully rather than by its cosine, so
that honest clients whose data differ from the majority's (small positive cosines under non-IID data) are not
down-weighted for it. ``weighting="cosine"`` gives FLTrust's ReLU(cos) weights instead.

What it does not stop: an attacker whose update keeps a positive cosine with the reference (ALIE, Baruch et al.
2019, sits close to the honest mean; scaling keeps the direction) is kept, but clipped to the median norm and
averaged with weight 1/kept, the influence of one honest client. When the reference is zero or no update passes,
the round's aggregate is the coordinate-wise median itself.

* Secure aggregation: not here (``needs_plaintext``): the reference and the cosines need every update in the clear.
* FedBuff: composes: the rule runs on each buffer's staleness-weighted updates (a median of K of them).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .robust import _Collecting, coordinate_median

__all__ = ["CosineFilter"]


class CosineFilter(_Collecting):
    """Keep the updates with a positive cosine to a robust reference, clip them to the median norm, average them
    (see the module docstring)."""

    name = "cosine_filter"

    def __init__(self, reference: str = "median", threshold: float = 0.0, weighting: str = "uniform") -> None:
        if reference not in ("median", "previous"):
            raise ConfigError(f'cosine_filter reference must be "median" or "previous", not {reference!r} '
                              f"(--aggregator-option reference=...)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold < 1:
            raise ConfigError(f"cosine_filter threshold must be a number in [-1, 1), not {threshold!r} "
                              f"(--aggregator-option threshold=...)")
        if weighting not in ("uniform", "cosine"):
            raise ConfigError(f'cosine_filter weighting must be "uniform" or "cosine", not {weighting!r} '
                              f"(--aggregator-option weighting=...)")
        self.reference, self.threshold, self.weighting = reference, float(threshold), weighting
        self.previous: torch.Tensor | None = None  # the last aggregate (kept only under reference="previous")
        self.kept = 0  # updates kept in the last round

    def _combine(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        median = coordinate_median(rows)
        ref = median
        if self.reference == "previous" and self.previous is not None and self.previous.numel() == rows.shape[1]:
            ref = self.previous
        # in the rows' own dtype: no n x P float64 copy (the engine has refused updates whose norm overflows); a row
        # whose dot product still overflows gets a NaN cosine and is not kept
        norms = torch.linalg.vector_norm(rows, dim=1)
        ref_norm = float(torch.linalg.vector_norm(ref))
        if not 0.0 < ref_norm < math.inf:
            return self._keep(median, 0)
        cos = (rows @ ref) / (norms * ref_norm)
        keep = (cos > self.threshold) & (norms > 0)
        if not bool(keep.any()):
            return self._keep(median, 0)
        # the lower median of all n norms: with fewer than half the updates Byzantine, an honest update's norm
        bound = float(norms.sort().values[(n - 1) // 2])
        scale = torch.clamp(bound / norms, max=1.0)
        weight = torch.where(keep, cos.clamp(min=0.0) if self.weighting == "cosine" else 1.0, 0.0).to(rows.dtype)
        if float(weight.sum()) == 0.0:  # cosine weights with a threshold below 0: every kept cosine <= 0
            return self._keep(median, 0)
        return self._keep((weight * scale / weight.sum()) @ rows, int(keep.sum()))

    def _keep(self, aggregate: torch.Tensor, kept: int) -> torch.Tensor:
        self.kept = kept
        if self.reference == "previous":  # the server optimizer may take the aggregate over: keep a copy
            self.previous = aggregate.clone()
        return aggregate
