"""The bus's message types and their encoding: ``[msgpack header, raw tensor frame, ...]``. No zmq, no I/O.

Every message is one ZeroMQ multipart message. Frame 0 is a msgpack map
``{"v": 1, "type": str, "round": int, "sender": str, "tensors": [{"dtype", "shape"}, ...], <fields>}``; each further
frame is the raw little-endian bytes of one tensor, in the order of ``tensors``. Senders pass tensor memory to zmq
without copying; receivers wrap the received frame with ``np.frombuffer`` (no copy), so a model crosses the bus with
no serialisation step at all. Nothing is pickled.

Message table (protocol version 1; every message also has ``round`` and ``sender``)::

    type         direction             fields                                   tensor frames
    HELLO        client -> coordinator client: name, device: name               -
    WELCOME      coordinator -> client spec: tree, config: tree                 -
    READY        client -> coordinator num_samples: weight                      -
    OFFER        client -> coordinator round, num_samples: weight,              -
                                       metrics: metrics
    PULL         coordinator -> client round                                    -
    TRAIN        coordinator -> client round, config: tree (TrainConfig)        model (flat global vector)
    UPDATE       client -> coordinator round, num_samples: weight,              delta (flat local - global)
                                       metrics: metrics
    EVALUATE     coordinator -> client round                                    model
    RESULT       client -> coordinator round, num_samples: count,               -
                                       metrics: metrics
    HEARTBEAT    both ways             -                                        -
    BYE          both ways             reason: text                             -
    GOSSIP_FETCH peer -> peer          xid: counter, addr: name, kind: one of   -
                                       "fetch", "exchange", "final"
    GOSSIP_REPLY peer -> peer          round, xid, version: counter,            model (the replier's vector before
                                       num_samples: weight, addr: name,         mixing)
                                       peers: peers
    GOSSIP_PUSH  peer -> peer          as GOSSIP_REPLY                          model (the initiator's vector before
                                                                                mixing; a D-PSGD round's model)
    GOSSIP_BUSY  peer -> peer          xid: counter, addr: name                 -
    SECAGG       both ways             round, parts: int in [1, 16]             the secure-aggregation message's
                                                                                parts, opaque (see below)

Field kinds and their bounds (the defaults of :class:`Limits`; a receiver may pass tighter ones)::

    counter   round, xid, version: int (not bool), 0 <= x < 2**53 (max_int). Only the range is checked here; each
              receiver checks the value against its own round or version window.
    weight    num_samples that weighs an average: int, 1 <= n <= 2**40 (max_samples), a hard ceiling far above any
              shard; the coordinator caps weights lower (its --max-samples).
    count     RESULT's num_samples (the size of an evaluation split): int, 0 <= n <= 2**40.
    name      sender, client, device, addr: printable str of at most 256 characters (max_name); printable, so a
              logged name cannot forge log lines.
    text      reason: printable str of at most 1024 characters (max_reason).
    metrics   map of at most 64 entries (max_metrics): name -> finite float, int with |x| < 2**53, or bool. NaN,
              Inf, strings and containers are rejected, so a receiver can do arithmetic on any value.
    peers     map of at most 64 entries (max_peers): name (a peer's address) -> counter. This is the wire's ceiling
              on rumours per message; the gossip engine may act on fewer.
    tree      plain data: maps with str keys, lists, str, int, float, bool, None; at most 8 levels deep (max_depth)
              and 2**18 items (containers and scalars) in all (max_tree_items). The receiver validates the
              content (ParamSpec.from_dict, the client's settings).

Validation happens before anything is allocated for a message's payload (:func:`decode`): the header is at most 4 MiB
(max_header_bytes) of msgpack decoding to a map, with msgpack's own limits set (strings of at most 64 KiB, max_str;
arrays and maps of at most max_tree_items entries; no bin, no extension types) so that a small header cannot expand
into a large structure; then version, type, every field against its kind, frame count, the dtype allow-list, each
dimension and the element count under max_elements (2**33), ``prod(shape) * itemsize == len(frame)``. Any failure
raises :class:`~fedopt.errors.WireError` with the reason (hostile values shortened); callers log it and carry on.
:func:`decode` raises nothing else, for any input. Tensor values are not inspected (no per-element work): NaN and
Inf travel, and the receiver judges them. Unknown header keys are rejected: a new field is a new protocol version.
An absent field takes its default, which is always a valid value (a weight defaults to 1). :func:`encode` applies
the same checks to what it sends, so an honest sender learns of a bad value (a NaN loss, an over-long name) at once,
from a WireError naming the field, instead of from a peer that drops the message.

Gossip peers (:mod:`clients.gossip.run`) speak only the GOSSIP_* types. An exchange is FETCH(kind="exchange") -> REPLY
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

A tensor spec is ``{"dtype", "shape"}`` plus, for a tensor split over several frames, ``"frames": k`` (1 <= k <=
max_chunks); other keys are rejected. :func:`encode` splits with ``chunk_bytes``: the bus does this over CurveZMQ,
which encrypts frame by frame, so fanning a model out to n peers does not hold n encrypted copies. The receiver joins
the chunks into one buffer (one copy); a one-frame tensor stays a view of its frame.

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
from .wire_schema import CHECKS as _CHECKS, FETCH_KINDS, is_int as _is_int, show as _show

__all__ = [
    "VERSION", "Limits", "Message", "Hello", "Welcome", "Ready", "Offer", "Pull", "Train", "UpdateMsg", "Evaluate", "Result",
    "Heartbeat", "Bye", "GossipPush", "GossipReply", "GossipBusy", "GossipFetch", "SecAgg", "MESSAGE_TYPES", "WIRE_DTYPES",
    "FETCH_KINDS", "encode", "decode",
]

VERSION = 1

#: dtypes a tensor frame may declare, and their sizes; anything else is rejected before allocation
_ALLOWED = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
#: ``--wire-dtype`` choices: the precision a model or delta travels in
WIRE_DTYPES = ("float32", "bfloat16", "float16")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# numpy has no bfloat16: bf16 frames are viewed as int16 and reinterpreted by torch
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "float64": np.float64}
#: GOSSIP_FETCH kinds: pull a model to adopt, propose a push-pull exchange, or a final-mix exchange


@dataclass(frozen=True)
class Limits:
    """Sizes and ranges a receiver accepts; checked before the payload is touched (see the module docstring)."""

    max_header_bytes: int = 4 << 20  # a ParamSpec of tens of thousands of entries still fits
    max_message_bytes: int = 16 << 30  # the socket's MAXMSGSIZE; also caps one tensor frame and all tensors together
    max_frames: int = 16  # tensors (or SECAGG parts) per message
    max_chunks: int = 1 << 16  # frames one tensor may be split into (see ``chunk_bytes`` in :func:`encode`)
    max_dims: int = 8  # dimensions of one tensor
    max_elements: int = 1 << 33  # elements of one tensor, and of each dimension: 16 GiB of 2-byte values
    max_int: int = 1 << 53  # round, xid, version are below this: exact as a float, far beyond any real run
    max_samples: int = 1 << 40  # num_samples ceiling; the coordinator applies its own, lower, configured cap
    max_name: int = 256  # characters of a name: sender, client, device, addr, a metric's or a peer's key
    max_reason: int = 1024  # characters of BYE's reason
    max_metrics: int = 64  # entries of a metrics map
    max_peers: int = 64  # entries of a gossip ``peers`` map (membership rumours)
    max_depth: int = 8  # nesting of a free-form tree (spec, config)
    max_tree_items: int = 1 << 18  # containers and scalars in one free-form tree; also msgpack's array and map length cap
    max_str: int = 1 << 16  # bytes of any one string in a header (msgpack's own limit)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Limits.{f.name} must be a positive int, not {v!r}")


@dataclass(frozen=True)
class Message:
    """Base of every message: the round it belongs to and the sender's name (informational)."""

    TYPE: ClassVar[str] = ""
    TENSORS: ClassVar[tuple[str, ...]] = ()  # fields that travel as raw frames, in frame order
    MIN_SAMPLES: ClassVar[int] = 1  # least num_samples (where the type has one): a weight is at least 1
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
    num_samples: int = 1  # the size of the client's train shard (FedAvg's weight)


@dataclass(frozen=True)
class Offer(Message):
    TYPE: ClassVar[str] = "OFFER"
    num_samples: int = 1  # the finished update's weight, announced before it is uploaded
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
    num_samples: int = 1
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
    MIN_SAMPLES: ClassVar[int] = 0  # a count, not a weight: an empty evaluation split reports 0
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
    num_samples: int = 1  # the sender's mixing weight
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
    kind: str = "fetch"  # one of FETCH_KINDS


@dataclass(frozen=True)
class SecAgg(Message):
    TYPE: ClassVar[str] = "SECAGG"
    OPAQUE: ClassVar[str] = "parts"  # the field whose frames travel unparsed (validated by fedopt.secagg.codec)
    parts: Any = ()  # codec.pack(message): [msgpack body, *raw vector frames] as buffers


MESSAGE_TYPES: dict[str, type[Message]] = {
    c.TYPE: c for c in (Hello, Welcome, Ready, Offer, Pull, Train, UpdateMsg, Evaluate, Result, Heartbeat, Bye,
                        GossipPush, GossipReply, GossipBusy, GossipFetch, SecAgg)
}


# ---- the schema: one check per field name (fedopt.wire_schema), shared by every type that has the field ------------
def _header_fields(cls: type[Message]) -> tuple[str, ...]:
    names = tuple(f.name for f in fields(cls) if f.name not in cls.TENSORS and f.name != getattr(cls, "OPAQUE", None))
    missing = [n for n in names if n not in _CHECKS]
    if missing:
        raise TypeError(f"wire schema: {cls.__name__} fields {missing} have no check")  # a programming error
    return names


_SCHEMA = {name: _header_fields(cls) for name, cls in MESSAGE_TYPES.items()}
#: header keys every message may carry besides its fields
_ENVELOPE = frozenset({"v", "type", "tensors"})
_KEYS = {name: _ENVELOPE | set(f) | ({cls.OPAQUE} if hasattr(cls, "OPAQUE") else set())
         for (name, f), cls in zip(_SCHEMA.items(), MESSAGE_TYPES.values())}
_SPEC_KEYS = frozenset({"dtype", "shape", "frames"})


def _check_fields(cls: type[Message], values: dict, limits: Limits) -> None:
    for name, v in values.items():
        _CHECKS[name](cls, name, v, limits)


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
    header: dict[str, Any] = {"v": VERSION, "type": msg.TYPE, **values}
    frames: list = []
    specs = []
    for i, name in enumerate(msg.TENSORS):
        dtype, buf, shape = _as_wire(getattr(msg, name), wire_dtype)
        spec = {"dtype": dtype, "shape": list(shape)}
        if chunk_bytes is not None and buf.nbytes > chunk_bytes:
            spec["frames"] = -(-buf.nbytes // chunk_bytes)
        _tensor_spec(i, spec, limits)  # the receiver's checks, word for word
        if "frames" in spec:
            frames.extend(buf[at : at + chunk_bytes] for at in range(0, buf.nbytes, chunk_bytes))
        else:
            frames.append(buf)
        specs.append(spec)
    header["tensors"] = specs
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


def _tensor_spec(i: int, spec: Any, limits: Limits) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, byte size, frame count) of tensor ``i`` as declared, validated; Python ints only."""
    if not isinstance(spec, dict) or not spec.keys() <= _SPEC_KEYS:
        raise WireError(f"tensor {i}: declaration must be a map of {', '.join(sorted(_SPEC_KEYS))}, "
                        f"not {_show(spec)}")
    k = spec.get("frames", 1)
    if not _is_int(k) or not 1 <= k <= limits.max_chunks:
        raise WireError(f"tensor {i}: frames must be an integer in [1, {limits.max_chunks}], not {_show(k)}")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if not isinstance(dtype, str) or dtype not in _ALLOWED:
        raise WireError(f"tensor {i}: dtype {_show(dtype)} is not allowed (allowed: {', '.join(_ALLOWED)})")
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
    if len(declared) != len(cls.TENSORS):
        raise WireError(f"{kind}: expected {len(cls.TENSORS)} tensor(s), header declares {len(declared)} and "
                        f"{len(frames) - 1} tensor frame(s) arrived")
    specs = [_tensor_spec(i, spec, limits) for i, spec in enumerate(declared)]
    if len(frames) - 1 != sum(s[3] for s in specs):
        raise WireError(f"{kind}: header declares {sum(s[3] for s in specs)} tensor frame(s) and {len(frames) - 1} "
                        f"arrived")
    if sum(s[2] for s in specs) > limits.max_message_bytes:
        raise WireError(f"{kind}: tensors of {sum(s[2] for s in specs)} bytes in all, over {limits.max_message_bytes}")
    first = 1
    for i, (name, (dtype, shape, nbytes, k)) in enumerate(zip(cls.TENSORS, specs)):
        bufs = [_buffer(f) for f in frames[first : first + k]]
        first += k
        got = sum(len(b) for b in bufs)
        if got != nbytes or (len(bufs) > 1 and not all(len(b) for b in bufs)):
            raise WireError(f"{kind}: tensor {i} declares {dtype}{list(shape)} = {nbytes} bytes but its "
                            f"{'frame has' if len(bufs) == 1 else f'{len(bufs)} frames have'} {got}")
        buf = bufs[0] if len(bufs) == 1 else _join(bufs, nbytes)
        values[name] = _tensor(kind, i, buf, dtype, shape)
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
