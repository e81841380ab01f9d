"""Client-level differential privacy (fedopt.privacy): the accountant against dp_accounting used directly, the
noise, the clip, adaptive clipping, calibration, the ledger across a checkpoint, config errors, and DP runs end to
end. Every random draw is seeded; statistical bounds are many standard errors wide."""

from __future__ import annotations

import dataclasses
import math
import sys

import dp_accounting as dpa
import numpy as np
import pytest
import torch

from clients.simulation.run import Simulation, simulate
from fedopt.aggregators import Update, mean
from fedopt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedopt.cli import main
from fedopt.config import RunConfig
from fedopt.config.sections import Bounds
from fedopt.engine import Engine, RoundServer
from fedopt.errors import ConfigError, RoundError
from fedopt.metrics import read_metrics
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.privacy import (Accountant, AdaptiveClip, CentralDP, calibrate, clip_update, default_delta, noise_seed,
                            secure_normal)
from fedopt.task import TrainConfig, resolve_task

NR = dpa.NeighboringRelation


def reference_epsilon(kind: str, event, delta: float, relation=NR.ADD_OR_REMOVE_ONE) -> float:
    """ε of ``event`` from a fresh dp_accounting accountant: the independent computation."""
    acc = dpa.rdp.RdpAccountant(neighboring_relation=relation) if kind == "rdp" else dpa.pld.PLDAccountant(relation)
    return acc.compose(event).get_epsilon(delta)


def poisson_event(q: float, z: float, rounds: int):
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)


# ---- (a) the accountant is dp_accounting's ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("population, per_round, z, rounds", [
    (10_000, 100, 1.1, 1000),  # q = 0.01
    (1_000, 100, 0.8, 100),  # q = 0.1
])
def test_poisson_epsilon_matches_dp_accounting(kind, population, per_round, z, rounds):
    acc = Accountant(kind, "poisson", population=population, per_round=per_round, noise_multiplier=z, delta=1e-5)
    acc.step(rounds)
    ours = acc.epsilon()
    ref = reference_epsilon(kind, poisson_event(per_round / population, z, rounds), 1e-5)
    assert ours == pytest.approx(ref, rel=0.01)
    assert acc.q == per_round / population


def test_fixed_size_epsilon_matches_dp_accounting_with_replace_one():
    # 20 of 1000 clients without replacement: neighbours replace one client, which moves the clipped sum by up to
    # 2C, and dp_accounting reads a REPLACE_ONE multiplier as noise over sensitivity: the ledger holds z/2
    acc = Accountant("rdp", "fixed", population=1000, per_round=20, noise_multiplier=1.0, delta=1e-5)
    acc.step(200)
    event = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(1000, 20, dpa.GaussianDpEvent(0.5)), 200)
    ref = reference_epsilon("rdp", event, 1e-5, NR.REPLACE_ONE)
    assert acc.epsilon() == pytest.approx(ref, rel=0.01)
    assert acc.event(200) == event


def test_the_replace_one_convention_the_accountant_relies_on():
    """With every client sampled, dp_accounting's REPLACE_ONE Gaussian of multiplier s is the plain Gaussian of
    multiplier s (noise over sensitivity). If a release changes that, the z/2 in the ledger must be revisited."""
    s = 0.7
    full = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(50, 50, dpa.GaussianDpEvent(s)), 10)
    plain = dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), 10)
    assert reference_epsilon("rdp", full, 1e-5, NR.REPLACE_ONE) == pytest.approx(
        reference_epsilon("rdp", plain, 1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_pld_steps_match_a_fresh_composition():
    acc = Accountant("pld", "poisson", population=1000, per_round=100, noise_multiplier=0.8, delta=1e-5, rounds=97)
    seen = [acc.epsilon()]
    for _ in range(3):  # 98, 99, 100: each one more composition of the cached one-round PLD
        acc.step()
        seen.append(acc.epsilon())
    assert seen == sorted(seen) and len(set(seen)) == 4
    assert acc.would_exceed(seen[-1]) and not acc.would_exceed(acc.epsilon(101))
    assert seen[-1] == pytest.approx(reference_epsilon("pld", poisson_event(0.1, 0.8, 100), 1e-5), rel=1e-6)
    assert Accountant("rdp", "poisson", population=10, per_round=1, noise_multiplier=1.0).epsilon() == 0.0


def test_the_notes_table_emnist_like_setting():
    """docs: second-wave.md §2.2, computed with dp-accounting 0.6.0: 100 of 3,400 clients, z = 1, 1,500 rounds."""
    rdp = Accountant("rdp", "poisson", population=3400, per_round=100, noise_multiplier=1.0, delta=1e-5)
    pld = Accountant("pld", "poisson", population=3400, per_round=100, noise_multiplier=1.0, delta=1e-5)
    assert round(rdp.epsilon(1500), 2) == 8.16 and round(pld.epsilon(1500), 2) == 7.46


def test_default_delta_and_state_round_trip():
    assert default_delta(1000) == pytest.approx(1000 ** -1.1)
    acc = Accountant("rdp", "fixed", population=500, per_round=25, noise_multiplier=1.3)
    assert acc.delta == default_delta(500)
    acc.step(7)
    again = Accountant.from_state(acc.state())
    assert again.state() == acc.state() and again.epsilon() == acc.epsilon() and again.rounds == 7
    with pytest.raises(ConfigError, match="not valid"):
        Accountant.from_state({"kind": "rdp"})


# ---- (b) the noise -------------------------------------------------------------------------------------------------
def dp(population=100, per_round=10, z=1.3, clip=0.5, sampling="poisson", **kw) -> CentralDP:
    acc = Accountant("rdp", sampling, population=population, per_round=per_round, noise_multiplier=z, delta=1e-5)
    return CentralDP(mean(), acc, clip=clip, **kw)


def test_noise_of_a_round_without_updates_has_std_z_times_c():
    agg = dp(z=1.3, clip=0.5, seed=4)
    agg.begin(1, 200_000)
    out = agg.result()
    noise = out.delta * agg.expected  # the release is (0 + noise) / D
    # 200,000 draws: the standard error of the std is 0.16%, of the mean 0.0015
    assert noise.std().item() == pytest.approx(1.3 * 0.5, rel=0.02)
    assert abs(noise.mean().item()) < 0.01
    assert out.count == 0 and agg.accountant.rounds == 1
    assert agg.result() is out and agg.accountant.rounds == 1  # one release, counted once


def test_secure_noise_source_is_standard_normal():
    x = secure_normal(200_001)
    assert x.shape == (200_001,) and x.dtype == torch.float64
    assert abs(x.mean().item()) < 0.02 and x.std().item() == pytest.approx(1.0, rel=0.02)
    agg = dp(z=2.0, clip=1.0, noise_source="secure")
    agg.begin(1, 100_000)
    assert (agg.result().delta * agg.expected).std().item() == pytest.approx(2.0, rel=0.02)


def test_adaptive_clipping_splits_the_noise_as_the_paper_does():
    # D = 20 expected clients: σ_b = D/20 = 1, and z = 1.9 leaves z_Δ = (z^-2 - (2σ_b)^-2)^-1/2 ≈ 6.08 for the update
    agg = dp(population=200, per_round=20, z=1.9, clip=0.25, adaptive=AdaptiveClip(0.5), seed=1)
    z_delta = (1.9 ** -2 - 2.0 ** -2) ** -0.5
    assert agg.count_stddev == 1.0 and agg.update_multiplier == pytest.approx(z_delta)
    agg.begin(1, 200_000)
    assert (agg.result().delta * agg.expected).std().item() == pytest.approx(z_delta * 0.25, rel=0.02)
    with pytest.raises(ConfigError, match="--adaptive-clip.*2σ_b > --noise-multiplier 2"):
        dp(population=200, per_round=20, z=2.0, clip=0.25, adaptive=AdaptiveClip(0.5))


# ---- (c) the clip and the estimator --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_norms_never_exceed_c(dtype):
    g = torch.Generator().manual_seed(0)
    for size in (1, 7, 1000, 100_003):
        for scale in (1e-3, 0.3, 1.0, 17.0, 1e6):
            d = (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(dtype)
            for clip in (1e-2, 0.5, 1.0, 3.0):
                out, norm = clip_update(d, clip)
                assert norm == pytest.approx(float(d.double().norm()), rel=1e-12)
                assert float(out.double().norm()) <= clip
                if norm <= clip:
                    assert out is d
                else:
                    assert float(out.double().norm()) == pytest.approx(clip, rel=1e-5)
                    assert torch.allclose(out.double() / clip, d.double() / norm, atol=1e-6)


def test_a_round_is_the_clipped_sum_over_the_expected_count_plus_seeded_noise():
    agg = dp(population=50, per_round=5, z=0.9, clip=1.0, seed=11)
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(64, generator=g) * s for s in (0.01, 0.1, 3.0, 50.0)]  # two under C, two over
    agg.begin(7, 64)
    for i, d in enumerate(deltas):
        agg.add(Update(str(i), d, num_samples=10 ** i))  # sample counts play no part: weights are uniform
    out = agg.result()
    noise = torch.randn(64, generator=torch.Generator().manual_seed(noise_seed(11, 7)))
    expected = sum(d * min(1.0, 1.0 / float(d.norm())) for d in deltas)
    assert torch.allclose(out.delta * 5 - noise * 0.9, expected, atol=1e-5)
    assert out.count == 4 and agg.fields()["dp_clip"] == 1.0
    with pytest.raises(ConfigError, match="already released"):
        agg.add(Update("x", deltas[0], 1))
    with pytest.raises(ConfigError, match="elements"):
        agg.begin(8, 64)
        agg.add(Update("x", torch.zeros(3), 1))


def test_a_batch_of_rows_is_judged_and_clipped_as_one_update_at_a_time_is():
    """RoundServer.offer_rows (vmap's stacked deltas) with CentralDP.add_rows: the same updates refused (NaN, over the
    norm bound, a straggler's partial work), the same clipped sum and noise as offer() one by one."""

    def round_of(batched: bool):
        server = dp_server()
        server.bounds = Bounds(norm_factor=0, max_update_norm=40.0)
        server.plan(1, {str(i): 10 for i in range(6)})
        server.begin(1)
        g = torch.Generator().manual_seed(5)
        rows = torch.stack([torch.randn(server.spec.size, generator=g) * s for s in (0.01, 0.3, 2.0, 30.0, 1.0, 1.0)])
        rows[4, 0] = float("nan")
        rows[3] *= 10  # norm ~ 300: over the bound of 40
        ups = [Update(str(i), None if batched else rows[i], 10, {"loss": 0.5}, partial=(i == 5)) for i in range(6)]
        if batched:
            keep = server.offer_rows(ups, rows)
        else:
            keep = [i for i, u in enumerate(ups) if server.offer(u) is None]
        return keep, server.aggregator.result(), dict(server._rejected), server.norms

    (k1, a1, r1, n1), (k2, a2, r2, n2) = round_of(False), round_of(True)
    assert k1 == k2 == [0, 1, 2] and r1.keys() == r2.keys() == {"3", "4", "5"}
    assert all(r1[c].split()[0] == r2[c].split()[0] for c in r1)  # the same reasons
    assert torch.allclose(a1.delta, a2.delta, atol=1e-6) and a1.count == a2.count == 3
    assert n1 == pytest.approx(n2, rel=1e-6)


# ---- (d) adaptive clipping -----------------------------------------------------------------------------------------
def test_adaptive_clip_converges_to_the_target_quantile_of_lognormal_norms():
    """Norms ~ lognormal(0, 1): the median is 1, 10x the paper's C0 = 0.1. With the paper's defaults (η = 0.2,
    σ_b = D/20, 100 clients per round) the clip reaches the median and stays near it."""
    rng = np.random.default_rng(5)
    agg = dp(population=1000, per_round=100, z=1.0, clip=0.1, sampling="fixed", adaptive=AdaptiveClip(0.5), seed=2)
    clips, fractions = [], []
    for r in range(1, 151):
        agg.begin(r, 4)
        norms = rng.lognormal(0.0, 1.0, size=100)
        dirs = rng.standard_normal((100, 4))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        for i in range(100):
            agg.add(Update(str(i), torch.from_numpy(dirs[i] * norms[i]).float(), 1))
        clips.append(agg.clip)  # already the next round's clip
        agg.result()
        fractions.append(float(np.mean(norms <= agg.clip)))
    log_tail = np.log(clips[50:])
    assert abs(log_tail.mean()) < 0.15 and log_tail.std() < 0.15  # near log(median) = 0
    assert 0.4 <= float(np.mean(fractions[50:])) <= 0.6
    # the same ledger as a fixed clip: adaptive clipping changes the noise split, not ε
    assert agg.accountant.epsilon() == Accountant(**{**agg.accountant.state(), "rounds": 150}).epsilon()


def test_adaptive_clip_rule_is_geometric():
    a = AdaptiveClip(0.5, lr=0.2)
    assert a.next_clip(1.0, 0.5) == 1.0
    assert a.next_clip(1.0, 1.0) == pytest.approx(math.exp(-0.1))
    assert a.next_clip(2.0, 0.0) == pytest.approx(2.0 * math.exp(0.1))


# ---- (e) calibration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling, per_round", [("poisson", 50), ("fixed", 50)])
def test_calibrate_meets_the_target_within_a_small_margin(sampling, per_round):
    setting = dict(kind="rdp", sampling=sampling, population=1000, per_round=per_round, delta=1e-5)
    z = calibrate(2.0, 100, **setting)
    eps = Accountant(noise_multiplier=z, **setting).epsilon(100)
    assert eps <= 2.0 and eps >= 0.98 * 2.0
    assert Accountant(noise_multiplier=z * 0.99, **setting).epsilon(100) > 2.0  # no much smaller z would do


def test_calibrate_refuses_a_target_out_of_reach():
    with pytest.raises(ConfigError, match="--target-epsilon 1e-06 is out of reach in 100 rounds"):
        calibrate(1e-6, 100, population=1000, per_round=50, delta=1e-5)


# ---- (f) the ledger across a checkpoint ----------------------------------------------------------------------------
class _Updates:
    """An executor whose clients send seeded random updates (no training: the ledger is what is tested)."""

    def __init__(self, n: int, size: int) -> None:
        self.sizes = {str(i): 10 for i in range(n)}
        self.size = size

    def available(self, round, attempt):
        if attempt > 1:
            raise RoundError(f"round {round} was retried")
        return self.sizes

    def run_round(self, server, jobs):
        for job in jobs:
            g = torch.Generator().manual_seed(job.config.seed)
            server.offer(Update(job.client, torch.randn(self.size, generator=g), 10, {"loss": 1.0}))

    def fields(self, jobs, outcome):
        return {"bytes_up": 0, "bytes_down": 0}

    def close(self):
        pass


def dp_server(z: float = 1.0, **kw) -> RoundServer:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    spec = ParamSpec.from_module(model)
    acc = Accountant("rdp", "poisson", population=20, per_round=5, noise_multiplier=z, delta=1e-4)
    agg = CentralDP(mean(), acc, clip=0.5, seed=9, adaptive=AdaptiveClip(0.5, count_stddev=4.0), **kw)
    return RoundServer(spec, spec.flatten(model), agg, make_server_optimizer("fedavg"), TrainConfig(), per_round=5,
                       seed=9, sampling="poisson", population=20)


def test_resume_continues_the_ledger_and_the_clip(tmp_path):
    def checkpoint(server):
        return lambda r, state: save_checkpoint(tmp_path, Checkpoint(r, server.global_vec, {}, server.spec, state))

    whole = dp_server()
    Engine(whole, _Updates(20, 8), 6).run()

    first = dp_server()
    Engine(first, _Updates(20, 8), 3, checkpoint=checkpoint(first)).run()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state["privacy"]["accountant"]["rounds"] == 3
    second = dp_server()
    second.global_vec.copy_(ckpt.global_vec)
    second.restore(ckpt.state)
    assert second.privacy.accountant.epsilon() == first.privacy.accountant.epsilon() > 0
    assert second.privacy.clip == first.privacy.clip != 0.5  # adaptive: moved, and kept
    Engine(second, _Updates(20, 8), 6, start=4).run()
    assert second.privacy.accountant.rounds == 6
    assert second.privacy.accountant.epsilon() == whole.privacy.accountant.epsilon()
    assert torch.equal(second.global_vec, whole.global_vec)  # same noise, same cohorts, same clip

    with pytest.raises(ConfigError, match=r"--resume: .*noise_multiplier 1.0 -> 2.0"):
        dp_server(z=2.0).restore(ckpt.state)


def test_a_resume_without_the_ledger_never_restarts_the_budget(caplog):
    server = dp_server()
    Engine(server, _Updates(20, 8), 5, start=4).run()  # rounds 1-3 happened in a process whose ledger was lost
    assert server.privacy.accountant.rounds == 5
    assert "counting rounds 1-3 as released" in caplog.text


# ---- sampling ------------------------------------------------------------------------------------------------------
def test_poisson_sampling_includes_each_client_with_probability_q():
    server = dp_server()
    ids = [str(i) for i in range(20)]
    cohorts = [server.select(r, ids) for r in range(1, 2001)]
    assert cohorts == [server.select(r, ids) for r in range(1, 2001)]  # seeded
    sizes = [len(c) for c in cohorts]
    assert 0 in sizes and max(sizes) > 5  # the cohort size varies, and may be empty
    counts = {c: sum(c in k for k in cohorts) for c in ids}
    # each of 2000 draws with q = 0.25: mean 500, standard deviation 19.4
    assert all(400 < n < 600 for n in counts.values()), counts


def test_fixed_sampling_under_dp_draws_over_the_whole_population():
    server = dp_server()
    server.sampling = "fixed"
    ready = [str(i) for i in range(10)]  # half of the 20 clients are ready: each still has probability 5/20
    picks = [len(server.select(r, ready)) for r in range(1, 2001)]
    assert 2.3 < float(np.mean(picks)) < 2.7  # 5 * 10/20 = 2.5 expected; the standard error is 0.02
    server.population = 0  # without DP, the draw is among the candidates: always 5
    assert {len(server.select(r, ready)) for r in range(1, 50)} == {5}


def test_poisson_rounds_without_dp_are_not_retried_below_the_quorum():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    spec = ParamSpec.from_module(model)
    server = RoundServer(spec, spec.flatten(model), mean(), make_server_optimizer("fedavg"), TrainConfig(),
                         per_round=1, seed=9, sampling="poisson", population=20)
    assert not server.retryable and server.privacy is None
    empty = next(r for r in range(1, 500) if not server.select(r, [str(i) for i in range(20)]))
    rec = Engine(server, _Updates(20, 8), empty, start=empty, min_clients=1).run()[-1]
    assert rec["clients"] == 0 and rec["attempts"] == 1


def test_empty_rounds_still_release_and_dp_rounds_are_not_retried():
    server = dp_server()
    assert not server.retryable
    empty = next(r for r in range(1, 5001) if not server.select(r, [str(i) for i in range(20)]))
    rec = Engine(server, _Updates(20, 8), empty, start=empty).run()[-1]
    assert rec["clients"] == 0 and server.privacy.accountant.rounds == empty
    with pytest.raises(ConfigError, match="cannot merge"):
        server.begin(empty + 1)
        server.merge(torch.zeros(server.spec.size), 1.0, 1)


# ---- (g) config and command-line errors name the flag ---------------------------------------------------------------
DP = dict(dp="central", noise_multiplier=1.0, dp_clip_norm=1.0)


@pytest.mark.parametrize("flat, match", [
    (dict(dp="local"), "--dp must be one of central"),
    (dict(dp="central", dp_clip_norm=1.0), "--dp central needs --noise-multiplier Z or --target-epsilon"),
    (dict(dp="central", noise_multiplier=1.0), "--dp central needs --dp-clip-norm C .* or --adaptive-clip"),
    ({**DP, "noise_multiplier": -1.0}, "--noise-multiplier must be a number > 0"),
    ({**DP, "dp_clip_norm": 0.0}, "--dp-clip-norm must be a number > 0"),
    ({**DP, "adaptive_clip": 1.5}, r"--adaptive-clip must be a quantile in \(0, 1\)"),
    ({**DP, "target_epsilon": 0}, "--target-epsilon must be a number > 0"),
    ({**DP, "delta": 1.0}, r"--delta must be in \(0, 1\)"),
    ({**DP, "accountant": "prv"}, "--accountant must be one of rdp, pld"),
    ({**DP, "accountant": "pld"}, "--accountant pld supports --client-sampling poisson only"),
    ({**DP, "noise_source": "dev"}, "--noise-source must be one of seeded, secure"),
    ({**DP, "aggregator": "median"}, "use --aggregator fedavg or mean, not 'median'"),
    ({**DP, "aggregator": "secagg"}, "--dp central does not combine with --aggregator secagg"),
    ({**DP, "buffer_size": 2, "aggregator": "secagg"}, "--dp central does not combine with --aggregator secagg"),
    ({**DP, "mode": "gossip"}, "--dp central does not combine with --mode gossip"),
    ({**DP, "algorithm": "scaffold"}, "--dp central does not combine with --algorithm scaffold"),
    (dict(noise_multiplier=1.0, delta=1e-5), "--noise-multiplier, --delta apply to differentially private runs: "
                                             "give --dp central"),
    (dict(client_sampling="bernoulli"), "--client-sampling must be one of fixed, poisson"),
    (dict(client_sampling="poisson", buffer_size=2), "--buffer-size .* does not combine with --client-sampling"),
])
def test_config_errors_name_the_flag(flat, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.of(**flat)


def test_a_missing_dp_extra_is_one_config_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # `import dp_accounting` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fedopt\[dp\]'"):
        Accountant("rdp", "poisson", population=10, per_round=2, noise_multiplier=1.0)
    rc = main(["simulate", "--dp", "central", "--noise-multiplier", "1", "--dp-clip-norm", "1", "--rounds", "1",
               "--out", str(tmp_path / "run"), "--progress", "off"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'fedopt[dp]'" in err


def test_bad_dp_flags_exit_2_with_one_line(tmp_path, capsys):
    rc = main(["simulate", "--dp", "central", "--noise-multiplier", "1", "--dp-clip-norm", "1", "--aggregator",
               "trimmed_mean", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--aggregator fedavg or mean, not 'trimmed_mean'" in err


# ---- (h) DP runs end to end ----------------------------------------------------------------------------------------
RUN = dict(task="digits", clients=20, clients_per_round=8, rounds=3, local_epochs=1, lr=0.1, batch_size=16,
           progress="off", plot=False, seed=5, device="cpu", dp="central", noise_multiplier=0.8, dp_clip_norm=1.0)


def test_simulate_writes_epsilon_every_round_and_is_reproducible(tmp_path):
    outs = []
    for name in ("a", "b"):
        cfg = RunConfig.of(**{**RUN, "out": str(tmp_path / name)})
        outs.append((simulate(cfg).global_vec, read_metrics(tmp_path / name / "metrics.jsonl")))
    (vec_a, rec_a), (vec_b, rec_b) = outs
    assert torch.equal(vec_a, vec_b)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rec_a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rec_b]
    acc = Accountant("rdp", "fixed", population=20, per_round=8, noise_multiplier=0.8)
    assert [r["epsilon"] for r in rec_a] == [acc.epsilon(k) for k in (1, 2, 3)]
    assert all(r["delta"] == default_delta(20) and r["dp_clip"] == 1.0 for r in rec_a)
    other = simulate(RunConfig.of(**{**RUN, "seed": 6, "out": str(tmp_path / "c")})).global_vec
    assert not torch.equal(vec_a, other)


def test_vmap_and_sequential_dp_runs_agree():
    """vmap offers every update on its own under DP (the clip is per client); the noise is the round's, once."""
    seq = Simulation(RunConfig.of(**RUN)).run(None).global_vec
    sim = Simulation(RunConfig.of(**RUN, backend="vmap"))
    assert type(sim.executor).__name__ == "VmapExecutor"
    assert torch.allclose(seq, sim.run(None).global_vec, atol=1e-4)


@pytest.mark.slow  # spawns worker processes
def test_pool_dp_run_adds_the_noise_once():
    """Each pool worker ships its clients' updates and the engine clips and noises them: the same model as in this
    process (noise added per worker would move it by about sqrt(workers) x the noise)."""
    torch.set_num_threads(1)
    seq = Simulation(RunConfig.of(**RUN, workers=1)).run(None).global_vec
    pool = Simulation(RunConfig.of(**RUN, workers=2))
    assert type(pool.executor).__name__ == "PoolExecutor"
    assert torch.allclose(seq, pool.run(None).global_vec, atol=1e-4)


def test_a_budget_stops_the_run_before_it_is_exceeded(tmp_path, caplog):
    acc = Accountant("rdp", "fixed", population=20, per_round=8, noise_multiplier=0.8)
    target = (acc.epsilon(2) + acc.epsilon(3)) / 2  # room for two rounds, not three
    cfg = RunConfig.of(**{**RUN, "rounds": 5, "target_epsilon": target, "out": str(tmp_path / "run")})
    records = simulate(cfg).records
    assert [r["round"] for r in records] == [1, 2] and records[-1]["epsilon"] <= target
    assert "stopping before round 3: privacy budget reached" in caplog.text


def test_target_epsilon_alone_calibrates_the_noise_for_the_planned_rounds():
    cfg = RunConfig.of(**{**RUN, "noise_multiplier": None, "target_epsilon": 30.0, "client_sampling": "poisson"})
    server = RoundServer.for_run(cfg, resolve_task("digits", {}), torch.device("cpu"))
    acc = server.privacy.accountant
    assert acc.sampling == "poisson" and acc.q == 8 / 20
    assert 0.98 * 30 <= acc.epsilon(3) <= 30.0
    assert server.bounds.norm_factor == 0 and not server.retryable


def test_the_config_file_round_trips_the_privacy_section(tmp_path):
    cfg = RunConfig.of(**{**RUN, "adaptive_clip": 0.5, "delta": 1e-6, "accountant": "pld",
                          "client_sampling": "poisson"})
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    from fedopt.config import build_config

    assert build_config(str(path)) == cfg
    assert dataclasses.asdict(cfg.privacy)["adaptive_clip"] == 0.5


# ---- (i) FedBuff: each buffer is one release, accounted without amplification ----------------------------------------
BUFFERED = {**RUN, "clients": 12, "buffer_size": 3, "concurrency": 6, "rounds": 4, "noise_multiplier": 1.0}


def test_buffered_dp_counts_buffer_closings_without_sampling(tmp_path):
    result = simulate(RunConfig.of(**BUFFERED, out=str(tmp_path / "run")))
    records = result.records
    assert [r["version"] for r in records] == [1, 2, 3, 4] and all(r["clients"] == 3 for r in records)
    # q = 1: k buffers are k unsampled Gaussian releases (dp_accounting used directly)
    want = [reference_epsilon("rdp", dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(1.0), k), default_delta(12))
            for k in (1, 2, 3, 4)]
    assert [r["epsilon"] for r in records] == pytest.approx(want, rel=0.01)
    server = RoundServer.for_run(RunConfig.of(**BUFFERED), resolve_task("digits", {}), torch.device("cpu"))
    assert server.privacy.expected == 3 and server.privacy.accountant.q == 1.0  # the noised sum over K


def test_a_budget_stops_buffered_dp_before_the_buffer_that_would_exceed_it(tmp_path, caplog):
    acc = Accountant("rdp", "poisson", population=12, per_round=1.0, noise_multiplier=1.0)
    target = (acc.epsilon(2) + acc.epsilon(3)) / 2
    records = simulate(RunConfig.of(**{**BUFFERED, "target_epsilon": target, "out": str(tmp_path / "run")})).records
    assert [r["version"] for r in records] == [1, 2] and records[-1]["epsilon"] <= target
    assert "stopping before version 3: privacy budget reached" in caplog.text


# ---- (j) sample-level DP-SGD in a client, through Opacus ------------------------------------------------------------
def test_dp_sgd_reports_each_clients_epsilon_over_all_its_steps():
    pytest.importorskip("opacus")
    task = resolve_task("digits", {})
    torch.manual_seed(0)
    spec = ParamSpec.from_module(task.build_model())
    from fedopt.trainer import LocalTrainer

    trainer = LocalTrainer(task, spec)
    data = task.load_data(0, 20, 0)
    n = data.num_samples
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, seed=1, dp_sgd_noise=1.1, dp_sgd_clip=1.0)
    vec = spec.flatten(trainer.model).clone()
    first = trainer.train("a", vec, data, cfg).metrics
    second = trainer.train("a", vec, data, cfg).metrics  # the same client again: its ledger goes on
    other = trainer.train("b", vec, data, cfg).metrics  # another client starts its own
    q, steps = 1 / math.ceil(n / 16), first["steps"]
    assert steps == math.ceil(n / 16) and first["dp_sgd_delta"] == pytest.approx(n ** -1.1)

    def reference(k: int) -> float:  # dp_accounting, not Opacus: the sampled Gaussian over k steps
        event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(1.1)), k)
        return reference_epsilon("rdp", event, n ** -1.1)

    assert first["dp_sgd_epsilon"] == pytest.approx(reference(steps), rel=0.03)
    assert second["dp_sgd_epsilon"] == pytest.approx(reference(2 * steps), rel=0.03)
    assert other["dp_sgd_epsilon"] == first["dp_sgd_epsilon"]


def test_dp_sgd_simulation_records_client_epsilon_and_vmap_falls_back(tmp_path, capsys):
    """--backend vmap falls back with its one line; each round's line has its clients' mean and max epsilon."""
    pytest.importorskip("opacus")
    cfg = RunConfig.of(task="digits", clients=20, clients_per_round=4, rounds=2, local_epochs=1, lr=0.1,
                       progress="off", plot=False, seed=5, device="cpu", dp_sgd=True, dp_sgd_noise=1.0,
                       backend="vmap", out=str(tmp_path / "run"))
    records = simulate(cfg).records
    assert capsys.readouterr().err.count("--dp-sgd trains one client at a time with Opacus") == 1
    assert all(0 < r["dp_sgd_epsilon_mean"] <= r["dp_sgd_epsilon_max"] for r in records)


def test_dp_sgd_without_opacus_is_one_config_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ImportError
    rc = main(["simulate", "--dp-sgd", "--rounds", "1", "--out", str(tmp_path / "run"), "--progress", "off"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'fedopt[opacus]'" in err
    with pytest.raises(ConfigError, match="--dp-sgd-noise and --dp-sgd-clip apply to --dp-sgd"):
        RunConfig.of(dp_sgd_noise=2.0)
    with pytest.raises(ConfigError, match="--dp-sgd does not combine with --mu"):
        RunConfig.of(dp_sgd=True, mu=0.1)
