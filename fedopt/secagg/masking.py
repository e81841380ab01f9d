"""Double masking of encoded updates and its removal from the sum (pure numpy, no I/O).

Bonawitz et al. (CCS 2017), with the neighbour sets of Bell et al. (CCS 2020). Client u sends

    y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(s_uv)   (mod 2^k)

with sign(u, v) = +1 if u > v else -1 (ids compared as strings), so the pairwise terms of u and v
cancel in y_u + y_v. Arithmetic is uint32/uint64 numpy, whose wrap-around is the reduction mod 2^k.

The server sums the y_u of the survivors U3, then removes what does not cancel:

- PRG(b_u) for every survivor u, from the reconstructed self-mask seeds;
- for every client v that shared keys but dropped before sending y_v (U2 minus U3), the term
  sign(w, v) * PRG(s_wv) in each surviving neighbour w's y_w, using the seeds s_wv the server
  recomputes from v's reconstructed mask secret key and w's advertised mask public key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedopt.errors import SecAggError
from fedopt.secagg.prg import accumulate_many

__all__ = ["mask_input", "pair_sign", "sum_vectors", "unmask_sum"]


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` > ``peer`` else -1: the sign of the pairwise mask ``me`` adds for ``peer``."""
    if me == peer:
        raise SecAggError(f"client {me!r} cannot be its own neighbour")
    return 1 if me > peer else -1


def _check_vector(x: np.ndarray) -> None:
    if x.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)) or x.ndim != 1:
        raise SecAggError(f"masked vectors must be 1-D uint32 or uint64, got {x.dtype} {x.shape}")


def mask_input(
    encoded: np.ndarray,
    me: str,
    self_seed: bytes,
    pair_seeds: Mapping[str, bytes],
    in_place: bool = False,
) -> np.ndarray:
    """y = encoded + PRG(self_seed) + sum_v sign(me, v) PRG(pair_seeds[v]) mod 2^k.

    A new array, or with ``in_place`` ``encoded`` itself overwritten (the caller gives the plaintext
    up: no second vector is allocated and the unmasked values no longer exist afterwards).
    """
    _check_vector(encoded)
    if in_place and not encoded.flags.c_contiguous:
        raise SecAggError("in-place masking needs a contiguous vector")
    y = encoded if in_place else np.empty(encoded.shape, dtype=encoded.dtype)
    terms = [(self_seed, 1)] + [(seed, pair_sign(me, peer)) for peer, seed in pair_seeds.items()]
    accumulate_many(y, terms, base=encoded)
    return y


def sum_vectors(vectors: Iterable[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Modular sum of equal-length vectors, added into ``out`` (a fresh zero vector if None)."""
    for v in vectors:
        _check_vector(v)
        if out is None:
            out = np.zeros_like(v)
        if v.shape != out.shape or v.dtype != out.dtype:
            raise SecAggError(f"vector {v.dtype} {v.shape} does not match sum {out.dtype} {out.shape}")
        np.add(out, v, out=out)
    if out is None:
        raise SecAggError("no vectors to sum")
    return out


def unmask_sum(
    masked_sum: np.ndarray,
    survivor_self_seeds: Iterable[bytes],
    dropped_pair_seeds: Iterable[tuple[str, str, bytes]],
) -> np.ndarray:
    """Remove the masks that do not cancel from the survivors' modular sum, in place; returns it.

    ``dropped_pair_seeds`` holds ``(survivor w, dropped v, s_wv)`` for every surviving neighbour w
    of every dropped v; w added sign(w, v) * PRG(s_wv), which is subtracted here.
    """
    _check_vector(masked_sum)
    if not masked_sum.flags.c_contiguous:
        raise SecAggError("masked sum must be contiguous")
    terms = [(seed, -1) for seed in survivor_self_seeds]
    terms += [(seed, -pair_sign(w, v)) for w, v, seed in dropped_pair_seeds]
    accumulate_many(masked_sum, terms)
    return masked_sum
