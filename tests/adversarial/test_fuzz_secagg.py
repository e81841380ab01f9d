"""Fuzzing the secure-aggregation codec and handlers: for any bytes, ``codec.unpack`` raises WireError or returns a
message, and neither side's handler ever raises into its loop.

Deterministic and modest by default (CI); ``FEDOPT_FUZZ_EXAMPLES=100000`` raises the count per test."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedopt.errors import WireError
from fedopt.secagg import codec, generate_identity, identity_public_bytes
from fedopt.secagg.messages import KeyAdvertisement, MaskedInput, UnmaskResponse

EXAMPLES = int(os.environ.get("FEDOPT_FUZZ_EXAMPLES", "300"))
# a raised count runs for minutes: no per-test timeout then
pytestmark = pytest.mark.timeout(0 if "FEDOPT_FUZZ_EXAMPLES" in os.environ else 300)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# values msgpack can carry, nested a little: what a hostile peer can put in a body
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=40),
                  st.binary(max_size=80))
_value = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)
_KINDS = ["setup", "advertise", "keys", "shares", "deliver", "masked", "unmask", "response", "abort", "other"]
_FIELDS = ["sender", "recipient", "c_pk", "s_pk", "b_commit", "signature", "shares", "advertisements",
           "survivors", "dropped", "b_shares", "sk_shares", "dtype", "length", "participants", "k", "t",
           "graph_seed", "vector_length", "modulus_bits", "quant", "reason", "bits"]
_body = st.fixed_dictionaries({"kind": st.sampled_from(_KINDS), "round": st.one_of(st.integers(-2, 3), _leaf)},
                              optional={f: _value for f in _FIELDS})


def _valid_samples() -> list[list[bytes]]:
    vec = np.arange(5, dtype=np.uint32)
    msgs = [KeyAdvertisement(1, "a", bytes(32), bytes(range(32)), bytes(32), bytes(64)),
            MaskedInput(1, "a", vec),
            MaskedInput(1, "a", vec, 20),  # packed: 2.5 bytes a value
            UnmaskResponse(1, "a", (("b", bytes(66)),), ())]
    return [[bytes(p) for p in codec.pack(m)] for m in msgs]


def _unpack_is_total(parts) -> None:
    try:
        codec.unpack(parts)
    except WireError:
        pass  # the one error a peer's bytes may cause


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=3))
def test_unpack_raises_only_wire_errors_for_random_bytes(parts):
    _unpack_is_total(parts)


@FUZZ
@given(_body, st.lists(st.binary(max_size=64), max_size=2))
def test_unpack_raises_only_wire_errors_for_structured_bodies(body, frames):
    _unpack_is_total([msgpack.packb(body, use_bin_type=True), *frames])
    try:  # decode itself, without unpack's last-resort wrapper: its own checks must already be total
        codec.decode(body, frames)
    except WireError:
        pass


@FUZZ
@given(st.sampled_from(range(4)), st.data())
def test_unpack_raises_only_wire_errors_for_mutated_valid_messages(which, data):
    parts = _valid_samples()[which]
    head = bytearray(parts[0])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(len(head) - 1, 0)))
        if op == "flip" and head:
            head[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del head[i:]
        else:
            head[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    _unpack_is_total([bytes(head), *parts[1:]])


_IDENT = generate_identity()
_PINNED = {"a": identity_public_bytes(_IDENT), "b": identity_public_bytes(generate_identity())}


@FUZZ
@given(st.lists(st.one_of(_body.map(lambda b: [msgpack.packb(b, use_bin_type=True)]),
                          st.lists(st.binary(max_size=120), min_size=1, max_size=2)), max_size=5))
def test_the_client_handler_never_raises(messages):
    from fedopt.secagg import SecAggClient

    sa = SecAggClient("a", _IDENT, _PINNED)
    for parts in messages:
        assert isinstance(sa.handle(parts), list)
