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
``max(v_a, v_b)`` (a mix adds no training), so a version is the latest training round in the model's history. Peers
that train side by side stay within a round or two of each other, however many exchanges they make; a model from a
peer restarted from an old checkpoint, or one cut off for a while, is many rounds behind. (Ticking on every mix, or
+1 on every local round as a Lamport clock over training events, made versions race ahead with the exchange rate and
drift apart: live peers ended up more than ``max_lag`` apart and refused to mix, so the swarm stopped averaging.)
A model more than ``max_lag`` rounds behind is *stale*: it is never mixed into a newer one (the newer side replies
without mixing) and the stale side adopts the newer model instead; an explicit fetch (a newcomer, a restarted peer)
adopts only a newer version.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from fedopt.errors import WireError

__all__ = ["ModelState", "MixOutcome", "consensus_distance"]


@dataclass(frozen=True)
class MixOutcome:
    """What one mix did: ``mixed`` (averaged), ``adopted`` (took the other model), or ``kept`` (refused a stale one)."""

    action: str
    distance: float  # ||x_self - x_other|| before mixing (the pair's disagreement)
    version: int  # this side's version afterwards


class ModelState:
    """The peer's current model. Every read and write holds ``lock``; vectors handed out are copies."""

    def __init__(self, vec: torch.Tensor, num_samples: int, version: int = 0, max_lag: int = 10) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, not {num_samples}")
        self.lock = threading.Lock()
        self.vec = vec.detach().clone()
        self.num_samples = int(num_samples)
        self.version = int(version)
        self.max_lag = int(max_lag)

    @property
    def size(self) -> int:
        return self.vec.numel()

    def check(self, other: torch.Tensor) -> torch.Tensor:
        """A received model as a vector of our dtype; WireError when its shape or values cannot be mixed."""
        if other.dim() != 1 or other.numel() != self.size:
            raise WireError(f"model of shape {list(other.shape)} does not match this peer's {self.size} parameters")
        other = other.to(self.vec.dtype)
        if not bool(torch.isfinite(other).all()):
            raise WireError("model holds non-finite values (NaN or Inf)")
        return other

    def snapshot(self) -> tuple[torch.Tensor, int]:
        with self.lock:
            return self.vec.clone(), self.version

    def add_progress(self, delta: torch.Tensor, round: int | None = None) -> int:
        """Local training of ``round`` finished: add its delta (trained - snapshot) and advance the clock to that round
        (by one when no round is given); returns the version."""
        with self.lock:
            self.vec += delta
            self.version = self.version + 1 if round is None else max(self.version, int(round))
            return self.version

    def _stale(self, other_version: int) -> bool:
        return other_version < self.version - self.max_lag

    def accept_push(self, other: torch.Tensor, n_other: int, v_other: int) -> tuple[torch.Tensor, int, MixOutcome]:
        """Mix ``other`` in now; returns (our model before mixing, its version, outcome) for the other side."""
        with self.lock:
            before, v_before = self.vec.clone(), self.version
            dist = float(torch.linalg.vector_norm(before - other))
            if self._stale(v_other):
                return before, v_before, MixOutcome("kept", dist, self.version)
            if v_other > self.version + self.max_lag:  # we are the stale side: take the newer model
                self.vec.copy_(other)
                self.version = v_other
                return before, v_before, MixOutcome("adopted", dist, self.version)
            total = self.num_samples + n_other
            w = 0.5 if total == 0 else n_other / total
            self.vec.add_(other - before, alpha=w)
            self.version = max(self.version, v_other)
            return before, v_before, MixOutcome("mixed", dist, self.version)

    def complete_push(self, sent: torch.Tensor, v_sent: int, other: torch.Tensor, n_other: int,
                      v_other: int) -> MixOutcome:
        """Mix ``other`` in when ``sent`` (our model at version ``v_sent``) went out earlier and ours may have moved."""
        with self.lock:
            dist = float(torch.linalg.vector_norm(sent - other))
            if v_other > v_sent + self.max_lag:  # the other side refused our stale model: take its newer one
                self.vec.copy_(other)
                self.version = v_other
                return MixOutcome("adopted", dist, self.version)
            if v_other < v_sent - self.max_lag:
                return MixOutcome("kept", dist, self.version)
            total = self.num_samples + n_other
            w = 0.5 if total == 0 else n_other / total
            self.vec.add_(other - sent, alpha=w)
            self.version = max(self.version, v_other)
            return MixOutcome("mixed", dist, self.version)

    def adopt(self, other: torch.Tensor, v_other: int) -> MixOutcome:
        """A fetched model replaces ours only when its version is newer."""
        with self.lock:
            dist = float(torch.linalg.vector_norm(self.vec - other))
            if v_other <= self.version:
                return MixOutcome("kept", dist, self.version)
            self.vec.copy_(other)
            self.version = v_other
            return MixOutcome("adopted", dist, self.version)


def consensus_distance(vectors: list[torch.Tensor], weights: list[float] | None = None) -> float:
    """``sqrt(mean_i ||x_i - x_bar||^2)`` with ``x_bar`` the (weighted) mean: the swarm's disagreement."""
    if not vectors:
        return math.nan
    x = torch.stack([v.to(torch.float64) for v in vectors])
    w = torch.ones(len(vectors), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    mean = (w[:, None] * x).sum(0) / w.sum()
    return float(((x - mean) ** 2).sum(1).mean().sqrt())
