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
    READY        client -> coordinator num_samples: weight, clients: count      -
    OFFER        client -> coordinator round, num_samples: weight,              -
                                       metrics: metrics
    PULL         coordinator -> client round                                    -
    COHORT       coordinator -> client round (the job), cohort: counter,        -
                                       scale: fraction
    TRAIN        coordinator -> client round, config: tree (TrainConfig),       model (flat global vector); or,
                                       encoding: encoding                       compressed: values [, indices]
                                                                                [, scales] (--compress-down)
    UPDATE       client -> coordinator round, num_samples: weight,              delta (flat local - global); or,
                                       metrics: metrics, encoding: encoding     compressed: values [, indices]
                                                                                [, scales] (see below)
    EVALUATE     coordinator -> client round                                    model
    RESULT       client -> coordinator round, num_samples: count,               -
                                       metrics: metrics
    HEARTBEAT    both ways             -                                        -
    BYE          both ways             reason: text                             -
    PASS         client -> coordinator round, reason: text                      -
    GOSSIP_FETCH peer -> peer          xid: counter, addr: name, kind: one of   -
                                       "fetch", "exchange", "final"
    GOSSIP_REPLY peer -> peer          round, xid, version: counter,            model (the replier's vector before
                                       num_samples: weight, addr: name,         mixing)
                                       peers: peers
    GOSSIP_PUSH  peer -> peer          as GOSSIP_REPLY, encoding: encoding      model (the initiator's vector before
                                                                                mixing; a D-PSGD round's model); or,
                                                                                compressed: a CHOCO round's values
                                                                                [, indices] [, scales]
    GOSSIP_BUSY  peer -> peer          xid: counter, addr: name                 -
    SECAGG       both ways             round, parts: int in [1, 16]             the secure-aggregation message's
                                                                                parts, opaque (see below)

Field kinds and their bounds (the defaults of :class:`Limits`; a receiver may pass tighter ones)::

    counter   round, xid, version, cohort: int (not bool), 0 <= x < 2**53 (max_int). Only the range is checked here; each
              receiver checks the value against its own round or version window.
    weight    num_samples that weighs an average: int, 1 <= n <= 2**40 (max_samples), a hard ceiling far above any
              shard; the coordinator caps weights lower (its --max-samples).
    count     RESULT's num_samples (the size of an evaluation split), READY's clients: int, 0 <= n <= 2**40.
    name      sender, client, device, addr: printable str of at most 256 characters (max_name); printable, so a
              logged name cannot forge log lines.
    text      reason: printable str of at most 1024 characters (max_reason).
    fraction  scale: float (or int), 0 < x <= 1.
    metrics   map of at most 64 entries (max_metrics): name -> finite float, int with |x| < 2**53, or bool. NaN,
              Inf, strings and containers are rejected, so a receiver can do arithmetic on any value.
    peers     map of at most 64 entries (max_peers): name (a peer's address) -> counter. This is the wire's ceiling
              on rumours per message; the gossip engine may act on fewer.
    encoding  UPDATE's (and TRAIN's, GOSSIP_PUSH's) compression: {} (dense) or {size, k, index, bits[, block][, seed]}, which fixes the exact
              dtype and length of each tensor (:mod:`fedopt.wire.compressed`).
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
Inf travel, and the receiver judges them; the one exception is a compressed UPDATE's index frame, checked in range and
strictly increasing before the receiver scatters by it (:mod:`fedopt.wire.compressed`, which also gives its layout).
The dtype allow-list is per tensor: a model or a dense delta is float32, float16, bfloat16 or float64; int32 and
uint8 only where a compressed UPDATE's encoding puts them. Unknown header keys are rejected: a new field is a new
protocol version, except ``encoding``, which is left out when empty, and READY's ``clients``, left out when 0 (only an
edge aggregator sends it), so a dense UPDATE is what version 1 always sent
(a receiver without compression refuses a compressed one by its unknown key). An absent field takes its default, which is always a valid value (a weight defaults to 1). :func:`encode` applies
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

Buffered asynchronous rounds with secure aggregation (``--buffer-size`` with ``--aggregator secagg``): a job is a TRAIN
whose ``round`` is the job's id; the client that finished it keeps its update and says OFFER for that job. Once K such
clients are waiting, the coordinator sends each COHORT (``round``: the job it answers, ``cohort``: the secure round
that will aggregate it, ``scale``: the staleness weight s(tau) it multiplies its update by before masking), then runs
that secure round's SECAGG messages among the K exactly as above.

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

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from .compressed import check_encoding
from .schema import CHECKS, FETCH_KINDS

#: every header field's check: the schema's, and the compressed layout's own
_CHECKS = {**CHECKS, "encoding": lambda cls, name, v, lim: check_encoding(f"{cls.TYPE}: {name}", v, lim)}

__all__ = [
    "VERSION", "Limits", "Message", "Hello", "Welcome", "Ready", "Offer", "Pull", "Cohort", "Train", "UpdateMsg", "Evaluate", "Result",
    "Heartbeat", "Bye", "Pass", "GossipPush", "GossipReply", "GossipBusy", "GossipFetch", "SecAgg", "MESSAGE_TYPES", "WIRE_DTYPES",
    "FETCH_KINDS",
]

VERSION = 1

#: dtypes a tensor frame may declare, and their sizes; anything else is rejected before allocation
_ALLOWED = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "uint8": 1}
#: what a dense tensor (a model, a delta) may be; int32 and uint8 travel only in a compressed UPDATE's exact layout
_FLOATS = ("float32", "float16", "bfloat16", "float64")
#: ``--wire-dtype`` choices: the precision a model or delta travels in
WIRE_DTYPES = ("float32", "bfloat16", "float16")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int32": torch.int32, "uint8": torch.uint8}
# numpy has no bfloat16: bf16 frames are viewed as int16 and reinterpreted by torch
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "float64": np.float64, "int32": np.int32,
          "uint8": np.uint8}
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
    clients: int = 0  # an edge aggregator's: the leaf clients behind it (0, left off the wire: a leaf client)


@dataclass(frozen=True)
class Offer(Message):
    TYPE: ClassVar[str] = "OFFER"
    num_samples: int = 1  # the finished update's weight, announced before it is uploaded
    metrics: dict = field(default_factory=dict)  # with secagg: the training metrics (loss, steps), as UPDATE carries


@dataclass(frozen=True)
class Pull(Message):
    TYPE: ClassVar[str] = "PULL"


@dataclass(frozen=True)
class Cohort(Message):
    TYPE: ClassVar[str] = "COHORT"
    cohort: int = 0  # the secure round that aggregates the update of job ``round``
    scale: float = 1.0  # the staleness weight the client applies to that update before masking


@dataclass(frozen=True)
class Train(Message):
    TYPE: ClassVar[str] = "TRAIN"
    TENSORS: ClassVar[tuple[str, ...]] = ("model",)
    PACKED: ClassVar[tuple[str, ...]] = ("values", "indices", "scales")  # a compressed model's tensors, in order
    config: dict = field(default_factory=dict)  # TrainConfig fields (seed, max_steps, epochs, lr, ...)
    encoding: dict = field(default_factory=dict)  # {} = dense ``model``; else compressed (fedopt.wire.compressed)
    model: Any = None  # flat global vector (torch.Tensor), in the wire dtype
    values: Any = None  # compressed (--compress-down): as UpdateMsg's
    indices: Any = None
    scales: Any = None


@dataclass(frozen=True)
class UpdateMsg(Message):
    TYPE: ClassVar[str] = "UPDATE"
    TENSORS: ClassVar[tuple[str, ...]] = ("delta",)
    PACKED: ClassVar[tuple[str, ...]] = ("values", "indices", "scales")  # a compressed update's tensors, in order
    num_samples: int = 1
    metrics: dict = field(default_factory=dict)  # loss, steps, samples, partial
    encoding: dict = field(default_factory=dict)  # {} = dense ``delta``; else compressed (fedopt.wire.compressed)
    delta: Any = None  # flat local - global (torch.Tensor), in the wire dtype
    values: Any = None  # compressed: the kept values (float) or their packed codes (uint8)
    indices: Any = None  # compressed, index "sent": int32 positions, strictly increasing
    scales: Any = None  # compressed, bits <= 8: float32 scale per block


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
class Pass(Message):
    TYPE: ClassVar[str] = "PASS"
    reason: str = ""  # why the sender has no update for ``round`` (an edge whose cohort aborted or missed its quorum)


@dataclass(frozen=True)
class GossipPush(Message):
    TYPE: ClassVar[str] = "GOSSIP_PUSH"
    TENSORS: ClassVar[tuple[str, ...]] = ("model",)
    PACKED: ClassVar[tuple[str, ...]] = ("values", "indices", "scales")  # a compressed difference's tensors
    xid: int = 0  # exchange id chosen by the initiator; the reply carries it back
    version: int = 0  # the model's logical clock (a stale model never overwrites a newer one)
    num_samples: int = 1  # the sender's mixing weight
    addr: str = ""  # the sender's bind address (its identity in the swarm)
    peers: dict = field(default_factory=dict)  # {address: 1} of peers the sender holds alive
    encoding: dict = field(default_factory=dict)  # {} = dense ``model``; else a CHOCO round's compressed difference
    model: Any = None
    values: Any = None  # compressed (D-PSGD with --compress): as UpdateMsg's
    indices: Any = None
    scales: Any = None


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
    c.TYPE: c for c in (Hello, Welcome, Ready, Offer, Pull, Cohort, Train, UpdateMsg, Evaluate, Result, Heartbeat, Bye,
                        Pass, GossipPush, GossipReply, GossipBusy, GossipFetch, SecAgg)
}


# ---- the schema: one check per field name (fedopt.wire.schema), shared by every type that has the field ------------
def _header_fields(cls: type[Message]) -> tuple[str, ...]:
    tensors = (*cls.TENSORS, *getattr(cls, "PACKED", ()))
    names = tuple(f.name for f in fields(cls) if f.name not in tensors and f.name != getattr(cls, "OPAQUE", None))
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
