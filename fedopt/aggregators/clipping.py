"""Clipping rules: ``norm_bound`` (each update clipped to an L2 bound, then FedAvg) and ``centered_clip`` (iterative
clipping around the previous round's aggregate).

**Norm bounding** — Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?" (arXiv 1911.07963,
2019): every update is scaled down to L2 norm at most ``bound`` before the sample-weighted mean, so no client moves a
round by more than ``bound * its weight share``, whatever it sends. It streams (O(P) memory) and reorders nothing.

* Secure aggregation: composes. Clipping needs only the client's own update, so under SecAgg+ it is done by the
  client before masking: ``--aggregator secagg --clip C`` *is* norm bounding at C (and
  ``make_aggregator("secagg", inner="norm_bound")`` takes the inner's bound as the clip). Precisely what composes:
  an honest client's contribution is clipped to L2 <= C; the server cannot check a masked vector's L2 norm, so a
  client that skips clipping is held only by the encoding's per-coordinate range (|x_i| <= C, i.e. L2 <= C*sqrt(P))
  and by the decoded-sum bounds of :mod:`fedopt.secagg.quantize`. The engine's own norm bound cannot see masked
  updates either.
* FedBuff: composes. Each staleness-weighted update is clipped as it enters the buffer.

**Centered clipping (CC)** — Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization"
(ICML 2021, arXiv 2012.10333), Algorithm 1: starting from the previous round's aggregate v,
``v <- v + (1/n) sum_i clip_tau(x_i - v)`` repeated L times, where ``clip_tau(z) = z * min(1, tau / ||z||)``.
Defaults: L = 1 (the paper's experiments) and ``tau="auto"``: each iteration clips at the median of the n distances
``||x_i - v||``, or, given ``f`` (the Byzantine updates assumed per round, as Krum and Bulyan take it), at the (n -
f)-th smallest distance. The paper's experiments use a fixed tau = 100 (the authors' code: ``Clipping(tau=100,
n_iter=1)``), but a fixed tau is in the units of what clients send: the paper's clients send gradient momenta,
fedopt's send model deltas (lr x steps x gradient); on digits (50 clients, momentum 0.9) the honest updates lie
0.35-0.75 from the centre, so tau = 100 clipped nothing and CC was a plain uniform mean (it let a x1000 update
through at 100/n per round). The paper's analysis sets tau from the honest clients' spread around the centre; the
median distance (the lower median: the ceil(n/2)-th smallest) estimates that spread from the round itself, and while
fewer than half the updates are Byzantine it lies between the smallest and the largest honest distance whatever the
others send. With f < n/2 assumed, the (n - f)-th smallest distance keeps that guarantee (it is at most the largest
honest distance and at least the (n - 2f)-th smallest honest one), and it clips only the farthest updates: each
Byzantine update still moves the centre by at most radius / n, while fewer honest updates are shortened (on digits
with 50 clients, f = 10: IPM took 3.8 points with the median radius and 2.3 with this one; see
``benchmarks/robust.py``). f = floor(n/2) is the median. The price is paid against an attack that pushes the same
way every round: each attacker adds up to radius / n along its shift, and the larger radius lets more through (ALIE
with z = 2 at 50 clients: 67.1 with f, 74.7 with the median radius, from 85.8 and 85.3 clean; neither holds ALIE
from z = 1 at that size, where ``dnc`` does). A number (``--aggregator-option tau=...``) fixes tau as before. The
paper pairs CC with worker momentum: clients send ``m_i = beta m_i + (1 - beta) delta_i`` (``--client-momentum
BETA``, :mod:`fedopt.client_momentum`) so that attacks hidden in one round's noise cannot be coupled across rounds.
The centre is this aggregator's state from round to round (the first round starts from zero); it is not in
checkpoints, so a resumed run restarts it at zero.

* Secure aggregation: not here (``needs_plaintext``). With L = 1 and a public centre each client could clip its own
  ``x_i - v`` before masking (the authors' README calls CC compatible with secure aggregation), with the same
  client-side caveat as norm bounding; fedopt does not implement that client path.
* FedBuff: composes and makes sense: each buffer of K updates is clipped around the previous buffer's aggregate
  (the authors' repository has an asynchronous variant); cost O(K L P) per buffer.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .base import Aggregate, Update
from .krum import _check_f
from .mean import fedavg
from .robust import _Collecting

__all__ = ["NormBound", "CenteredClip", "clip_to_norm", "centered_clip"]


def clip_to_norm(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``x`` scaled to L2 norm ``bound`` when longer, else ``x`` itself (no copy)."""
    norm = float(torch.linalg.vector_norm(x))
    return x * (bound / norm) if norm > bound else x


#: columns per block of :func:`centered_clip`: a block of n rows stays in cache while it is read twice
_BLOCK_VALUES = 1 << 18


def centered_clip(rows: torch.Tensor, center: torch.Tensor, tau: float | None, iterations: int,
                  f: int | None = None) -> torch.Tensor:
    """Karimireddy et al.'s iterative centered clipping of the n x P ``rows`` from ``center`` (uniform weights).
    ``tau=None`` (``"auto"``): each iteration's radius is the (n - f)-th smallest of the rows' distances to the
    current centre, ``f`` the Byzantine rows assumed (``None``: floor(n / 2), which makes it the lower median).

    Each iteration reads the rows twice, a block of columns at a time (distances, then the clipped mean as one
    matrix-vector product per block), and allocates no n x P temporary."""
    v = center.to(rows.dtype).clone()
    n, p = rows.shape
    # with at most f Byzantine rows, the (n - f)-th smallest distance is no larger than the largest honest one and
    # no smaller than the (n - 2f)-th smallest honest one, whatever the f send (f = n/2: the lower median)
    rank = n - min(n // 2 if f is None else f, n // 2) - 1
    width = max(1, _BLOCK_VALUES // max(n, 1))
    blocks = [slice(s, min(s + width, p)) for s in range(0, p, width)]
    for _ in range(iterations):
        squares = torch.zeros(n, dtype=torch.float64, device=rows.device)
        for b in blocks:
            squares += (rows[:, b] - v[b]).square().sum(dim=1, dtype=torch.float64)
        norms = squares.sqrt()
        radius = float(norms.sort().values[rank]) if tau is None else tau
        # radius / 0 = inf: a row at the centre is kept as it is (and 0 / 0 below means every row is at the centre)
        weights = (torch.clamp(radius / norms, max=1.0).nan_to_num(1.0) / n).to(rows.dtype)
        step = torch.empty_like(v)
        for b in blocks:
            step[b] = weights @ (rows[:, b] - v[b])
        v += step
    return v


def _positive(name: str, value, what: str = "a number > 0") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be {what}, not {value!r} (--aggregator-option {name.split()[-1]}=...)")
    return float(value)


class NormBound:
    """Clip each update to L2 norm ``bound``, then the sample-weighted mean (see the module docstring)."""

    name = "norm_bound"
    linear = False  # partials pre-aggregated elsewhere (vmap, pool workers) would skip the clip: take each update
    needs_all_updates = False  # streams: one running mean
    needs_plaintext = False  # the clip is client-side under secure aggregation (--aggregator secagg --clip C)

    def __init__(self, bound: float = 3.0) -> None:
        self.bound = _positive("norm_bound bound", bound)
        self._mean = fedavg()
        self._size = 0
        self.clipped = 0  # updates clipped in the current round

    def begin(self, round: int, size: int) -> None:
        self._mean.begin(round, size)
        self._size, self.clipped = size, 0

    def add(self, update: Update) -> None:
        d = update.delta
        if d.dim() != 1 or d.numel() != self._size:
            raise ConfigError(f"update has {d.numel()} elements, the model has {self._size}")
        clipped = clip_to_norm(d, self.bound)
        self.clipped += clipped is not d
        self._mean.add(dataclasses.replace(update, delta=clipped))

    def result(self) -> Aggregate | None:
        return self._mean.result()


class CenteredClip(_Collecting):
    """Iterative centered clipping around the previous round's aggregate (see the module docstring)."""

    name = "centered_clip"

    def __init__(self, tau: float | str = "auto", iterations: int = 1, f: int | None = None) -> None:
        self.tau = None if tau == "auto" else _positive("centered_clip tau", tau, 'a number > 0 or "auto"')
        _check_f(self.name, f)
        if f is not None and tau != "auto":
            raise ConfigError("centered_clip f sets the radius that tau=auto takes: give one of --aggregator-option "
                              "tau=... and f=...")
        self.f = f
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"centered_clip iterations must be an integer >= 1, not {iterations!r} "
                              f"(--aggregator-option iterations=...)")
        self.iterations = iterations
        self.center: torch.Tensor | None = None  # the last aggregate: the next round's starting point

    def check_round_size(self, n: int) -> None:
        """Refuse an ``f`` of half the round or more: the radius would no longer be bounded by an honest distance."""
        if self.f is not None and n >= 2 and not 2 * self.f < n:
            raise ConfigError(f"centered_clip with f={self.f} assumes half or more of the {n} updates per round are "
                              f"Byzantine: lower f (--aggregator-option f=...) or select more clients "
                              f"(--clients-per-round)")

    def _combine(self, rows: torch.Tensor) -> torch.Tensor:
        if self.center is None or self.center.numel() != rows.shape[1]:
            self.center = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
        v = centered_clip(rows, self.center, self.tau, self.iterations, self.f)
        self.center = v.clone()  # the server optimizer may take the aggregate over
        return v
