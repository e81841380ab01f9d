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


def test_round_trip_every_type():
    vec = torch.arange(6, dtype=torch.float32)
    msgs = [
        wire.Hello(client="3", device="cpu"), wire.Welcome(spec={"dtype": "float32", "entries": []},
                                                          config={"seed": 1, "x": [1, 2.5, None]}),
        wire.Ready(num_samples=7), wire.Train(round=2, config={"lr": 0.1, "max_steps": None}, model=vec),
        wire.UpdateMsg(round=2, num_samples=5, metrics={"loss": 0.5}, delta=vec), wire.Evaluate(round=4, model=vec),
        wire.Result(round=4, num_samples=3, metrics={"accuracy": 0.9}), wire.Heartbeat(), wire.Bye(reason="done"),
    ]
    for m in msgs:
        out = wire.decode(wire.encode(m))
        assert type(out) is type(m)
        for name in m.TENSORS:
            assert torch.equal(getattr(out, name), getattr(m, name))
        plain = {k: v for k, v in m.__dict__.items() if k not in m.TENSORS}
        assert {k: v for k, v in out.__dict__.items() if k not in m.TENSORS} == plain


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


def test_encoder_refuses_non_wire_dtypes_and_objects():
    with pytest.raises(WireError, match="int64"):
        wire.encode(wire.Train(model=torch.arange(3)))
    with pytest.raises(WireError, match="torch.Tensor"):
        wire.encode(wire.Train(model=[1, 2]))


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
    ([msgpack.packb({"v": 2, "type": "HELLO"})], "version"),
    ([msgpack.packb({"v": 1, "type": "PWN"})], "unknown message type"),
    ([msgpack.packb({"v": 1, "type": "READY", "num_samples": "many"})], "must be int"),
    ([msgpack.packb({"v": 1, "type": "READY", "num_samples": True})], "must be int"),
    ([msgpack.packb({"v": 1, "type": "WELCOME", "config": {"a": msgpack.ExtType(1, b"x")}})], "does not carry"),
    ([header(), np.zeros(3, np.float32).tobytes()], "frame has 12"),
    ([header(tensors=[{"dtype": "float32", "shape": [10**12]}]), b"\0" * 16], "over the limit"),
    ([header(tensors=[{"dtype": "object", "shape": [4]}]), b"\0" * 16], "not allowed"),
    ([header(tensors=[{"dtype": "float32", "shape": [-4]}]), b"\0" * 16], "shape"),
    ([header(tensors=[{"dtype": "float32", "shape": [2, 2]}, {"dtype": "float32", "shape": [4]}]), b"\0" * 16],
     "tensor frame"),
    ([header(), b"\0" * 16, b"\0" * 16], "tensor frame"),
    ([header(tensors=[])], "tensor frame"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(WireError, match=reason):
        wire.decode(frames)


def test_header_size_limit():
    big = msgpack.packb({"v": 1, "type": "BYE", "reason": "x" * 5000})
    with pytest.raises(WireError, match="header of"):
        wire.decode([big], wire.Limits(max_header_bytes=1000))


def test_declared_size_is_checked_before_any_allocation(monkeypatch):
    calls = []
    monkeypatch.setattr(wire.np, "frombuffer", lambda *a, **k: calls.append(a) or np.zeros(0))
    with pytest.raises(WireError):
        wire.decode([header(tensors=[{"dtype": "float64", "shape": [10**6, 10**6]}]), b"\0" * 8])
    assert calls == []  # rejected before the frame was even wrapped


def test_nan_travels_unchanged_for_the_receiver_to_judge():
    vec = torch.tensor([math.nan, math.inf, 1.0])
    out = wire.decode(wire.encode(wire.UpdateMsg(round=1, delta=vec)))
    assert torch.isnan(out.delta[0]) and torch.isinf(out.delta[1])


def test_message_table_is_documented():
    for name in wire.MESSAGE_TYPES:
        assert name in wire.__doc__
