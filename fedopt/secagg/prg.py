"""Cryptographic PRG for secure-aggregation masks: AES-256-CTR keystream read as integers.

Bonawitz et al. (CCS 2017) and Bell et al. (CCS 2020) expand every 32-byte seed (a self-mask seed
``b_u`` or a pairwise seed ``s_uv``) into a mask over Z_{2^k}^m with a PRG. Here the seed is the AES-256
key, the counter block starts at zero, and the keystream (AES-CTR over zero bytes) is reinterpreted
little-endian as uint32 or uint64 words. Because the modulus is a power of two, uniform bytes give
uniform words with no rejection step. A seed is used as a key for exactly one stream, so the fixed
zero counter never repeats a (key, counter) pair.

Never use numpy's RandomState/Generator for masks: their state is recoverable from outputs.

The hot path (:func:`accumulate_many`) walks the output once in cache-sized blocks and, per block,
writes every seed's next keystream chunk into one scratch buffer and adds or subtracts it in place.
Each block of the accumulator stays in cache while all seeds touch it, so masking with k seeds costs
little beyond generating the k keystreams (measured: about 1.2x the bare AES-CTR time for k = 15,
m = 10^6, against about 2.4x when each seed makes its own pass over the whole vector). Long vectors
are cut into contiguous ranges walked by several threads (:mod:`fedopt.secagg.parallel`): CTR mode is
seekable, so each range starts its ciphers at its own counter block and the result is bit-identical.
"""

from __future__ import annotations

import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedopt.errors import SecAggError
from fedopt.secagg.parallel import for_ranges

__all__ = ["SEED_BYTES", "Scratch", "accumulate", "accumulate_many", "cipher", "expand", "keystream", "scratch"]

#: length of a PRG seed (an AES-256 key)
SEED_BYTES = 32
_ZERO_COUNTER = bytes(16)
_BLOCK = 16
#: keystream bytes per call: amortises the per-call overhead (measured with 2 threads, k = 15, m = 10^6: masking took
#: 6.0 / 5.2 / 5.1 / 5.1 / 4.8 ms with 128 KiB / 256 KiB / 512 KiB / 1 MiB / 2 MiB)
CHUNK_BYTES = 1 << 20


def _check_seed(seed: bytes) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise SecAggError(f"PRG seed must be {SEED_BYTES} bytes")
    return bytes(seed)


def cipher(seed: bytes, block: int = 0):
    """The keystream generator of ``seed`` positioned at 16-byte block ``block`` (an AES-256-CTR encryptor;
    feed it zero bytes, e.g. with :meth:`Scratch.fill`)."""
    counter = _ZERO_COUNTER if block == 0 else block.to_bytes(16, "big")
    return Cipher(algorithms.AES(_check_seed(seed)), modes.CTR(counter)).encryptor()


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise SecAggError(f"PRG words must be uint32 or uint64, got {dt}")
    return dt.newbyteorder("<")


def keystream(seed: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` of the AES-256-CTR keystream under ``seed``."""
    if nbytes < 0:
        raise SecAggError(f"keystream length must be >= 0, got {nbytes}")
    return cipher(seed).update(bytes(nbytes))


def expand(seed: bytes, m: int, dtype=np.uint32) -> np.ndarray:
    """``m`` pseudorandom words (uint32 or uint64), deterministic in ``seed``; a fresh writable array."""
    dt = _check_dtype(dtype)
    if m < 0:
        raise SecAggError(f"PRG output length must be >= 0, got {m}")
    out = np.empty(m, dtype=dt)
    enc = cipher(seed)
    raw = out.view(np.uint8)
    buf = bytearray(min(raw.nbytes, CHUNK_BYTES) + _BLOCK - 1)
    zeros = bytes(min(raw.nbytes, CHUNK_BYTES))
    for start in range(0, raw.nbytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, raw.nbytes - start)
        enc.update_into(zeros[:n] if n < len(zeros) else zeros, buf)
        raw[start : start + n] = np.frombuffer(buf, np.uint8, n)
    return out


class Scratch:
    """Reusable keystream buffers for one thread (:func:`scratch`); avoid an allocation per seed and chunk."""

    def __init__(self) -> None:
        self._zeros = bytes(CHUNK_BYTES)
        self._buf = bytearray(CHUNK_BYTES + _BLOCK - 1)

    def fill(self, enc, nbytes: int) -> memoryview:
        """The next ``nbytes`` (at most 1 MiB) of ``enc``'s keystream, in this scratch's (writable) buffer."""
        data = self._zeros if nbytes == CHUNK_BYTES else memoryview(self._zeros)[:nbytes]
        enc.update_into(data, self._buf)
        return memoryview(self._buf)[:nbytes]


_local = threading.local()


def scratch() -> Scratch:
    """This thread's :class:`Scratch` (made on first use)."""
    s = getattr(_local, "scratch", None)
    if s is None:
        s = _local.scratch = Scratch()
    return s


def accumulate(acc: np.ndarray, seed: bytes, sign: int = 1, base: np.ndarray | None = None) -> None:
    """``acc = base + sign * expand(seed, len(acc), acc.dtype)`` modulo 2^k, chunk by chunk.

    ``base`` defaults to ``acc`` itself (in-place accumulation); passing it fuses a copy into the
    expansion. ``acc`` must be a contiguous 1-D uint32 or uint64 array, ``base`` the same shape and
    dtype; unsigned wrap-around is the reduction.
    """
    accumulate_many(acc, [(seed, sign)], base=base)


def accumulate_many(acc: np.ndarray, terms, base: np.ndarray | None = None) -> None:
    """``acc = base + sum_i sign_i * expand(seed_i, len(acc), acc.dtype)`` mod 2^k, in one pass.

    ``terms`` is an iterable of ``(seed, sign)`` with sign +1 or -1; the result equals calling
    :func:`accumulate` once per term. ``base`` defaults to ``acc`` (in place). Every seed's cipher
    stays open while the accumulator is walked block by block (see the module docstring); long
    vectors are split across threads.
    """
    dt = _check_dtype(acc.dtype)
    if acc.ndim != 1 or not acc.flags.c_contiguous:
        raise SecAggError("mask accumulator must be a contiguous 1-D array")
    if base is not None and (base.shape != acc.shape or base.dtype != acc.dtype):
        raise SecAggError(f"mask base {base.dtype}{base.shape} does not match {acc.dtype}{acc.shape}")
    specs = []
    for seed, sign in terms:
        if sign not in (1, -1):
            raise SecAggError(f"mask sign must be +1 or -1, got {sign}")
        specs.append((_check_seed(seed), np.add if sign == 1 else np.subtract))
    if base is acc:
        base = None
    if not specs:
        if base is not None:
            np.copyto(acc, base)
        return
    words = CHUNK_BYTES // dt.itemsize

    def walk(start: int, stop: int) -> None:
        streams = [(cipher(seed, start * dt.itemsize // _BLOCK), op) for seed, op in specs]
        sc = scratch()
        for i in range(start, stop, words):
            n = min(words, stop - i)
            block = acc[i : i + n]
            src = block if base is None else base[i : i + n]  # the copy of base is fused into term 1
            for enc, op in streams:
                view = np.frombuffer(sc.fill(enc, n * dt.itemsize), dtype=dt, count=n)
                op(src, view, out=block)
                src = block

    for_ranges(walk, acc.size, dt.itemsize)
