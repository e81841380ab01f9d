"""A compressor is at most one sparsifier followed by at most one value codec, named by a spec such as
``topk:0.01+q8``; :class:`Packed` is what it produces, and what travels in a compressed UPDATE
(:mod:`fedopt.wire.compressed` validates it on arrival).

Spec grammar (stages joined by ``+``, sparsifier first)::

    topk:F      keep the fraction F in (0, 1] of coordinates with the largest magnitudes (indices sent, int32)
    randk:F     keep a random fraction F (indices drawn from the round's seed, not sent)
    q8[:B] q4[:B] q2[:B]   stochastic quantisation to 8/4/2 bits, one float32 scale per block of B values (default 256)
    fp16        values as float16

Compression is stateless math: ``compress(x, seed)`` is deterministic given the seed (random-k's draw and stochastic
rounding), and ``decompress`` needs nothing but the Packed. The error-feedback residual is the client's
(:class:`~fedopt.compress.feedback.ErrorFeedback`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError, WireError
from . import quantize as q
from .sparsify import keep_count, random_k, top_k

__all__ = ["Compressor", "Packed", "parse_compressor", "decompress", "decoded", "SEED_MASK", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 256  # 4 bytes of scale per 256 codes: 1.6% on top of 8 bits
SEED_MASK = (1 << 53) - 1  # a seed travels as a wire counter (below 2**53)


@dataclass(frozen=True, kw_only=True)
class Packed:
    """A compressed flat vector: the fields of a compressed UPDATE's ``encoding`` plus its tensors."""

    size: int  # the dense vector's length P
    k: int  # coordinates sent (P for "all")
    index: str  # "all" (every coordinate, in order) | "sent" (``indices``) | "seeded" (random-k's draw from ``seed``)
    bits: int  # 32 | 16 (``values`` float32/float16) | 8 | 4 | 2 (``values`` packed uint8 codes, ``scales``)
    block: int = 0  # values per scale (bits <= 8)
    seed: int = 0  # random-k's draw (index "seeded")
    values: torch.Tensor
    indices: torch.Tensor | None = None  # int32[k], strictly increasing (index "sent")
    scales: torch.Tensor | None = None  # float32[ceil(k / block)] (bits <= 8)

    def encoding(self) -> dict:
        """The UPDATE header's ``encoding`` map."""
        enc = {"size": self.size, "k": self.k, "index": self.index, "bits": self.bits}
        if self.bits <= 8:
            enc["block"] = self.block
        if self.index == "seeded":
            enc["seed"] = self.seed
        return enc

    @classmethod
    def from_encoding(cls, encoding: dict, values, indices=None, scales=None) -> "Packed":
        """The Packed of a decoded UPDATE (its ``encoding`` and tensors, already validated by the wire)."""
        return cls(size=encoding["size"], k=encoding["k"], index=encoding["index"], bits=encoding["bits"],
                   block=encoding.get("block", 0), seed=encoding.get("seed", 0), values=values, indices=indices,
                   scales=scales)

    @property
    def nbytes(self) -> int:
        """Bytes of its tensor frames: what it adds to an UPDATE on the wire besides the header."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.scales) if t is not None)


def decoded(p: Packed) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(positions, values)`` of ``p`` as the receiver decodes them: int64 positions (None: every coordinate, in
    order) and their float32 values, which never share memory with ``p``. O(k) work (random-k: its draw)."""
    if p.bits <= 8:
        vals = q.dequantize(p.values, p.scales, p.k, p.bits, p.block)
    else:
        vals = p.values.float()
        if vals.data_ptr() == p.values.data_ptr():
            vals = vals.clone()
    if p.index == "sent":
        return p.indices.long(), vals
    if p.index == "seeded":
        return random_k(p.size, p.k, p.seed), vals
    return None, vals


def decompress(p: Packed, size: int) -> torch.Tensor:
    """The dense float32 vector of ``p``. ``size`` is the length the receiver expects: a Packed of another length is
    refused (WireError) before anything of that length is allocated."""
    if p.size != size:
        raise WireError(f"compressed update of {p.size} elements, the model has {size}")
    at, vals = decoded(p)
    if at is None:
        return vals
    out = torch.zeros(size, dtype=torch.float32)
    out[at] = vals
    return out


@dataclass(frozen=True)
class Compressor:
    """``compress(x, seed) -> Packed``; see the module docstring for the spec it is parsed from."""

    spec: str
    sparsify: str | None = None  # "topk" | "randk"
    fraction: float = 1.0
    bits: int = 32
    block: int = DEFAULT_BLOCK

    @property
    def biased(self) -> bool:
        """True for a sparsifier (a contraction, not an unbiased estimate): error feedback applies by default."""
        return self.sparsify is not None

    def compress(self, x: torch.Tensor, seed: int) -> Packed:
        x = x.detach().reshape(-1).to("cpu", torch.float32)
        size = x.numel()
        seed &= SEED_MASK
        index, at = "all", None
        if self.sparsify == "topk":
            at = top_k(x, keep_count(size, self.fraction))
            index = "sent"
        elif self.sparsify == "randk":
            at = random_k(size, keep_count(size, self.fraction), seed)
            index = "seeded"
        vals = x if at is None else x[at]
        k = vals.numel()
        fields = dict(size=size, k=k, index=index, bits=self.bits, seed=seed if index == "seeded" else 0,
                      indices=at.to(torch.int32) if index == "sent" else None)
        if self.bits <= 8:
            g = torch.Generator().manual_seed((seed * 0x9E3779B1 + 1) & SEED_MASK)  # a stream apart from random-k's
            packed, scales = q.quantize(vals, self.bits, self.block, g)
            return Packed(values=packed, scales=scales, block=self.block, **fields)
        return Packed(values=vals.to(torch.float16) if self.bits == 16 else vals.clone(), **fields)


def _fraction(stage: str, text: str, flag: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if not 0 < f <= 1:
        raise ConfigError(f"{flag}: {stage} takes a fraction in (0, 1], not {text!r}")
    return f


def parse_compressor(spec: str, flag: str = "--compress") -> Compressor:
    """The Compressor a spec names; ConfigError naming ``flag`` and the bad stage otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{flag} must be a spec such as topk:0.01+q8, not {spec!r}")
    c = Compressor(spec)
    stages = spec.strip().split("+")
    for i, stage in enumerate(stages):
        name, _, arg = stage.partition(":")
        if name in ("topk", "randk"):
            if i != 0:
                raise ConfigError(f"{flag} {spec!r}: the sparsifier ({name}) must come first")
            c = dataclasses.replace(c, sparsify=name, fraction=_fraction(name, arg, flag))
        elif name in ("q8", "q4", "q2", "fp16"):
            if c.bits != 32:
                raise ConfigError(f"{flag} {spec!r}: at most one value codec (q8, q4, q2, fp16)")
            if name == "fp16":
                if arg:
                    raise ConfigError(f"{flag} {spec!r}: fp16 takes no argument")
                c = dataclasses.replace(c, bits=16)
                continue
            block = DEFAULT_BLOCK
            if arg:
                if not arg.isdigit() or not 1 <= int(arg) <= 1 << 20:
                    raise ConfigError(f"{flag} {spec!r}: {name}'s block size must be an integer in [1, 1048576], "
                                      f"not {arg!r}")
                block = int(arg)
            c = dataclasses.replace(c, bits=int(name[1:]), block=block)
        else:
            raise ConfigError(f"{flag} {spec!r}: unknown stage {stage!r} (known: topk:F, randk:F, q8[:B], q4[:B], "
                              f"q2[:B], fp16)")
    return c
