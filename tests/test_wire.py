"""Wire format: round trips, zero-copy decoding, and every malformed input rejected before allocation."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch

from fedopt import wire
from fedopt.errors import WireError


def header(**kw):
    base = {"v": 1, "type": "UPDATE", "round": 3, "num_samples": 10, "metrics": {},
            "tensors": [{"dtype": "float32", "shape": [4]}]}
    base.update(kw)
    return msgpack.packb(base)


def head(**kw):
    return msgpack.packb({"v": 1, **kw})


def realistic_messages(vec: torch.Tensor) -> list[wire.Message]:
    """One message of every type with the values honest senders put in them."""
    spec = {"dtype": "float32", "entries": [["fc.weight", [10, 64], "float32"], ["fc.bias", [10], "float32"]]}
    settings = {"task": "digits", "task_options": {"hidden": 32}, "clients": 8, "partition": "dirichlet",
                "alpha": 0.5, "seed": 1, "buffers": "average", "heartbeat": 0.5, "secagg": False}
    train = {"seed": 7, "max_steps": None, "epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "mu": 0.0}
    metrics = {"loss": 0.6931, "steps": 12, "samples": 384, "partial": False}
    peers = {"tcp://127.0.0.1:41231": 1, "ipc:///tmp/fedopt/peer-3.sock": 1}
    addr = "tcp://127.0.0.1:40000"
    return [
        wire.Hello(client="3", device="cpu", sender="3"), wire.Welcome(spec=spec, config=settings),
        wire.Ready(num_samples=1437, sender="3"), wire.Offer(round=4, num_samples=1437, metrics=metrics, sender="3"),
        wire.Pull(round=4), wire.Cohort(round=4, cohort=9, scale=0.57735), wire.Train(round=4, config=train, model=vec),
        wire.UpdateMsg(round=4, num_samples=1437, metrics=metrics, delta=vec, sender="3"),
        wire.Evaluate(round=4, model=vec), wire.Result(round=4, num_samples=0, metrics={"accuracy": 0.0, "loss": 0.0}),
        wire.Result(round=4, num_samples=360, metrics={"accuracy": 0.93, "loss": 0.21}), wire.Heartbeat(sender="3"),
        wire.Bye(reason="unknown peer: send HELLO"), wire.Pass(round=4, reason="secure round: 1 survivors", sender="e"),
        wire.GossipFetch(xid=2**31 - 1, addr=addr, kind="exchange", sender=addr),
        wire.GossipReply(round=0, xid=5, version=40, num_samples=200, addr=addr, peers=peers, model=vec, sender=addr),
        wire.GossipPush(round=12, xid=5, version=41, num_samples=200, addr=addr, peers=peers, model=vec, sender=addr),
        wire.GossipBusy(xid=5, addr=addr, sender=addr), wire.SecAgg(round=4, parts=[b"body", bytes(40)], sender="3"),
    ]


@pytest.mark.parametrize("chunk", [None, 1000, 7])
def test_round_trip_every_type_with_realistic_values(chunk):
    vec = torch.randn(1000)
    msgs = realistic_messages(vec)
    assert {m.TYPE for m in msgs} == set(wire.MESSAGE_TYPES)
    for m in msgs:
        out = wire.decode([bytes(f) for f in wire.encode(m, chunk_bytes=chunk)])
        assert type(out) is type(m)
        for name in m.TENSORS:
            assert torch.equal(getattr(out, name), getattr(m, name))
        if isinstance(m, wire.SecAgg):
            assert [bytes(p) for p in out.parts] == [bytes(p) for p in m.parts]
        skip = (*m.TENSORS, "parts")
        assert {k: v for k, v in out.__dict__.items() if k not in skip} == \
            {k: v for k, v in m.__dict__.items() if k not in skip}


def test_defaults_are_valid_messages():
    for cls in wire.MESSAGE_TYPES.values():
        kw = {name: torch.zeros(3) for name in cls.TENSORS}
        if cls is wire.SecAgg:
            kw["parts"] = [b"x"]
        assert type(wire.decode(wire.encode(cls(**kw)))) is cls


def test_absent_fields_take_their_defaults():
    out = wire.decode([head(type="READY")])
    assert out == wire.Ready()


def test_decoded_tensor_is_a_view_of_the_frame():
    frames = wire.encode(wire.UpdateMsg(round=1, delta=torch.ones(1000)))
    buf = bytearray(frames[1])  # a writable buffer standing in for a received zmq frame
    out = wire.decode([frames[0], buf])
    buf[0:4] = np.float32(7.0).tobytes()
    assert out.delta[0].item() == 7.0  # shares memory: no copy was made


@pytest.mark.parametrize("dtype", wire.WIRE_DTYPES)
def test_wire_dtype_casts_and_decodes(dtype):
    vec = torch.linspace(-1, 1, 101)
    out = wire.decode(wire.encode(wire.Train(round=1, model=vec), wire_dtype=dtype))
    assert str(out.model.dtype) == f"torch.{dtype}"
    assert torch.allclose(out.model.float(), vec, atol=1e-2)


def test_shaped_and_scalar_tensors_round_trip():
    for t in (torch.randn(3, 4, 5), torch.tensor(2.5), torch.zeros(0, 7)):
        out = wire.decode(wire.encode(wire.Train(model=t), chunk_bytes=16))
        assert out.model.shape == t.shape and torch.equal(out.model, t)


def test_encoder_refuses_non_wire_dtypes_and_objects():
    with pytest.raises(WireError, match="int64"):
        wire.encode(wire.Train(model=torch.arange(3)))
    with pytest.raises(WireError, match="torch.Tensor"):
        wire.encode(wire.Train(model=[1, 2]))


@pytest.mark.parametrize("msg, reason", [
    (wire.UpdateMsg(metrics={"loss": math.nan}, delta=torch.zeros(2)), "finite number"),
    (wire.Offer(metrics={"note": "diverged"}), "finite number"),
    (wire.Ready(num_samples=0), "num_samples"),
    (wire.Ready(num_samples=np.int64(5)), "num_samples"),
    (wire.Hello(client="x" * 300), "client"),
    (wire.Bye(reason="line\nforged log line"), "printable"),
    (wire.GossipFetch(kind="steal"), "kind"),
    (wire.GossipPush(peers={f"tcp://h:{i}": 1 for i in range(65)}, model=torch.zeros(1)), "peers"),
    (wire.Welcome(config={"blob": b"bytes"}), "does not carry"),
    (wire.Train(round=-1, model=torch.zeros(1)), "round"),
    (wire.SecAgg(parts=[]), "parts"),
])
def test_encoder_refuses_what_the_decoder_would_reject(msg, reason):
    with pytest.raises(WireError, match=reason):
        wire.encode(msg)


def test_encoder_refuses_more_chunks_than_the_limit():
    with pytest.raises(WireError, match="frames must be an integer in \\[1, 64\\]"):
        wire.encode(wire.Train(model=torch.zeros(100)), chunk_bytes=1, limits=wire.Limits(max_chunks=64))
    with pytest.raises(WireError, match="shape"):
        wire.encode(wire.Train(model=torch.zeros(0, 2**10)), limits=wire.Limits(max_elements=1000))


@pytest.mark.parametrize("nbytes, chunk", [(4000, 1000), (4000, 999), (4000, 4000), (4, 1)])
def test_chunked_tensor_round_trips(nbytes, chunk):
    vec = torch.randn(nbytes // 4)
    frames = wire.encode(wire.Train(round=3, model=vec), chunk_bytes=chunk)
    assert len(frames) - 1 == -(-nbytes // chunk) and all(len(memoryview(f)) <= chunk for f in frames[1:])
    out = wire.decode([frames[0], *(bytes(f) for f in frames[1:])])
    assert out.round == 3 and torch.equal(out.model, vec)
    out.model.add_(1)  # the joined chunks are the message's own, writable memory


def chunked(k, sizes):
    return [header(tensors=[{"dtype": "float32", "shape": [4], "frames": k}]), *(b"\0" * n for n in sizes)]


@pytest.mark.parametrize("frames, reason", [
    (chunked(2, [8]), "declares 2 tensor frame"),
    (chunked(2, [8, 4]), "2 frames have 12"),
    (chunked(2, [16, 0]), "2 frames have 16"),
    (chunked(0, []), "frames must be an integer"),
    (chunked("2", [8, 8]), "frames must be an integer"),
    (chunked(1 << 20, [8, 8]), "frames must be an integer"),
])
def test_malformed_chunks_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(WireError, match=reason):
        wire.decode(frames)


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"\xc1\xff garbage"], "not msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([head(type="HELLO") + b"\x00"], "not msgpack"),  # trailing bytes
    ([msgpack.packb({"v": 2, "type": "HELLO"})], "version"),
    ([msgpack.packb({"v": True, "type": "HELLO"})], "version"),
    ([msgpack.packb({"v": 1.0, "type": "HELLO"})], "version"),
    ([head(type="PWN")], "unknown message type"),
    ([head(type=["HELLO"])], "unknown message type"),
    ([head(type="READY", num_samples="many")], "num_samples must be an int"),
    ([head(type="READY", num_samples=True)], "num_samples must be an int"),
    ([head(type="WELCOME", config={"a": msgpack.ExtType(1, b"x")})], "not msgpack"),
    ([header(), np.zeros(3, np.float32).tobytes()], "frame has 12"),
    ([header(tensors=[{"dtype": "float32", "shape": [10**12]}]), b"\0" * 16], "over the limit"),
    ([header(tensors=[{"dtype": "object", "shape": [4]}]), b"\0" * 16], "not allowed"),
    ([header(tensors=[{"dtype": ["float32"], "shape": [4]}]), b"\0" * 16], "not allowed"),
    ([header(tensors=[{"dtype": "float32", "shape": [-4]}]), b"\0" * 16], "shape"),
    ([header(tensors=[{"dtype": "float32", "shape": [4], "strides": [1]}]), b"\0" * 16], "declaration"),
    ([header(tensors=[{"dtype": "float32", "shape": [2, 2]}, {"dtype": "float32", "shape": [4]}]), b"\0" * 16],
     "tensor frame"),
    ([header(), b"\0" * 16, b"\0" * 16], "tensor frame"),
    ([header(tensors=[])], "tensor frame"),
    ([head(type="HEARTBEAT", tensors=[{"dtype": "float32", "shape": [4]}]), b"\0" * 16], "tensor"),
    ([header(), object()], "not a contiguous buffer"),
    ([header(), memoryview(np.zeros(8, np.float32))[::2]], "not a contiguous buffer"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(WireError, match=reason):
        wire.decode(frames)


def test_zero_dimension_cannot_hide_a_huge_one():
    """Regression: [0, 2**63] has 0 elements, so the size check passed and ``view`` raised TypeError."""
    for shape in ([0, 2**63], [2**63, 0], [0, 2**64 - 1], [0] * 7 + [2**40]):
        with pytest.raises(WireError, match="shape"):
            wire.decode([header(tensors=[{"dtype": "float32", "shape": shape}]), b""])


def test_element_count_is_bounded_as_well_as_each_dimension():
    limits = wire.Limits(max_elements=1000)
    wire.decode([header(tensors=[{"dtype": "float32", "shape": [10, 100]}]), bytes(4000)], limits)
    with pytest.raises(WireError, match="over the limit of 1000 elements"):
        wire.decode([header(tensors=[{"dtype": "float32", "shape": [100, 100]}]), bytes(40000)], limits)


def test_a_residual_view_failure_is_a_wire_error(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(wire.codec.torch, "from_numpy", boom)
    with pytest.raises(WireError, match="cannot be viewed"):
        wire.decode([header(), bytes(16)])


@pytest.mark.parametrize("metrics", [
    {"loss": "0.5"},  # regression: a string loss killed the coordinator with TypeError
    {"loss": math.nan}, {"loss": math.inf}, {"loss": -math.inf}, {"loss": None}, {"loss": [0.5]},
    {"loss": {"a": 1}}, {"steps": 2**60}, {"x" * 300: 1.0}, {"bad\nkey": 1.0},
    {f"m{i}": 1.0 for i in range(65)},
])
@pytest.mark.parametrize("kind", ["UPDATE", "OFFER", "RESULT"])
def test_metrics_hold_only_finite_numbers(kind, metrics):
    frames = [header(type=kind, metrics=metrics), bytes(16)] if kind == "UPDATE" else \
        [head(type=kind, num_samples=1, metrics=metrics)]
    with pytest.raises(WireError, match="metrics"):
        wire.decode(frames)


def test_metrics_accept_ints_floats_and_bools():
    m = {"loss": 0.25, "steps": 3, "partial": True, "big": 2**53 - 1, "neg": -1.5}
    assert wire.decode([head(type="RESULT", num_samples=5, metrics=m)]).metrics == m


@pytest.mark.parametrize("kind, n, ok", [
    ("READY", 2**64 - 1, False),  # regression: crashed the coordinator ("high is out of bounds for int64")
    ("READY", 2**40 + 1, False), ("READY", 2**40, True), ("READY", 0, False), ("READY", -1, False),
    ("OFFER", 0, False), ("UPDATE", 0, False), ("GOSSIP_PUSH", 0, False), ("GOSSIP_REPLY", 0, False),
    ("RESULT", 0, True), ("RESULT", -1, False), ("READY", 1.0, False),
])
def test_num_samples_range(kind, n, ok):
    frames = [header(type=kind, num_samples=n), bytes(16)] if kind in ("UPDATE", "GOSSIP_PUSH", "GOSSIP_REPLY") \
        else [head(type=kind, num_samples=n)]
    if kind.startswith("GOSSIP"):
        frames[0] = head(type=kind, num_samples=n, tensors=[{"dtype": "float32", "shape": [4]}])
    if ok:
        assert wire.decode(frames).num_samples == n
    else:
        with pytest.raises(WireError, match="num_samples"):
            wire.decode(frames)


@pytest.mark.parametrize("kind, name", [("PULL", "round"), ("GOSSIP_BUSY", "xid"), ("GOSSIP_PUSH", "version"),
                                        ("COHORT", "cohort")])
@pytest.mark.parametrize("value, ok", [(0, True), (2**53 - 1, True), (2**53, False), (-1, False), (True, False),
                                       (3.0, False), ("3", False), (None, False)])
def test_counters_are_bounded_non_negative_ints(kind, name, value, ok):
    tensors = [{"dtype": "float32", "shape": [0]}] if kind == "GOSSIP_PUSH" else []
    frames = [head(type=kind, tensors=tensors, **{name: value}), *([b""] if tensors else [])]
    if ok:
        assert getattr(wire.decode(frames), name) == value
    else:
        with pytest.raises(WireError, match=name):
            wire.decode(frames)


@pytest.mark.parametrize("value, ok", [(1, True), (1.0, True), (0.125, True), (5e-324, True), (0, False), (0.0, False),
                                       (-0.5, False), (1.0000001, False), (float("nan"), False), (True, False),
                                       ("0.5", False), (None, False)])
def test_a_cohort_scale_is_a_fraction(value, ok):
    frames = [head(type="COHORT", round=3, cohort=9, scale=value)]
    if ok:
        assert wire.decode(frames).scale == value
    else:
        with pytest.raises(WireError, match="scale"):
            wire.decode(frames)


@pytest.mark.parametrize("kind, name, most", [
    ("HELLO", "client", 256), ("HELLO", "device", 256), ("HEARTBEAT", "sender", 256), ("BYE", "reason", 1024),
    ("PASS", "reason", 1024), ("GOSSIP_BUSY", "addr", 256),
])
def test_strings_are_bounded_and_printable(kind, name, most):
    assert getattr(wire.decode([head(type=kind, **{name: "é" * most})]), name) == "é" * most
    for bad in ("x" * (most + 1), "a\nb", "a\x1b[2Jb", 7, None, ["x"]):
        with pytest.raises(WireError, match=name):
            wire.decode([head(type=kind, **{name: bad})])


def test_fetch_kind_is_from_its_set():
    for kind in wire.FETCH_KINDS:
        assert wire.decode([head(type="GOSSIP_FETCH", kind=kind)]).kind == kind
    for bad in ("FETCH", "", ["fetch"], 1):
        with pytest.raises(WireError, match="kind"):
            wire.decode([head(type="GOSSIP_FETCH", kind=bad)])


@pytest.mark.parametrize("peers, ok", [
    ({f"tcp://10.0.0.{i}:5000": 1 for i in range(64)}, True),
    ({f"tcp://10.0.0.{i}:5000": 1 for i in range(65)}, False),
    ({"tcp://h:1": "1"}, False), ({"tcp://h:1": -1}, False), ({"tcp://h:1": 2**53}, False),
    ({"x" * 257: 1}, False), ({"a\nb": 1}, False), ([["tcp://h:1", 1]], False),
])
def test_gossip_peers_map(peers, ok):
    frames = [head(type="GOSSIP_REPLY", peers=peers, tensors=[{"dtype": "float32", "shape": [1]}]), bytes(4)]
    if ok:
        assert wire.decode(frames).peers == peers
    else:
        with pytest.raises(WireError, match="peers"):
            wire.decode(frames)


def nested(depth):
    x = 1
    for _ in range(depth):
        x = [x]
    return {"a": x}


@pytest.mark.parametrize("config, reason", [
    (nested(7), None), (nested(8), "nested"), ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}, None),
    ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, "nested"),
    ({"a": [0] * (1 << 18)}, "items"), ({str(i): 0 for i in range(1 << 17)} | {"l": [0] * (1 << 17)}, "items"),
    ([1, 2], "must be a map"), ({1: 2}, "not msgpack"),
])
def test_free_form_trees_are_bounded(config, reason):
    frames = [head(type="WELCOME", config=config)]
    if reason is None:
        assert wire.decode(frames).config == config
    else:
        with pytest.raises(WireError, match=reason):
            wire.decode(frames)


@pytest.mark.parametrize("raw, what", [
    (b"\xdd\xff\xff\xff\xff", "array32 claiming 2**32-1 entries"),
    (b"\xdf\xff\xff\xff\xff", "map32 claiming 2**32-1 entries"),
    (b"\xdb\xff\xff\xff\xff", "str32 claiming 4 GiB"),
    (b"\xc6\x00\x00\x00\x01x", "bin"),
    (b"\xd4\x01x", "fixext"),
    (b"\xd6\xff\x00\x00\x00\x00", "timestamp ext"),
    (b"\x91" * 100_000 + b"\x00", "deep nesting"),
])
def test_msgpack_limits_stop_expansion(raw, what):
    frame = b"\x83\xa1v\x01\xa4type\xa7WELCOME\xa6config\x81\xa1a" + raw  # {"v":1,"type":"WELCOME","config":{"a": raw}}
    with pytest.raises(WireError, match="msgpack"):
        wire.decode([frame])


def test_a_long_string_inside_a_tree_is_refused_by_msgpack():
    with pytest.raises(WireError, match="msgpack"):
        wire.decode([head(type="WELCOME", config={"a": "x" * (1 << 16 + 1)})])


def test_unknown_header_keys_are_rejected():
    with pytest.raises(WireError, match="unknown header key"):
        wire.decode([head(type="HEARTBEAT", extra=1)])
    with pytest.raises(WireError, match="unknown header key"):
        wire.decode([head(type="HELLO", num_samples=5)])  # a field of another type


def test_hostile_values_are_shortened_in_reasons():
    with pytest.raises(WireError) as e:
        wire.decode([head(type="x" * 60000)])
    assert len(str(e.value)) < 200


def test_header_size_limit():
    big = msgpack.packb({"v": 1, "type": "BYE", "reason": "x" * 5000})
    with pytest.raises(WireError, match="header of"):
        wire.decode([big], wire.Limits(max_header_bytes=1000))


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_samples"):
        wire.Limits(max_samples=0)


def test_declared_size_is_checked_before_any_allocation(monkeypatch):
    calls = []
    monkeypatch.setattr(wire.codec.np, "frombuffer", lambda *a, **k: calls.append(a) or np.zeros(0))
    with pytest.raises(WireError):
        wire.decode([header(tensors=[{"dtype": "float64", "shape": [10**6, 10**6]}]), b"\0" * 8])
    assert calls == []  # rejected before the frame was even wrapped


def test_nan_travels_unchanged_for_the_receiver_to_judge():
    vec = torch.tensor([math.nan, math.inf, 1.0])
    out = wire.decode(wire.encode(wire.UpdateMsg(round=1, delta=vec)))
    assert torch.isnan(out.delta[0]) and torch.isinf(out.delta[1])


def test_message_table_is_documented():
    for name in wire.MESSAGE_TYPES:
        assert name in wire.messages.__doc__
    for f in ("max_int", "max_samples", "max_name", "max_reason", "max_metrics", "max_peers", "max_depth",
              "max_tree_items", "max_str", "max_elements", "max_header_bytes", "max_chunks"):
        assert f in wire.messages.__doc__, f
