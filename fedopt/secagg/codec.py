"""Wire encoding of the secure-aggregation messages: msgpack bodies plus one raw vector frame, no pickle.

The bus carries each message of :mod:`fedopt.secagg.messages` as ``[msgpack body, *raw frames]`` (the layout of
:mod:`fedopt.wire`): :func:`encode` gives ``(body, frames)`` — a dict of str/int/bytes/lists that msgpack packs
as-is, and the list of numpy arrays sent as raw little-endian frames (only :class:`MaskedInput` has one) — and
:func:`decode` is its validated inverse. :func:`pack`/:func:`unpack` put the body through msgpack too, for a
transport that carries bytes (and to count exactly what a client sends).

Body kinds (``body["kind"]``), besides the round number ``round``:

==========  ================  =============================================================
kind        direction         fields
==========  ================  =============================================================
setup       server -> client  :class:`RoundConfig` fields + ``quant`` (clip, bits, max_weight)
advertise   client -> server  sender, c_pk (32 B), s_pk (32 B), b_commit (32 B), signature (64 B)
keys        server -> client  recipient, advertisements: [advertise bodies]
shares      client -> server  sender, shares: [[receiver, ciphertext]]
deliver     server -> client  recipient, shares: [[sender, ciphertext]]
masked      client -> server  sender, dtype, length, bits  + one frame: the masked vector
unmask      server -> client  recipient, survivors: [ids], dropped: [ids]
response    client -> server  sender, b_shares / sk_shares: [[owner, share (66 B)]]
abort       server -> client  reason: str (the coordinator gave up on the round)
==========  ================  =============================================================

:func:`decode` checks, before allocating anything for a payload: the kind, every field's type, id lengths, key,
signature and share sizes, list lengths (at most ``MAX_PEERS``), the vector dtype (uint32/uint64) and that the
frame holds exactly ``length`` words. Anything else raises :class:`~fedopt.errors.WireError`; the protocol checks
(signatures, stages, consistency) stay in the state machines.

A masked vector of a round mod 2^k with k < 32 (``bits`` k) travels packed: two k-bit values in k/4 bytes,
little-endian (:func:`pack_words`), so a 20-bit round sends 2.5 bytes a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from fedopt.errors import WireError
from fedopt.secagg.messages import (EncryptedShare, KeyAdvertisement, MaskedInput, NeighbourKeys, RoundConfig,
                                    ShareDelivery, ShareKeys, UnmaskRequest, UnmaskResponse)
from fedopt.secagg.quantize import MODULUS_BITS, QuantConfig

__all__ = ["Abort", "MAX_PEERS", "MAX_WORDS", "Setup", "decode", "encode", "pack", "pack_words", "unpack",
           "unpack_words"]

#: most ids in one list (participants, neighbours, shares)
MAX_PEERS = 1 << 16
#: most words in a masked vector (2^32 float parameters)
MAX_WORDS = 1 << 32
_MAX_ID = 256  # characters in a client id
_MAX_CT = 1024  # bytes in one encrypted share bundle (12 + 2*66 + 16 = 160 in practice)
_MAX_BODY = 64 << 20
_DTYPES = {"uint32": np.dtype("<u4"), "uint64": np.dtype("<u8")}
#: the packed widths: residues mod 2^k, k a multiple of 4 below 32
_PACKED = tuple(k for k in MODULUS_BITS if k < 32)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of ``n`` values of ``bits`` bits packed two by two (an odd count is padded with one zero value)."""
    return (n + 1) // 2 * (bits // 4)


def pack_words(v: np.ndarray, bits: int) -> np.ndarray:
    """The low ``bits`` bits of each uint32 word of ``v``, packed: each pair (a, b) as the integer a + b·2^bits in
    bits/4 little-endian bytes. A uint8 array of :func:`packed_bytes` bytes."""
    if bits not in _PACKED or v.dtype != np.uint32 or v.ndim != 1:
        raise WireError(f"cannot pack {v.dtype}{list(v.shape)} at {bits} bits")
    mask = np.uint64((1 << bits) - 1)
    w = np.zeros(2 * ((v.size + 1) // 2), dtype=np.uint64)
    w[: v.size] = v
    w &= mask
    pairs = w[0::2] | (w[1::2] << np.uint64(bits))
    return np.ascontiguousarray(pairs.astype("<u8").view(np.uint8).reshape(-1, 8)[:, : bits // 4]).reshape(-1)


def unpack_words(buf, n: int, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_words`: ``n`` uint32 values (each below 2^bits) from exactly
    ``packed_bytes(n, bits)`` bytes; WireError for any other size, or a nonzero padding value."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits not in _PACKED or raw.size != packed_bytes(n, bits):
        raise WireError(f"secagg masked input: frame has {raw.size} bytes, {n} values of {bits} bits declared")
    full = np.zeros(((n + 1) // 2, 8), dtype=np.uint8)
    full[:, : bits // 4] = raw.reshape(-1, bits // 4)
    pairs = full.view("<u8").reshape(-1)
    out = np.empty(2 * pairs.size, dtype=np.uint32)
    out[0::2] = pairs & np.uint64((1 << bits) - 1)
    out[1::2] = pairs >> np.uint64(bits)
    if n % 2 and out[-1]:
        raise WireError("secagg masked input: the padding value of an odd-length vector is not zero")
    return out[:n]


class Setup:
    """Server -> client: the round's public parameters (the graph follows from them) and the encoding."""

    __slots__ = ("config", "quant")

    def __init__(self, config: RoundConfig, quant: QuantConfig) -> None:
        self.config, self.quant = config, quant

    @property
    def round(self) -> int:
        return self.config.round


class Abort:
    """Server -> client: the coordinator abandoned the round (the client drops its session)."""

    __slots__ = ("round", "reason")

    def __init__(self, round: int, reason: str) -> None:
        self.round, self.reason = round, reason


def _advert(a: KeyAdvertisement) -> dict:
    return {"sender": a.sender, "c_pk": a.c_pk, "s_pk": a.s_pk, "b_commit": a.b_commit, "signature": a.signature}


def encode(msg: Any) -> tuple[dict, list[np.ndarray]]:
    """``(msgpack-able body, raw frames)`` for one protocol message."""
    r = msg.round
    if isinstance(msg, Setup):
        c, q = msg.config, msg.quant
        return {"kind": "setup", "round": r, "participants": list(c.participants), "k": c.k, "t": c.t,
                "graph_seed": c.graph_seed, "vector_length": c.vector_length, "modulus_bits": c.modulus_bits,
                "quant": {"clip": float(q.clip), "bits": q.bits, "max_weight": q.max_weight}}, []
    if isinstance(msg, KeyAdvertisement):
        return {"kind": "advertise", "round": r, **_advert(msg)}, []
    if isinstance(msg, NeighbourKeys):
        return {"kind": "keys", "round": r, "recipient": msg.recipient,
                "advertisements": [_advert(a) for a in msg.advertisements]}, []
    if isinstance(msg, ShareKeys):
        return {"kind": "shares", "round": r, "sender": msg.sender,
                "shares": [[s.receiver, s.ciphertext] for s in msg.shares]}, []
    if isinstance(msg, ShareDelivery):
        return {"kind": "deliver", "round": r, "recipient": msg.recipient,
                "shares": [[s.sender, s.ciphertext] for s in msg.shares]}, []
    if isinstance(msg, MaskedInput):
        v = np.ascontiguousarray(msg.vector, dtype=msg.vector.dtype.newbyteorder("<"))
        body = {"kind": "masked", "round": r, "sender": msg.sender, "dtype": str(v.dtype.name), "length": int(v.size)}
        if msg.bits:
            return {**body, "bits": msg.bits}, [pack_words(v, msg.bits)]
        return body, [v]
    if isinstance(msg, UnmaskRequest):
        return {"kind": "unmask", "round": r, "recipient": msg.recipient, "survivors": list(msg.survivors),
                "dropped": list(msg.dropped)}, []
    if isinstance(msg, UnmaskResponse):
        return {"kind": "response", "round": r, "sender": msg.sender,
                "b_shares": [list(p) for p in msg.b_shares], "sk_shares": [list(p) for p in msg.sk_shares]}, []
    if isinstance(msg, Abort):
        return {"kind": "abort", "round": r, "reason": msg.reason}, []
    raise WireError(f"not a secure-aggregation message: {type(msg).__name__}")


# ---- validated decoding ---------------------------------------------------------------------------------------------
def _get(body: dict, name: str, kind: type) -> Any:
    v = body.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise WireError(f"secagg {body.get('kind')!r} message: field {name!r} must be {kind.__name__}")
    return v


def _id(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= _MAX_ID:
        raise WireError(f"secagg message: {what} must be a client id of 1..{_MAX_ID} characters")
    return v


def _bytes(v: Any, what: str, size: int | None = None, most: int = _MAX_CT) -> bytes:
    if not isinstance(v, bytes) or (size is not None and len(v) != size) or len(v) > most:
        want = f"{size} bytes" if size is not None else f"at most {most} bytes"
        raise WireError(f"secagg message: {what} must be {want}")
    return v


def _list(body: dict, name: str) -> list:
    v = _get(body, name, list)
    if len(v) > MAX_PEERS:
        raise WireError(f"secagg message: {name!r} lists more than {MAX_PEERS} entries")
    return v


def _pairs(body: dict, name: str, size: int | None) -> list[tuple[str, bytes]]:
    out = []
    for p in _list(body, name):
        if not isinstance(p, list) or len(p) != 2:
            raise WireError(f"secagg message: entries of {name!r} must be [id, bytes] pairs")
        out.append((_id(p[0], f"an id in {name!r}"), _bytes(p[1], f"a value in {name!r}", size)))
    return out


def _parse_advert(d: Any, r: int) -> KeyAdvertisement:
    if not isinstance(d, dict):
        raise WireError("secagg message: an advertisement must be a map")
    return KeyAdvertisement(r, _id(d.get("sender"), "sender"), _bytes(d.get("c_pk"), "c_pk", 32),
                            _bytes(d.get("s_pk"), "s_pk", 32), _bytes(d.get("b_commit"), "b_commit", 32),
                            _bytes(d.get("signature"), "signature", 64))


def decode(body: Any, frames: Sequence[Any] = ()) -> Any:
    """The message for ``(body, frames)``; raises WireError naming the first problem found."""
    if not isinstance(body, dict):
        raise WireError("secagg message body must be a map")
    kind = body.get("kind")
    r = _get(body, "round", int)
    if r < 0:
        raise WireError("secagg message: round must be >= 0")
    if kind != "masked" and frames:
        raise WireError(f"secagg {kind!r} message carries no frames, got {len(frames)}")
    if kind == "setup":
        q = _get(body, "quant", dict)
        ids = [_id(u, "a participant") for u in _list(body, "participants")]
        try:
            quant = QuantConfig(float(_get(q, "clip", float)), _get(q, "bits", int), _get(body, "modulus_bits", int),
                                q.get("max_weight"))
            cfg = RoundConfig(r, tuple(ids), _get(body, "k", int), _get(body, "t", int),
                              _bytes(body.get("graph_seed"), "graph_seed", 32), _get(body, "vector_length", int),
                              _get(body, "modulus_bits", int))
        except WireError:
            raise
        except Exception as e:  # SecAggError from the dataclasses' own validation
            raise WireError(f"secagg setup message: {e}") from None
        return Setup(cfg, quant)
    if kind == "advertise":
        return _parse_advert(body, r)
    if kind == "keys":
        return NeighbourKeys(r, _id(body.get("recipient"), "recipient"),
                             tuple(_parse_advert(a, r) for a in _list(body, "advertisements")))
    if kind == "shares":
        u = _id(body.get("sender"), "sender")
        return ShareKeys(r, u, tuple(EncryptedShare(r, u, v, ct) for v, ct in _pairs(body, "shares", None)))
    if kind == "deliver":
        u = _id(body.get("recipient"), "recipient")
        return ShareDelivery(r, u, tuple(EncryptedShare(r, v, u, ct) for v, ct in _pairs(body, "shares", None)))
    if kind == "masked":
        name = body.get("dtype")
        dt = _DTYPES.get(name) if isinstance(name, str) else None
        if dt is None:
            raise WireError("secagg masked input: dtype must be uint32 or uint64")
        n = _get(body, "length", int)
        if not 0 < n <= MAX_WORDS:
            raise WireError(f"secagg masked input: length must be in [1, {MAX_WORDS}]")
        if len(frames) != 1:
            raise WireError(f"secagg masked input needs exactly one frame, got {len(frames)}")
        buf = memoryview(frames[0]).cast("B")
        sender = _id(body.get("sender"), "sender")
        if "bits" in body:
            bits = _get(body, "bits", int)
            if bits not in _PACKED or dt != np.dtype("<u4"):
                raise WireError(f"secagg masked input: bits must be one of {_PACKED} with uint32 words")
            return MaskedInput(r, sender, unpack_words(buf, n, bits), bits)
        if buf.nbytes != n * dt.itemsize:
            raise WireError(f"secagg masked input: frame has {buf.nbytes} bytes, {n} x {dt.name} declared")
        return MaskedInput(r, sender, np.frombuffer(buf, dtype=dt))
    if kind == "unmask":
        return UnmaskRequest(r, _id(body.get("recipient"), "recipient"),
                             tuple(_id(u, "a survivor") for u in _list(body, "survivors")),
                             tuple(_id(u, "a dropped client") for u in _list(body, "dropped")))
    if kind == "response":
        return UnmaskResponse(r, _id(body.get("sender"), "sender"), tuple(_pairs(body, "b_shares", 66)),
                              tuple(_pairs(body, "sk_shares", 66)))
    if kind == "abort":
        reason = body.get("reason")
        if not isinstance(reason, str) or len(reason) > 4096:
            raise WireError("secagg abort: reason must be a string")
        return Abort(r, reason)
    raise WireError(f"unknown secagg message kind {kind!r}")


def pack(msg: Any) -> list[bytes | memoryview]:
    """``[msgpack(body), *raw frames]``: the bytes a transport sends."""
    body, frames = encode(msg)
    return [msgpack.packb(body, use_bin_type=True), *(memoryview(f).cast("B") for f in frames)]


def unpack(parts: Sequence[Any]) -> Any:
    """Inverse of :func:`pack`; raises WireError for anything malformed."""
    if not parts:
        raise WireError("empty secagg message")
    head = bytes(parts[0])
    if len(head) > _MAX_BODY:
        raise WireError(f"secagg message body over {_MAX_BODY} bytes")
    try:
        body = msgpack.unpackb(head, raw=False, strict_map_key=True, max_bin_len=_MAX_BODY, max_str_len=1 << 20)
    except Exception as e:
        raise WireError(f"secagg message body is not valid msgpack: {e}") from None
    try:
        return decode(body, list(parts[1:]))
    except WireError:
        raise
    except Exception as e:  # a case the checks above missed: still the codec's one error type (and a bug to fix)
        raise WireError(f"secagg message rejected ({type(e).__name__}: {e})") from None
