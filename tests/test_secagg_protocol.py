"""The SecAgg / SecAgg+ protocol state machines, driven in memory with injected faults."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import pytest
from scipy import stats

from fedopt.errors import SecAggError
from fedopt.secagg import (
    ClientSession,
    QuantConfig,
    RoundConfig,
    ServerSession,
    UnmaskRequest,
    check_capacity,
    decode_sum,
    encode_update,
    generate_identity,
    identity_public_bytes,
)
from fedopt.secagg.keys import RoundKeys


class Drop(enum.Enum):
    """The stage at which a client goes silent (a fault injected through the driver, not the code)."""

    BEFORE_ADVERTISE = "advertise"
    BEFORE_SHARE_KEYS = "share"
    BEFORE_MASKED_INPUT = "mask"
    BEFORE_UNMASK = "unmask"


def _ids(n):
    return [f"client-{i:03d}" for i in range(n)]


def _identities(ids):
    idents = {u: generate_identity() for u in ids}
    return idents, {u: identity_public_bytes(k) for u, k in idents.items()}


def run_round(cfg: RoundConfig, inputs, drops=None, idents=None, tamper_adverts=None):
    """Drive one round; ``drops`` maps client id -> Drop. Returns (result, clients, requests)."""
    drops = drops or {}
    ids = list(cfg.participants)
    if idents is None:
        idents = _identities(ids)
    idents, pinned = idents
    server = ServerSession(cfg)
    clients = {u: ClientSession(u, idents[u], pinned, cfg) for u in ids}
    live = lambda stage: [u for u in ids if drops.get(u) is None or  # noqa: E731
                          list(Drop).index(drops[u]) > list(Drop).index(stage)]
    for u in live(Drop.BEFORE_ADVERTISE):
        server.receive_advertisement(clients[u].advertise())
    nk = server.close_advertise()
    if tamper_adverts:
        nk = tamper_adverts(nk)
    for u in live(Drop.BEFORE_SHARE_KEYS):
        server.receive_shares(clients[u].share_keys(nk[u]))
    deliveries = server.close_share_keys()
    for u in live(Drop.BEFORE_MASKED_INPUT):
        server.receive_masked_input(clients[u].masked_input(deliveries[u], inputs[u]))
    requests = server.close_masked_input()
    for u in live(Drop.BEFORE_UNMASK):
        server.receive_unmask(clients[u].unmask(requests[u]))
    return server.finish(), clients, requests


def _float_inputs(ids, m, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0, 0.02, m) for u in ids}


def _assert_no_double_release(clients):
    for c in clients.values():
        assert set(c.released.values()) <= {"b", "sk"}
    # Every client released at most one kind of share for any given peer, by construction of the
    # mapping; check too that no peer had b-shares released by some and sk-shares by others.
    kinds = {}
    for c in clients.values():
        for v, kind in c.released.items():
            kinds.setdefault(v, set()).add(kind)
    assert all(len(k) == 1 for k in kinds.values())


@pytest.mark.parametrize("n,m,k", [(3, 2000, None), (10, 2000, None), (100, 1000, None), (10, 500, 9)])
def test_exact_sum(n, m, k):
    ids = _ids(n)
    qcfg = QuantConfig(clip=1.0, bits=16)
    check_capacity(qcfg, n)
    floats = _float_inputs(ids, m)
    rng = np.random.default_rng(1)
    enc = {u: encode_update(floats[u], qcfg, rng).vector for u in ids}
    cfg = RoundConfig.create(7, ids, m, k=k)
    if n == 100:
        assert cfg.k == 14 and cfg.t == 8  # SecAgg+: k = 2 ceil(log2 n)
    result, clients, _ = run_round(cfg, enc)
    plain = np.sum(np.stack(list(enc.values())), axis=0, dtype=np.uint32)
    assert result.total.dtype == np.uint32
    assert np.array_equal(result.total, plain)
    assert result.survivors == tuple(ids) and result.dropped == ()
    back, _ = decode_sum(result.total, qcfg)
    assert np.max(np.abs(back - sum(floats.values()))) < n * qcfg.step
    _assert_no_double_release(clients)


def test_weighted_fedavg_and_uint64():
    ids = _ids(6)
    qcfg = QuantConfig(clip=1.0, bits=24, modulus_bits=64, max_weight=500)
    check_capacity(qcfg, 6)
    floats = _float_inputs(ids, 300)
    weights = dict(zip(ids, [1, 20, 300, 500, 7, 42]))
    rng = np.random.default_rng(3)
    enc = {u: encode_update(floats[u], qcfg, rng, weight=weights[u]).vector for u in ids}
    cfg = RoundConfig.create(1, ids, qcfg.vector_length(300), modulus_bits=64)
    result, _, _ = run_round(cfg, enc)
    mean, total_w = decode_sum(result.total, qcfg)
    exact = sum(weights[u] * floats[u] for u in ids) / sum(weights.values())
    assert total_w == sum(weights.values())
    assert np.max(np.abs(mean - exact)) < 6 * qcfg.step * qcfg.max_weight / total_w


@pytest.mark.parametrize("stage", list(Drop))
@pytest.mark.parametrize("k", [None, 9])  # SecAgg+ (k=8, t=5) and complete SecAgg (k=9, t=5)
def test_dropouts_with_enough_survivors(stage, k):
    ids = _ids(10)
    m = 256
    rng = np.random.default_rng(5)
    enc = {u: rng.integers(0, 2**32, m, dtype=np.uint32) for u in ids}
    cfg = RoundConfig.create(2, ids, m, k=k, graph_seed=bytes(range(32)))
    # drop two clients that are neighbours of each other
    a = ids[0]
    b = sorted(cfg.neighbours(a))[0]
    result, clients, requests = run_round(cfg, enc, drops={a: stage, b: stage})
    sent_input = stage == Drop.BEFORE_UNMASK  # dropping in Unmask still counts the input
    expect_in = [u for u in ids if sent_input or u not in (a, b)]
    assert result.survivors == tuple(expect_in)
    assert result.dropped == ((tuple(sorted((a, b)))) if stage == Drop.BEFORE_MASKED_INPUT else ())
    plain = np.sum(np.stack([enc[u] for u in expect_in]), axis=0, dtype=np.uint32)
    assert np.array_equal(result.total, plain)
    _assert_no_double_release(clients)
    for u, req in requests.items():  # what each client released matches its one request
        if u in (a, b):
            continue
        assert {v for v, kind in clients[u].released.items() if kind == "b"} == set(req.survivors)
        assert {v for v, kind in clients[u].released.items() if kind == "sk"} == set(req.dropped)


@pytest.mark.parametrize("stage", list(Drop))
def test_too_few_survivors_abort(stage):
    ids = _ids(10)
    cfg = RoundConfig.create(2, ids, 16)  # k = 8, t = 5
    enc = {u: np.zeros(16, np.uint32) for u in ids}
    drops = {u: stage for u in ids[:6]}
    with pytest.raises(SecAggError, match="threshold"):
        run_round(cfg, enc, drops=drops)


def test_abort_is_final():
    ids = _ids(4)
    cfg = RoundConfig.create(0, ids, 8)
    server = ServerSession(cfg)
    with pytest.raises(SecAggError):
        server.close_advertise()
    with pytest.raises(SecAggError, match="aborted"):
        server.close_advertise()


def _one_round_until_unmask(n=6, m=64):
    ids = _ids(n)
    cfg = RoundConfig.create(4, ids, m, k=n - 1)
    idents, pinned = _identities(ids)
    server = ServerSession(cfg, identities=pinned)
    clients = {u: ClientSession(u, idents[u], pinned, cfg) for u in ids}
    for u in ids:
        server.receive_advertisement(clients[u].advertise())
    nk = server.close_advertise()
    for u in ids:
        server.receive_shares(clients[u].share_keys(nk[u]))
    dl = server.close_share_keys()
    for u in ids:
        server.receive_masked_input(clients[u].masked_input(dl[u], np.zeros(m, np.uint32)))
    return cfg, server, clients, server.close_masked_input()


def test_inconsistent_unmask_requests_refused():
    cfg, _, _, _ = _one_round_until_unmask()
    assert cfg.t == 3
    u = cfg.participants[0]
    others = [v for v in cfg.participants if v != u]
    bad = [
        UnmaskRequest(cfg.round, u, tuple(others), (others[0],)),  # both survived and dropped
        UnmaskRequest(cfg.round, u, tuple(others[:2]), tuple(others[2:])),  # 2 survivors < t
        UnmaskRequest(cfg.round, u, tuple(others[:-1]), ()),  # a held peer not accounted for
        UnmaskRequest(cfg.round, u, tuple(others) + ("stranger",), ()),  # unknown id
        UnmaskRequest(cfg.round, u, tuple(others) + (u,), ()),  # itself
        UnmaskRequest(cfg.round, u, tuple(others + others[:1]), ()),  # listed twice
        UnmaskRequest(cfg.round + 1, u, tuple(others), ()),  # wrong round
    ]
    for req in bad:
        _, _, clients, _ = _one_round_until_unmask()
        with pytest.raises(SecAggError):
            clients[u].unmask(req)
        assert not clients[u].released  # a refused request leaks nothing


def test_second_unmask_request_refused():
    cfg, _, clients, _ = _one_round_until_unmask()
    u = cfg.participants[0]
    others = [v for v in cfg.participants if v != u]
    first = clients[u].unmask(UnmaskRequest(cfg.round, u, tuple(others[:3]), tuple(others[3:])))
    assert [v for v, _ in first.b_shares] == others[:3]
    assert [v for v, _ in first.sk_shares] == others[3:]
    # a server that now claims others[0] dropped would get its sk-share on top of its b-share
    flip = UnmaskRequest(cfg.round, u, tuple(others[1:]), (others[0],))
    with pytest.raises(SecAggError, match="second unmask"):
        clients[u].unmask(flip)
    assert dict(clients[u].released) == {**{v: "b" for v in others[:3]}, **{v: "sk" for v in others[3:]}}


def test_server_rejects_mismatched_unmask_response():
    cfg, server, clients, reqs = _one_round_until_unmask()
    u, v = cfg.participants[:2]
    resp = clients[u].unmask(reqs[u])
    forged = dataclasses.replace(resp, b_shares=resp.b_shares[1:], sk_shares=resp.b_shares[:1])
    with pytest.raises(SecAggError, match="does not answer"):
        server.receive_unmask(forged)
    server.receive_unmask(resp)
    with pytest.raises(SecAggError, match="second"):
        server.receive_unmask(resp)


def _substitute(kind):
    """A coordinator that swaps one advertisement delivered to the first client."""

    def tamper(nk):
        first = sorted(nk)[0]
        advs = list(nk[first].advertisements)
        attacker = RoundKeys.generate()
        if kind == "keys":  # attacker's keys, victim's signature
            advs[0] = dataclasses.replace(advs[0], c_pk=attacker.c_pk, s_pk=attacker.s_pk)
        elif kind == "unsigned":
            advs[0] = dataclasses.replace(advs[0], c_pk=attacker.c_pk, signature=b"")
        elif kind == "wrong-signer":
            from fedopt.secagg.keys import sign_advertisement

            sig = sign_advertisement(generate_identity(), advs[0].round, advs[0].sender,
                                     attacker.c_pk, attacker.s_pk, advs[0].b_commit)
            advs[0] = dataclasses.replace(advs[0], c_pk=attacker.c_pk, s_pk=attacker.s_pk, signature=sig)
        elif kind == "replay-round":
            advs[0] = dataclasses.replace(advs[0], round=advs[0].round + 1)
        nk[first] = dataclasses.replace(nk[first], advertisements=tuple(advs))
        return nk

    return tamper


@pytest.mark.parametrize("kind", ["keys", "unsigned", "wrong-signer", "replay-round"])
def test_substituted_advertisement_rejected(kind):
    ids = _ids(4)
    cfg = RoundConfig.create(0, ids, 8)
    enc = {u: np.zeros(8, np.uint32) for u in ids}
    with pytest.raises(SecAggError):
        run_round(cfg, enc, tamper_adverts=_substitute(kind))


def test_server_with_pinned_identities_rejects_forged_advertisement():
    ids = _ids(3)
    cfg = RoundConfig.create(0, ids, 8)
    idents, pinned = _identities(ids)
    server = ServerSession(cfg, identities=pinned)
    forger = ClientSession(ids[0], generate_identity(), pinned, cfg)  # not the pinned key
    with pytest.raises(SecAggError, match="bad signature"):
        server.receive_advertisement(forger.advertise())
    honest = ClientSession(ids[0], idents[ids[0]], pinned, cfg)
    server.receive_advertisement(honest.advertise())


def test_tampered_share_ciphertext_rejected():
    ids = _ids(3)
    cfg = RoundConfig.create(0, ids, 8)
    idents, pinned = _identities(ids)
    server = ServerSession(cfg)
    clients = {u: ClientSession(u, idents[u], pinned, cfg) for u in ids}
    for u in ids:
        server.receive_advertisement(clients[u].advertise())
    nk = server.close_advertise()
    for u in ids:
        server.receive_shares(clients[u].share_keys(nk[u]))
    dl = server.close_share_keys()
    u = ids[0]
    s0 = dl[u].shares[0]
    ct = bytearray(s0.ciphertext)
    ct[20] ^= 0xFF
    bad = dataclasses.replace(dl[u], shares=(dataclasses.replace(s0, ciphertext=bytes(ct)),) + dl[u].shares[1:])
    with pytest.raises(SecAggError, match="authentication"):
        clients[u].masked_input(bad, np.zeros(8, np.uint32))
    with pytest.raises(SecAggError, match="aborted"):
        clients[u].masked_input(dl[u], np.zeros(8, np.uint32))


def test_masked_vector_looks_uniform():
    ids = _ids(3)
    m = 200_000
    x = (np.arange(m, dtype=np.uint64) % 7).astype(np.uint32)  # a very structured input
    enc = {u: x for u in ids}
    cfg = RoundConfig.create(0, ids, m)
    idents, pinned = _identities(ids)
    server = ServerSession(cfg)
    clients = {u: ClientSession(u, idents[u], pinned, cfg) for u in ids}
    for u in ids:
        server.receive_advertisement(clients[u].advertise())
    nk = server.close_advertise()
    for u in ids:
        server.receive_shares(clients[u].share_keys(nk[u]))
    dl = server.close_share_keys()
    y = clients[ids[0]].masked_input(dl[ids[0]], enc[ids[0]]).vector
    counts = np.bincount((y & 0xFF).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    r = np.corrcoef(x.astype(np.float64), (y & 0xFF).astype(np.float64))[0, 1]
    assert abs(r) < 0.02
    r_full = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
    assert abs(r_full) < 0.02


def test_keys_fresh_each_round():
    ids = _ids(3)
    idents, pinned = _identities(ids)
    a1 = ClientSession(ids[0], idents[ids[0]], pinned, RoundConfig.create(1, ids, 4)).advertise()
    a2 = ClientSession(ids[0], idents[ids[0]], pinned, RoundConfig.create(2, ids, 4)).advertise()
    assert a1.c_pk != a2.c_pk and a1.s_pk != a2.s_pk


def test_stage_order_enforced():
    ids = _ids(3)
    idents, pinned = _identities(ids)
    cfg = RoundConfig.create(1, ids, 4)
    c = ClientSession(ids[0], idents[ids[0]], pinned, cfg)
    with pytest.raises(SecAggError, match="stage"):
        c.unmask(UnmaskRequest(1, ids[0], (), ()))


@pytest.mark.parametrize("kw", [dict(t=1), dict(t=5), dict(k=0), dict(graph_seed=b"x")])
def test_round_config_validated(kw):
    with pytest.raises(SecAggError):
        RoundConfig.create(0, _ids(5), 4, **kw)


# ---- integrity of reconstruction: every secret is checked against its owner's signed commitment -----------------------
def _forge(resp, cfg: RoundConfig, kind: str, shift: int = 1):
    """``resp`` with every share of ``kind`` ("b" or "sk") moved so that interpolating from the t smallest holder ids
    shifts the secret by ``shift``: a forgery that stays in range, invisible to plain Shamir."""
    from fedopt.secagg import shamir

    me = cfg.share_id(resp.sender)
    out = []
    for owner, data in getattr(resp, f"{kind}_shares"):
        xs = tuple(sorted(cfg.share_id(w) for w in cfg.neighbours(owner)))[: cfg.t]
        y = shamir.decode_share(data)
        if me in xs:
            y = (y + shift * pow(shamir._lagrange_at_zero(xs)[xs.index(me)], -1, shamir.PRIME)) % shamir.PRIME
        out.append((owner, shamir.encode_share(y)))
    return dataclasses.replace(resp, **{f"{kind}_shares": tuple(out)})


def _round_with_liars(liars, drop=None, kind="b", n=7):
    ids = _ids(n)
    cfg = RoundConfig.create(1, ids, 40, k=n - 1, t=4)
    idents, pinned = _identities(ids)
    server = ServerSession(cfg, pinned)
    clients = {u: ClientSession(u, idents[u], pinned, cfg) for u in ids}
    for u in ids:
        server.receive_advertisement(clients[u].advertise())
    nk = server.close_advertise()
    for u in ids:
        server.receive_shares(clients[u].share_keys(nk[u]))
    deliveries = server.close_share_keys()
    rng = np.random.default_rng(0)
    inputs = {u: rng.integers(0, 2**32, 40, dtype=np.uint64).astype(np.uint32) for u in ids}
    for u in ids:
        if u != drop:
            server.receive_masked_input(clients[u].masked_input(deliveries[u], inputs[u]))
    for u, req in server.close_masked_input().items():
        resp = clients[u].unmask(req)
        server.receive_unmask(_forge(resp, cfg, kind) if u in liars else resp)
    want = np.sum(np.stack([inputs[u] for u in ids if u != drop]), axis=0, dtype=np.uint32)
    return server, want


@pytest.mark.parametrize("kind", ["b", "sk"])
def test_a_forged_share_is_caught_and_set_aside(kind):
    ids = _ids(7)
    server, want = _round_with_liars({ids[0]}, drop=ids[6] if kind == "sk" else None, kind=kind)
    result = server.finish()
    assert np.array_equal(result.total, want)  # the honest shares rebuilt every secret: the sum is exact
    assert result.liars == (ids[0],)


def test_two_liars_among_six_holders_still_leave_t_honest_shares():
    ids = _ids(7)
    server, want = _round_with_liars({ids[0], ids[1]})  # each owner has >= 4 = t honest holders left
    result = server.finish()
    assert np.array_equal(result.total, want) and set(result.liars) == {ids[0], ids[1]}


def test_too_many_liars_abort_the_round_cleanly():
    ids = _ids(7)
    server, _ = _round_with_liars(set(ids[:4]))  # owners whose t smallest holders lie have < t honest shares
    with pytest.raises(SecAggError, match="aborted.*cannot be reconstructed from honest shares"):
        server.finish()
    with pytest.raises(SecAggError, match="aborted"):
        server.finish()  # stays aborted


def test_shamir_reconstruct_verified_finds_the_honest_subset():
    import hashlib
    import os

    from fedopt.secagg import shamir

    secret = os.urandom(32)
    check = lambda s: hashlib.sha256(s).digest() == hashlib.sha256(secret).digest()  # noqa: E731
    shares = shamir.share(secret, 3, range(1, 7))
    assert shamir.reconstruct_verified(shares, 3, check) == (secret, frozenset())
    bad = dict(shares)
    bad[2] = (bad[2] + 12345) % shamir.PRIME
    bad[5] = (bad[5] + 1) % shamir.PRIME
    assert shamir.reconstruct_verified(bad, 3, check) == (secret, frozenset({2, 5}))
    assert shamir.reconstruct_verified(bad, 3, check, suspects={2, 5}) == (secret, frozenset({2, 5}))
    bad[1] = bad[3] = bad[4] = 7  # 1 honest share left of 6, t = 3
    with pytest.raises(SecAggError, match="commitment"):
        shamir.reconstruct_verified(bad, 3, check)
    with pytest.raises(SecAggError, match="within 2 tries"):
        shamir.reconstruct_verified(bad, 3, check, budget=2)
    with pytest.raises(SecAggError, match="need 3"):
        shamir.reconstruct_verified({1: shares[1], 2: shares[2]}, 3, check)
