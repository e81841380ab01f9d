"""The bus's message types and their encoding: ``[msgpack header, raw tensor frame, ...]``. No zmq, no I/O.

Every message is one ZeroMQ multipart message. Frame 0 is a msgpack map
``{"v": 1, "type": str, "round": int, "sender": str, "tensors": [{"dtype", "shape"}, ...], <fields>}``; each further
frame is the raw little-endian bytes of one tensor, in the order of ``tensors``. Senders pass tensor memory to zmq
without copying; receivers wrap the received frame with ``np.frombuffer`` (no copy), so a model crosses the bus with
no serialisation step at all. Nothing is pickled.

Message table (protocol version 1)::

    type       direction             fields                                   tensor frames
    HELLO      client -> coordinator client: str, device: str                 -
    WELCOME    coordinator -> client spec: dict, config: dict                 -
    READY      client -> coordinator num_samples: int                         -
    OFFER      client -> coordinator round, num_samples: int                  -
    PULL       coordinator -> client round                                    -
    TRAIN      coordinator -> client round, config: dict (TrainConfig)        model (flat global vector)
    UPDATE     client -> coordinator round, num_samples: int, metrics: dict   delta (flat local - global)
    EVALUATE   coordinator -> client round                                    model
    RESULT     client -> coordinator round, num_samples: int, metrics: dict   -
    HEARTBEAT  both ways             -                                        -
    BYE        both ways             reason: str                              -
    GOSSIP_FETCH peer -> peer         xid: int, addr: str, kind: str           -
    GOSSIP_REPLY peer -> peer         round, xid, version, num_samples: int,   model (the replier's vector before mixing)
                                     addr: str, peers: dict
    GOSSIP_PUSH  peer -> peer         round, xid, version, num_samples: int,   model (the initiator's vector before
                                     addr: str, peers: dict                   mixing; a D-PSGD round's model)
    GOSSIP_BUSY  peer -> peer         xid: int, addr: str                      -
    SECAGG     both ways             round, parts: int                        the secure-aggregation message's
                                                                             parts, opaque (see below)

Gossip peers (:mod:`clients.gossip`) speak only the GOSSIP_* types. An exchange is FETCH(kind="exchange") -> REPLY
(the replier reserves itself for this exchange) -> PUSH (both sides mix), or FETCH -> BUSY, so a refusal moves no
model; FETCH(kind="fetch") is a newcomer pulling a model, which it adopts when newer. ``addr`` is the sender's own
bind address, ``peers`` a map of live peer addresses it knows (membership rumours).

SECAGG carries one message of the secure-aggregation protocol (:mod:`fedopt.secagg.codec`: a msgpack body plus, for
a masked input, one raw uint32/uint64 vector) as opaque frames: this module checks only their number and sizes, and
``codec.unpack`` validates their content (kinds, fields, key sizes, dtype, length) before anything is allocated.
Its frames are not tensors: they are listed under ``parts`` (a count), not ``tensors``. A coordinator running
``--aggregator secagg`` sends SECAGG after TRAIN, and its clients answer with SECAGG; the masked input takes upload
credit like an UPDATE (OFFER with the training metrics, then SECAGG on PULL).

A client says HELLO, gets WELCOME (the ParamSpec and the run's data settings), loads its shard and says READY with its
sample count; from then on it may be selected. Any message counts as a heartbeat (see :mod:`fedopt.liveness`).

Uploads are credit-based (the ZeroMQ guide, chapter 7): a client that has finished training sends OFFER and uploads
its UPDATE only when the coordinator answers PULL. The coordinator grants a few PULLs at a time, so however many
clients finish together, at most that many update frames are in its memory at once (ZeroMQ would otherwise read every
concurrent upload off the network into memory before the application sees the first one).

Validation happens before anything is allocated for a message's payload (:func:`decode`): header size, msgpack
well-formedness, version, type, each field's type, frame count, the dtype allow-list, a declared element count under
the limit, and ``prod(shape) * itemsize == len(frame)``. Any failure raises :class:`~fedopt.errors.WireError` with the
reason; callers log it and carry on.

A tensor may travel as several frames (its spec says ``"frames": k``; :func:`encode` with ``chunk_bytes``): the bus
does this over CurveZMQ, which encrypts frame by frame, so fanning a model out to n peers does not hold n encrypted
copies. The receiver joins the chunks into one buffer (one copy); a one-frame tensor stays a view of its frame.

Limits: a message is bounded by ``Limits.max_message_bytes`` (the socket's ``MAXMSGSIZE``, 16 GiB by default: ZeroMQ
frames have 64-bit lengths, so there is no 2 GB cap); the receiver holds one message in memory at a time, so a
P-parameter model costs one P-sized frame per message in flight plus the aggregator's running mean.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Sequence

import msgpack
import numpy as np
import torch

from .errors import WireError

__all__ = [
    "VERSION", "Limits", "Message", "Hello", "Welcome", "Ready", "Offer", "Pull", "Train", "UpdateMsg", "Evaluate", "Result",
    "Heartbeat", "Bye", "GossipPush", "GossipReply", "GossipBusy", "GossipFetch", "SecAgg", "MESSAGE_TYPES", "WIRE_DTYPES", "encode", "decode",
]

VERSION = 1

#: dtypes a tensor frame may declare, and their sizes; anything else is rejected before allocation
_ALLOWED = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
#: ``--wire-dtype`` choices: the precision a model or delta travels in
WIRE_DTYPES = ("float32", "bfloat16", "float16")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# numpy has no bfloat16: bf16 frames are viewed as int16 and reinterpreted by torch
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "float64": np.float64}


@dataclass(frozen=True)
class Limits:
    """Sizes a receiver accepts; checked before the payload is touched."""

    max_header_bytes: int = 4 << 20  # a ParamSpec of tens of thousands of entries still fits
    max_message_bytes: int = 16 << 30  # the socket's MAXMSGSIZE; also caps one tensor frame
    max_frames: int = 16  # tensor frames per message
    max_chunks: int = 1 << 16  # frames one tensor may be split into (see ``chunk_bytes`` in :func:`encode`)
    max_dims: int = 8  # dimensions of one tensor


@dataclass(frozen=True)
class Message:
    """Base of every message: the round it belongs to and the sender's name (informational)."""

    TYPE: ClassVar[str] = ""
    TENSORS: ClassVar[tuple[str, ...]] = ()  # fields that travel as raw frames, in frame order
    round: int = 0  # the round the message belongs to (0 outside rounds)
    sender: str = ""  # the sender's id as it claims it; the coordinator trusts the socket, not this


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "HELLO"
    client: str = ""  # stable client id (its shard index for built-in tasks): selection is seeded by it
    device: str = "cpu"  # where the client trains


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "WELCOME"
    spec: dict = field(default_factory=dict)  # ParamSpec.to_dict() of the global model
    config: dict = field(default_factory=dict)  # task, task_options, clients, partition, alpha, seed, heartbeat...


@dataclass(frozen=True)
class Ready(Message):
    TYPE: ClassVar[str] = "READY"
    num_samples: int = 0  # the size of the client's train shard (FedAvg's weight)


@dataclass(frozen=True)
class Offer(Message):
    TYPE: ClassVar[str] = "OFFER"
    num_samples: int = 0  # the finished update's weight, announced before it is uploaded
    metrics: dict = field(default_factory=dict)  # with secagg: the training metrics (loss, steps), as UPDATE carries


@dataclass(frozen=True)
class Pull(Message):
    TYPE: ClassVar[str] = "PULL"


@dataclass(frozen=True)
class Train(Message):
    TYPE: ClassVar[str] = "TRAIN"
    TENSORS: ClassVar[tuple[str, ...]] = ("model",)
    config: dict = field(default_factory=dict)  # TrainConfig fields (seed, max_steps, epochs, lr, ...)
    model: Any = None  # flat global vector (torch.Tensor), in the wire dtype


@dataclass(frozen=True)
class UpdateMsg(Message):
    TYPE: ClassVar[str] = "UPDATE"
    TENSORS: ClassVar[tuple[str, ...]] = ("delta",)
    num_samples: int = 0
    metrics: dict = field(default_factory=dict)  # loss, steps, samples, partial
    delta: Any = None  # flat local - global (torch.Tensor), in the wire dtype


@dataclass(frozen=True)
class Evaluate(Message):
    TYPE: ClassVar[str] = "EVALUATE"
    TENSORS: ClassVar[tuple[str, ...]] = ("model",)
    model: Any = None


@dataclass(frozen=True)
class Result(Message):
    TYPE: ClassVar[str] = "RESULT"
    num_samples: int = 0  # size of the split evaluated on
    metrics: dict = field(default_factory=dict)  # accuracy, loss


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "HEARTBEAT"


@dataclass(frozen=True)
class Bye(Message):
    TYPE: ClassVar[str] = "BYE"
    reason: str = ""  # "done" ends a client; anything else is logged and the client reconnects


@dataclass(frozen=True)
class GossipPush(Message):
    TYPE: ClassVar[str] = "GOSSIP_PUSH"
    TENSORS: ClassVar[tuple[str, ...]] = ("model",)
    xid: int = 0  # exchange id chosen by the initiator; the reply carries it back
    version: int = 0  # the model's logical clock (a stale model never overwrites a newer one)
    num_samples: int = 0  # the sender's mixing weight
    addr: str = ""  # the sender's bind address (its identity in the swarm)
    peers: dict = field(default_factory=dict)  # {address: 1} of peers the sender holds alive
    model: Any = None


@dataclass(frozen=True)
class GossipReply(GossipPush):
    TYPE: ClassVar[str] = "GOSSIP_REPLY"


@dataclass(frozen=True)
class GossipBusy(Message):
    TYPE: ClassVar[str] = "GOSSIP_BUSY"
    xid: int = 0
    addr: str = ""


@dataclass(frozen=True)
class GossipFetch(Message):
    TYPE: ClassVar[str] = "GOSSIP_FETCH"
    xid: int = 0
    addr: str = ""
    kind: str = "fetch"  # "fetch" (pull a model to adopt), "exchange" (propose a push-pull exchange) or "final"


@dataclass(frozen=True)
class SecAgg(Message):
    TYPE: ClassVar[str] = "SECAGG"
    OPAQUE: ClassVar[str] = "parts"  # the field whose frames travel unparsed (validated by fedopt.secagg.codec)
    parts: Any = ()  # codec.pack(message): [msgpack body, *raw vector frames] as buffers


MESSAGE_TYPES: dict[str, type[Message]] = {
    c.TYPE: c for c in (Hello, Welcome, Ready, Offer, Pull, Train, UpdateMsg, Evaluate, Result, Heartbeat, Bye,
                        GossipPush, GossipReply, GossipBusy, GossipFetch, SecAgg)
}
_SCALAR = (int, float, str, bool, type(None))


def _field_types(cls: type[Message]) -> dict[str, type]:
    """Python types of a message's non-tensor fields, read from the dataclass annotations."""
    out = {}
    for f in fields(cls):
        if f.name in cls.TENSORS or f.name == getattr(cls, "OPAQUE", None):
            continue
        out[f.name] = {"int": int, "str": str, "dict": dict}[f.type]
    return out


_SCHEMA = {name: _field_types(cls) for name, cls in MESSAGE_TYPES.items()}


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
    return name, memoryview(arr).cast("B"), tuple(t.shape)


def encode(msg: Message, wire_dtype: str | None = None, chunk_bytes: int | None = None) -> list:
    """``[header bytes, tensor buffers...]`` ready for ``send_multipart(copy=False)``; buffers alias the tensors.

    ``chunk_bytes``: a tensor longer than this travels as several frames of at most that many bytes each (declared
    as ``"frames": k`` in its spec; :func:`decode` joins them). Over CurveZMQ each frame is encrypted on its own, so
    a sender fanning one model out to n peers holds n encrypted chunks instead of n encrypted models."""
    if chunk_bytes is not None and chunk_bytes < 1:
        raise WireError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if type(msg) not in MESSAGE_TYPES.values():
        raise WireError(f"not a wire message: {type(msg).__name__}")
    header: dict[str, Any] = {"v": VERSION, "type": msg.TYPE}
    frames: list = []
    specs = []
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in msg.TENSORS:
            dtype, buf, shape = _as_wire(value, wire_dtype)
            spec = {"dtype": dtype, "shape": list(shape)}
            if chunk_bytes is not None and buf.nbytes > chunk_bytes:
                spec["frames"] = -(-buf.nbytes // chunk_bytes)
                frames.extend(buf[i : i + chunk_bytes] for i in range(0, buf.nbytes, chunk_bytes))
            else:
                frames.append(buf)
            specs.append(spec)
        else:
            header[f.name] = value
    header["tensors"] = specs
    opaque = getattr(msg, "OPAQUE", None)
    if opaque is not None:
        parts = list(getattr(msg, opaque))
        header[opaque] = len(parts)
        try:
            frames.extend(memoryview(b).cast("B") for b in parts)
        except TypeError:
            raise WireError(f"{msg.TYPE}: every part must be a buffer") from None
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError) as e:
        raise WireError(f"{msg.TYPE} header cannot be encoded: {e}") from None
    return [head, *frames]


# ---- decoding ------------------------------------------------------------------------------------------------------
def _check_value(name: str, value: Any, depth: int = 0) -> None:
    """Free-form dict fields (config, metrics, spec) may hold only plain data, a few levels deep."""
    if depth > 6:
        raise WireError(f"field {name!r} is nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise WireError(f"field {name!r} has a non-string key")
            _check_value(name, v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_value(name, v, depth + 1)
    elif not isinstance(value, _SCALAR):
        raise WireError(f"field {name!r} holds a {type(value).__name__}, which the wire does not carry")


def _tensor_spec(i: int, spec: Any, limits: Limits) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, byte size) of tensor ``i`` as declared, validated; no allocation, Python ints only."""
    if not isinstance(spec, dict):
        raise WireError(f"tensor {i}: declaration is not a map")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in _ALLOWED:
        raise WireError(f"tensor {i}: dtype {dtype!r} is not allowed (allowed: {', '.join(_ALLOWED)})")
    if not isinstance(shape, list) or len(shape) > limits.max_dims or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise WireError(f"tensor {i}: shape {shape!r} is not a list of at most {limits.max_dims} sizes >= 0")
    nbytes = math.prod(shape) * _ALLOWED[dtype]
    if nbytes > limits.max_message_bytes:
        raise WireError(f"tensor {i}: declared shape {shape} is {nbytes} bytes, over the limit of "
                        f"{limits.max_message_bytes}")
    return dtype, tuple(shape), nbytes


def _chunk_count(i: int, spec: Any, limits: Limits) -> int:
    """How many frames tensor ``i`` was split into (``"frames"``, default 1), validated."""
    k = spec.get("frames", 1) if isinstance(spec, dict) else 1
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limits.max_chunks:
        raise WireError(f"tensor {i}: frames must be an integer in [1, {limits.max_chunks}], not {k!r}")
    return k


def _join(bufs: list[memoryview], nbytes: int) -> memoryview:
    """One writable buffer holding the chunks of a tensor in order (the sizes were checked)."""
    out = np.empty(nbytes, dtype=np.uint8)
    at = 0
    for b in bufs:
        out[at : at + len(b)] = np.frombuffer(b, dtype=np.uint8)
        at += len(b)
    return memoryview(out)


def _buffer(frame: Any) -> memoryview:
    """The bytes of a received frame without copying (a zmq Frame, bytes or any buffer)."""
    buf = getattr(frame, "buffer", frame)
    try:
        return memoryview(buf).cast("B")
    except TypeError:
        raise WireError(f"frame of type {type(frame).__name__} is not a buffer") from None


def decode(frames: Sequence[Any], limits: Limits = Limits()) -> Message:
    """Validate and decode one multipart message; tensors are views of the received frames (no copy).

    Raises WireError naming the first problem found. Nothing is allocated for a tensor until its frame's length
    has been checked against its declared shape and dtype.
    """
    if not frames:
        raise WireError("empty message")
    head = _buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise WireError(f"header of {len(head)} bytes is over the limit of {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise WireError(f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    if header.get("v") != VERSION:
        raise WireError(f"unsupported protocol version {header.get('v')!r} (this side speaks {VERSION})")
    kind = header.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message type {kind!r}")
    values: dict[str, Any] = {}
    for name, typ in _SCHEMA[kind].items():
        if name not in header:
            continue  # defaults apply
        v = header[name]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise WireError(f"{kind}: field {name!r} must be {typ.__name__}, not {type(v).__name__}")
        if typ is dict:
            _check_value(name, v)
        values[name] = v
    opaque = getattr(cls, "OPAQUE", None)
    if opaque is not None:
        return _decode_opaque(cls, kind, header, frames, values, limits)
    declared = header.get("tensors", [])
    if not isinstance(declared, list) or len(declared) > limits.max_frames:
        raise WireError(f"{kind}: tensor declarations must be a list of at most {limits.max_frames}")
    if len(declared) != len(cls.TENSORS):
        raise WireError(f"{kind}: expected {len(cls.TENSORS)} tensor(s), header declares {len(declared)} and "
                        f"{len(frames) - 1} tensor frame(s) arrived")
    counts = [_chunk_count(i, spec, limits) for i, spec in enumerate(declared)]
    if len(frames) - 1 != sum(counts):
        raise WireError(f"{kind}: header declares {sum(counts)} tensor frame(s) and {len(frames) - 1} arrived")
    first = 1
    for i, (name, spec) in enumerate(zip(cls.TENSORS, declared)):
        dtype, shape, nbytes = _tensor_spec(i, spec, limits)
        bufs = [_buffer(f) for f in frames[first : first + counts[i]]]
        first += counts[i]
        got = sum(len(b) for b in bufs)
        if got != nbytes or (len(bufs) > 1 and not all(len(b) for b in bufs)):
            raise WireError(f"{kind}: tensor {i} declares {dtype}{list(shape)} = {nbytes} bytes but its "
                            f"{'frame has' if len(bufs) == 1 else f'{len(bufs)} frames have'} {got}")
        buf = bufs[0] if len(bufs) == 1 else _join(bufs, nbytes)
        arr = np.frombuffer(buf, dtype=_NUMPY[dtype])  # a view of the frame (or of the joined chunks): no copy
        if buf.readonly:  # bytes (tests, inproc copies): torch warns about sharing read-only memory; we never write
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
        else:
            t = torch.from_numpy(arr)
        if dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        values[name] = t.view(shape)
    return cls(**values)


def _decode_opaque(cls, kind: str, header: dict, frames: Sequence[Any], values: dict, limits: Limits) -> Message:
    """A message whose frames travel unparsed: check their count and sizes, hand them over as views."""
    count = header.get(cls.OPAQUE)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= limits.max_frames:
        raise WireError(f"{kind}: {cls.OPAQUE!r} must count 1..{limits.max_frames} frames, not {count!r}")
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
