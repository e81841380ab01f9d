"""Distributed DP inside SecAgg+ (``--dp distributed``): the clients' Skellam noise (its summed variance, added before
masking, never a noiseless sum), the no-wrap bound, the minimum of survivors, the accountant's two published bounds
against dp_accounting where they must agree, the config, and runs in process and over the bus. Every random draw is
seeded; statistical bounds are many standard errors wide."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest

from _bus import BASE, Cluster, wait_for
from clients.simulation.run import simulate
from fedopt.aggregators.secure import SecureAggregator, round_encoding
from fedopt.config import RunConfig
from fedopt.errors import ConfigError, SecAggError
from fedopt.keys import generate_keys
from fedopt.privacy import SkellamAccountant, default_min_clients
from fedopt.privacy.distributed import ORDERS, poisson_subsampled_rdp, skellam_rdp
from fedopt.secagg import (DistributedNoise, MemoryTransport, QuantConfig, RoundConfig, SecAggClient, SecAggDriver,
                           check_capacity, generate_identity, identity_public_bytes)
from fedopt.secagg.skellam import UniformStream, skellam
from fedopt.testing import Fault

P = 20_000  # words per update: the variance of 20,000 draws is known to about 1%


def _round(n: int, noise: DistributedNoise, bits: int = 12):
    """One SecAgg+ round of ``n`` clients that add ``noise``; the clients' clean encodings are caught before noise."""
    ids = [f"c{i}" for i in range(n)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    quant = QuantConfig(clip=1.0, bits=bits, noise_bound=noise.tail_bound(n, bits, P), min_inputs=noise.min_clients)
    check_capacity(quant, n)
    cfg = RoundConfig.create(1, ids, quant.vector_length(P))
    clean: dict[str, np.ndarray] = {}
    clients = {}
    for u in ids:
        clients[u] = SecAggClient(u, idents[u], pinned, noise=lambda r, u=u: u.encode().ljust(32, b"."))
        clients[u].dp_noise = noise
        clients[u].on_encoded = lambda r, v, u=u: clean.__setitem__(u, v.copy())
    transport = MemoryTransport(clients)
    driver = SecAggDriver(cfg, quant, transport.send, identities=pinned)
    driver.start()
    transport.pump(driver)
    return ids, quant, transport, driver, clean


def test_summed_client_noise_has_the_configured_variance_and_the_sum_is_never_noiseless():
    noise = DistributedNoise(noise_multiplier=0.5, min_clients=6)
    ids, quant, transport, driver, clean = _round(8, noise)
    rng = np.random.default_rng(7)
    for u in ids[:7]:  # c7 drops after sharing keys: 7 survivors carry 7 shares
        transport.provide_update(u, rng.normal(0, 0.004, P).astype(np.float32), 1)
        transport.deliver(driver)
    driver.close_stage()
    transport.pump(driver)
    out = driver.outcome
    assert out.survivors == tuple(ids[:7])
    # what the coordinator learns, minus the survivors' clipped quantised updates: the clients' noise alone
    total = out.total.view(np.int32).astype(np.int64)
    noise_sum = total - np.sum([clean[u].view(np.int32).astype(np.int64) for u in out.survivors], axis=0)
    var = 2 * 7 * noise.client_lambda(quant.bits, P)  # Sk(7 λ_c)
    l2 = DistributedNoise.sensitivity(quant.bits, P)[1]
    assert var == pytest.approx((noise.noise_multiplier * l2) ** 2 * 7 / 6)  # (z Δ₂)² for t = 6, times 7/6
    assert np.var(noise_sum) == pytest.approx(var, rel=0.05)  # standard error 1%
    assert abs(np.mean(noise_sum)) < 5 * math.sqrt(var / P)
    assert np.abs(noise_sum).max() < quant.noise_bound  # within the range reserved for it: no wrap
    # the noise came with the masked inputs: every survivor's own contribution carries its share (seeded by its id)
    assert not np.array_equal(total, np.sum([clean[u].view(np.int32) for u in out.survivors], axis=0))


def test_too_few_survivors_abort_before_anything_is_unmasked():
    noise = DistributedNoise(noise_multiplier=0.5, min_clients=6)
    ids, quant, transport, driver, _ = _round(8, noise)
    for u in ids[:5]:
        transport.provide_update(u, np.zeros(P, dtype=np.float32), 1)
        transport.deliver(driver)
    with pytest.raises(SecAggError, match="fewer than the 6 whose noise distributed DP plans for"):
        driver.close_stage()
    assert driver.outcome is None
    agg = SecureAggregator(clip=1.0, bits=16, weighting="uniform", dp_noise=noise)
    with pytest.raises(SecAggError, match="5 participants, fewer than the 6"):
        round_encoding(agg, 5, None, P)


def test_the_width_reserves_a_tail_bound_on_the_noise():
    noise = DistributedNoise(noise_multiplier=1.0, min_clients=2)
    b = noise.tail_bound(100, 16, 10_000)
    sd = math.sqrt(2 * 100 * noise.client_lambda(16, 10_000))
    assert 7 * sd < b < 12 * sd  # Bennett with a union over 10^4 words at 2^-40: about 9.4 standard deviations
    ok = QuantConfig(clip=1.0, bits=16, noise_bound=b)
    check_capacity(ok, 100)
    wide = QuantConfig(clip=1.0, bits=16, noise_bound=(1 << 31) - 100 * 32767)
    with pytest.raises(SecAggError, match=r"\+ .* \(noise\) would wrap"):
        check_capacity(wide, 100)
    agg = SecureAggregator(clip=1.0, bits=24, weighting="uniform", dp_noise=noise)
    # 200 x 24-bit words fit in 32 bits (1.7e9 < 2^31), not with the noise's 7e8 on top: 64-bit words
    assert round_encoding(agg, 200, None, 10_000).modulus_bits == 64
    assert round_encoding(SecureAggregator(clip=1.0, bits=24, weighting="uniform"), 200).modulus_bits == 32
    rng = UniformStream(bytes(32))
    draws = skellam(noise.client_lambda(16, 10_000) * 100, 200_000, rng)
    assert np.abs(draws).max() < b and np.std(draws) == pytest.approx(sd, rel=0.02)


def test_noise_the_sampler_cannot_draw_exactly_is_refused_not_drawn_wrong():
    """λ beyond 2^36 (PTRS's float64 acceptance test loses accuracy; variates near int64's range) is refused: by the
    sampler a client runs (a coordinator cannot make it add wrong noise) and by the run's configuration, naming --bits."""
    from fedopt.secagg.skellam import MAX_LAMBDA, poisson

    assert poisson(MAX_LAMBDA, 4, UniformStream(bytes(32))).min() > 0
    for lam in (MAX_LAMBDA * 2, 5e22, float("inf"), -1.0):
        with pytest.raises(SecAggError, match="Poisson parameter"):
            poisson(lam, 4, UniformStream(bytes(32)))
    cfg = RunConfig.of(**{**DDP, "task": "digits", "clients": 20, "clients_per_round": 10, "bits": 40})
    with pytest.raises(ConfigError, match="lower --bits"):
        simulate(cfg)


def test_a_round_that_samples_no_client_aborts_and_an_unreachable_minimum_is_refused(tmp_path):
    """Poisson sampling of 1 in 20: some rounds draw no client; each such round aborts (model unchanged, counted in
    the ledger) instead of ending the run. A --dp-min-clients above the population could never be met: refused."""
    run = {**RUN, "clients": 20, "clients_per_round": 1, "rounds": 6, "dp_min_clients": 2}
    out = simulate(RunConfig.of(**run, out=str(tmp_path / "a")))
    assert [r["round"] for r in out.records] == list(range(1, 7))
    assert any(r["selected"] == 0 and r["clients"] == 0 for r in out.records)
    assert [r["epsilon"] for r in out.records] == sorted(r["epsilon"] for r in out.records)  # every round counted
    with pytest.raises(ConfigError, match="more than the 20 clients"):
        simulate(RunConfig.of(**{**run, "dp_min_clients": 21}, out=str(tmp_path / "b")))


# ---- the accountant: the two published bounds, checked where dp_accounting can check them ---------------------------
def _gaussian_rdp(q: float, z: float) -> np.ndarray:
    acc = dpa.rdp.RdpAccountant(orders=list(ORDERS))
    event = dpa.GaussianDpEvent(z) if q == 1 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    return acc.compose(event).rdp


def test_skellam_rdp_tends_to_dp_accountings_gaussian_as_the_scale_grows():
    z, dim = 0.9, 10_000
    gap = []
    for bits in (8, 16, 24, 32):
        l1, l2 = DistributedNoise.sensitivity(bits, dim)
        ours = skellam_rdp(ORDERS, l1, l2, (z * l2) ** 2 / 2)
        ref = _gaussian_rdp(1.0, z)
        assert np.all(ours >= ref)  # the Skellam bound is the Gaussian's plus a positive term
        gap.append(float(np.max(ours / ref - 1)))
    assert gap[0] > gap[1] > gap[2] >= 0 and gap[0] > 1e-5 and gap[-1] < 1e-12
    # and ε of 50 unsampled releases: the Skellam accountant at 32 bits is dp_accounting's Gaussian
    acc = SkellamAccountant(population=100, per_round=100, noise_multiplier=z, bits=32, dim=dim, delta=1e-5)
    ref = dpa.rdp.RdpAccountant(orders=list(ORDERS)).compose(dpa.GaussianDpEvent(z), 50).get_epsilon(1e-5)
    assert acc.epsilon(50) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("q, z", [(0.01, 1.1), (0.1, 0.8)])
def test_the_subsampling_bound_is_dp_accountings_for_the_gaussian_with_factor_one(q, z):
    tight = poisson_subsampled_rdp(q, lambda a: a / (2 * z * z), ORDERS, factor=1.0)
    assert tight == pytest.approx(_gaussian_rdp(q, z), rel=1e-6)
    general = poisson_subsampled_rdp(q, lambda a: a / (2 * z * z), ORDERS)
    assert np.all(general >= tight - 1e-12)


def test_distributed_epsilon_is_a_little_above_central_at_the_same_noise():
    """The general subsampling bound and the rounding inflation cost ε; the figure the README quotes."""
    dd = SkellamAccountant(population=10_000, per_round=100, noise_multiplier=1.0, bits=16, dim=10_000, delta=1e-5)
    central = dpa.rdp.RdpAccountant().compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 1000)).get_epsilon(1e-5)
    assert central < dd.epsilon(1000) < 1.25 * central
    again = SkellamAccountant.from_state(dd.state())
    assert again.epsilon(1000) == dd.epsilon(1000)


# ---- config ---------------------------------------------------------------------------------------------------------
DDP = dict(dp="distributed", noise_multiplier=1.0, dp_clip_norm=1.0, aggregator="secagg", client_sampling="poisson")


@pytest.mark.parametrize("flat, match", [
    ({**DDP, "aggregator": "fedavg"}, "--dp distributed does not combine with --aggregator fedavg"),
    ({**DDP, "client_sampling": "fixed"}, "give --client-sampling poisson"),
    ({**DDP, "clip": 2.0}, "the clip is --dp-clip-norm"),
    ({**DDP, "buffer_size": 2, "client_sampling": "fixed"}, "--dp distributed does not combine with"),
    ({**DDP, "adaptive_clip": 0.5}, "--dp distributed does not combine with --adaptive-clip"),
    ({**DDP, "dp_clip_norm": None}, "--dp distributed needs --dp-clip-norm C"),
    ({**DDP, "dp_min_clients": 0}, "--dp-min-clients must be an integer >= 1"),
    (dict(dp="central", noise_multiplier=1.0, dp_clip_norm=1.0, dp_min_clients=3), "applies to --dp distributed"),
])
def test_config_errors_name_the_flag(flat, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.of(**flat)


def test_welcome_settings_round_trip_and_are_validated():
    noise = DistributedNoise(1.5, 80)
    assert DistributedNoise.from_dict(noise.to_dict()) == noise
    for bad in ({"noise_multiplier": -1, "min_clients": 3}, {"noise_multiplier": 1.0}, {"noise_multiplier": True,
                                                                                         "min_clients": 3},
                {"noise_multiplier": 1.0, "min_clients": 2.5}, [1, 2]):
        with pytest.raises(SecAggError):
            DistributedNoise.from_dict(bad)
    assert default_min_clients(100) == 80 and default_min_clients(3) == 2


# ---- runs -----------------------------------------------------------------------------------------------------------
RUN = {**DDP, **dict(task="digits", clients=40, clients_per_round=12, rounds=3, lr=0.1, progress="off", plot=False,
                     seed=3, device="cpu", noise_multiplier=0.8)}


def test_a_simulated_run_reports_the_skellam_epsilon_and_is_reproducible(tmp_path):
    a = simulate(RunConfig.of(**RUN, out=str(tmp_path / "a")))
    b = simulate(RunConfig.of(**RUN, out=str(tmp_path / "b")))
    assert np.array_equal(a.global_vec.numpy(), b.global_vec.numpy())
    bits = a.records[0]["dp_bits"]  # without --bits: the finest quantisation whose planned rounds fit 20-bit words
    assert 2 <= bits < 16 and all(r["dp_bits"] == bits for r in a.records)
    acc = SkellamAccountant(population=40, per_round=12, noise_multiplier=0.8, bits=bits, dim=a.spec.size)
    assert [r["epsilon"] for r in a.records] == [acc.epsilon(k) for k in (1, 2, 3)]
    assert all(r["dp_min_clients"] == default_min_clients(12) for r in a.records)
    other = simulate(RunConfig.of(**{**RUN, "noise_multiplier": 0.4}, out=str(tmp_path / "c")))
    assert not np.array_equal(a.global_vec.numpy(), other.global_vec.numpy())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_over_the_bus_the_clients_add_the_noise(tmp_path):
    """4 client processes: the coordinator's sum minus the survivors' own clean encodings (Fault.SECAGG_DUMP) is noise
    of the planned variance, so the noise was added client-side and the coordinator never held a noiseless sum."""
    keys = str(generate_keys(tmp_path / "keys", 4))
    dump = tmp_path / "dump"
    c = Cluster(tmp_path, keys)
    seam = {Fault.SECAGG_DUMP: dump}
    z, t = 0.5, 2
    try:
        c.start_coordinator(*BASE, "--aggregator", "secagg", "--clients", "4", "--clients-per-round", "4",
                            "--client-sampling", "poisson", "--rounds", "2", "--dp", "distributed",
                            "--noise-multiplier", str(z), "--dp-clip-norm", "1", "--dp-min-clients", str(t),
                            "--join-timeout", "20", "--deadline", "40", "--seed", "1", faults=seam)
        for i in range(4):
            c.start_client(i, faults=seam)
        wait_for(lambda: c.coordinator.poll() is not None, 200, "the coordinator to finish")
        assert c.coordinator.returncode == 0, c.log()[-3000:]
    finally:
        c.stop()
    rows = c.rounds()
    assert [r["round"] for r in rows] == [1, 2] and all(r["epsilon"] > 0 for r in rows)
    assert "privacy" in c.log() and "skellam" in c.log()  # the end-of-run summary line
    import json

    meta = json.loads((dump / "sum-1.json").read_text())
    bits = meta["modulus_bits"]
    assert bits <= 20  # the round's values travel packed at k bits (the quantisation chosen to fit 20-bit words)
    total = np.load(dump / "sum-1.npy").astype(np.int64)
    own = [np.load(dump / f"encoded-1-{u}.npy").view(np.int32).astype(np.int64) for u in meta["survivors"]]
    half = 1 << (bits - 1)
    noise = (((total - np.sum(own, axis=0)) & ((1 << bits) - 1)) ^ half) - half  # mod 2^k, sign-extended
    k, dim = len(meta["survivors"]), total.size
    var = 2 * k * DistributedNoise(z, t).client_lambda(rows[0]["dp_bits"], dim)
    assert np.var(noise) == pytest.approx(var, rel=0.1)  # about 1,500 words of noise: standard error 4%
