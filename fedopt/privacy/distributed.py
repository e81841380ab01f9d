"""Distributed differential privacy inside SecAgg+: DP-FedAvg whose noise the clients add (``--dp distributed``).

Each client clips its update to C, quantises it (``fedopt.secagg.quantize``), adds its share of Skellam noise to
the integer vector and only then masks it (:mod:`fedopt.secagg.skellam`: the mechanism, the choice of Skellam over the
distributed discrete Gaussian, the sensitivities Δ₁, Δ₂, the planned minimum of t survivors, the no-wrap bound). The
coordinator unmasks the noised sum of the survivors, divides it by the expected cohort D (the fixed denominator of
central DP-FedAvg) and never holds a noiseless sum. Every update weighs 1.

Accounting (:class:`SkellamAccountant`). dp_accounting has no event for the Skellam mechanism, nor RDP amplification
by sampling for anything but the Gaussian, so two published bounds are written here, and only the RDP → (ε, δ)
conversion is the library's (``dp_accounting.rdp.compute_epsilon``):

1. Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning" (NeurIPS 2021,
   arXiv 2110.04995), the RDP bound of the multi-dimensional Skellam mechanism: with noise Sk(μ) = Poisson(μ) −
   Poisson(μ) per coordinate and integer sensitivities Δ₁, Δ₂, for every α > 1::

       ε(α) ≤ α Δ₂² / (4μ) + min( ((2α − 1) Δ₂² + 6 Δ₁) / (16 μ²),  3 Δ₁ / (4μ) )

   (the same bound, in the scaled form, is ``_skellam_rdp`` of google-research/federated's distributed_dp
   accounting utilities). Here μ = (z Δ₂)² / 2, so the first term is α / (2z²): the Gaussian mechanism's RDP at
   noise multiplier z; the rest vanishes as Δ₂ grows (tests/test_distributed_dp.py checks that limit against
   dp_accounting's ``GaussianDpEvent``).
2. Zhu, Wang, "Poisson Subsampled Rényi Differential Privacy" (ICML 2019), the general upper bound (their
   Theorem 5) for a mechanism with RDP ε(·) run on a Poisson sample of rate q, at integer orders α ≥ 2::

       ε_q(α) ≤ 1/(α−1) · log( (1−q)^(α−1) (αq − q + 1) + C(α,2) q² (1−q)^(α−2) e^{ε(2)}
                               + 3 Σ_{l=3..α} C(α,l) q^l (1−q)^(α−l) e^{(l−1) ε(l)} )

   With the factor 3 replaced by 1 the expression is the exact RDP of the Poisson-subsampled Gaussian (Mironov,
   Talwar, Zhang 2019); the test checks that it then equals dp_accounting's. The general bound costs up to
   log(3)/(α−1) over the tight one, so at the same z distributed DP reports a somewhat larger ε than central DP.

Neighbouring runs differ by one client's presence (add/remove), with Poisson sampling (``--client-sampling
poisson``, the only sampling accounted here). Conditioned on the set of survivors (which the coordinator sees), the
noise of k ≥ t survivors is Sk(k λ_c) with k λ_c ≥ μ, and the Skellam bound above decreases in μ, so the planned
noise bounds every completed round; a round with fewer than t masked inputs is aborted before Unmask
(``QuantConfig.min_inputs``). Every round counts once in the ledger, aborted or not (conservative). The coordinator
is trusted to follow the protocol (honest-but-curious, DESIGN.md's threat model): it chooses the encoding and could
otherwise unmask a sum with too few inputs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from ..aggregators import Aggregate, Update
from ..errors import ConfigError
from ..secagg.skellam import DistributedNoise
from .accounting import Accountant, continue_ledger
from .central import budget_stop_reason

__all__ = ["SkellamAccountant", "DistributedDP", "skellam_rdp", "poisson_subsampled_rdp", "ORDERS"]

#: RDP orders (integers: the subsampling bound is stated for them)
ORDERS = np.array(list(range(2, 129)) + [160, 192, 256], dtype=np.float64)


def skellam_rdp(orders, l1: float, l2: float, mu: float) -> np.ndarray:
    """Agarwal et al.'s RDP bound of the multi-dimensional Skellam mechanism (module docstring, 1)."""
    a = np.asarray(orders, dtype=np.float64)
    return a * l2 ** 2 / (4 * mu) + np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (16 * mu ** 2), 3 * l1 / (4 * mu))


def poisson_subsampled_rdp(q: float, rdp, orders, factor: float = 3.0) -> np.ndarray:
    """Zhu and Wang's general upper bound on the RDP of a mechanism with RDP ``rdp(orders)`` run on a Poisson sample
    of rate ``q`` (module docstring, 2), at integer ``orders`` >= 2; never above the mechanism's own RDP. ``factor`` 1
    gives the exact value for the Gaussian mechanism (a test's reference), 3 the general bound used for accounting."""
    orders = np.asarray(orders, dtype=np.float64)
    own = np.asarray(rdp(orders), dtype=np.float64)
    if q >= 1:
        return own
    top = int(orders.max())
    eps_l = np.asarray(rdp(np.arange(2, top + 1, dtype=np.float64)), dtype=np.float64)  # ε(l), l = 2..top
    out = np.empty_like(orders)
    for i, a in enumerate(orders.astype(int)):
        ls = np.arange(2, a + 1, dtype=np.float64)
        log_comb = gammaln(a + 1) - gammaln(ls + 1) - gammaln(a - ls + 1)
        terms = log_comb + ls * math.log(q) + (a - ls) * math.log1p(-q) + (ls - 1) * eps_l[: a - 1]
        terms[1:] += math.log(factor)  # l >= 3
        first = (a - 1) * math.log1p(-q) + math.log(a * q - q + 1)
        out[i] = np.logaddexp.reduce(np.concatenate([[first], terms])) / (a - 1)
    return np.minimum(out, own)


class SkellamAccountant(Accountant):
    """ε of the Poisson-sampled Skellam mechanism of ``--dp distributed`` after the rounds released so far.

    An :class:`~fedopt.privacy.Accountant` (the same parameters, checks, ledger and state) whose one-round RDP is the
    Skellam bound, Poisson-subsampled; ``bits`` and ``dim`` give the integer sensitivities. Raises ConfigError naming
    the flag of a bad parameter, or a missing dp extra (its RDP → ε conversion).
    """

    def __init__(self, *, population: int, per_round: int | float, noise_multiplier: float, bits: int, dim: int,
                 delta: float | None = None, rounds: int = 0, kind: str = "skellam", sampling: str = "poisson") -> None:
        if kind != "skellam" or sampling != "poisson":
            raise ConfigError(f"--dp distributed accounts Poisson sampling with the Skellam bound, not {kind}/{sampling}")
        if not (isinstance(bits, int) and 2 <= bits <= 53 and isinstance(dim, int) and dim >= 1):
            raise ConfigError(f"distributed DP needs --bits in [2, 53] and a model of >= 1 parameter, not {bits!r}, "
                              f"{dim!r}")
        super().__init__("rdp", "poisson", population=population, per_round=per_round,
                         noise_multiplier=noise_multiplier, delta=delta, rounds=rounds)
        self.kind, self.bits, self.dim = "skellam", bits, dim
        self._rdp = None  # one round's RDP at ORDERS

    def round_rdp(self) -> np.ndarray:
        """One round's RDP at :data:`ORDERS`: the Skellam bound at the planned noise, Poisson-subsampled."""
        if self._rdp is None:
            l1, l2 = DistributedNoise.sensitivity(self.bits, self.dim)
            mu = (self.noise_multiplier * l2) ** 2 / 2
            self._rdp = poisson_subsampled_rdp(self.q, lambda a: skellam_rdp(a, l1, l2, mu), ORDERS)
        return self._rdp

    def _epsilon(self, rounds: int) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        return float(rdp.compute_epsilon(ORDERS, rounds * self.round_rdp(), self.delta)[0])

    def event(self, rounds: int = 1):
        raise ConfigError("the Skellam mechanism has no dp_accounting event: its RDP is the paper's bound")

    def state(self) -> dict:
        return {**super().state(), "bits": self.bits, "dim": self.dim}


class DistributedDP:
    """DP-FedAvg with the clients' Skellam noise, around the SecAgg+ aggregator (module docstring).

    ``inner`` is a :class:`~fedopt.aggregators.secure.SecureAggregator` with uniform weighting and ``dp_noise`` set
    (its clip is C); the round's release is the survivors' noised sum over the expected cohort D. Over the bus the
    coordinator runs the protocol itself and hands the survivors' aggregate to :meth:`release`. The inner aggregator's
    protocol settings (clip, bits, neighbours, threshold, dp_noise) are read through this wrapper.
    """

    linear = False
    needs_all_updates = False
    needs_plaintext = False
    needs_participants = True

    def __init__(self, inner, accountant: SkellamAccountant, *, target_epsilon: float | None = None) -> None:
        if getattr(inner, "dp_noise", None) is None or getattr(inner, "weighting", None) != "uniform":
            raise ConfigError("--dp distributed wraps the secagg aggregator with uniform weights and client noise")
        self.inner, self.accountant, self.target_epsilon = inner, accountant, target_epsilon
        self.name = "ddp-secagg"
        self.expected = accountant.expected_cohort  # D

    def __getattr__(self, name: str):  # the protocol's settings: round_encoding and the bus read them
        if name in ("clip", "bits", "neighbours", "threshold", "max_weight", "weighting", "dp_noise", "last_round"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    def begin(self, round: int, size: int, participants=None) -> None:
        self.inner.begin(round, size, participants=participants)

    def add(self, update: Update) -> None:
        self.inner.add(update)

    def result(self) -> Aggregate | None:
        return self.release(self.inner.result())

    def release(self, aggregate: Aggregate | None) -> Aggregate | None:
        """Count the round and turn the survivors' mean into the noised sum over D (None: the round aborted)."""
        self.accountant.step()
        if aggregate is None:
            return None
        return Aggregate(aggregate.delta * (aggregate.count / self.expected), aggregate.weight, aggregate.count)

    def fields(self) -> dict:
        a, noise = self.accountant, self.inner.dp_noise
        return {"epsilon": a.epsilon(), "delta": a.delta, "noise_multiplier": a.noise_multiplier,
                "dp_clip": self.inner.clip, "dp_min_clients": noise.min_clients, "dp_bits": self.inner.bits}

    def stop_reason(self) -> str | None:
        return budget_stop_reason(self.accountant, self.target_epsilon)

    def state(self) -> dict:
        return {"accountant": self.accountant.state()}

    def load_state(self, state: dict) -> None:
        """Continue the ledger of an earlier process of the same run (ConfigError when its parameters differ)."""
        try:
            saved = SkellamAccountant.from_state(state["accountant"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"the checkpoint's privacy state is not valid: {e}") from None
        continue_ledger(self.accountant, saved)
