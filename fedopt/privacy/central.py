"""Central differential privacy for federated averaging: DP-FedAvg, with fixed or adaptive clipping.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018 (DP-FedAvg);
Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021.

:class:`CentralDP` wraps the round's aggregator (``fedavg`` or ``mean``). The coordinator sees plaintext updates and
adds the noise itself (central DP: the guarantee covers what leaves it, the sequence of global models). A round::

    add(update)   Δ_k ← Δ_k · min(1, C/‖Δ_k‖)        after the RoundServer's own checks; S ← S + Δ_k
    result()      Δ̄ = (S + N(0, (z_Δ·C)² I)) / D     one release, counted by the accountant

* Weights are uniform: every sampled client counts once, whatever its sample count (``fedavg``'s weights would need a
  cap and the population's total weight to bound the sensitivity). Adding or removing one client moves S by at most
  C; with fixed-size sampling (one client replaced by another) by at most 2C, which the accountant accounts for.
* The denominator D is fixed: the expected number of sampled clients, q·N (the paper's estimator with w_k = 1). It
  never depends on who reported, so a client's absence shows only through the noised sum.
* Every round releases, even one with no update (noise alone), so the ledger counts every completed round.
* The noise comes from a ``torch.Generator`` seeded by (run seed, round): simulations are reproducible, and the
  draw is the same on any device. A production coordinator should use ``noise_source="secure"`` (``--noise-source
  secure``): normal deviates made from ``os.urandom`` bytes (Box–Muller in float64). Either way the noise is
  floating-point; the attack on its low-order bits (Mironov, CCS 2012) is not mitigated.

Adaptive clipping (``adaptive``, :class:`AdaptiveClip`): each client also contributes its bit b_k = [‖Δ_k‖ ≤ C],
centred to b_k − ½ (sensitivity ½); the coordinator releases the fraction b̄ = (Σ(b_k − ½) + N(0, σ_b²))/D + ½ and
moves the clip geometrically, C ← C·exp(−η_C (b̄ − γ)). The paper's defaults: γ = 0.5, η_C = 0.2, C₀ = 0.1,
σ_b = D/20. The two Gaussians together are one Gaussian mechanism of multiplier z when the update noise uses
z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (Andrew et al.), so the accountant sees z, and ε is the same as with a fixed clip.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..aggregators import Aggregate, Update
from ..errors import ConfigError
from .accounting import Accountant, continue_ledger

__all__ = ["CentralDP", "AdaptiveClip", "budget_stop_reason", "clip_update", "noise_seed", "secure_normal",
           "NOISE_SOURCES"]

NOISE_SOURCES = ("seeded", "secure")
#: a clipped update is scaled to just under C, so float32 rounding can never take its norm over C
_UNDER = 1 - 2.0 ** -20


def clip_update(delta: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """(``delta`` scaled to L2 norm at most ``clip``, its norm before clipping). A new tensor when it is scaled,
    ``delta`` itself otherwise. The norm is computed in float64."""
    norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    if norm <= clip:
        return delta, norm
    return delta * (clip / norm * _UNDER), norm


def noise_seed(seed: int, round: int) -> int:
    """The noise generator's seed of ``round`` of a run seeded ``seed`` (BLAKE2b, 63 bits)."""
    h = hashlib.blake2b(f"{seed}/{round}".encode(), digest_size=8, person=b"fedopt-dp-noise").digest()
    return int.from_bytes(h, "little") >> 1


def secure_normal(n: int) -> torch.Tensor:
    """``n`` standard normal deviates (float64) from the operating system's cryptographic source (Box–Muller)."""
    m = (n + 1) // 2
    bits = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m) >> np.uint64(11)
    u1 = (bits[0].astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]: log(u1) is finite
    u2 = bits[1].astype(np.float64) * 2.0 ** -53
    r = np.sqrt(-2.0 * np.log(u1))
    out = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(out)


def budget_stop_reason(accountant, target_epsilon: float | None) -> str | None:
    """Why a run must stop before its next release (one more would take ε over ``target_epsilon``), or None."""
    if target_epsilon is None:
        return None
    a = accountant
    after = a.epsilon(a.rounds + 1)
    if after <= target_epsilon:
        return None
    return (f"privacy budget reached: round {a.rounds + 1} would take epsilon from {a.epsilon():.4g} to "
            f"{after:.4g}, over --target-epsilon {target_epsilon:g} (delta {a.delta:.3g})")


@dataclass
class AdaptiveClip:
    """The clip as a private estimate of the ``quantile`` γ of the update norms (Andrew et al.; module docstring).
    ``count_stddev`` σ_b defaults to D/20 (D: expected clients per round)."""

    quantile: float = 0.5  # γ: the fraction of updates that should go unclipped
    lr: float = 0.2  # η_C of the geometric update
    count_stddev: float | None = None  # σ_b of the noised unclipped count

    def __post_init__(self) -> None:
        if not (isinstance(self.quantile, (int, float)) and 0 < self.quantile < 1):
            raise ConfigError(f"--adaptive-clip must be a quantile in (0, 1), not {self.quantile!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"adaptive clipping's learning rate must be > 0, not {self.lr!r}")

    def next_clip(self, clip: float, unclipped_fraction: float) -> float:
        """The geometric update C·exp(−η_C (b̄ − γ))."""
        return clip * math.exp(-self.lr * (unclipped_fraction - self.quantile))


class CentralDP:
    """DP-FedAvg around a linear aggregator (see the module docstring).

    ``accountant`` holds z, the sampling and the ledger; ``clip`` is C (the initial clip with ``adaptive``);
    ``target_epsilon``, when given, is the budget :meth:`stop_reason` guards; ``seed`` keys the noise of each round;
    ``denominator`` replaces the accountant's expected cohort as D (a FedBuff buffer's K).
    Raises ConfigError for an ``inner`` aggregator that is not a plain mean, a bad clip, or adaptive clipping whose
    count noise is too small for z.
    """

    linear = False  # each update is clipped on its own: pre-aggregated partial means cannot be merged
    needs_all_updates = False  # O(P): one running sum
    needs_plaintext = True  # the coordinator clips plaintext updates (no secure masking under it)

    def __init__(self, inner, accountant: Accountant, *, clip: float, seed: int = 0,
                 adaptive: AdaptiveClip | None = None, noise_source: str = "seeded",
                 target_epsilon: float | None = None, device: torch.device | str = "cpu",
                 denominator: float | None = None) -> None:
        name = getattr(inner, "name", repr(inner))
        if not getattr(inner, "linear", False) or name not in ("fedavg", "mean"):
            raise ConfigError(f"--dp central wraps a mean of the updates: use --aggregator fedavg or mean, not "
                              f"{name!r} (its output is not a sum whose sensitivity clipping bounds)")
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ConfigError(f"--dp-clip-norm must be a number > 0, not {clip!r}")
        if noise_source not in NOISE_SOURCES:
            raise ConfigError(f"--noise-source must be one of {', '.join(NOISE_SOURCES)}, not {noise_source!r}")
        self.name = f"dp-{name}"
        self.accountant = accountant
        self.clip = float(clip)
        self.seed = seed
        self.adaptive = adaptive
        self.noise_source = noise_source
        self.target_epsilon = target_epsilon
        self.device = torch.device(device)  # where a round without updates makes its sum
        self.expected = float(denominator) if denominator else accountant.expected_cohort  # D (FedBuff: K)
        z = accountant.noise_multiplier
        self.update_multiplier = z  # z_Δ
        if adaptive is not None:
            sb = self.expected / 20 if adaptive.count_stddev is None else float(adaptive.count_stddev)
            if not 2 * sb > z:
                raise ConfigError(f"--adaptive-clip: the unclipped count's noise σ_b = {sb:g} (D/20, D = "
                                  f"{self.expected:g} expected clients per round) needs 2σ_b > --noise-multiplier "
                                  f"{z:g}: sample more clients per round or lower the noise multiplier")
            self.count_stddev = sb
            self.update_multiplier = (z ** -2 - (2 * sb) ** -2) ** -0.5
        self.last: dict = {}  # the last release's public facts: clip used, noised unclipped fraction
        self._round = 0
        self._size = 0
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._unclipped = 0
        self._released: Aggregate | None = None

    # ---- the Aggregator protocol ------------------------------------------------------------------------------------
    def begin(self, round: int, size: int) -> None:
        self._round, self._size = round, size
        self._sum, self._count, self._unclipped, self._released = None, 0, 0, None

    def add(self, update: Update) -> None:
        """Clip ``update``'s delta to the round's C and add it to the sum (weight 1). ConfigError for a wrong length
        or non-finite values (the RoundServer refuses those first)."""
        d = update.delta
        if d.dim() != 1 or d.numel() != self._size:
            raise ConfigError(f"update has {d.numel()} elements, the model has {self._size}")
        self._open()
        clipped, norm = clip_update(d.detach(), self.clip)
        if not math.isfinite(norm):
            raise ConfigError("non-finite values (NaN or Inf) in the update")
        self._accumulator(d).add_(clipped.to(self._sum.dtype))
        self._count += 1
        self._unclipped += norm <= self.clip

    def add_rows(self, rows: torch.Tensor, norms: torch.Tensor, updates) -> None:
        """:meth:`add` for a batch: ``rows`` (B x P) are the deltas, ``norms`` their L2 norms in float64 (the
        RoundServer's one pass, :meth:`~fedopt.engine.round.RoundServer.offer_rows`). Each row is scaled to at most
        C as :func:`clip_update` scales it, and the scaled rows are summed in one matrix product."""
        if rows.dim() != 2 or rows.shape[1] != self._size or norms.shape != (rows.shape[0],):
            raise ConfigError(f"update rows of shape {tuple(rows.shape)} for a model of {self._size}")
        self._open()
        if not bool(torch.isfinite(norms).all()):
            raise ConfigError("non-finite values (NaN or Inf) in the update")
        under = norms <= self.clip
        scale = torch.where(under, torch.ones_like(norms), self.clip / norms * _UNDER)
        self._accumulator(rows).add_(scale.to(device=rows.device, dtype=rows.dtype) @ rows.detach())
        self._count += rows.shape[0]
        self._unclipped += int(under.sum())

    def _open(self) -> None:
        """ConfigError once the round is released: an update can no longer join it."""
        if self._released is not None:
            raise ConfigError(f"round {self._round} was already released; an update cannot join it")

    def _accumulator(self, like: torch.Tensor) -> torch.Tensor:
        """The round's running sum, made on first use on ``like``'s device (float64 for float64 updates)."""
        if self._sum is None:
            self._sum = torch.zeros(self._size, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                                    device=like.device)
        return self._sum

    def result(self) -> Aggregate:
        """The round's release: the noised sum over the fixed denominator, counted by the accountant once (a second
        call returns the same release). Never None: a round without updates releases noise alone."""
        if self._released is not None:
            return self._released
        total = self._sum if self._sum is not None else torch.zeros(self._size, device=self.device)
        normal = self._normal_source()
        noise = normal(self._size).to(device=total.device, dtype=total.dtype)
        total = total + noise * (self.update_multiplier * self.clip)
        self.last = {"dp_clip": self.clip}
        if self.adaptive is not None:
            centred = self._unclipped - 0.5 * self._count + float(normal(1)[0]) * self.count_stddev
            fraction = centred / self.expected + 0.5
            self.last["unclipped"] = fraction
            self.clip = self.adaptive.next_clip(self.clip, fraction)
        self.accountant.step()
        self._released = Aggregate(total / self.expected, float(self._count), self._count)
        return self._released

    def _normal_source(self):
        """``normal(n)`` -> n standard normal deviates: the round's seeded generator, or the OS's secure source."""
        if self.noise_source == "secure":
            return secure_normal
        gen = torch.Generator(device="cpu").manual_seed(noise_seed(self.seed, self._round))
        return lambda n: torch.randn(n, generator=gen, dtype=torch.float64 if self._sum is not None
                                     and self._sum.dtype == torch.float64 else torch.float32)

    # ---- the run's budget -------------------------------------------------------------------------------------------
    def fields(self) -> dict:
        """The metrics of the last release: ε and δ so far, the clip it used, and (adaptive) the noised fraction
        of unclipped updates."""
        a = self.accountant
        return {"epsilon": a.epsilon(), "delta": a.delta, "noise_multiplier": a.noise_multiplier, **self.last}

    def stop_reason(self) -> str | None:
        """Why the run must stop before its next round (one more release would exceed ``target_epsilon``), or None."""
        return budget_stop_reason(self.accountant, self.target_epsilon)

    def state(self) -> dict:
        """What a checkpoint keeps: the accountant's ledger and the current clip (adaptive clipping moves it)."""
        return {"accountant": self.accountant.state(), "clip": self.clip}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` of an earlier process of the same run. ConfigError when its DP parameters
        differ from this run's (a resumed run must not change z, δ, the sampling or the population)."""
        try:
            saved = Accountant.from_state(state["accountant"])
            clip = float(state["clip"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the checkpoint's privacy state is not valid: {e}") from None
        continue_ledger(self.accountant, saved)
        self.clip = clip
