"""Conformance checks a plug-in can run against itself: ``check_task`` and ``check_aggregator``; and, for anything
that receives bus messages, ``check_message`` (a decoded message obeys the wire schema) and ``hostile_frames``
(random and mutated messages to throw at a decoder or a running process).

They exercise the contracts the engines rely on and raise ``AssertionError`` with a message naming the broken rule.
Use them in your own test suite::

    from fedopt.testing import check_task
    def test_my_task():
        check_task(MyTask())

It is also the one seam through which a test injects faults into a running fedopt process (``Fault``): a test sets
the environment variable ``FEDOPT_FAULTS`` of the process it starts (``fault_env``), and the process reads it once at
start-up (``faults``). No command-line flag carries a fault.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path

import msgpack
import torch

from . import wire
from .aggregators.base import Aggregator, Update
from .compress import parse_compressor
from .errors import ConfigError
from .params import ParamSpec
from .task import ClientData, Task, TrainConfig

__all__ = ["check_task", "check_aggregator", "check_message", "hostile_frames", "Fault", "SecAggExit", "TokenBucket",
           "SECAGG_STAGES", "FAULTS_ENV", "faults", "fault_env"]


def check_task(task: Task, num_shards: int = 2, seed: int = 0) -> None:
    """Model builds identically twice, shards load and are non-empty, train changes the model and returns metrics,
    evaluate returns an accuracy in [0, 1], and loading the same shard twice gives the same data."""
    m1, m2 = task.build_model(), task.build_model()
    s1, s2 = ParamSpec.from_module(m1), ParamSpec.from_module(m2)
    assert s1 == s2, "build_model() must give the same architecture every call"
    for shard in range(num_shards):
        data = task.load_data(shard, num_shards, seed)
        assert isinstance(data, ClientData), "load_data must return a ClientData"
        assert data.num_samples > 0, f"shard {shard} of {num_shards} is empty"
        n = data.train[0].shape[0]
        assert all(t.shape[0] == n for t in data.train), "train tensors must be aligned on their first dimension"
        again = task.load_data(shard, num_shards, seed)
        assert all(torch.equal(a, b) for a, b in zip(data.train, again.train)), "load_data must be deterministic"
    before = s1.flatten(m1).clone()
    metrics = task.train(m1, data, TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=seed))
    assert isinstance(metrics, dict), "train must return a dict of metrics"
    assert not torch.equal(before, s1.flatten(m1)), "train must change the model"
    eval_data = data.test if data.test is not None else data.train
    ev = task.evaluate(m1, eval_data)
    assert "accuracy" in ev and 0.0 <= ev["accuracy"] <= 1.0, "evaluate must report accuracy in [0, 1]"


def check_aggregator(make: callable, size: int = 64, clients: int = 5, seed: int = 0) -> None:
    """Streaming contract: begin/add/result, None for an empty round, no retained reference to the delta for
    streaming aggregators, identical updates aggregate to that update, wrong-length updates are refused."""
    g = torch.Generator().manual_seed(seed)
    agg: Aggregator = make()
    for attr in ("name", "linear", "needs_all_updates", "needs_plaintext"):
        assert hasattr(agg, attr), f"aggregator lacks attribute {attr!r}"
    agg.begin(1, size)
    assert agg.result() is None, "result() of an empty round must be None"
    x = torch.randn(size, generator=g)
    agg.begin(2, size)
    buf = torch.empty(size)
    for i in range(clients):
        buf.copy_(x)
        agg.add(Update(str(i), buf, num_samples=10 + i))
        if not agg.needs_all_updates:
            buf.fill_(math.nan)  # the caller may reuse its buffer after add()
    res = agg.result()
    assert res is not None and res.count == clients, "result must count every update"
    assert torch.allclose(res.delta, x, atol=1e-6), "identical updates must aggregate to that update"
    agg.begin(3, size)
    try:
        agg.add(Update("bad", torch.zeros(size + 1), num_samples=1))
    except Exception:
        pass
    else:
        raise AssertionError("an update of the wrong length must be refused")


def check_message(msg: wire.Message, limits: wire.Limits = wire.Limits()) -> None:
    """A decoded message obeys the bounds of :mod:`fedopt.wire`'s docstring, field by field; written apart from the
    decoder's own checks, so a decoder that lets something through is caught here."""
    assert type(msg) in wire.MESSAGE_TYPES.values(), f"{type(msg).__name__} is not a wire message"

    def text(v, most):
        return type(v) is str and len(v) <= most and v.isprintable()

    enc = getattr(msg, "encoding", {})
    for f in dataclasses.fields(msg):
        v, name, where = getattr(msg, f.name), f.name, f"{msg.TYPE}.{f.name}"
        if name in ("round", "xid", "version", "cohort"):
            assert type(v) is int and 0 <= v < limits.max_int, f"{where} = {v!r} is not a counter"
        elif name == "num_samples":
            assert type(v) is int and msg.MIN_SAMPLES <= v <= limits.max_samples, f"{where} = {v!r} out of range"
        elif name == "clients":
            assert type(v) is int and 0 <= v <= limits.max_samples, f"{where} = {v!r} is not a count"
        elif name in ("sender", "client", "device", "addr", "reason"):
            most = limits.max_reason if name == "reason" else limits.max_name
            assert text(v, most), f"{where} is not a printable str of at most {most} characters"
        elif name == "kind":
            assert v in wire.FETCH_KINDS, f"{where} = {v!r}"
        elif name == "scale":
            assert type(v) in (int, float) and 0 < v <= 1, f"{where} = {v!r} is not a fraction in (0, 1]"
        elif name == "metrics":
            assert type(v) is dict and len(v) <= limits.max_metrics, f"{where} is not a small map"
            for k, x in v.items():
                assert text(k, limits.max_name), f"{where} has key {k!r}"
                assert math.isfinite(x) if type(x) is float else type(x) in (int, bool) and abs(x) < limits.max_int, \
                    f"{where}[{k!r}] = {x!r} is not a finite number"
        elif name == "peers":
            assert type(v) is dict and len(v) <= limits.max_peers, f"{where} is not a small map"
            assert all(text(k, limits.max_name) and type(x) is int and 0 <= x < limits.max_int
                       for k, x in v.items()), f"{where} holds a bad entry"
        elif name in ("spec", "config"):
            assert type(v) is dict, f"{where} is not a map"
        elif name == "encoding":
            _check_encoding(v, limits)
        elif name in getattr(msg, "PACKED", ()) or (enc and name in msg.TENSORS):
            _check_packed(msg, name, v, enc)
        elif name in msg.TENSORS:
            assert isinstance(v, torch.Tensor) and v.dim() <= limits.max_dims, f"{where} is not a tensor"
            assert v.numel() <= limits.max_elements and all(s <= limits.max_elements for s in v.shape), where
            assert str(v.dtype).removeprefix("torch.") in ("float32", "float16", "bfloat16", "float64"), where
        elif name == "parts":
            assert 1 <= len(v) <= limits.max_frames and all(isinstance(p, memoryview) for p in v), where
        else:
            raise AssertionError(f"{where}: a field check_message does not know")


def _check_encoding(enc, limits: wire.Limits) -> None:
    """An UPDATE's ``encoding``: {} or the map fedopt.wire.compressed describes."""
    assert type(enc) is dict, "UPDATE.encoding is not a map"
    if not enc:
        return
    need = {"size", "k", "index", "bits"} | ({"block"} if enc.get("bits") in (8, 4, 2) else set()) \
        | ({"seed"} if enc.get("index") == "seeded" else set())
    assert set(enc) == need, f"UPDATE.encoding has keys {sorted(enc)}, not {sorted(need)}"
    size, k = enc["size"], enc["k"]
    assert type(size) is int and 1 <= size <= limits.max_elements, f"UPDATE.encoding.size = {size!r}"
    assert type(k) is int and 0 <= k <= size, f"UPDATE.encoding.k = {k!r}"
    assert enc["index"] in ("all", "sent", "seeded") and type(enc["bits"]) is int and enc["bits"] in (32, 16, 8, 4, 2)
    assert enc["index"] != "all" or k == size, "UPDATE.encoding: index 'all' with k != size"
    assert enc["index"] != "sent" or size <= 2**31, "UPDATE.encoding: int32 indices cannot address size"
    assert "block" not in enc or type(enc["block"]) is int and 1 <= enc["block"] <= 2**20, "UPDATE.encoding.block"
    assert "seed" not in enc or type(enc["seed"]) is int and 0 <= enc["seed"] < limits.max_int, "UPDATE.encoding.seed"


def _check_packed(msg, name: str, v, enc: dict) -> None:
    """A compressed UPDATE's tensors have exactly the dtype and length its encoding gives, in-range sorted indices
    and zero padding bits; a dense UPDATE has none of them (and a compressed one no delta)."""
    where = f"{msg.TYPE}.{name}"
    want = None
    if enc:
        k, bits = enc["k"], enc["bits"]
        want = {"values": ({32: torch.float32, 16: torch.float16}.get(bits, torch.uint8),
                           k if bits > 8 else (k * bits + 7) // 8),
                "indices": (torch.int32, k) if enc["index"] == "sent" else None,
                "scales": (torch.float32, -(-k // enc["block"])) if bits <= 8 else None}.get(name)
    if want is None:
        assert v is None, f"{where} is set in a{' compressed' if enc else ' dense'} UPDATE that has none"
        return
    assert isinstance(v, torch.Tensor) and v.dtype == want[0] and tuple(v.shape) == (want[1],), \
        f"{where} is not {want[0]}[{want[1]}]"
    if name == "indices" and v.numel():
        assert int(v.min()) >= 0 and int(v.max()) < enc["size"] and bool((v[1:] > v[:-1]).all()), \
            f"{where} not strictly increasing within [0, {enc['size']})"
    if name == "values" and enc["bits"] <= 8 and (enc["k"] * enc["bits"]) % 8:
        assert int(v[-1]) >> ((enc["k"] * enc["bits"]) % 8) == 0, f"{where}: padding bits are set"


#: values that sit on or just past the wire's bounds, or have the wrong type: what an attacker tries first
_EDGE = [0, 1, -1, 2**31, 2**40, 2**40 + 1, 2**53 - 1, 2**53, 2**63 - 1, 2**64 - 1, -(2**63), True, 0.5, math.nan,
         math.inf, -math.inf, "", "x" * 256, "x" * 257, "a\nb", "é", None, [], {}, [1, 2], {"a": 1}, b"", b"\x00" * 8]


#: compressed UPDATE encodings, each wrong in one way (or right, with frames that may not fit)
_HOSTILE_ENCODINGS = [
    {"size": 4, "k": 4, "index": "all", "bits": 32}, {"size": 4, "k": 5, "index": "all", "bits": 32},
    {"size": 4, "k": 3, "index": "all", "bits": 32}, {"size": 8, "k": 4, "index": "sent", "bits": 32},
    {"size": 2**31 + 1, "k": 1, "index": "sent", "bits": 32}, {"size": 0, "k": 0, "index": "all", "bits": 32},
    {"size": 8, "k": 4, "index": "sent", "bits": 8}, {"size": 8, "k": 4, "index": "sent", "bits": 8, "block": 0},
    {"size": 8, "k": 5, "index": "all", "bits": 4, "block": 2}, {"size": 8, "k": 4, "index": "seeded", "bits": 16},
    {"size": 8, "k": 4, "index": "seeded", "bits": 16, "seed": -1}, {"size": 8, "k": 4, "index": "none", "bits": 8},
    {"size": 8, "k": 4, "index": "sent", "bits": 3, "block": 4}, {"size": 8, "k": 4, "index": "sent", "bits": True},
    {"size": 2**33 + 1, "k": 1, "index": "seeded", "bits": 32, "seed": 1}, {"size": 8, "k": 4, "index": "sent",
                                                                            "bits": 32, "extra": 1},
    {"size": 8, "k": 4, "index": "sent", "bits": 2, "block": 2**20 + 1}, [], "topk", None,
]


def _hostile_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if r < 0.6 or depth > 2:
        return rng.choice(_EDGE)
    if r < 0.75:
        return [_hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if r < 0.9:
        return {rng.choice(["loss", "accuracy", "tcp://127.0.0.1:1", "x" * 300, ""]): _hostile_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return rng.choice([{"loss": "0.5"}, {"loss": math.nan}, {f"k{i}": 1.0 for i in range(65)},
                       {f"tcp://10.0.0.{i}:1": 1 for i in range(65)}, {"steps": 2**60}])


def _valid_hostile(rng: random.Random, n: int) -> wire.Message:
    """A message the wire accepts, with values on the edges of its bounds: for the handlers behind the decoder."""
    def pick(*choices):
        return rng.choice(choices)

    counter = pick(0, 1, 2, 3, 5, 2**31, 2**53 - 1)
    # ids of its own: under --insecure a HELLO may claim a real client's id, which the docs say; that is not fuzzing
    name = pick("", "99999", "x" * 256, "tcp://127.0.0.1:1", "ipc:///nonexistent", "é" * 10)
    metrics = pick({}, {"loss": 1e308, "partial": True}, {"loss": -1.0, "accuracy": 2.0, "steps": 2**53 - 1},
                   {"accuracy": True, "loss": 0}, {f"k{i}": 0.0 for i in range(64)})
    size = pick(0, 1, max(n - 1, 0), n, n, n + 1)
    vec = pick(torch.zeros(size), torch.full((size,), math.nan), torch.full((size,), math.inf),
               torch.full((size,), 3e38), torch.zeros(size).to(torch.float64), torch.zeros(size).bfloat16(),
               torch.zeros(1, size))
    kw = dict(round=counter, cohort=counter, scale=pick(1, 1.0, 5e-324, 0.5), sender=name, num_samples=pick(1, 2, 2**40), metrics=metrics, xid=counter,
              version=pick(0, 1, counter, 2**53 - 1), addr=name, peers=pick({}, {name: 1}, {f"tcp://h:{i}": 2**53 - 1
                                                                               for i in range(64)}),
              client=name, device=pick("cpu", "x" * 256), reason=pick("done", "", "x" * 1024), kind=pick(*wire.FETCH_KINDS),
              config=pick({}, {"lr": 1e308, "epochs": 2**53}), spec=pick({}, {"dtype": "float32", "entries": []}),
              model=vec, delta=vec, parts=pick([b"x"], [b"\x81\xa4kind\xa6masked", bytes(8)]))
    cls = rng.choice(list(wire.MESSAGE_TYPES.values()))
    if cls in (wire.UpdateMsg, wire.Train, wire.GossipPush, wire.GossipReply) and rng.random() < 0.5:
        return _compressed_update(rng, max(n, 1), counter, name, metrics, cls)
    msg = cls(**{f.name: kw[f.name] for f in dataclasses.fields(cls) if f.name in kw})
    if cls is wire.Result:
        msg = dataclasses.replace(msg, num_samples=pick(0, 1, 2**40))
    return msg


def _compressed_update(rng: random.Random, n: int, counter: int, name: str, metrics: dict,
                       cls: type = wire.UpdateMsg) -> wire.Message:
    """A compressed UPDATE (or TRAIN, GOSSIP_PUSH, GOSSIP_REPLY: ``cls``) the wire accepts, on its edges: every index kind and width, k of 0, 1 or all, sizes that do
    not match the model (``n``), NaN or huge values and scales."""
    spec = rng.choice(["topk:0.01+q8", "topk:1+q2", "randk:0.5+q4:1", "q4:3", "q2", "fp16", "topk:0.3", "randk:1",
                       "q8:1048576", "topk:1"])
    x = rng.choice([torch.randn, torch.zeros])(rng.choice([1, max(n - 1, 1), n, n + 1]))
    x[-1] = rng.choice([0.0, 1e30, -1e30, math.nan])
    p = parse_compressor(spec).compress(x, rng.choice([0, 1, 2**53 - 1]))
    enc = p.encoding()
    if p.index == "sent" and rng.random() < 0.3:  # k = 0
        p = dataclasses.replace(p, k=0, indices=p.indices[:0], values=p.values[:0],
                                scales=None if p.scales is None else p.scales[:0])
        enc = p.encoding()
    packed = dict(round=counter, sender=name, encoding=enc, values=p.values, indices=p.indices, scales=p.scales)
    if cls is wire.Train:
        return wire.Train(config={"seed": counter}, **packed)
    if cls is not wire.UpdateMsg:
        return cls(num_samples=rng.choice([1, 2**40]), addr=name, version=counter, **packed)
    return wire.UpdateMsg(num_samples=rng.choice([1, 2**40]), metrics=metrics, **packed)


def hostile_frames(rng: random.Random, seeds: list[list[bytes]], model_size: int = 16) -> list[bytes]:
    """One hostile multipart message: random bytes; a header of a real type with hostile field values and tensor
    declarations; a well-formed message whose values sit on the edges of the wire's bounds (NaN or wrongly sized
    models of about ``model_size`` elements, weights of 2**40, counters of 2**53 - 1); or a real message in ``seeds``
    (``wire.encode`` output as bytes) mutated (bit flips, truncation, frames dropped, duplicated or appended, header
    fields and tensor specs replaced). Deterministic given ``rng``."""
    r = rng.random()
    if r < 0.2:
        return [bytes(f) for f in wire.encode(_valid_hostile(rng, model_size))]
    if r < 0.3:
        return [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(1, 4))]
    if r < 0.55:
        kind = rng.choice(list(wire.MESSAGE_TYPES))
        cls = wire.MESSAGE_TYPES[kind]
        head = {"v": 1, "type": kind}
        for f in dataclasses.fields(cls):
            if f.name not in cls.TENSORS and rng.random() < 0.8:
                head[f.name] = _hostile_value(rng)
        frames = []
        if cls.TENSORS:
            shape = rng.choice([[4], [0, 2**63], [2**33 + 1], [2, 2], [], [-1], [10**12], [1] * 9, "4"])
            head["tensors"] = [{"dtype": rng.choice(["float32", "bfloat16", "int64", "object"]), "shape": shape}]
            frames = [bytes(rng.choice([0, 1, 16, 40]))]
        if kind in ("UPDATE", "TRAIN", "GOSSIP_PUSH", "GOSSIP_REPLY") and rng.random() < 0.5:  # a lying layout
            head["encoding"] = rng.choice(_HOSTILE_ENCODINGS)
            k = rng.choice([0, 1, 4, 5])
            head["tensors"] = [{"dtype": d, "shape": [k]} for d in rng.sample(["uint8", "int32", "float32", "float16"],
                                                                              rng.randrange(1, 4))]
            frames = [bytes(k * 4) if rng.random() < 0.5 else rng.randbytes(k * 4) for _ in head["tensors"]]
        if kind == "SECAGG":
            frames = [bytes(rng.randrange(8)) for _ in range(head.get("parts", 1) if type(head.get("parts")) is int
                                                            and 0 <= head.get("parts", 1) < 20 else 1)]
        try:
            return [msgpack.packb(head, use_bin_type=True), *frames]
        except (TypeError, ValueError, OverflowError):
            return [b"\x81\xa1v\x01"]
    frames = [bytearray(f) for f in rng.choice(seeds)]
    for _ in range(rng.randrange(1, 4)):
        op, i = rng.randrange(6), rng.randrange(len(frames))
        if op == 0 and frames[i]:  # bit flips
            for _ in range(rng.randrange(1, 4)):
                frames[i][rng.randrange(len(frames[i]))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        elif op == 2 and len(frames) > 1:  # a frame dropped or duplicated
            frames.insert(i, frames[i]) if rng.random() < 0.5 else frames.pop(i)
        elif op == 3:
            frames.append(bytearray(rng.randbytes(rng.choice([0, 4, 16]))))
        else:  # a header field or a tensor spec replaced
            try:
                head = msgpack.unpackb(bytes(frames[0]), strict_map_key=False)
                if op == 4 or not head.get("tensors"):
                    head[rng.choice(list(head) + ["extra"])] = _hostile_value(rng)
                else:
                    head["tensors"][0][rng.choice(["dtype", "shape", "frames", "strides"])] = \
                        rng.choice([[0, 2**63], [2**33 + 1], "float64", "int8", 0, 2, 2**16 + 1, [1, -1], None])
                frames[0] = bytearray(msgpack.packb(head, use_bin_type=True))
            except Exception:  # the header was already mutated beyond parsing: leave it so
                pass
    return [bytes(f) for f in frames]


# ---- fault injection -------------------------------------------------------------------------------------------------
#: the environment variable that carries faults into a process: a JSON object {fault name: argument}
FAULTS_ENV = "FEDOPT_FAULTS"
#: the secure-aggregation stages a client can die at, in protocol order; each begins with one incoming message
SECAGG_STAGES = ("advertise", "share", "mask", "unmask")


@dataclasses.dataclass(frozen=True)
class SecAggExit:
    """The argument of ``Fault.EXIT_AT_SECAGG_STAGE``."""

    stage: str  # one of SECAGG_STAGES: the client dies on the incoming message that begins this stage
    round: int | None = None  # only in this round; None: whenever the stage begins

    def __post_init__(self) -> None:
        if self.stage not in SECAGG_STAGES:
            raise ConfigError(f"{FAULTS_ENV}: exit_at_secagg_stage: stage {self.stage!r} is not one of "
                              f"{', '.join(SECAGG_STAGES)}")
        if self.round is not None and (type(self.round) is not int or self.round < 1):
            raise ConfigError(f"{FAULTS_ENV}: exit_at_secagg_stage: round must be an integer >= 1, "
                              f"not {self.round!r}")


class Fault(enum.Enum):
    """A fault (or observation point) a test injects into a fedopt process. The value is the name it has in
    ``FEDOPT_FAULTS``; the argument each takes:

    ``SLOW_TRAIN``            seconds (a number in [0, 3600]): a federated client or a gossip peer sleeps this long
                              before each local training, so it is a straggler
    ``EXIT_AT_SECAGG_STAGE``  ``SecAggExit(stage, round)``: a federated client kills itself with SIGKILL when the
                              secure-aggregation message that begins ``stage`` arrives (in ``round``, if given)
    ``SLOW_UPLINK``           bytes per second (a number >= 1): a federated client's UPDATE uploads pass a token bucket of
                              that rate (:class:`TokenBucket`, burst one second's worth), an emulated slow uplink
    ``SECAGG_DUMP``           a folder: each client writes its encoded (quantised, unmasked) vectors there (and, in
                              secure buffered rounds, the staleness-weighted float update it encodes), and the
                              coordinator each secure sum it learns, so a test can check the sum bit for bit
    """

    SLOW_TRAIN = "slow_train"
    SLOW_UPLINK = "slow_uplink"
    EXIT_AT_SECAGG_STAGE = "exit_at_secagg_stage"
    SECAGG_DUMP = "secagg_dump"


def _seconds(fault: Fault, value) -> float:
    if type(value) not in (int, float) or not 0 <= value <= 3600:
        raise ConfigError(f"{FAULTS_ENV}: {fault.value} takes seconds in [0, 3600], not {value!r}")
    return float(value)


def _secagg_exit(fault: Fault, value) -> SecAggExit:
    if isinstance(value, SecAggExit):
        return value
    if not isinstance(value, dict) or not set(value) <= {"stage", "round"} or "stage" not in value:
        raise ConfigError(f'{FAULTS_ENV}: {fault.value} takes {{"stage": ..., "round": ...}}, not {value!r}')
    return SecAggExit(value["stage"], value.get("round"))


def _folder(fault: Fault, value) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{FAULTS_ENV}: {fault.value} takes a folder path, not {value!r}")
    return Path(value)


def _rate(fault: Fault, value) -> float:
    if type(value) not in (int, float) or not 1 <= value < math.inf:
        raise ConfigError(f"{FAULTS_ENV}: {fault.value} takes bytes per second >= 1, not {value!r}")
    return float(value)


class TokenBucket:
    """A token bucket (``rate`` bytes per second, at most ``burst`` bytes of credit) with an injected clock:
    ``due(nbytes)`` takes the bytes and returns when a send of them may leave (now, or once the bucket has refilled);
    sends queue behind one another. Pure: the caller waits (``Fault.SLOW_UPLINK``)."""

    def __init__(self, rate: float, burst: float | None = None, clock=None) -> None:
        import time

        self.rate, self.burst = float(rate), float(rate if burst is None else burst)
        self.clock = clock or time.monotonic
        self._tokens, self._at = self.burst, self.clock()

    def due(self, nbytes: int) -> float:
        now = self.clock()
        if now > self._at:  # refill up to the burst for the time that passed
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        self._tokens -= nbytes  # a debt is paid off at ``rate``: this send leaves when the bucket is back at zero
        if self._tokens >= 0:
            return self._at
        self._at += -self._tokens / self.rate
        self._tokens = 0.0
        return self._at


_PARSE = {Fault.SLOW_TRAIN: _seconds, Fault.SLOW_UPLINK: _rate, Fault.EXIT_AT_SECAGG_STAGE: _secagg_exit, Fault.SECAGG_DUMP: _folder}


def faults(environ: Mapping[str, str] | None = None) -> dict[Fault, object]:
    """The faults injected into this process: ``FEDOPT_FAULTS`` of ``environ`` (default ``os.environ``) parsed into
    ``{Fault: typed argument}`` (float seconds, ``SecAggExit``, ``Path``). Unset or empty: ``{}``.

    Raises ``ConfigError`` naming the variable when it is not a JSON object, names an unknown fault, or gives a fault
    an argument of the wrong type or range."""
    text = (os.environ if environ is None else environ).get(FAULTS_ENV, "").strip()
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{FAULTS_ENV} is not JSON ({e.msg}): {text[:200]!r}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{FAULTS_ENV} must be a JSON object {{fault: argument}}, not {text[:200]!r}")
    out = {}
    for name, value in raw.items():
        try:
            fault = Fault(name)
        except ValueError:
            raise ConfigError(f"{FAULTS_ENV}: unknown fault {name!r} (known: "
                              f"{', '.join(f.value for f in Fault)})") from None
        out[fault] = _PARSE[fault](fault, value)
    return out


def fault_env(injected: Mapping[Fault, object]) -> dict[str, str]:
    """``{FEDOPT_FAULTS: ...}`` to add to the environment of a process that should run with ``injected`` faults;
    the arguments are checked as ``faults()`` will check them there (raises ``ConfigError``)."""
    plain = {}
    for fault, value in injected.items():
        value = _PARSE[fault](fault, value)
        plain[fault.value] = (dataclasses.asdict(value) if isinstance(value, SecAggExit)
                              else str(value) if isinstance(value, Path) else value)
    return {FAULTS_ENV: json.dumps(plain)}
