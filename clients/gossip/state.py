"""A gossip peer's model: one flat vector, its logical clock and its mixing weight, changed only under one lock.

Randomized pairwise gossip (Boyd, Ghosh, Prabhakar & Shah, "Randomized gossip algorithms", IEEE Trans. IT 52(6), 2006)
with sample weights: when peers ``a`` and ``b`` exchange, both become ``(n_a x_a + n_b x_b) / (n_a + n_b)``, which keeps
``sum_i n_i x_i`` unchanged, so the swarm's consensus point is the sample-weighted average FedAvg would compute.
Local SGD between exchanges (as in AD-PSGD, Lian et al. ICML 2018, and SwarmSGD, Nadiradze et al. NeurIPS 2021) runs
on a copy: the trainer adds its delta back under the lock, so a mix that happened meanwhile is kept and nothing ever
sees a half-applied state.

The initiator of an exchange sent ``x_a`` and later receives ``x_b`` (the replier's model before it mixed); its own
model may have moved by local training since, so it applies ``x_a_now + w_b (x_b - x_a_sent)``: the pair average of
the states that were exchanged, plus its own progress.

Versions are round clocks: a peer that trains its round ``r`` sets its version to ``max(version, r)``, and a mix takes
the newer version (a mix adds no training), so a version is the latest training round in the model's history. A model
more than ``max_lag`` rounds behind is *stale*: it is never mixed into a newer one (the newer side replies without
mixing), while the stale side mixes the newer model in as usual and so catches up within a few exchanges.

Zero trust. Every number in a neighbour's message is a claim, so none sets this peer's state unchecked:

* *versions* advance by at most ``max_jump`` per exchange: a peer claiming version 10**9 moves this clock by
  ``max_jump``, and nothing is ever adopted wholesale because of a version;
* *models* are screened (:meth:`ModelState.screen`) before they are mixed: finite, ``||x|| <= norm_factor`` times this
  peer's own norm, and ``||x - own|| <= dist_factor`` times the swarm's recent motion ``tau`` (the largest of the last
  accepted mixes' distances and of this peer's own last local-round steps: honest peers drift apart by about one
  round of training between exchanges), or refused; and a model within that is *clipped*: ``x - own`` is shortened
  to at most ``clip_factor * tau`` (centered clipping, as in ClippedGossip: He, Karimireddy & Jaggi, "Byzantine-robust
  decentralized learning via ClippedGossip", 2022), so one exchange moves this peer no further than an honest one
  would, whatever the sender chose. Only the clipped length enters the recent motion, so a liar cannot inflate it;
* *weights* (sample counts) are clamped to ``[1, max_weight_ratio * own]``, so one mix moves this peer at most
  ``max_weight_ratio / (1 + max_weight_ratio)`` of the way (0.8 by default); shards within that ratio of each other
  keep the weighted sum exactly;
* a newcomer's *fetch* takes the coordinate-wise median of several neighbours' models (:meth:`ModelState.adopt_agreed`),
  so one hostile neighbour among three cannot choose it; a single reply counts as one bounded exchange.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import torch

from fedopt.errors import WireError

__all__ = ["ModelState", "MixOutcome", "Bounds", "consensus_distance", "coordinate_median"]


@dataclass(frozen=True)
class Bounds:
    """How far one neighbour's claims may move this peer (see the module docstring)."""

    max_jump: int = 2  # versions (training rounds) one exchange may advance this peer's clock by
    norm_factor: float = 3.0  # ||received|| <= this x max(own norm, norm_floor)
    dist_factor: float = 8.0  # ||received - own|| <= this x the swarm's recent motion, or refused
    clip_factor: float = 1.0  # ... and clipped to this x the recent motion
    max_weight_ratio: float = 4.0  # a neighbour's sample count is clamped to [1, this x own]
    norm_floor: float = 1e-3  # a reference norm for an all-zero model
    warmup: int = 2  # motions known before the distance bound applies (until then only the norm bound does)

    def __post_init__(self) -> None:
        if self.max_jump < 0:
            raise ValueError(f"max_jump must be >= 0, not {self.max_jump}")
        for name in ("norm_factor", "dist_factor", "clip_factor", "max_weight_ratio"):
            if not 1 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a number >= 1, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class MixOutcome:
    """What one mix did: ``mixed`` (averaged), ``adopted`` (took an agreed model), or ``kept`` (refused a stale one)."""

    action: str
    distance: float  # ||x_self - x_other|| before mixing (the pair's disagreement)
    version: int  # this side's version afterwards


class ModelState:
    """The peer's current model. Every read and write holds ``lock``; vectors handed out are copies."""

    def __init__(self, vec: torch.Tensor, num_samples: int, version: int = 0, max_lag: int = 10,
                 bounds: Bounds = Bounds()) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, not {num_samples}")
        self.lock = threading.Lock()
        self.vec = vec.detach().clone()
        self.num_samples = int(num_samples)
        self.version = int(version)
        self.max_lag = int(max_lag)
        self.bounds = bounds
        self.motion: deque[float] = deque(maxlen=16)  # recent accepted (clipped) distances
        self.steps: deque[float] = deque(maxlen=4)  # this peer's own last local-round steps ||delta||

    @property
    def size(self) -> int:
        return self.vec.numel()

    def check(self, other: torch.Tensor) -> torch.Tensor:
        """A received model as a vector of our dtype; WireError when its shape or values cannot be mixed."""
        if not isinstance(other, torch.Tensor) or other.dim() != 1 or other.numel() != self.size:
            shape = list(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise WireError(f"model of shape {shape} does not match this peer's {self.size} parameters")
        other = other.to(self.vec.dtype)
        if not bool(torch.isfinite(other).all()):
            raise WireError("model holds non-finite values (NaN or Inf)")
        return other

    def tau(self) -> float | None:
        """The swarm's recent motion (see the module docstring); None until ``warmup`` values are known."""
        known = [*self.motion, *self.steps]
        return max(known) if len(known) >= self.bounds.warmup else None

    def screen(self, other: torch.Tensor, against: torch.Tensor | None = None,
               motion: bool = True) -> tuple[torch.Tensor, float]:
        """Check a received model against this peer's (or ``against``) before mixing: (the model as it may be mixed,
        clipped towards ``against`` when ``motion``, and its distance before clipping).

        Raises WireError when it is not finite, of the wrong shape, too large, or (``motion``) too far away.
        Call with ``lock`` held."""
        other = self.check(other)
        ref = self.vec if against is None else against
        b = self.bounds
        own = max(float(torch.linalg.vector_norm(ref)), b.norm_floor)
        norm = float(torch.linalg.vector_norm(other))
        if not norm <= b.norm_factor * own:  # also catches an overflow to inf in the norm itself
            raise WireError(f"model norm {norm:.4g} is over {b.norm_factor:g}x this peer's {own:.4g}")
        diff = other - ref
        dist = float(torch.linalg.vector_norm(diff))
        tau = self.tau() if motion else None
        if tau is not None:
            tau = max(tau, b.norm_floor * own)
            if not dist <= b.dist_factor * tau:
                raise WireError(f"model is {dist:.4g} away, over {b.dist_factor:g}x the swarm's recent motion "
                                f"({tau:.4g})")
            if dist > b.clip_factor * tau:
                other = ref + diff * (b.clip_factor * tau / dist)
        return other, dist

    def weight(self, n_other: int) -> float:
        """The other side's share in a mix, its sample count clamped to ``[1, max_weight_ratio * own]``."""
        own = max(1, self.num_samples)
        n = min(max(1, int(n_other)), int(self.bounds.max_weight_ratio * own))
        return n / (own + n)

    def _advance(self, v_other: int) -> int:
        """The clock after mixing a model claimed at ``v_other``: newer, by at most ``max_jump``."""
        return max(self.version, min(int(v_other), self.version + self.bounds.max_jump))

    def snapshot(self) -> tuple[torch.Tensor, int]:
        with self.lock:
            return self.vec.clone(), self.version

    def add_progress(self, delta: torch.Tensor, round: int | None = None) -> int:
        """Local training of ``round`` finished: add its delta (trained - snapshot) and advance the clock to that round
        (by one when no round is given); returns the version."""
        with self.lock:
            self.vec += delta
            step = float(torch.linalg.vector_norm(delta))
            if math.isfinite(step):
                self.steps.append(step)
            self.version = self.version + 1 if round is None else max(self.version, int(round))
            return self.version

    def _stale(self, other_version: int) -> bool:
        return other_version < self.version - self.max_lag

    def accept_push(self, other: torch.Tensor, n_other: int, v_other: int) -> tuple[torch.Tensor, int, MixOutcome]:
        """Mix ``other`` in now; returns (our model before mixing, its version, outcome) for the other side.
        Raises WireError (nothing changed) when ``other`` fails :meth:`screen`."""
        with self.lock:
            before, v_before = self.vec.clone(), self.version
            if self._stale(v_other):
                dist = float(torch.linalg.vector_norm(before - self.check(other)))
                return before, v_before, MixOutcome("kept", dist, self.version)
            other, dist = self.screen(other)
            self.vec.add_(other - before, alpha=self.weight(n_other))
            self.motion.append(float(torch.linalg.vector_norm(other - before)))
            self.version = self._advance(v_other)
            return before, v_before, MixOutcome("mixed", dist, self.version)

    def complete_push(self, sent: torch.Tensor, v_sent: int, other: torch.Tensor, n_other: int,
                      v_other: int) -> MixOutcome:
        """Mix ``other`` in when ``sent`` (our model at version ``v_sent``) went out earlier and ours may have moved.
        Raises WireError (nothing changed) when ``other`` fails :meth:`screen` against ``sent``."""
        with self.lock:
            if v_other < v_sent - self.max_lag:
                return MixOutcome("kept", float(torch.linalg.vector_norm(sent - self.check(other))), self.version)
            other, dist = self.screen(other, against=sent)
            self.vec.add_(other - sent, alpha=self.weight(n_other))
            self.motion.append(float(torch.linalg.vector_norm(other - sent)))
            self.version = self._advance(v_other)
            return MixOutcome("mixed", dist, self.version)

    def adopt(self, other: torch.Tensor, v_other: int, n_other: int = 1) -> MixOutcome:
        """One fetched model (a swarm of two): mixed in as one bounded exchange when its version is newer."""
        with self.lock:
            dist = float(torch.linalg.vector_norm(self.vec - self.check(other)))
            if v_other <= self.version:
                return MixOutcome("kept", dist, self.version)
            other, _ = self.screen(other, motion=False)
            self.vec.add_(other - self.vec, alpha=self.weight(n_other))
            self.version = self._advance(v_other)
            return MixOutcome("mixed", dist, self.version)

    def adopt_agreed(self, models: list[torch.Tensor], versions: list[int]) -> MixOutcome:
        """Two or more neighbours' fetched models: take their coordinate-wise median when the (lower) median version
        is newer than ours. Each model must pass the norm bound; one hostile model among three moves nothing."""
        if len(models) < 2 or len(models) != len(versions):
            raise ValueError("adopt_agreed needs two or more models, one version each")
        with self.lock:
            for m in models:
                self.screen(m, motion=False)
            v = sorted(int(x) for x in versions)[(len(versions) - 1) // 2]
            agreed = coordinate_median([self.check(m) for m in models])
            dist = float(torch.linalg.vector_norm(self.vec - agreed))
            if v <= self.version:
                return MixOutcome("kept", dist, self.version)
            self.vec.copy_(agreed)
            self.version = v
            return MixOutcome("adopted", dist, self.version)


def coordinate_median(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median (the mean of the middle two for an even count)."""
    x = torch.stack(vectors).sort(dim=0).values
    k = x.shape[0]
    return x[k // 2] if k % 2 else (x[k // 2 - 1] + x[k // 2]) / 2


def consensus_distance(vectors: list[torch.Tensor], weights: list[float] | None = None) -> float:
    """``sqrt(mean_i ||x_i - x_bar||^2)`` with ``x_bar`` the (weighted) mean: the swarm's disagreement."""
    if not vectors:
        return math.nan
    x = torch.stack([v.to(torch.float64) for v in vectors])
    w = torch.ones(len(vectors), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    mean = (w[:, None] * x).sum(0) / w.sum()
    return float(((x - mean) ** 2).sum(1).mean().sqrt())
