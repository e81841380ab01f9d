"""Clip, quantise and encode float updates into Z_{2^k} for masked summation, and back.

Secure aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) sums integer vectors modulo
2^k. This module maps a float update to such a vector and a modular sum back to floats.

Encoding of one client's update ``x`` (length m) with clip ``c``, ``bits`` b and modulus 2^k:

1. **L2 clipping**: if ||x||_2 > c then x <- x * c / ||x||_2. L2 (not L-infinity) because it is the norm
   DP-FedAvg bounds, and it implies |x_i| <= c for every coordinate, which step 3 needs. The clip
   rate reported is the fraction of *updates* clipped (:attr:`Encoded.clipped` per update).
2. **Signed stochastic quantisation**: scale s = (2^(b-1) - 1) / c; q = floor(s*x + U), U ~ U[0, 1)
   (rounding noise, not a mask: it is drawn from an AES-CTR keystream under a caller-given 32-byte
   seed, 23 or 52 random mantissa bits per coordinate; measured for 10^6 float32 values: 0.74 ms against
   1.82 ms for numpy's generator).
   E[q] = s*x (unbiased) and q lies in [-(2^(b-1)-1), 2^(b-1)-1].
3. **Weighting** (weighted FedAvg): q <- w * q, an exact integer product, with ``w`` = num_samples
   clamped to [0, W] and W = ``max_weight`` the run's public cap (``--max-samples``), never a client's
   claim. Scaling after rounding keeps full resolution for small weights.
4. **Two's complement mod 2^k**, k a multiple of 4 up to 32 (held in uint32 words) or 64 (uint64); with weights
   the integer ``w`` is appended as coordinate m, so the vector has m+1 words. Below 32 bits the words are
   residues mod 2^32 whose low k bits are the residue mod 2^k: masking and summing mod 2^32 agree with mod 2^k
   (2^k divides 2^32), so a client reduces its masked vector to k bits for the wire (:mod:`fedopt.secagg.codec`
   packs two values into k/4 bytes) and the server reduces the unmasked sum (:func:`residue`).

Decoding a modular sum S of n such vectors: read S as signed k-bit integers, divide by s (and, when
weighted, by sum(w), the last word of S).

**No wrap**: the true integer sum must fit in signed k bits whatever the clients claim: every word is at
most T = 2^(b-1)-1 (times W when weighted) in absolute value, so :func:`check_capacity` requires
n*T*W < 2^(k-1) (W = 1 unweighted) and raises otherwise. Under distributed DP the clients also add Skellam
noise (:mod:`fedopt.secagg.skellam`), and ``noise_bound`` B, a tail bound on the summed noise, is reserved too:
n*T*W + B < 2^(k-1). The width therefore follows from public
values only (n, b, W): e.g. b = 16 and W = 10^6 need k = 64 for any n >= 1; with k = 32, n*W <= 65,538.

**Bounds on the decoded sum**: honest inputs give |S_i| <= T*sum(w) and 0 < sum(w) <= n*W.
:func:`decode_sum` checks both when told n, so a client that folds an out-of-range word into its
masked vector (which no one can see) is caught when the sum breaks them.

**Error bound**: per coordinate and client |q/s - x| < 1/s = ``step`` (one quantisation step), so the
dequantised sum is within n*step of the sum of the clipped floats, per coordinate (typical error
~ sqrt(n)*step/2, since rounding errors are independent and zero-mean). Weighted, the decoded mean is
a weighted mean of per-client errors below one step: within ``step`` of the exact weighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedopt.errors import SecAggError
from fedopt.secagg import prg
from fedopt.secagg.parallel import for_ranges

__all__ = [
    "Encoded",
    "QuantConfig",
    "check_capacity",
    "clip_fraction",
    "clip_l2",
    "decode_sum",
    "encode_update",
    "l2_norm",
    "residue",
    "MODULUS_BITS",
]

#: the widths k of Z_{2^k} a round may use: multiples of 4 (two values pack into k/4 bytes) up to 32, and 64
MODULUS_BITS = (8, 12, 16, 20, 24, 28, 32, 64)


@dataclass(frozen=True)
class QuantConfig:
    """How every client of one round encodes its update; public, identical for all."""

    clip: float  # L2 clip norm c (> 0)
    bits: int = 16  # quantisation bits b: integers in [-(2^(b-1)-1), 2^(b-1)-1]
    modulus_bits: int = 32  # k: arithmetic mod 2^k, one of MODULUS_BITS (uint32 words up to 32, uint64 for 64)
    max_weight: int | None = None  # W, the public cap on one weight (weighted FedAvg); None = unweighted
    # distributed DP (fedopt.secagg.skellam), server side only (the Setup message does not carry them): the range
    # reserved for the summed noise, and the fewest inputs whose sum may be unmasked (fewer carry too little noise)
    noise_bound: int = 0
    min_inputs: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"QuantConfig.clip must be a finite number > 0, got {self.clip!r}")
        if self.modulus_bits not in MODULUS_BITS:
            raise SecAggError(f"QuantConfig.modulus_bits must be one of {MODULUS_BITS}, got {self.modulus_bits!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= min(self.modulus_bits, 53):
            raise SecAggError(
                f"QuantConfig.bits must be in [2, {min(self.modulus_bits, 53)}], got {self.bits!r}"
            )
        if self.max_weight is not None and (
            not isinstance(self.max_weight, int) or self.max_weight < 1
        ):
            raise SecAggError(f"QuantConfig.max_weight must be an int >= 1, got {self.max_weight!r}")
        if not (isinstance(self.noise_bound, int) and self.noise_bound >= 0 and isinstance(self.min_inputs, int)
                and self.min_inputs >= 0):
            raise SecAggError(f"QuantConfig.noise_bound and min_inputs must be ints >= 0, got "
                              f"{self.noise_bound!r}, {self.min_inputs!r}")

    @property
    def dtype(self) -> np.dtype:
        """uint32 for k <= 32, uint64 for k = 64."""
        return np.dtype(np.uint32 if self.modulus_bits <= 32 else np.uint64)

    @property
    def scale(self) -> float:
        """s = (2^(b-1) - 1) / c: integers per unit of update."""
        return ((1 << (self.bits - 1)) - 1) / self.clip

    @property
    def step(self) -> float:
        """One quantisation step 1/s: the per-coordinate, per-client error bound."""
        return 1.0 / self.scale

    @property
    def weighted(self) -> bool:
        return self.max_weight is not None

    def vector_length(self, m: int) -> int:
        """Words in an encoded vector for an update of length m."""
        return m + (1 if self.weighted else 0)


@dataclass(frozen=True)
class Encoded:
    """One client's encoded update, ready to mask."""

    vector: np.ndarray  # uint32/uint64, length m (+1 weight word when weighted)
    norm: float  # L2 norm before clipping
    clipped: bool  # whether clipping changed the update


def check_capacity(cfg: QuantConfig, n: int) -> None:
    """Raise SecAggError unless the sum of ``n`` encoded vectors cannot wrap modulo 2^k: n*T*W + B < 2^(k-1), with B
    the range ``noise_bound`` reserved for distributed DP noise (0 without it)."""
    if not isinstance(n, int) or n < 1:
        raise SecAggError(f"number of clients must be >= 1, got {n}")
    top = (1 << (cfg.bits - 1)) - 1
    w = cfg.max_weight if cfg.weighted else 1
    if n * top * w + cfg.noise_bound >= 1 << (cfg.modulus_bits - 1):
        what = f" with weights up to {cfg.max_weight}" if cfg.weighted else ""
        noise = f" + {cfg.noise_bound} (noise)" if cfg.noise_bound else ""
        raise SecAggError(
            f"modulus 2^{cfg.modulus_bits} too small for {n} clients at {cfg.bits} bits{what}: "
            f"{n}*{top}*{w}{noise} would wrap (use modulus_bits=64, fewer bits or a smaller max weight)"
        )


def residue(total: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``total`` (uint32/uint64 words, residues mod 2^32 or 2^64) reduced mod 2^k in place; returns it."""
    if modulus_bits < 8 * total.dtype.itemsize:
        np.bitwise_and(total, total.dtype.type((1 << modulus_bits) - 1), out=total)
    return total


_BLOCK = 1 << 16  # values per block of the chunked passes (a few 256 KiB buffers: they stay in cache)


def _float_vector(x) -> np.ndarray:
    """``x`` as a 1-D float32/float64 array, without copying when it already is one (torch CPU tensors
    and numpy arrays share memory); other dtypes are converted to float64."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return x.reshape(-1)


def _sum_squares(x: np.ndarray) -> float:
    """Sum of squares, block by block and split across threads. Squares of float32 values are summed in
    float32 per block (numpy's pairwise sum: relative error ~ 1e-7 * log2(block)), block sums in float64."""
    parts: list[float] = []

    def walk(start: int, stop: int) -> None:
        buf = np.empty(min(stop - start, _BLOCK), dtype=x.dtype)
        total = 0.0
        for i in range(start, stop, _BLOCK):
            c = x[i : min(i + _BLOCK, stop)]
            b = buf[: c.size]
            np.multiply(c, c, out=b)
            total += float(b.sum())
        parts.append(total)

    for_ranges(walk, x.size, x.itemsize)
    return math.fsum(parts)


def l2_norm(x: np.ndarray) -> float:
    """The L2 norm of a float32/float64 vector; raises SecAggError on NaN/inf.

    No full-size copy and no BLAS ``dot`` (whose worker threads spin and slow down by 10x or more on a
    loaded machine). A finite sum of squares means every value is finite, so this is also the finiteness
    check (one pass instead of two). Where float32 squares overflow or underflow, it is recomputed in
    float64 with rescaling.
    """
    sq = _sum_squares(x) if x.size else 0.0
    if not math.isfinite(sq) or (sq == 0.0 and x.size and np.any(x)):
        if not np.all(np.isfinite(x)):
            raise SecAggError("update contains NaN or infinite values")
        return float(np.linalg.norm(x.astype(np.float64)))
    return math.sqrt(sq)


def clip_l2(x: np.ndarray, clip: float) -> tuple[np.ndarray, float, bool]:
    """``(x scaled to L2 norm <= clip, original norm, whether it was clipped)``; a float64 copy.

    (:func:`encode_update` does not call this: it folds the clip factor into its one scaling pass.)
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    norm = l2_norm(x)
    if norm > clip:
        return x * (clip / norm), norm, True
    return x.copy(), norm, False


def encode_update(
    x: np.ndarray,
    cfg: QuantConfig,
    noise: bytes | np.random.Generator,
    weight: int | None = None,
) -> Encoded:
    """Clip, weight, stochastically quantise and encode ``x`` modulo 2^k (see module docstring).

    ``x`` may be float32 or float64 (numpy, or anything ``np.asarray`` accepts, e.g. a CPU tensor);
    it is read, never modified or copied. ``noise`` seeds the rounding noise: 32 bytes, or a numpy
    Generator that 32 seed bytes are drawn from. ``weight`` (num_samples, an int >= 0; clamped to
    max_weight) is required iff ``cfg`` is weighted. Clip factor and scale are folded into one multiplier;
    after the norm pass, one blocked pass (split across threads) scales, adds the noise, clamps, floors
    into the integer vector and multiplies by the weight.
    """
    x = _float_vector(x)
    if isinstance(noise, np.random.Generator):
        noise = noise.bytes(prg.SEED_BYTES)
    norm = l2_norm(x)
    was_clipped = norm > cfg.clip
    factor = cfg.scale * (cfg.clip / norm if was_clipped else 1.0)
    w = 1
    if cfg.weighted:
        if weight is None or isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 0:
            raise SecAggError(f"weight must be an int >= 0, got {weight!r}")
        w = min(int(weight), cfg.max_weight)  # the public cap, whatever the count
    elif weight is not None:
        raise SecAggError("weight given but QuantConfig.max_weight is None (unweighted)")
    top = (1 << (cfg.bits - 1)) - 1
    m = x.size
    # float32 holds s*x + u to within 2^-8 of a step while |s*x| < 2^16, and costs half the memory traffic.
    # Noise: random mantissa bits under the exponent of 1.0 make a float in [1, 2); minus 1 is U[0, 1), exact.
    if cfg.bits <= 16:
        ft, wt, shift, one = np.float32, np.uint32, 9, 0x3F800000
    else:
        ft, wt, shift, one = np.float64, np.uint64, 12, 0x3FF0000000000000
    # signed ints reinterpreted as unsigned (two's complement) are the residues mod 2^k
    it, ut = (np.int32, np.uint32) if cfg.modulus_bits <= 32 else (np.int64, np.uint64)
    vec = np.empty(cfg.vector_length(m), dtype=it)
    f_one, f_top, f_factor = ft(1), ft(top), ft(factor)
    words = np.dtype(wt).itemsize

    def walk(start: int, stop: int) -> None:
        enc, sc = prg.cipher(noise, start * words // 16), prg.scratch()
        buf = np.empty(min(stop - start, _BLOCK), dtype=ft)
        for i in range(start, stop, _BLOCK):
            n = min(_BLOCK, stop - i)
            f = buf[:n]
            np.multiply(x[i : i + n], f_factor, out=f, casting="same_kind")
            u = np.frombuffer(sc.fill(enc, n * words), dtype=wt, count=n)
            np.right_shift(u, shift, out=u)
            np.bitwise_or(u, one, out=u)
            unit = u.view(ft)
            np.subtract(unit, f_one, out=unit)  # U[0, 1)
            np.add(f, unit, out=f)  # stochastic rounding: floor(s*x + U) is unbiased
            np.clip(f, -f_top, f_top, out=f)  # guards the one-ulp overshoot of s * c at |x_i| = c
            q = vec[i : i + n]
            np.floor(f, out=q, casting="unsafe")  # |f| <= top <= 2^(k-1) - 1: the cast is exact
            if w != 1:
                np.multiply(q, w, out=q)  # |w q| <= W top < 2^(k-1) (check_capacity): exact

    for_ranges(walk, m, words)
    if cfg.weighted:
        vec[m] = w
    return Encoded(vec.view(ut), norm, bool(was_clipped))


def clip_fraction(encoded: Iterable[Encoded]) -> float:
    """The fraction of updates that clipping changed (0.0 for none); the round's clip rate."""
    flags = [e.clipped for e in encoded]
    return sum(flags) / len(flags) if flags else 0.0


def decode_sum(total: np.ndarray, cfg: QuantConfig, count: int | None = None) -> tuple[np.ndarray, int | None]:
    """Dequantise a modular sum: ``(float64 vector, total weight)``.

    Unweighted: the vector approximates the sum of clipped updates and the weight is None.
    Weighted: it approximates the weighted mean sum(w x)/sum(w); raises SecAggError if sum(w) <= 0.
    With ``count`` (the number of inputs summed) it also raises when the sum breaks the bounds honest inputs
    keep (0 < sum(w) <= count*W, |S_i| <= T*sum(w), or |S_i| <= T*count unweighted): some input was out of range.
    """
    total = np.asarray(total)
    if total.dtype != cfg.dtype or total.ndim != 1:
        raise SecAggError(f"modular sum must be a 1-D {cfg.dtype} array, got {total.dtype}")
    k = cfg.modulus_bits
    if k in (32, 64):
        signed = total.view(np.int32 if k == 32 else np.int64)
    else:  # the low k bits, sign-extended
        half = 1 << (k - 1)
        signed = ((total.astype(np.int64) & ((1 << k) - 1)) ^ half) - half
    top = (1 << (cfg.bits - 1)) - 1
    if not cfg.weighted:
        if count is not None:
            _check_bounds(signed, top * count + cfg.noise_bound)
        return signed.astype(np.float64) / cfg.scale, None
    if total.size < 1:
        raise SecAggError("weighted modular sum is missing its weight word")
    w = int(signed[-1])
    if w <= 0:
        raise SecAggError(f"total weight of the round is {w}; cannot average")
    if count is not None:
        if w > count * cfg.max_weight:
            raise SecAggError(f"total weight {w} exceeds {count} x the cap {cfg.max_weight}: an input was out of range")
        _check_bounds(signed[:-1], top * w + cfg.noise_bound)
    return signed[:-1].astype(np.float64) / (cfg.scale * w), w


def _check_bounds(signed: np.ndarray, bound: int) -> None:
    if signed.size and (int(signed.max()) > bound or int(signed.min()) < -bound):
        raise SecAggError(f"the decoded sum leaves [-{bound}, {bound}], the range honest inputs keep: "
                          f"an input was out of range")
