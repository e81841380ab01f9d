"""Shamir t-of-n secret sharing of 32-byte secrets, as used by secure aggregation.

Bonawitz et al. (CCS 2017) share each client's self-mask seed ``b_u`` and mask secret key ``s_u^SK``
t-out-of-n; Bell et al. (CCS 2020) share them among the client's k graph neighbours only.

Field: GF(p) with the Mersenne prime p = 2^521 - 1. A secret is 32 arbitrary bytes, i.e. any integer
below 2^256, so the field must be larger than 2^256: 2^255 - 19 is too small (an X25519 private key
or a random seed can exceed it). 2^521 - 1 is a well-known prime, one field element holds a whole
secret (no chunking), and a share is 66 bytes. Arithmetic is on Python ints; x-coordinates are
positive integers (never 0, which would be the secret itself); polynomial coefficients come from
``secrets.randbelow``.

Reconstruction is Lagrange interpolation at 0 over exactly ``t`` shares (the ``t`` smallest ids, so
the result does not depend on dict order). Fewer than ``t`` shares, duplicate or invalid ids, or a
value outside the field raise :class:`fedopt.errors.SecAggError`. With t-1 shares every secret is
equally likely: the scheme is information-theoretically hiding.

Shares come from peers that may lie. Plain Shamir cannot notice a forged share: any ``t`` values
interpolate to *some* secret, and a liar who knows its Lagrange coefficient can shift the secret by an
amount it chooses. :func:`reconstruct_verified` therefore takes a ``check`` (the owner's commitment:
a hash of the seed, or the advertised public key of a private key) and, when the ``t`` smallest ids
fail it, searches other ``t``-subsets of the shares it has, fewest exclusions first, so a single liar
costs at most one interpolation per share held. The subset that passes fixes the polynomial; every
share off it is reported as bad. No passing subset within ``budget`` interpolations raises.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping

from fedopt.errors import SecAggError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "decode_share",
    "encode_share",
    "reconstruct",
    "reconstruct_verified",
    "share",
]

#: the field modulus, 2^521 - 1 (Mersenne prime)
PRIME = (1 << 521) - 1
#: length of a secret in bytes
SECRET_BYTES = 32
#: length of an encoded share value in bytes (ceil(521 / 8))
SHARE_BYTES = 66


def _check_ids(ids: Iterable[int]) -> list[int]:
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise SecAggError(f"duplicate Shamir share ids in {sorted(ids)}")
    for x in ids:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < PRIME:
            raise SecAggError(f"Shamir share id must be an integer in [1, p), got {x!r}")
    return ids


def share(secret: bytes, t: int, ids: Iterable[int]) -> dict[int, int]:
    """Split ``secret`` (<= 32 bytes, big-endian integer) into one share per id; any ``t`` recover it.

    Raises SecAggError if ``t`` is not in [1, len(ids)], an id is invalid or repeated, or the secret
    is longer than 32 bytes.
    """
    ids = _check_ids(ids)
    if not isinstance(t, int) or not 1 <= t <= len(ids):
        raise SecAggError(f"Shamir threshold t={t!r} must be in [1, {len(ids)}] (number of shares)")
    if len(secret) > SECRET_BYTES:
        raise SecAggError(f"Shamir secret must be at most {SECRET_BYTES} bytes, got {len(secret)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in ids:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], t: int, length: int = SECRET_BYTES) -> bytes:
    """Recover the secret (as ``length`` big-endian bytes) from at least ``t`` shares ``{id: value}``.

    Raises SecAggError with fewer than ``t`` shares, invalid ids or values, or when the interpolated
    value does not fit in ``length`` bytes (a sign of corrupted shares).
    """
    ids = _check_ids(shares)
    if not isinstance(t, int) or t < 1:
        raise SecAggError(f"Shamir threshold t={t!r} must be >= 1")
    if len(ids) < t:
        raise SecAggError(f"need {t} Shamir shares to reconstruct, got {len(ids)}")
    xs = sorted(ids)[:t]
    for x in xs:
        if not isinstance(shares[x], int) or not 0 <= shares[x] < PRIME:
            raise SecAggError(f"Shamir share value for id {x} is outside the field")
    secret = 0
    for xi, li in zip(xs, _lagrange_at_zero(tuple(xs))):
        secret = (secret + shares[xi] * li) % PRIME
    if secret >> (8 * length):
        raise SecAggError("reconstructed Shamir secret is too large: shares are corrupted")
    return secret.to_bytes(length, "big")


def _interpolate(shares: Mapping[int, int], xs: tuple[int, ...], length: int) -> bytes | None:
    """The secret the shares at ``xs`` interpolate to, or None when it does not fit in ``length`` bytes."""
    secret = 0
    for xi, li in zip(xs, _lagrange_at_zero(xs)):
        secret = (secret + shares[xi] * li) % PRIME
    return None if secret >> (8 * length) else secret.to_bytes(length, "big")


def _value_at(shares: Mapping[int, int], xs: tuple[int, ...], x: int) -> int:
    """The polynomial through the shares at ``xs``, evaluated at ``x``."""
    total = 0
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + shares[xi] * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct_verified(
    shares: Mapping[int, int],
    t: int,
    check: Callable[[bytes], bool],
    *,
    suspects: Iterable[int] = (),
    budget: int = 512,
    length: int = SECRET_BYTES,
) -> tuple[bytes, frozenset[int]]:
    """``(secret, ids of bad shares)``: the secret that ``check`` accepts, from any ``t`` honest shares.

    Tries the ``t`` smallest ids first (one interpolation when nobody lies), then ``t``-subsets that leave
    out ever more shares, those of ``suspects`` (ids already caught lying about another secret) first.
    Once a subset's secret passes ``check``, every share that is not on its polynomial is bad.

    Raises SecAggError with fewer than ``t`` shares, invalid ids or values, or when no subset passes
    within ``budget`` interpolations (too many liars: fewer than ``t`` honest shares, or a search too
    long to be worth it).
    """
    ids = _check_ids(shares)
    if not isinstance(t, int) or t < 1:
        raise SecAggError(f"Shamir threshold t={t!r} must be >= 1")
    if len(ids) < t:
        raise SecAggError(f"need {t} Shamir shares to reconstruct, got {len(ids)}")
    for x in ids:
        if not isinstance(shares[x], int) or not 0 <= shares[x] < PRIME:
            raise SecAggError(f"Shamir share value for id {x} is outside the field")
    suspects = set(suspects) & set(ids)
    # suspects go last, so the first subsets tried leave them out
    order = sorted(x for x in ids if x not in suspects) + sorted(suspects)
    tried: set[tuple[int, ...]] = set()
    for leave_out in range(len(order) - t + 1):
        drops = itertools.combinations(reversed(order), leave_out) if leave_out else [()]
        for out in drops:
            xs = tuple(sorted([x for x in order if x not in out][:t]))
            if xs in tried:
                continue
            if len(tried) >= budget:
                raise SecAggError(f"no {t} of {len(ids)} Shamir shares match the commitment within {budget} tries")
            tried.add(xs)
            secret = _interpolate(shares, xs, length)
            if secret is not None and check(secret):
                bad = frozenset(x for x in ids if x not in xs and _value_at(shares, xs, x) != shares[x])
                return secret, bad
    raise SecAggError(f"no {t} of {len(ids)} Shamir shares reconstruct a secret that matches its commitment")


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis values at 0 for ids ``xs``; cached, since a round reconstructs many secrets from the
    same holders."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME  # (0 - xj) / (xi - xj) with both signs flipped
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def encode_share(value: int) -> bytes:
    """A share value as 66 big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Inverse of :func:`encode_share`; raises SecAggError on a wrong length or out-of-field value."""
    if len(data) != SHARE_BYTES:
        raise SecAggError(f"Shamir share must be {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise SecAggError("Shamir share value is outside the field")
    return value
