"""Stochastic blockwise quantisation to 8, 4 or 2 bits, and the bit packing that puts the codes on the wire.

QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic; "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding", NeurIPS 2017) rounds each coordinate stochastically to one of a few levels scaled by a norm, so the
quantised vector is an *unbiased* estimate of the input. Here the scale is the absolute maximum of a block of
``block`` consecutive values (blockwise scales as in Dettmers, Lewis, Shleifer, Zettlemoyer; "8-bit Optimizers via
Block-wise Quantization", ICLR 2022), which keeps one outlier from flattening a whole vector.

With ``L = 2**bits - 1`` and a block's scale ``s = max |x|``, a value ``x`` maps to ``u = (x / s + 1) * L / 2`` in
``[0, L]`` and is sent as the code ``c = floor(u + U)``, ``U ~ Uniform[0, 1)``; so ``E[c] = u`` and the decoded value
``s * (2c / L - 1)`` has expectation ``x`` (unbiased) and error below ``2s / L`` per coordinate. A block of zeros has
``s = 0`` and decodes to zeros whatever its codes.

Codes are packed ``8 // bits`` to a byte, the first code in the lowest bits; the last byte's unused high bits are
zero, so a packed vector of ``n`` codes is exactly ``ceil(n * bits / 8)`` bytes. Pure functions on CPU tensors.
"""

from __future__ import annotations

import torch

__all__ = ["BITS", "quantize", "dequantize", "pack", "unpack", "packed_bytes", "num_blocks"]

#: the code widths this module packs
BITS = (8, 4, 2)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of ``n`` packed ``bits``-wide codes."""
    return -(-n * bits // 8)


def num_blocks(n: int, block: int) -> int:
    """Scales of ``n`` values quantised in blocks of ``block``."""
    return -(-n // block)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below ``2**bits`` -> ``packed_bytes(len, bits)`` bytes, ``8 // bits`` codes a byte."""
    per = 8 // bits
    if per == 1:
        return codes
    n = codes.numel()
    padded = torch.zeros(packed_bytes(n, bits) * per, dtype=torch.uint8)
    padded[:n] = codes
    lanes = padded.view(-1, per)
    out = lanes[:, 0].clone()
    for j in range(1, per):
        out |= lanes[:, j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``packed`` (the inverse of :func:`pack`) as uint8."""
    per = 8 // bits
    if per == 1:
        return packed[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & ((1 << bits) - 1)).view(-1)[:n]


def quantize(x: torch.Tensor, bits: int, block: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes uint8, scales float32[num_blocks])`` of the float vector ``x`` (unbiased, see above)."""
    n = x.numel()
    levels = (1 << bits) - 1
    nb = num_blocks(n, block)
    xb = torch.zeros(nb * block, dtype=torch.float32)
    xb[:n] = x.detach().float().reshape(-1)
    xb = xb.view(nb, block)
    scales = xb.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    u = (xb / safe[:, None] + 1.0) * (levels / 2)
    u += torch.rand(u.shape, generator=generator)
    u.nan_to_num_(0.0)  # a NaN input has a NaN scale and decodes to NaN whatever its code; the code stays in range
    codes = u.floor_().clamp_(0, levels).to(torch.uint8).view(-1)[:n]
    return pack(codes, bits), scales


def dequantize(packed: torch.Tensor, scales: torch.Tensor, n: int, bits: int, block: int) -> torch.Tensor:
    """float32[n] decoded from :func:`quantize`'s output."""
    levels = (1 << bits) - 1
    codes = unpack(packed, bits, n).float()
    nb = scales.numel()
    full = torch.zeros(nb * block, dtype=torch.float32)
    full[:n] = codes
    out = (full.view(nb, block) * (2.0 / levels) - 1.0) * scales.float()[:, None]
    return out.view(-1)[:n]
