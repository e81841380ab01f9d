"""Encoding and decoding of the bus's messages (:mod:`fedopt.wire.messages`): ``[msgpack header, raw frames...]``.

:func:`encode` checks every field it sends; :func:`decode` validates a message completely before allocating anything
for its payload and raises only :class:`~fedopt.errors.WireError`. The rules are in the message module's docstring.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import msgpack
import numpy as np
import torch

from ..errors import WireError
from . import compressed
from .messages import (_ALLOWED, _FLOATS, _KEYS, _NUMPY, _SCHEMA, _SPEC_KEYS, _TORCH, MESSAGE_TYPES, VERSION, Limits,
                       Message, _check_fields)
from .schema import is_int as _is_int, show as _show

__all__ = ["encode", "decode"]


def _layout(cls, values: dict) -> list[tuple[str, tuple[str, ...], int | None]]:
    """``[(field, allowed dtypes, exact length or None)]`` of the tensors a message with these (checked) header fields
    carries: its TENSORS, any float dtype and shape; or a compressed UPDATE's exact layout."""
    enc = values.get("encoding")
    if enc:
        return [(name, (dtype,), n) for name, dtype, n in compressed.layout(enc)]
    return [(name, _FLOATS, None) for name in cls.TENSORS]


def _exact(kind: str, i: int, shape: tuple[int, ...], n: int | None) -> None:
    if n is not None and shape != (n,):
        raise WireError(f"{kind}: tensor {i} must have shape [{n}] by its encoding, not {list(shape)}")


# ---- encoding ------------------------------------------------------------------------------------------------------
def _as_wire(t: torch.Tensor, wire_dtype: str | None) -> tuple[str, memoryview, tuple[int, ...]]:
    """A tensor as (dtype name, zero-copy byte view, shape); cast first when a wire dtype is asked for."""
    if not isinstance(t, torch.Tensor):
        raise WireError(f"tensor field must be a torch.Tensor, not {type(t).__name__}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if wire_dtype is not None and t.dtype != _TORCH[wire_dtype]:
        t = t.to(_TORCH[wire_dtype])
    t = t.contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _ALLOWED:
        raise WireError(f"dtype {name} cannot travel on the bus (allowed: {', '.join(_ALLOWED)})")
    arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    # flat bytes via numpy, not memoryview.cast: a cast refuses shapes with a zero in them ([0, 7])
    return name, memoryview(arr.reshape(-1).view(np.uint8)), tuple(t.shape)


def encode(msg: Message, wire_dtype: str | None = None, chunk_bytes: int | None = None,
           limits: Limits = Limits()) -> list:
    """``[header bytes, tensor buffers...]`` ready for ``send_multipart(copy=False)``; buffers alias the tensors.

    ``chunk_bytes``: a tensor longer than this travels as several frames of at most that many bytes each (declared
    as ``"frames": k`` in its spec; :func:`decode` joins them). Over CurveZMQ each frame is encrypted on its own, so
    a sender fanning one model out to n peers holds n encrypted chunks instead of n encrypted models.

    Raises WireError for a message that :func:`decode` with the same ``limits`` would reject for its header fields
    or tensor shapes (a NaN metric, an over-long name, a weight below 1, too many chunks): the sender finds out,
    not the receiver.
    """
    if chunk_bytes is not None and chunk_bytes < 1:
        raise WireError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if type(msg) not in MESSAGE_TYPES.values():
        raise WireError(f"not a wire message: {type(msg).__name__}")
    values = {name: getattr(msg, name) for name in _SCHEMA[msg.TYPE]}
    _check_fields(type(msg), values, limits)
    if values.get("encoding") == {}:
        del values["encoding"]  # a dense UPDATE stays what protocol version 1 sent
    if values.get("clients") == 0:
        del values["clients"]  # a leaf client's READY too
    header: dict[str, Any] = {"v": VERSION, "type": msg.TYPE, **values}
    frames: list = []
    specs = []
    for i, (name, allowed, n) in enumerate(_layout(type(msg), values)):
        dtype, buf, shape = _as_wire(getattr(msg, name), wire_dtype if n is None else None)
        spec = {"dtype": dtype, "shape": list(shape)}
        if chunk_bytes is not None and buf.nbytes > chunk_bytes:
            spec["frames"] = -(-buf.nbytes // chunk_bytes)
        _tensor_spec(i, spec, limits, allowed)  # the receiver's checks, word for word
        _exact(msg.TYPE, i, shape, n)
        if "frames" in spec:
            frames.extend(buf[at : at + chunk_bytes] for at in range(0, buf.nbytes, chunk_bytes))
        else:
            frames.append(buf)
        specs.append(spec)
    header["tensors"] = specs
    if values.get("encoding"):
        compressed.check_payload(msg.TYPE, values["encoding"], {name: getattr(msg, name).cpu()
                                                                 for name, _, _ in _layout(type(msg), values)})
    opaque = getattr(msg, "OPAQUE", None)
    if opaque is not None:
        parts = list(getattr(msg, opaque))
        if not 1 <= len(parts) <= limits.max_frames:
            raise WireError(f"{msg.TYPE}: {len(parts)} parts, not 1..{limits.max_frames}")
        header[opaque] = len(parts)
        try:
            frames.extend(memoryview(b).cast("B") for b in parts)
        except (TypeError, ValueError):
            raise WireError(f"{msg.TYPE}: every part must be a contiguous buffer") from None
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"{msg.TYPE} header cannot be encoded: {e}") from None
    if len(head) > limits.max_header_bytes:
        raise WireError(f"{msg.TYPE} header of {len(head)} bytes is over the limit of {limits.max_header_bytes}")
    _unpack(head, limits)  # msgpack's own limits (a string over max_str), exactly as the receiver applies them
    return [head, *frames]


# ---- decoding ------------------------------------------------------------------------------------------------------
def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _unpack(head: memoryview, limits: Limits) -> Any:
    """msgpack with its own limits, so a small header cannot declare a huge string, array or map."""
    try:
        return msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext,
                               max_str_len=limits.max_str, max_bin_len=0, max_ext_len=0,
                               max_array_len=limits.max_tree_items, max_map_len=limits.max_tree_items)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several unrelated types (ValueError, UnicodeDecodeError, StackError...)
        raise WireError(f"header is not msgpack within the limits ({type(e).__name__})") from None


def _tensor_spec(i: int, spec: Any, limits: Limits, allowed: tuple[str, ...] = _FLOATS
                 ) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, byte size, frame count) of tensor ``i`` as declared, validated; Python ints only."""
    if not isinstance(spec, dict) or not spec.keys() <= _SPEC_KEYS:
        raise WireError(f"tensor {i}: declaration must be a map of {', '.join(sorted(_SPEC_KEYS))}, "
                        f"not {_show(spec)}")
    k = spec.get("frames", 1)
    if not _is_int(k) or not 1 <= k <= limits.max_chunks:
        raise WireError(f"tensor {i}: frames must be an integer in [1, {limits.max_chunks}], not {_show(k)}")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if not isinstance(dtype, str) or dtype not in allowed:
        raise WireError(f"tensor {i}: dtype {_show(dtype)} is not allowed (allowed: {', '.join(allowed)})")
    if not isinstance(shape, list) or len(shape) > limits.max_dims or not all(_is_int(s) and s >= 0 for s in shape):
        raise WireError(f"tensor {i}: shape {_show(shape)} is not a list of at most {limits.max_dims} sizes >= 0")
    n = math.prod(shape)
    nbytes = n * _ALLOWED[dtype]
    # each dimension is bounded on its own, so a zero elsewhere cannot hide a huge one ([0, 2**63] has 0 elements)
    if max(shape, default=0) > limits.max_elements or n > limits.max_elements or nbytes > limits.max_message_bytes:
        raise WireError(f"tensor {i}: declared shape {_show(shape)} is over the limit of {limits.max_elements} "
                        f"elements (in all and per dimension) or {limits.max_message_bytes} bytes")
    return dtype, tuple(shape), nbytes, k


def _join(bufs: list[memoryview], nbytes: int) -> memoryview:
    """One writable buffer holding the chunks of a tensor in order (the sizes were checked)."""
    out = np.empty(nbytes, dtype=np.uint8)
    at = 0
    for b in bufs:
        out[at : at + len(b)] = np.frombuffer(b, dtype=np.uint8)
        at += len(b)
    return memoryview(out)


def _buffer(frame: Any) -> memoryview:
    """The bytes of a received frame without copying (a zmq Frame, bytes or any contiguous buffer)."""
    buf = getattr(frame, "buffer", frame)
    try:
        return memoryview(buf).cast("B")
    except (TypeError, ValueError):
        raise WireError(f"frame of type {type(frame).__name__} is not a contiguous buffer") from None


def _tensor(kind: str, i: int, buf: memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing ``buf`` (whose length was checked against dtype and shape): no copy, no per-element work."""
    try:
        arr = np.frombuffer(buf, dtype=_NUMPY[dtype])  # a view of the frame (or of the joined chunks): no copy
        if buf.readonly:  # bytes (tests, inproc copies): torch warns about sharing read-only memory; we never write
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
        else:
            t = torch.from_numpy(arr)
        if dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.view(shape)
    except (ValueError, TypeError, RuntimeError) as e:  # the checks above should leave nothing for these
        raise WireError(f"{kind}: tensor {i} cannot be viewed as {dtype}{list(shape)} ({type(e).__name__})") from None


def decode(frames: Sequence[Any], limits: Limits = Limits()) -> Message:
    """Validate and decode one multipart message; tensors are views of the received frames (no copy).

    Raises WireError naming the first problem found, and nothing else, whatever the frames hold. Every header field
    is checked against its kind (module docstring) and nothing is allocated for a tensor until its frame's length
    has been checked against its declared shape and dtype.
    """
    if not frames:
        raise WireError("empty message")
    head = _buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise WireError(f"header of {len(head)} bytes is over the limit of {limits.max_header_bytes}")
    header = _unpack(head, limits)
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    v = header.get("v")
    if not _is_int(v) or v != VERSION:
        raise WireError(f"unsupported protocol version {_show(v)} (this side speaks {VERSION})")
    kind = header.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message type {_show(kind)}")
    unknown = [k for k in header if k not in _KEYS[kind]]
    if unknown:
        raise WireError(f"{kind}: unknown header key(s) {_show(unknown)} (a new field needs a new protocol version)")
    values = {name: header[name] for name in _SCHEMA[kind] if name in header}  # absent: the (valid) default
    _check_fields(cls, values, limits)
    opaque = getattr(cls, "OPAQUE", None)
    if opaque is not None:
        return _decode_opaque(cls, kind, header, frames, values, limits)
    declared = header.get("tensors", [])
    if not isinstance(declared, list) or len(declared) > limits.max_frames:
        raise WireError(f"{kind}: tensor declarations must be a list of at most {limits.max_frames}")
    expect = _layout(cls, values)
    if len(declared) != len(expect):
        raise WireError(f"{kind}: expected {len(expect)} tensor(s), header declares {len(declared)} and "
                        f"{len(frames) - 1} tensor frame(s) arrived")
    specs = [_tensor_spec(i, spec, limits, allowed) for i, (spec, (_, allowed, _)) in enumerate(zip(declared, expect))]
    for i, ((_, shape, _, _), (_, _, n)) in enumerate(zip(specs, expect)):
        _exact(kind, i, shape, n)
    if len(frames) - 1 != sum(s[3] for s in specs):
        raise WireError(f"{kind}: header declares {sum(s[3] for s in specs)} tensor frame(s) and {len(frames) - 1} "
                        f"arrived")
    if sum(s[2] for s in specs) > limits.max_message_bytes:
        raise WireError(f"{kind}: tensors of {sum(s[2] for s in specs)} bytes in all, over {limits.max_message_bytes}")
    first = 1
    for i, ((name, _, _), (dtype, shape, nbytes, k)) in enumerate(zip(expect, specs)):
        bufs = [_buffer(f) for f in frames[first : first + k]]
        first += k
        got = sum(len(b) for b in bufs)
        if got != nbytes or (len(bufs) > 1 and not all(len(b) for b in bufs)):
            raise WireError(f"{kind}: tensor {i} declares {dtype}{list(shape)} = {nbytes} bytes but its "
                            f"{'frame has' if len(bufs) == 1 else f'{len(bufs)} frames have'} {got}")
        buf = bufs[0] if len(bufs) == 1 else _join(bufs, nbytes)
        values[name] = _tensor(kind, i, buf, dtype, shape)
    if values.get("encoding"):
        compressed.check_payload(kind, values["encoding"], values)
    return cls(**values)


def _decode_opaque(cls, kind: str, header: dict, frames: Sequence[Any], values: dict, limits: Limits) -> Message:
    """A message whose frames travel unparsed: check their count and sizes, hand them over as views."""
    count = header.get(cls.OPAQUE)
    if not _is_int(count) or not 1 <= count <= limits.max_frames:
        raise WireError(f"{kind}: {cls.OPAQUE!r} must count 1..{limits.max_frames} frames, not {_show(count)}")
    if header.get("tensors", []) != []:
        raise WireError(f"{kind}: carries no tensors")
    if len(frames) - 1 != count:
        raise WireError(f"{kind}: header declares {count} part(s) and {len(frames) - 1} arrived")
    parts = tuple(_buffer(f) for f in frames[1:])
    total = sum(p.nbytes for p in parts)
    if total > limits.max_message_bytes:
        raise WireError(f"{kind}: {total} bytes, over the limit of {limits.max_message_bytes}")
    values[cls.OPAQUE] = parts
    return cls(**values)
