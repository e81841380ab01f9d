"""Skellam noise for distributed differential privacy inside secure aggregation.

Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021
(arXiv 2110.04995). Each client adds Sk(λ_c) = Poisson(λ_c) − Poisson(λ_c) to every integer coordinate of its
quantised update before masking; Skellam noise is closed under summation, so k survivors' shares sum to exactly
Sk(k·λ_c), and the coordinator, which only ever unmasks the sum, never holds a noiseless one.

Why Skellam rather than the distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021): the sum of discrete
Gaussians is not a discrete Gaussian (its analysis needs an extra divergence term that grows with the number of
clients), and an exact discrete Gaussian sampler needs Bernoulli(exp(−γ)) loops; the Skellam sum is exact and a
Poisson sampler is all it takes.

Parameters (:class:`DistributedNoise`, public, the same for every client of a run):

* ``noise_multiplier`` z, as in central DP-FedAvg; ``min_clients`` t, the planned minimum number of survivors.
* A client's integer vector q (``quantize.encode_update``: clip to C, scale by s = T/C with T = 2^(b−1) − 1,
  stochastic rounding) has L2 norm below Δ₂ = T + √d (each coordinate's rounding moves it by less than 1) and
  L1 norm at most Δ₁ = min(√d·Δ₂, Δ₂²) (integers: |q_i| ≤ q_i²): these are the mechanism's sensitivities.
* Each client adds Sk(λ_c), λ_c = (z·Δ₂)² / (2t): with at least t survivors the sum carries Sk(μ), μ ≥ (z·Δ₂)²/2,
  whose variance 2μ ≥ (z·Δ₂)²: z times the sensitivity, as in the Gaussian mechanism. Fewer than t survivors would
  leave less noise than planned, so such a round is aborted before anything is unmasked (``QuantConfig.min_inputs``,
  checked by the driver before Unmask); every surviving client beyond t only adds noise.

Capacity: the noised sum of n clients must not wrap modulo 2^k. Its noise is Sk(n·λ_c), a compound Poisson sum of
±1 jumps with variance v = 2nλ_c, so Bennett's inequality (bounded jumps) gives P(|X| ≥ a) ≤ 2·exp(−a²/(2(v + a/3)))
per coordinate. :meth:`DistributedNoise.tail_bound` takes the a that makes the union over d coordinates at most
``WRAP_FAILURE`` (2^−40) a round, a = L/3 + sqrt(L²/9 + 2Lv) with L = ln(2d / 2^−40), and the capacity check
requires n·T + a < 2^(k−1) (``QuantConfig.noise_bound``).

Sampling: Poisson variates by Hörmann's transformed rejection with squeeze (PTRS, "The transformed rejection method
for generating Poisson random variables", 1993) for λ ≥ 10, by inversion below, from uniforms made of an AES-256-CTR
keystream (:mod:`fedopt.secagg.prg`). The key is 32 bytes from the client's noise source: fresh ``os.urandom`` bytes on
a real client, bytes derived from (run seed, round, client) in a simulation, so a simulation is reproducible. The
arithmetic is float64: the sampler is exact up to floating-point rounding in its acceptance test (the kind of gap
Mironov's attack on floating-point Laplace exploits is not analysed here).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from fedopt.errors import SecAggError
from fedopt.secagg import prg

__all__ = ["DistributedNoise", "UniformStream", "add_skellam", "noise_key", "poisson", "skellam", "MAX_LAMBDA",
           "WRAP_FAILURE"]

#: probability, per round, that the noised sum leaves the range the capacity check reserves for it
WRAP_FAILURE = 2.0 ** -40
#: the largest Poisson parameter sampled: PTRS's acceptance test subtracts terms of size about λ·ln λ, so float64 keeps
#: it accurate only while they stay far below 2^53 (at 2^36 they are ~2^41), and the variates must fit int64. Larger
#: noise (large --bits with a large z) is refused, never sampled wrong.
MAX_LAMBDA = 2.0 ** 36


class UniformStream:
    """Uniform float64 deviates in [0, 1) (53 random bits each) from the AES-256-CTR keystream of a 32-byte key."""

    def __init__(self, key: bytes) -> None:
        self._enc = prg.cipher(key)

    def next(self, n: int) -> np.ndarray:
        words = np.frombuffer(self._enc.update(bytes(8 * n)), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _poisson_small(lam: float, n: int, stream: UniformStream) -> np.ndarray:
    """Inversion by sequential search (λ < 10: the expected number of steps is λ + 1)."""
    u = stream.next(n)
    k = np.zeros(n, dtype=np.int64)
    p = math.exp(-lam)
    cdf = np.full(n, p)
    live = u >= cdf
    j = 0
    while live.any():
        j += 1
        p *= lam / j
        k[live] = j
        cdf[live] += p
        live &= u >= cdf
        if p == 0.0:  # the tail below float64 resolution: stop where the cdf is (probability < 1e-300)
            break
    return k


def _poisson_ptrs(lam: float, n: int, stream: UniformStream) -> np.ndarray:
    """Hörmann's PTRS (λ ≥ 10): every candidate is accepted with probability about 0.9 or more."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(n, dtype=np.int64)
    done = 0
    while done < n:
        # candidates are i.i.d. and so are the accepted ones: draw about 1/8 more than are missing, keep the first
        # accepted, and a second pass is rare (one pass of ~25 array operations, not one per straggling rejection)
        m = (n - done) + (n - done) // 8 + 32
        uv = stream.next(2 * m)
        u, v = uv[:m], uv[m:]
        u -= 0.5
        us = np.abs(u)
        np.subtract(0.5, us, out=us)
        k = np.maximum(us, 1e-300)  # k = floor((2a/us + b)·u + λ + 0.43), in place
        np.divide(2 * a, k, out=k)
        k += b
        k *= u
        k += lam + 0.43
        np.floor(k, out=k)
        quick = us >= 0.07
        quick &= v <= vr
        ok = quick.copy()
        slow = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
        if slow.any():
            ks, uss, vs = k[slow], us[slow], v[slow]
            lhs = np.log(vs) + math.log(invalpha) - np.log(a / (uss * uss) + b)
            ok[slow] = lhs <= -lam + ks * loglam - gammaln(ks + 1)
        got = k[ok][: n - done]
        out[done : done + got.size] = got
        done += got.size
    return out


def poisson(lam: float, n: int, stream: UniformStream) -> np.ndarray:
    """``n`` Poisson(λ) variates (int64) from ``stream``."""
    if not (math.isfinite(lam) and 0 <= lam <= MAX_LAMBDA):
        raise SecAggError(f"Poisson parameter must be in [0, 2^36], got {lam!r}")
    if lam == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    return _poisson_small(lam, n, stream) if lam < 10 else _poisson_ptrs(lam, n, stream)


def skellam(lam: float, n: int, stream: UniformStream) -> np.ndarray:
    """``n`` Sk(λ) = Poisson(λ) − Poisson(λ) variates (int64): mean 0, variance 2λ."""
    both = poisson(lam, 2 * n, stream)  # one pass for the two halves: a third less time than two calls
    return both[:n] - both[n:]


def noise_key(source: bytes) -> bytes:
    """The AES key of a client's Skellam noise, derived from its noise source's 32 bytes (the rounding noise uses the
    bytes themselves: the two streams are independent)."""
    return hashlib.blake2b(bytes(source), digest_size=32, person=b"fedopt-skellam").digest()


def add_skellam(vec: np.ndarray, lam: float, key: bytes) -> None:
    """Add Sk(λ) to every word of ``vec`` (uint32/uint64 two's complement residues) in place, modulo 2^k."""
    stream = UniformStream(key)
    step = 1 << 20  # bounded scratch memory for long vectors
    for i in range(0, vec.size, step):
        block = vec[i : i + step]
        np.add(block, skellam(lam, block.size, stream).astype(vec.dtype), out=block)


@dataclass(frozen=True)
class DistributedNoise:
    """The public parameters of the distributed Skellam mechanism (see the module docstring)."""

    noise_multiplier: float  # z: the summed noise's std over the integer L2 sensitivity
    min_clients: int  # t: each client adds the share of t survivors; fewer survivors abort the round

    def __post_init__(self) -> None:
        z, t = self.noise_multiplier, self.min_clients
        if not (isinstance(z, (int, float)) and not isinstance(z, bool) and math.isfinite(z) and 0 < z <= 1e6):
            raise SecAggError(f"distributed noise multiplier must be a number in (0, 1e6], not {z!r}")
        if not (isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 1 << 20):
            raise SecAggError(f"distributed DP's minimum number of clients must be an integer >= 1, not {t!r}")

    @staticmethod
    def sensitivity(bits: int, dim: int) -> tuple[float, float]:
        """(Δ₁, Δ₂) of one client's integer vector of ``dim`` words quantised to ``bits`` bits."""
        l2 = float((1 << (bits - 1)) - 1) + math.sqrt(dim)
        return min(math.sqrt(dim) * l2, l2 * l2), l2

    def client_lambda(self, bits: int, dim: int) -> float:
        """λ_c: each Poisson parameter of one client's share, (z·Δ₂)² / (2t)."""
        return (self.noise_multiplier * self.sensitivity(bits, dim)[1]) ** 2 / (2 * self.min_clients)

    def tail_bound(self, n: int, bits: int, dim: int) -> int:
        """An integer a with P(some coordinate of n clients' summed noise reaches a) <= WRAP_FAILURE (Bennett)."""
        v = 2.0 * n * self.client_lambda(bits, dim)
        ln = math.log(2.0 * max(dim, 1) / WRAP_FAILURE)
        return math.ceil(ln / 3 + math.sqrt(ln * ln / 9 + 2 * ln * v))

    def to_dict(self) -> dict:
        return {"noise_multiplier": float(self.noise_multiplier), "min_clients": int(self.min_clients)}

    @classmethod
    def from_dict(cls, d) -> "DistributedNoise":
        """From WELCOME's ``dp_noise`` table; SecAggError for anything but the two fields, well typed."""
        if not isinstance(d, dict) or set(d) != {"noise_multiplier", "min_clients"}:
            raise SecAggError(f"distributed DP settings must be {{noise_multiplier, min_clients}}, not {d!r}")
        z = d["noise_multiplier"]
        return cls(float(z) if isinstance(z, int) and not isinstance(z, bool) else z, d["min_clients"])
