"""The compressed encoding of an UPDATE (:mod:`fedopt.compress` makes it): its header map and its tensors' exact
layout, checked before anything is allocated, and its index frame's content, checked before anything is scattered.

An UPDATE whose ``encoding`` map is empty (the default) carries the dense ``delta``. Otherwise ``encoding`` is::

    size   int in [1, max_elements]: the dense vector's length P (the receiver also checks it is its model's)
    k      int in [0, size]: coordinates sent
    index  "all" (k == size, every coordinate in order) | "sent" (an int32 index frame; size <= 2**31) |
           "seeded" (random-k: the k coordinates drawn from ``seed``, fedopt.compress.sparsify.random_k)
    bits   32 | 16 | 8 | 4 | 2
    block  int in [1, 2**20], present exactly when bits <= 8: values per scale
    seed   counter, present exactly when index is "seeded"

and the tensors are, in this order, each one-dimensional with exactly this dtype and length::

    values    bits 32: float32[k]; bits 16: float16[k]; bits <= 8: uint8[ceil(k * bits / 8)], codes packed
              8 // bits to a byte, the last byte's unused high bits zero
    indices   index "sent" only: int32[k], each in [0, size), strictly increasing
    scales    bits <= 8 only: float32[ceil(k / block)]

The index frame is the one tensor whose values the decoder inspects (one vectorised pass over k int32s), because a
receiver scatters by it. Scale and value contents travel unchecked like any tensor; the round's norm bound judges the
decoded update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import WireError
from .schema import int_in, is_int, show

if TYPE_CHECKING:
    from .messages import Limits

__all__ = ["check_encoding", "layout", "check_payload", "INDEX_KINDS", "ENCODING_BITS"]

INDEX_KINDS = ("all", "sent", "seeded")
ENCODING_BITS = (32, 16, 8, 4, 2)
_KEYS = {"size", "k", "index", "bits", "block", "seed"}
MAX_BLOCK = 1 << 20
MAX_SENT_INDEX = 1 << 31  # int32 indices


def check_encoding(what: str, v: Any, lim: "Limits") -> None:
    """The ``encoding`` header field: ``{}`` or a map exactly as the module docstring says."""
    if not isinstance(v, dict):
        raise WireError(f"{what} must be a map, not {show(v)}")
    if not v:
        return
    if not v.keys() <= _KEYS or not {"size", "k", "index", "bits"} <= v.keys():
        raise WireError(f"{what} must hold size, k, index, bits (and block, seed where they apply), not {show(v)}")
    int_in(f"{what}.size", v["size"], 1, lim.max_elements)
    int_in(f"{what}.k", v["k"], 0, v["size"])
    if v["index"] not in INDEX_KINDS:
        raise WireError(f"{what}.index must be one of {', '.join(INDEX_KINDS)}, not {show(v['index'])}")
    if v["bits"] not in ENCODING_BITS or not is_int(v["bits"]):
        raise WireError(f"{what}.bits must be one of {', '.join(map(str, ENCODING_BITS))}, not {show(v['bits'])}")
    if v["index"] == "all" and v["k"] != v["size"]:
        raise WireError(f"{what}: index 'all' needs k == size, not k={v['k']} size={v['size']}")
    if v["index"] == "sent" and v["size"] > MAX_SENT_INDEX:
        raise WireError(f"{what}: int32 indices cannot address size {v['size']}")
    if ("block" in v) != (v["bits"] <= 8):
        raise WireError(f"{what}: block is given exactly when bits <= 8")
    if "block" in v:
        int_in(f"{what}.block", v["block"], 1, MAX_BLOCK)
    if ("seed" in v) != (v["index"] == "seeded"):
        raise WireError(f"{what}: seed is given exactly when index is 'seeded'")
    if "seed" in v:
        int_in(f"{what}.seed", v["seed"], 0, lim.max_int - 1)


def layout(enc: dict) -> list[tuple[str, str, int]]:
    """``[(field, dtype, length)]`` of the tensors a compressed UPDATE with a checked ``encoding`` carries."""
    k, bits = enc["k"], enc["bits"]
    if bits > 8:
        out = [("values", "float32" if bits == 32 else "float16", k)]
    else:
        out = [("values", "uint8", -(-k * bits // 8))]
    if enc["index"] == "sent":
        out.append(("indices", "int32", k))
    if bits <= 8:
        out.append(("scales", "float32", -(-k // enc["block"])))
    return out


def check_payload(kind: str, enc: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Content checks of a compressed UPDATE's tensors (their layout was checked): indices in range and strictly
    increasing, and the packed values' padding bits zero."""
    idx = tensors.get("indices")
    if idx is not None and idx.numel():
        a = idx.numpy()
        if int(a[0]) < 0 or int(a[-1]) >= enc["size"] or (a.size > 1 and not bool(np.all(a[1:] > a[:-1]))):
            raise WireError(f"{kind}: indices must be strictly increasing and in [0, {enc['size']})")
    bits = enc["bits"]
    spare = (-enc["k"] * bits) % 8
    if bits <= 8 and spare:
        last = int(tensors["values"][-1])
        if last >> (8 - spare):
            raise WireError(f"{kind}: the packed values' unused high bits must be zero")
