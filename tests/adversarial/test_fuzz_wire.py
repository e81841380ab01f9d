"""Property-based fuzzing of ``wire.decode``: whatever arrives, only WireError escapes, and what decodes obeys the
schema (``fedopt.testing.check_message``).

Deterministic in CI (``derandomize``): about 3,000 examples in all. ``FEDOPT_FUZZ_EXAMPLES=100000`` sets the total
for a long run; the examples are split between the strategies by the weights below.
"""

from __future__ import annotations

import math
import os
import random

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedopt import testing, wire
from fedopt.compress import parse_compressor
from fedopt.wire import messages as wire_messages
from fedopt.errors import WireError

TOTAL = int(os.environ.get("FEDOPT_FUZZ_EXAMPLES", "3000"))
SEEN = {"messages": 0, "decoded": 0}
pytestmark = pytest.mark.timeout(max(300, TOTAL // 10))  # a long run takes its time (about 150 examples/s)


def fuzz(weight: float):
    return settings(max_examples=max(1, int(TOTAL * weight)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def decode_or_wire_error(frames: list) -> wire.Message | None:
    """The property: decode returns a message obeying the schema, or raises WireError; anything else fails."""
    SEEN["messages"] += 1
    try:
        msg = wire.decode(frames)
    except WireError:
        return None
    testing.check_message(msg)
    SEEN["decoded"] += 1
    return msg


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nwire fuzz: {SEEN['messages']} messages, {SEEN['decoded']} decoded, only WireError raised")


# ---- strategies ------------------------------------------------------------------------------------------------------
EDGE_INTS = [0, 1, -1, 4, 2**31, 2**33, 2**33 + 1, 2**40, 2**40 + 1, 2**53 - 1, 2**53, 2**63 - 1, 2**64 - 1, -(2**63)]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=300), st.binary(max_size=32))
#: anything msgpack can carry (and ExtType, which the decoder must refuse)
msgpack_data = st.recursive(
    st.one_of(scalars, st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=20), ints),
                                                                         inner, max_size=5)),
    max_leaves=20)
#: values of the right type near or past the bounds, and values of the wrong type
field_values = st.one_of(
    ints, st.floats(), st.text(max_size=1100), st.sampled_from(["x" * 256, "x" * 257, "a\nb", "fetch", "final"]),
    st.dictionaries(st.text(max_size=260), st.one_of(st.floats(), ints, st.booleans(), st.text(max_size=4)),
                    max_size=70),
    msgpack_data)
shapes = st.one_of(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 2**31, 2**33, 2**33 + 1, 2**63, 2**64 - 1, -1]),
                            max_size=10), msgpack_data)
specs = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "object"]),
                        msgpack_data),
     "shape": shapes},
    optional={"frames": st.one_of(st.integers(-1, 5), st.sampled_from([2**16, 2**16 + 1]), msgpack_data),
              "strides": msgpack_data})


@st.composite
def structured(draw):
    """A header of a real type (mostly) with random field values and tensor declarations, plus frames that match
    the declarations when those are small (so that some decode and reach the schema check)."""
    kind = draw(st.one_of(st.sampled_from(sorted(wire.MESSAGE_TYPES)), st.text(max_size=12)))
    head = {"v": draw(st.one_of(st.just(1), msgpack_data)), "type": kind}
    cls = wire.MESSAGE_TYPES.get(kind)
    names = [f for f in wire_messages._SCHEMA.get(kind, ())] + ["parts", "extra"]
    for name in draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)):
        head[name] = draw(field_values)
    declared = draw(st.lists(specs, max_size=2)) if draw(st.booleans()) else \
        [{"dtype": "float32", "shape": [draw(st.integers(0, 8))]} for _ in (cls.TENSORS if cls else ())]
    if declared or draw(st.booleans()):
        head["tensors"] = declared
    frames = []
    for spec in declared:
        shape, dtype = spec.get("shape"), spec.get("dtype")
        size = wire_messages._ALLOWED.get(dtype, 4) * math.prod(shape) \
            if isinstance(dtype, str) and isinstance(shape, list) and all(type(s) is int for s in shape) else -1
        k = spec.get("frames", 1) if type(spec.get("frames", 1)) is int and 0 < spec.get("frames", 1) < 6 else 1
        if 0 <= size <= 4096 and draw(st.booleans()):
            cuts = sorted(draw(st.lists(st.integers(0, size), min_size=k - 1, max_size=k - 1)))
            frames += [bytes(b - a) for a, b in zip([0, *cuts], [*cuts, size])]
        else:
            frames += draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    if kind == "SECAGG":
        frames += draw(st.lists(st.binary(max_size=16), max_size=3))
    try:
        header = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        header = msgpack.packb({"v": 1, "type": "HEARTBEAT"})
    return [header, *frames]


def seed_messages() -> list[list[bytes]]:
    vec = torch.randn(10)
    msgs = [
        wire.Hello(client="1", device="cpu", sender="1"),
        wire.Welcome(spec={"dtype": "float32", "entries": [["w", [10], "float32"]]}, config={"seed": 1, "lr": 0.1}),
        wire.Ready(num_samples=100), wire.Offer(round=2, num_samples=100, metrics={"loss": 0.5, "steps": 3}),
        wire.Pull(round=2), wire.Train(round=2, config={"lr": 0.1, "max_steps": None}, model=vec),
        wire.UpdateMsg(round=2, num_samples=100, metrics={"loss": 0.5, "partial": False}, delta=vec),
        wire.Evaluate(round=2, model=vec.bfloat16()), wire.Result(round=2, num_samples=20, metrics={"accuracy": 0.9}),
        wire.Heartbeat(), wire.Bye(reason="done"), wire.GossipFetch(xid=3, addr="tcp://127.0.0.1:5", kind="exchange"),
        wire.GossipReply(xid=3, version=2, num_samples=50, addr="tcp://127.0.0.1:6", peers={"tcp://127.0.0.1:7": 1},
                         model=vec),
        wire.GossipPush(round=1, xid=3, version=2, num_samples=50, addr="tcp://127.0.0.1:5", model=vec),
        wire.GossipBusy(xid=3, addr="tcp://127.0.0.1:6"), wire.SecAgg(round=2, parts=[b"\x80", bytes(16)]),
    ]
    for spec in ("topk:0.3+q4:2", "randk:0.5", "q2", "fp16"):  # compressed UPDATEs (fedopt.wire.compressed)
        p = parse_compressor(spec).compress(vec, 1)
        msgs.append(wire.UpdateMsg(round=2, num_samples=100, encoding=p.encoding(), values=p.values,
                                   indices=p.indices, scales=p.scales))
    out = [[bytes(f) for f in wire.encode(m)] for m in msgs]
    out += [[bytes(f) for f in wire.encode(m, chunk_bytes=12)] for m in msgs if m.TENSORS]
    return out


SEEDS = seed_messages()


@st.composite
def mutated(draw):
    """A real encoded message with one to four mutations (see ``apply``)."""
    frames = [bytearray(f) for f in draw(st.sampled_from(SEEDS))]
    for op in draw(st.lists(st.sampled_from(["flip", "truncate", "drop", "dup", "append", "field", "spec", "swap"]),
                            min_size=1, max_size=4)):
        i = draw(st.integers(0, len(frames) - 1))
        if op == "flip" and frames[i]:
            for pos in draw(st.lists(st.integers(0, len(frames[i]) * 8 - 1), min_size=1, max_size=4)):
                frames[i][pos // 8] ^= 1 << (pos % 8)
        elif op == "truncate":
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
        elif op == "drop" and len(frames) > 1:
            frames.pop(i)
        elif op == "dup":
            frames.insert(i, bytearray(frames[i]))
        elif op == "append":
            frames.append(bytearray(draw(st.binary(max_size=40))))
        elif op == "swap" and len(frames) > 2:
            frames[1], frames[-1] = frames[-1], frames[1]
        elif op in ("field", "spec"):
            try:
                head = msgpack.unpackb(bytes(frames[0]), strict_map_key=False)
            except Exception:
                continue
            if not isinstance(head, dict):
                continue
            tensors = head.get("tensors")
            if op == "spec" and isinstance(tensors, list) and tensors and isinstance(tensors[0], dict):
                head["tensors"][0][draw(st.sampled_from(["dtype", "shape", "frames", "strides"]))] = \
                    draw(st.one_of(shapes, st.sampled_from(["float64", "int8", 2, 0, 2**16 + 1]), msgpack_data))
            elif draw(st.booleans()) and head:
                del head[draw(st.sampled_from(sorted(head, key=repr)))]
            else:
                head[draw(st.sampled_from(sorted(head, key=repr) + ["extra"]))] = draw(field_values)
            try:
                frames[0] = bytearray(msgpack.packb(head, use_bin_type=True))
            except (TypeError, ValueError, OverflowError):
                pass
    return [bytes(f) for f in frames]


# ---- properties ------------------------------------------------------------------------------------------------------
@fuzz(0.15)
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_random_frames(frames):
    decode_or_wire_error(frames)


@fuzz(0.1)
@given(msgpack_data, st.lists(st.binary(max_size=64), max_size=3))
def test_random_msgpack_headers(data, frames):
    try:
        head = msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    decode_or_wire_error([head, *frames])


@fuzz(0.35)
@given(structured())
def test_structured_headers_with_random_values(frames):
    decode_or_wire_error(frames)


@fuzz(0.35)
@given(mutated())
def test_mutations_of_valid_messages(frames):
    decode_or_wire_error(frames)


@fuzz(0.05)
@given(st.integers(0, 2**32))
def test_the_shared_hostile_generator(seed):
    rng = random.Random(seed)
    for _ in range(20):
        decode_or_wire_error(testing.hostile_frames(rng, SEEDS, model_size=10))


def test_every_seed_decodes():
    for frames in SEEDS:
        assert decode_or_wire_error(frames) is not None
