"""Primitives of fedopt.secagg: keys, PRG, Shamir, quantisation, graph, masking."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

import fedopt.secagg as secagg
from fedopt.errors import SecAggError
from fedopt.secagg import graph, keys, masking, parallel, prg, quantize, shamir


# -- key agreement, signatures, AEAD --------------------------------------------------------------


def _ka(a, b, **kw):
    args = dict(purpose=keys.PURPOSE_MASK, round=3)
    args.update(kw)
    return keys.agree(a, keys.public_bytes(b), **args)


def test_key_agreement_symmetric_and_bound_to_round_ids_purpose():
    a, b = keys.RoundKeys.generate().s_sk, keys.RoundKeys.generate().s_sk
    k_ab = _ka(a, b, me="alice", peer="bob")
    assert len(k_ab) == 32
    assert k_ab == _ka(b, a, me="bob", peer="alice")
    assert k_ab == keys.agree(keys.private_bytes(a), keys.public_bytes(b), purpose=keys.PURPOSE_MASK,
                              round=3, me="alice", peer="bob")
    assert k_ab != _ka(a, b, me="alice", peer="bob", round=4)
    assert k_ab != _ka(a, b, me="alice", peer="carol")
    assert k_ab != _ka(a, b, me="alice", peer="bob", purpose=keys.PURPOSE_ENCRYPT)


def test_key_agreement_rejects_bad_keys():
    a = keys.RoundKeys.generate().s_sk
    with pytest.raises(SecAggError):
        keys.agree(a, b"\x00" * 32, purpose=b"x", round=0, me="a", peer="b")  # low-order point
    with pytest.raises(SecAggError):
        keys.agree(a, b"short", purpose=b"x", round=0, me="a", peer="b")
    with pytest.raises(SecAggError):
        keys.agree(a, keys.public_bytes(a), purpose=b"x", round=0, me="a", peer="a")


def test_round_keys_are_fresh():
    k1, k2 = keys.RoundKeys.generate(), keys.RoundKeys.generate()
    assert len({k1.c_pk, k1.s_pk, k2.c_pk, k2.s_pk}) == 4


def test_advertisement_signature():
    ident, other = keys.generate_identity(), keys.generate_identity()
    pk = keys.identity_public_bytes(ident)
    c, s, b = os.urandom(32), os.urandom(32), keys.commit_seed(5, "u1", os.urandom(32))
    sig = keys.sign_advertisement(ident, 5, "u1", c, s, b)
    keys.verify_advertisement(pk, sig, 5, "u1", c, s, b)
    for args in [(6, "u1", c, s, b), (5, "u2", c, s, b), (5, "u1", s, c, b), (5, "u1", os.urandom(32), s, b),
                 (5, "u1", c, s, os.urandom(32))]:  # the seed commitment is signed too
        with pytest.raises(SecAggError, match="bad signature"):
            keys.verify_advertisement(pk, sig, *args)
    with pytest.raises(SecAggError):
        keys.verify_advertisement(keys.identity_public_bytes(other), sig, 5, "u1", c, s, b)
    with pytest.raises(SecAggError):
        keys.verify_advertisement(pk, b"", 5, "u1", c, s, b)
    # a verified (cached) advertisement does not make a tampered signature pass, now or on a retry
    keys.verify_advertisement(pk, sig, 5, "u1", c, s, b)
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    for _ in range(2):
        with pytest.raises(SecAggError, match="bad signature"):
            keys.verify_advertisement(pk, bad, 5, "u1", c, s, b)


def test_seed_commitment_binds_round_client_and_seed():
    seed = os.urandom(32)
    c = keys.commit_seed(3, "u1", seed)
    assert len(c) == 32 and c == keys.commit_seed(3, "u1", seed)
    others = {keys.commit_seed(4, "u1", seed), keys.commit_seed(3, "u2", seed),
              keys.commit_seed(3, "u1", bytes(a ^ (i == 0) for i, a in enumerate(seed)))}
    assert c not in others and len(others) == 3


def test_hkdf_matches_the_cryptography_package():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    for n in (0, 1, 40, 300):
        ikm, info = os.urandom(32), os.urandom(n)
        ref = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)
        assert keys.hkdf_sha256(ikm, info) == ref


def test_aead_roundtrip_and_tamper():
    key = os.urandom(32)
    blob = keys.encrypt_bundle(key, b"secret shares", round=1, sender="a", receiver="b")
    assert keys.decrypt_bundle(key, blob, round=1, sender="a", receiver="b") == b"secret shares"
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    for bad_blob, kw in [
        (bytes(flipped), dict(round=1, sender="a", receiver="b")),
        (blob, dict(round=2, sender="a", receiver="b")),
        (blob, dict(round=1, sender="b", receiver="a")),
        (blob[:10], dict(round=1, sender="a", receiver="b")),
    ]:
        with pytest.raises(SecAggError):
            keys.decrypt_bundle(key, bad_blob, **kw)
    with pytest.raises(SecAggError):
        keys.decrypt_bundle(os.urandom(32), blob, round=1, sender="a", receiver="b")


# -- PRG ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_prg_deterministic_distinct_and_consistent(dtype):
    s1, s2 = os.urandom(32), os.urandom(32)
    m = (1 << 20) // np.dtype(dtype).itemsize + 7  # crosses a chunk boundary
    a = prg.expand(s1, m, dtype)
    assert a.dtype == dtype and a.shape == (m,)
    assert np.array_equal(a, prg.expand(s1, m, dtype))
    assert np.array_equal(a, np.frombuffer(prg.keystream(s1, a.nbytes), dtype=np.dtype(dtype).newbyteorder("<")))
    assert np.mean(a == prg.expand(s2, m, dtype)) < 1e-3
    acc = np.zeros(m, dtype)
    prg.accumulate(acc, s1, 1)
    assert np.array_equal(acc, a)
    prg.accumulate(acc, s1, -1)
    assert not acc.any()
    assert np.array_equal(prg.expand(s1, 10, dtype), a[:10])  # a prefix of the same stream


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_accumulate_many_equals_one_pass_per_seed(dtype):
    seeds = [os.urandom(32) for _ in range(5)]
    signs = [1, -1, -1, 1, -1]
    m = (1 << 20) // np.dtype(dtype).itemsize * 2 + 3  # several blocks and a ragged tail
    base = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, m, dtype=dtype)
    want = base.copy()
    for seed, sign in zip(seeds, signs):
        prg.accumulate(want, seed, sign)
    got = np.empty_like(base)
    prg.accumulate_many(got, list(zip(seeds, signs)), base=base)
    assert np.array_equal(got, want)
    prg.accumulate_many(got, [(s, -g) for s, g in zip(seeds, signs)])  # in place, undoes every term
    assert np.array_equal(got, base)
    with pytest.raises(SecAggError):
        prg.accumulate_many(got, [(seeds[0], 0)])


def test_prg_rejects_bad_input():
    with pytest.raises(SecAggError):
        prg.expand(b"short", 4)
    with pytest.raises(SecAggError):
        prg.expand(os.urandom(32), 4, np.int32)
    with pytest.raises(SecAggError):
        prg.accumulate(np.zeros(4, np.uint32), os.urandom(32), 2)


@pytest.fixture
def split_small(monkeypatch):
    """Split even short vectors across threads; yields a function that sets the thread count."""
    monkeypatch.setattr(parallel, "MIN_BYTES_PER_THREAD", 64)
    yield parallel.set_threads
    parallel.set_threads(None)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_threaded_masking_is_bit_identical(split_small, dtype):
    """Ranges start their ciphers at their own counter block: any thread count gives the same bytes."""
    seeds = [os.urandom(32) for _ in range(4)]
    terms = list(zip(seeds, [1, -1, 1, -1]))
    m = 1001  # ragged: not a multiple of the 16-byte alignment
    base = np.random.default_rng(3).integers(0, np.iinfo(dtype).max, m, dtype=dtype)
    out = {}
    for t in (1, 2, 3, 7):
        split_small(t)
        got = np.empty_like(base)
        prg.accumulate_many(got, terms, base=base)
        out[t] = got
    split_small(1)
    want = base.copy()
    for seed, sign in terms:
        want += prg.expand(seed, m, dtype) if sign == 1 else -prg.expand(seed, m, dtype)
    for t, got in out.items():
        assert np.array_equal(got, want), t


def test_threaded_encoding_is_bit_identical(split_small):
    x = np.random.default_rng(4).normal(0, 0.3, 5003).astype(np.float32)
    for cfg in (quantize.QuantConfig(clip=1.0, bits=16), quantize.QuantConfig(clip=1.0, bits=24, modulus_bits=64)):
        seed = os.urandom(32)
        encs = []
        for t in (1, 3):
            split_small(t)
            encs.append(quantize.encode_update(x, cfg, seed))
        assert np.array_equal(encs[0].vector, encs[1].vector)
        assert encs[0].norm == pytest.approx(encs[1].norm, rel=1e-6)
        assert encs[0].norm == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-6)
        assert not np.array_equal(encs[0].vector, quantize.encode_update(x, cfg, os.urandom(32)).vector)


def test_thread_errors_reach_the_caller(split_small, monkeypatch):
    split_small(4)

    def fn(a, b):
        if a > 0:
            raise SecAggError(f"range {a}")

    with pytest.raises(SecAggError, match="range"):
        parallel.for_ranges(fn, 1000, 4)
    with pytest.raises(SecAggError, match="threads"):
        parallel.set_threads(0)
    split_small(None)
    monkeypatch.setenv("FEDOPT_SECAGG_THREADS", "two")
    with pytest.raises(SecAggError, match="FEDOPT_SECAGG_THREADS"):
        parallel.threads()
    monkeypatch.setenv("FEDOPT_SECAGG_THREADS", "2")
    assert parallel.threads() == 2


# -- Shamir ---------------------------------------------------------------------------------------


def test_shamir_any_t_of_n_and_not_t_minus_1():
    secret = b"\xff" * 32  # > 2^255 - 19: the field must be larger
    ids = [3, 7, 8, 11, 20, 21]
    t = 4
    sh = shamir.share(secret, t, ids)
    for subset in itertools.combinations(ids, t):
        assert shamir.reconstruct({x: sh[x] for x in subset}, t) == secret
    assert shamir.reconstruct(sh, t) == secret
    for subset in itertools.combinations(ids, t - 1):
        with pytest.raises(SecAggError, match="need 4"):
            shamir.reconstruct({x: sh[x] for x in subset}, t)
    # t-1 shares interpolated as if the threshold were t-1 give an unrelated value
    sub = {x: sh[x] for x in ids[: t - 1]}
    with pytest.raises(SecAggError, match="corrupted"):
        shamir.reconstruct(sub, t - 1)


def test_shamir_errors_and_encoding():
    with pytest.raises(SecAggError, match="duplicate"):
        shamir.share(b"x", 2, [1, 2, 2])
    with pytest.raises(SecAggError):
        shamir.share(b"x", 4, [1, 2, 3])
    with pytest.raises(SecAggError):
        shamir.share(b"x", 1, [0, 1])
    with pytest.raises(SecAggError):
        shamir.share(b"x" * 33, 1, [1])
    sh = shamir.share(os.urandom(32), 2, [1, 2, 3])
    assert all(shamir.decode_share(shamir.encode_share(v)) == v for v in sh.values())
    assert len(shamir.encode_share(sh[1])) == shamir.SHARE_BYTES
    with pytest.raises(SecAggError):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)
    sh[1] = int.from_bytes(os.urandom(64), "big") % shamir.PRIME  # garbage is detected (w.h.p.)
    with pytest.raises(SecAggError, match="corrupted"):
        shamir.reconstruct({1: sh[1], 2: sh[2]}, 2)


# -- quantisation ---------------------------------------------------------------------------------


def test_quantise_error_bound_and_sum_bound():
    cfg = quantize.QuantConfig(clip=2.0, bits=12)
    rng = np.random.default_rng(0)
    n, m = 20, 5000
    xs = [rng.normal(0, 0.01, m) for _ in range(n)]
    encs = [quantize.encode_update(x, cfg, rng) for x in xs]
    for x, e in zip(xs, encs):
        assert not e.clipped
        back, _ = quantize.decode_sum(e.vector, cfg)
        assert np.max(np.abs(back - x)) < cfg.step  # one step per coordinate per client
    total = masking.sum_vectors(e.vector for e in encs)
    back, w = quantize.decode_sum(total, cfg)
    assert w is None
    err = np.abs(back - np.sum(xs, axis=0))
    assert np.max(err) < n * cfg.step
    assert abs(np.mean(back - np.sum(xs, axis=0))) < 0.05 * cfg.step * math.sqrt(n)  # unbiased


@pytest.mark.parametrize("bits,modulus", [(16, 32), (24, 64)])
def test_stochastic_rounding_is_unbiased(bits, modulus):
    """A value 0.3 or -1.7 steps rounds up with probability 0.3: the keystream noise is uniform on [0, 1)."""
    cfg = quantize.QuantConfig(clip=1e3, bits=bits, modulus_bits=modulus)
    m = 200_000
    for frac in (0.3, -1.7):
        q = quantize.encode_update(np.full(m, frac * cfg.step), cfg, os.urandom(32)).vector
        q = q.view(np.int32 if modulus == 32 else np.int64)
        assert set(np.unique(q)) == {math.floor(frac), math.floor(frac) + 1}
        assert np.mean(q) == pytest.approx(frac, abs=4 * 0.5 / math.sqrt(m))


def test_quantise_clips_l2_and_reports():
    cfg = quantize.QuantConfig(clip=1.0, bits=16, modulus_bits=64)
    x = np.full(100, 1.0)  # norm 10
    e = quantize.encode_update(x, cfg, np.random.default_rng(1))
    assert e.clipped and e.norm == pytest.approx(10.0) and e.vector.dtype == np.uint64
    back, _ = quantize.decode_sum(e.vector, cfg)
    assert np.linalg.norm(back) == pytest.approx(1.0, abs=10 * cfg.step)
    neg = quantize.encode_update(-x / 20, cfg, np.random.default_rng(1))
    assert not neg.clipped
    assert quantize.clip_fraction([e, neg]) == 0.5 and quantize.clip_fraction([]) == 0.0
    # |x_i| = c exactly: stays within +-(2^(b-1) - 1), no one-ulp overshoot
    edge = quantize.encode_update(np.array([-1.0, 0.0]), cfg, np.random.default_rng(1))
    assert np.all(np.abs(edge.vector.view(np.int64)) <= (1 << 15) - 1)
    assert np.all(quantize.decode_sum(neg.vector, cfg)[0] < 0)


def test_quantise_weighted_mean():
    cfg = quantize.QuantConfig(clip=1.0, bits=16, max_weight=1000)
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-0.05, 0.05, 50) for _ in range(4)]
    ws = [10, 200, 0, 1000]
    encs = [quantize.encode_update(x, cfg, rng, weight=w) for x, w in zip(xs, ws)]
    assert encs[0].vector.size == cfg.vector_length(50) == 51
    mean, total_w = quantize.decode_sum(masking.sum_vectors(e.vector for e in encs), cfg, count=len(encs))
    exact = sum(w * x for w, x in zip(ws, xs)) / sum(ws)
    assert total_w == sum(ws)
    # w * q is exact: the weighted mean of per-client rounding errors stays under one step, for small weights too
    assert np.max(np.abs(mean - exact)) < cfg.step
    with pytest.raises(SecAggError):
        quantize.encode_update(xs[0], cfg, rng)  # weight missing
    with pytest.raises(SecAggError):
        quantize.encode_update(xs[0], cfg, rng, weight=-1)
    # a count above the public cap is clamped to it: the weight folded in never exceeds W
    big = quantize.encode_update(xs[0], cfg, rng, weight=2**40)
    assert int(big.vector[-1]) == cfg.max_weight


def test_decode_sum_refuses_a_sum_out_of_honest_bounds():
    cfg = quantize.QuantConfig(clip=1.0, bits=8, max_weight=10)
    rng = np.random.default_rng(0)
    honest = [quantize.encode_update(rng.uniform(-1, 1, 20), cfg, rng, weight=10) for _ in range(3)]
    total = masking.sum_vectors(e.vector for e in honest)
    quantize.decode_sum(total, cfg, count=3)
    hostile = np.zeros(21, dtype=np.uint32)
    hostile[0] = 10 * 127 * 50  # far beyond what weight 0 allows
    with pytest.raises(SecAggError, match="range"):
        quantize.decode_sum(total + hostile, cfg, count=4)
    hostile[:] = 0
    hostile[-1] = 1000  # a weight over the cap
    with pytest.raises(SecAggError, match="cap"):
        quantize.decode_sum(total + hostile, cfg, count=4)
    unweighted = quantize.QuantConfig(clip=1.0, bits=8)
    with pytest.raises(SecAggError, match="range"):
        quantize.decode_sum(np.full(5, 128 * 2, dtype=np.uint32), unweighted, count=2)


def test_no_wrap_check():
    cfg = quantize.QuantConfig(clip=1.0, bits=16)
    quantize.check_capacity(cfg, 65538)  # 65538 * 32767 < 2^31
    with pytest.raises(SecAggError, match="too small"):
        quantize.check_capacity(cfg, 65539)
    # weighted: the public cap W multiplies every word, claims play no part
    quantize.check_capacity(quantize.QuantConfig(clip=1.0, bits=16, max_weight=655), 100)
    with pytest.raises(SecAggError, match="too small"):
        quantize.check_capacity(quantize.QuantConfig(clip=1.0, bits=16, max_weight=1_000_000), 1)
    quantize.check_capacity(quantize.QuantConfig(clip=1.0, bits=16, modulus_bits=64, max_weight=1_000_000), 100_000)
    quantize.check_capacity(quantize.QuantConfig(clip=1.0, bits=16, modulus_bits=64), 1 << 20)
    with pytest.raises(SecAggError, match="weight"):
        quantize.check_capacity(quantize.QuantConfig(clip=1.0, bits=8, max_weight=1 << 28), 16)


@pytest.mark.parametrize("kw", [dict(clip=0.0), dict(clip=-1.0), dict(clip=float("nan")),
                                dict(clip=1.0, bits=1), dict(clip=1.0, modulus_bits=18),
                                dict(clip=1.0, modulus_bits=12),  # narrower than bits
                                dict(clip=1.0, max_weight=0)])
def test_quant_config_validated(kw):
    with pytest.raises(SecAggError):
        quantize.QuantConfig(**kw)


def test_quantise_rejects_nan():
    with pytest.raises(SecAggError, match="NaN"):
        quantize.encode_update(np.array([1.0, np.nan]), quantize.QuantConfig(clip=1.0),
                               np.random.default_rng(0))


# -- graph ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(10, 4), (100, 14), (12, 5), (7, 6)])
def test_graph_regular_symmetric_deterministic(n, k):
    ids = [f"c{i:03d}" for i in range(n)]
    seed = os.urandom(32)
    g = graph.neighbour_graph(ids, k, seed)
    assert g == graph.neighbour_graph(list(reversed(ids)), k, seed)
    for u, nb in g.items():
        assert len(nb) == k and u not in nb
        assert all(u in g[v] for v in nb)
    if k < n - 1:
        assert g != graph.neighbour_graph(ids, k, os.urandom(32))


def test_graph_defaults_and_errors():
    assert graph.default_neighbours(3) == 2
    assert graph.default_neighbours(100) == 14
    assert graph.default_threshold(14) == 8 and graph.default_threshold(2) == 2
    for n in range(2, 2000, 37):
        k = graph.default_neighbours(n)
        graph.neighbour_graph([str(i) for i in range(n)], k, bytes(32))  # always constructible
    with pytest.raises(SecAggError):
        graph.neighbour_graph(["a", "b", "c", "d", "e"], 3, bytes(32))
    with pytest.raises(SecAggError):
        graph.neighbour_graph(["a", "a", "b"], 1, bytes(32))


# -- masking --------------------------------------------------------------------------------------


def test_pairwise_masks_cancel():
    m = 1000
    ids = ["a", "b", "c"]
    seeds = {frozenset(p): os.urandom(32) for p in itertools.combinations(ids, 2)}
    xs = {u: np.arange(m, dtype=np.uint32) * (i + 1) for i, u in enumerate(ids)}
    selfs = {u: os.urandom(32) for u in ids}
    ys = [masking.mask_input(xs[u], u, selfs[u], {v: seeds[frozenset((u, v))] for v in ids if v != u})
          for u in ids]
    total = masking.unmask_sum(masking.sum_vectors(ys), selfs.values(), [])
    assert np.array_equal(total, masking.sum_vectors(xs.values()))


def test_public_api_is_explicit():
    assert sorted(secagg.__all__) == secagg.__all__
    for name in secagg.__all__:
        assert hasattr(secagg, name)


# ---- narrow moduli: masked vectors packed at k bits a value ------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 12, 16, 20, 24, 28])
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_packed_words_round_trip_at_every_width(bits, n):
    from fedopt.secagg import codec
    from fedopt.secagg.messages import MaskedInput

    rng = np.random.default_rng(bits * 1000 + n)
    v = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    packed = codec.pack_words(v, bits)
    assert packed.nbytes == (n + 1) // 2 * bits // 4  # k bits a value, an odd count padded by one value
    low = v & np.uint32((1 << bits) - 1)
    assert np.array_equal(codec.unpack_words(packed.tobytes(), n, bits), low)
    msg = codec.unpack(codec.pack(MaskedInput(3, "a", low, bits)))
    assert msg.bits == bits and msg.vector.dtype == np.uint32 and np.array_equal(msg.vector, low)


def test_malformed_packed_frames_are_refused():
    from fedopt.errors import WireError
    from fedopt.secagg import codec

    v = np.arange(5, dtype=np.uint32)
    good = codec.pack_words(v, 20).tobytes()
    assert len(good) == 3 * 5  # three pairs of 20-bit values
    for buf in (good[:-1], good + b"\0", b""):  # one byte short, one over, none
        with pytest.raises(WireError, match="bytes"):
            codec.unpack_words(buf, 5, 20)
    bad = bytearray(good)
    bad[-1] = 0xFF  # the high half of the last pair is the padding value of an odd-length vector: it must be 0
    with pytest.raises(WireError, match="padding"):
        codec.unpack_words(bytes(bad), 5, 20)
    body = {"kind": "masked", "round": 1, "sender": "a", "dtype": "uint32", "length": 5}
    for bits in (18, 32, 64, 0, -4, True):
        with pytest.raises(WireError):
            codec.decode({**body, "bits": bits}, [good])
    with pytest.raises(WireError):
        codec.decode({**body, "dtype": "uint64", "bits": 20}, [good])


def test_the_narrowest_modulus_that_cannot_wrap_is_chosen_and_sums_decode_exactly():
    """Rounds of n clients at 16 bits take the narrowest k with n*T < 2^(k-1); the masked protocol sums mod 2^k and
    decodes the same integers as the plain sum, negative coordinates included."""
    from fedopt.aggregators.secure import SecureAggregator, round_encoding

    agg = SecureAggregator(clip=1.0, bits=16, weighting="uniform")
    sizes = (2, 16, 17, 256, 257, 4096, 4097)  # n * 32767 < 2^19 up to 16 clients, < 2^23 up to 256, < 2^27 to 4096
    assert [round_encoding(agg, n).modulus_bits for n in sizes] == [20, 20, 24, 24, 28, 28, 32]
    cfg = round_encoding(agg, 15)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, 64) / 8 for _ in range(15)]
    xs[0][:4] = [1.0, -1.0, 0.5, -0.5]
    encs = [quantize.encode_update(x, cfg, bytes([i]) * 32).vector for i, x in enumerate(xs)]
    plain = np.sum([e.view(np.int32).astype(np.int64) for e in encs], axis=0)
    total = quantize.residue(np.sum(np.stack(encs), axis=0, dtype=np.uint32), cfg.modulus_bits)
    assert int(total.max()) < 1 << 20
    decoded, _ = quantize.decode_sum(total, cfg, count=15)
    assert np.array_equal(decoded * cfg.scale, plain.astype(np.float64))
