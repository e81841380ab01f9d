"""Byzantine-robust aggregators (fedopt.aggregators.{clipping,krum,geomed}), the attack suite (fedopt.attacks), client
momentum, their config and the simulation's Byzantine clients; one real-process test of a malicious bus client."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist

import pytest
import torch

from _bus import BASE, Cluster, finished
from clients.federated.attacker import arm
from clients.federated.config import ClientConfig
from clients.simulation.byzantine import FlippedLabels
from clients.simulation.run import Simulation
from fedopt.aggregators import (Bulyan, CenteredClip, CosineFilter, DivideAndConquer, GeometricMedian, Krum,
                                MultiKrum, NormBound, SecureAggregator, Update, make_aggregator)
from fedopt.aggregators.geomed import geometric_median, weighted_coordinate_median
from fedopt.aggregators.krum import bulyan_picks
from fedopt.attacks import Attack, alie, alie_z, byzantine_clients
from fedopt.cli import main
from fedopt.client_momentum import ClientMomentum
from fedopt.config import RunConfig
from fedopt.errors import ConfigError
from fedopt.task import ClientData
from fedopt.testing import check_aggregator

ROBUST = ["norm_bound", "centered_clip", "krum", "multi_krum", "bulyan", "geomed", "cosine_filter", "dnc"]


def aggregate(agg, rows, samples=None, round=1):
    """Run one round of ``agg`` on ``rows`` (a list of lists); the Aggregate."""
    rows = [torch.tensor(r, dtype=torch.float32) for r in rows]
    agg.begin(round, rows[0].numel())
    for i, r in enumerate(rows):
        agg.add(Update(str(i), r, samples[i] if samples else 1))
    return agg.result()


# ---- conformance and registry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROBUST)
def test_robust_aggregators_pass_the_conformance_check(name):
    # norm_bound clips by design: identical updates come back unchanged only when within its bound
    check_aggregator(lambda: make_aggregator(name, **({"bound": 100.0} if name == "norm_bound" else {})))


@pytest.mark.parametrize("name", ["centered_clip", "krum", "multi_krum", "bulyan", "geomed", "cosine_filter", "dnc"])
def test_plaintext_rules_refuse_secure_aggregation_with_one_line(name):
    for build in (lambda: make_aggregator(name, secure=True), lambda: make_aggregator("secagg", inner=name)):
        with pytest.raises(ConfigError, match=f"aggregator '{name}' needs every client's update in the clear") as e:
            build()
        assert "\n" not in str(e.value)


def test_norm_bound_under_secure_aggregation_is_secaggs_client_side_clip():
    agg = make_aggregator("norm_bound", secure=True, bound=2.5)
    assert isinstance(agg, SecureAggregator) and agg.clip == 2.5 and agg.weighting == "samples"
    assert make_aggregator("secagg", inner="norm_bound").clip == NormBound().bound == 3.0


# ---- norm bounding ------------------------------------------------------------------------------------------------
def test_norm_bound_clips_each_update_then_takes_the_sample_weighted_mean():
    agg = NormBound(bound=1.0)
    res = aggregate(agg, [[3.0, 4.0], [0.0, 0.5]], samples=[1, 3])
    # [3, 4] has norm 5 -> [0.6, 0.8]; [0, 0.5] is within the bound; weights 1 and 3
    assert torch.allclose(res.delta, torch.tensor([0.6 / 4, (0.8 + 3 * 0.5) / 4]))
    assert agg.clipped == 1 and res.count == 2 and res.weight == 4


# ---- centered clipping --------------------------------------------------------------------------------------------
def test_centered_clipping_one_iteration_and_its_fixed_point():
    # 1-D, centre 0, tau 1: v <- v + (1/4)(3 clip(0 - v) + clip(10 - v)) = v + (1 - 3v)/4 while |v| < 1
    rows = [[0.0], [0.0], [0.0], [10.0]]
    assert aggregate(CenteredClip(tau=1.0, iterations=1), rows).delta.item() == pytest.approx(0.25)
    # its fixed point solves 1 - 3v = 0: v = 1/3, where the mean is 2.5
    assert aggregate(CenteredClip(tau=1.0, iterations=200), rows).delta.item() == pytest.approx(1 / 3, abs=1e-6)
    # updates within tau of the centre are not clipped: one iteration gives their mean
    assert torch.allclose(aggregate(CenteredClip(tau=100.0), [[1.0, 2.0], [3.0, 0.0]]).delta, torch.tensor([2.0, 1.0]))


def test_centered_clipping_starts_each_round_from_the_last_aggregate():
    agg = CenteredClip(tau=1.0, iterations=1)
    assert aggregate(agg, [[0.0], [0.0], [0.0], [10.0]]).delta.item() == pytest.approx(0.25)
    # round 2 starts at 0.25: 0.25 + (3 * clip(-0.25) + clip(9.75)) / 4 = 0.25 + (1 - 0.75) / 4
    assert aggregate(agg, [[0.0], [0.0], [0.0], [10.0]], round=2).delta.item() == pytest.approx(0.3125)


def test_centered_clipping_auto_tau_is_the_median_distance_of_each_iteration():
    # centre 0, distances 1, 2, 3, 10: the lower median is 2, so the rows clip to 1, 2, 2, 2 and v = 7/4
    rows = [[1.0], [2.0], [3.0], [10.0]]
    assert aggregate(CenteredClip(), rows).delta.item() == 1.75
    # a second iteration from 1.75: distances 0.75, 0.25, 1.25, 8.25, lower median 0.75; the clipped differences
    # -0.75, 0.25, 0.75, 0.75 add 0.25: v = 2 (the plain mean is 4)
    assert aggregate(CenteredClip(tau="auto", iterations=2), rows).delta.item() == 2.0
    # every row at the centre: nothing moves (no 0/0)
    assert aggregate(CenteredClip(), [[0.0], [0.0]]).delta.tolist() == [0.0]
    with pytest.raises(ConfigError, match='centered_clip tau must be a number > 0 or "auto", not \'median\''):
        make_aggregator("centered_clip", tau="median")


def test_centered_clipping_given_f_clips_at_the_n_minus_f_th_distance():
    rows = [[1.0], [2.0], [3.0], [10.0]]
    # f = 1 of 4: the radius is the 3rd smallest distance, 3: the rows clip to 1, 2, 3, 3 and v = 9/4
    assert aggregate(CenteredClip(f=1), rows).delta.item() == 2.25
    # f = 2 = n/2 is the lower median again (1.75), and f = 0 clips nothing: the mean
    assert aggregate(CenteredClip(f=2), rows).delta.item() == 1.75
    assert aggregate(CenteredClip(f=0), rows).delta.item() == 4.0
    # a round smaller than planned: f is capped at n/2 (the median), never past it
    assert aggregate(CenteredClip(f=3), rows).delta.item() == 1.75
    with pytest.raises(ConfigError, match=r"centered_clip with f=5 assumes half or more of the 10 updates .*f=\.\.\."):
        make_aggregator("centered_clip", f=5).check_round_size(10)
    make_aggregator("centered_clip", f=4).check_round_size(10)
    for bad, match in ((dict(f=-1), "centered_clip f .* must be an integer >= 0"), (dict(f=1.5), "integer >= 0"),
                       (dict(f=1, tau=2.0), "give one of --aggregator-option tau=... and f=...")):
        with pytest.raises(ConfigError, match=match):
            make_aggregator("centered_clip", **bad)


# ---- Krum, Multi-Krum, Bulyan -------------------------------------------------------------------------------------
FIVE = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [10.0, 10.0]]


def test_krum_chooses_the_update_with_the_closest_neighbours():
    # f = 1, n = 5: each update's score sums its n - f - 2 = 2 smallest squared distances to the others:
    # (0,0): 1 + 4 = 5; (1,0): 1 + 5 = 6; (0,2): 4 + 5 = 9; (3,3): 10 + 13 = 23; (10,10): 98 + 164 = 262
    res = aggregate(Krum(f=1), FIVE)
    assert res.delta.tolist() == [0.0, 0.0] and res.count == 5


def test_multi_krum_averages_the_m_best_scores():
    assert torch.allclose(aggregate(MultiKrum(f=1, m=3), FIVE).delta, torch.tensor([1 / 3, 2 / 3]))
    # m defaults to n - f = 4: (0,0), (1,0), (0,2), (3,3)
    assert torch.allclose(aggregate(MultiKrum(f=1), FIVE).delta, torch.tensor([1.0, 1.25]))


def test_bulyan_picks_n_minus_2f_by_krum_then_averages_the_values_nearest_the_median():
    # second coordinate = -first, so picks follow the first; n = 7, f = 1: theta = 5 picks, beta = 3 values
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 50.0, 51.0]
    rows = [[x, -x] for x in xs]
    # Krum picks (neighbours max(1, r - 3) among the r left; ties to the earlier update): 3 (score 10), then 2
    # (14, tied with 4), then 4 (10), then 50 (1: the two colluders are each other's nearest), then 1 (16, tied
    # with 5). Per coordinate the picks {1, 2, 3, 4, 50} have median 3 and the 3 nearest values 3, 2, 4: mean 3.
    assert bulyan_picks(torch.tensor(rows), 1) == [2, 1, 3, 5, 0]
    assert aggregate(Bulyan(f=1), rows).delta.tolist() == pytest.approx([3.0, -3.0])  # the picks' mean would be 12


def test_bulyan_refuses_rounds_below_4f_plus_3_with_one_line():
    with pytest.raises(ConfigError, match=r"bulyan with f=2 needs at least 11 updates per round \(n >= 4f\+3\), "
                                          r"not 10: lower f \(--aggregator-option f=...\)") as e:
        Bulyan(f=2).check_round_size(10)
    assert "\n" not in str(e.value)
    Bulyan(f=2).check_round_size(11)
    with pytest.raises(ConfigError, match="--clients-per-round"):
        Krum(f=2).check_round_size(6)
    # a round that arrives short of it (a quorum) is declined: the model does not move
    assert aggregate(Bulyan(f=1), [[float(i)] for i in range(6)]) is None


def test_selection_rules_default_to_the_largest_f_the_round_allows():
    # f = None: Krum assumes floor((n - 3) / 2) = 1 of 5, so (0,0) wins as with f = 1
    assert aggregate(Krum(), FIVE).delta.tolist() == [0.0, 0.0]
    assert aggregate(Bulyan(), [[x, -x] for x in [1.0, 2.0, 3.0, 4.0, 5.0, 50.0, 51.0]]).delta[0].item() == 3.0


def test_selection_rule_options_are_checked_naming_the_flag():
    for bad in (dict(f=-1), dict(f=1.5), dict(m=0)):
        with pytest.raises(ConfigError, match="--aggregator-option"):
            MultiKrum(**bad)
    with pytest.raises(ConfigError, match="centered_clip tau must be a number > 0"):
        make_aggregator("centered_clip", tau=0)
    with pytest.raises(ConfigError, match="norm_bound bound must be a number > 0"):
        make_aggregator("norm_bound", bound=-1)


# ---- cosine filter ------------------------------------------------------------------------------------------------
def test_cosine_filter_keeps_what_points_with_the_median_clips_to_the_median_norm():
    # coordinate median (1, 0); cosines 1, .707, .707, -1, 1: (-3, 0) is dropped; the lower median of the 5 norms
    # (0.5, 1.414, 1.414, 2, 3) is sqrt 2, so (2, 0) becomes (1.414, 0); the mean of the 4 kept
    agg = CosineFilter()
    res = aggregate(agg, [[2.0, 0.0], [1.0, 1.0], [1.0, -1.0], [-3.0, 0.0], [0.5, 0.0]])
    assert agg.kept == 4 and res.count == 5
    assert torch.allclose(res.delta, torch.tensor([(2 ** 0.5 + 2.5) / 4, 0.0]), atol=1e-6)
    # FLTrust's ReLU(cos) weights: 1, .707, .707, 1 on the same clipped rows
    w = torch.tensor([1.0, 0.5 ** 0.5, 0.5 ** 0.5, 1.0])
    rows = torch.tensor([[2 ** 0.5, 0.0], [1.0, 1.0], [1.0, -1.0], [0.5, 0.0]])
    res = aggregate(CosineFilter(weighting="cosine"), [[2.0, 0.0], [1.0, 1.0], [1.0, -1.0], [-3.0, 0.0], [0.5, 0.0]])
    assert torch.allclose(res.delta, (w[:, None] * rows).sum(0) / w.sum(), atol=1e-6)


def test_cosine_filter_drops_sign_flipped_and_ipm_updates_that_distance_rules_keep():
    # non-IID-like honest updates: a small shared direction under large client-specific parts; the flipped copies
    # lie as far from the centre as honest ones, only their angle gives them away
    g = torch.Generator().manual_seed(0)
    shared = torch.zeros(400)
    shared[:40] = 0.3
    honest = shared + 0.1 * torch.randn(16, 400, generator=g)
    flipped, ipm = -honest[:2], -0.1 * honest.mean(0).expand(2, 400)
    agg = CosineFilter()
    res = aggregate(agg, torch.cat([honest, flipped, ipm]).tolist())
    assert agg.kept == 16
    cos = torch.nn.functional.cosine_similarity(res.delta, honest.mean(0), dim=0)
    assert cos > 0.99 and cos > torch.nn.functional.cosine_similarity(
        torch.cat([honest, flipped, ipm]).mean(0), honest.mean(0), dim=0)


def test_cosine_filter_previous_reference_and_its_fallbacks():
    agg = CosineFilter(reference="previous")
    first = aggregate(agg, [[1.0, 0.0], [1.0, 0.2], [0.9, -0.1]])  # round 1: the median is the reference
    assert agg.kept == 3
    # round 2: every row points away from round 1's aggregate, though their median (0, 1) would keep them all
    second = aggregate(agg, [[-1.0, 1.0], [-1.0, 1.1], [-1.0, 0.9]], round=2)
    assert agg.kept == 0 and second.delta.tolist() == [-1.0, 1.0]  # nothing passes: the coordinate median
    assert first.delta[0] > 0
    # a zero update has no direction either: not kept, and under cosine weights it adds nothing (not a NaN)
    cosw = CosineFilter(weighting="cosine")
    res = aggregate(cosw, [[1.0, 0.0], [1.0, 0.1], [0.0, 0.0], [0.9, 0.0], [-1.0, 0.0]])
    assert cosw.kept == 3 and bool(torch.isfinite(res.delta).all()) and res.delta[0] > 0.9
    # a zero reference (the median of updates that cancel) has no direction: the coordinate median again
    zero = CosineFilter()
    assert aggregate(zero, [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]).delta.tolist() == [0.0, 0.0] and zero.kept == 0
    for bad, flag in ((dict(reference="mean"), "reference"), (dict(threshold=1.0), "threshold"),
                      (dict(threshold=True), "threshold"), (dict(weighting="trust"), "weighting")):
        with pytest.raises(ConfigError, match=f"cosine_filter {flag} must be .*--aggregator-option {flag}="):
            make_aggregator("cosine_filter", **bad)


# ---- divide and conquer -------------------------------------------------------------------------------------------
def test_dnc_drops_the_largest_projections_on_the_top_singular_direction():
    # centred on their mean (0, 1) the rows are (1,-1), (-1,-1), (0,0), (0,-2), (0,4): the x and y sums of squares
    # are 2 and 22 with no cross term, so the top direction is y and the scores are y^2 = 1, 1, 0, 4, 16
    rows = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 5.0]]
    one = DivideAndConquer(f=1)
    assert aggregate(one, rows).delta.tolist() == [0.0, 0.0] and one.dropped == 1  # (0, 5) goes
    two = DivideAndConquer(f=2)  # (0, 5) and (0, -1) go: the mean of the other three
    assert torch.allclose(aggregate(two, rows).delta, torch.tensor([0.0, 1 / 3])) and two.dropped == 2
    # c scales the count: c = 0.5 of f = 2 drops one; f = 0 drops nothing (the plain mean)
    assert aggregate(DivideAndConquer(f=2, c=0.5), rows).delta.tolist() == [0.0, 0.0]
    assert torch.allclose(aggregate(DivideAndConquer(f=0), rows).delta, torch.tensor([0.0, 1.0]))
    # f = None drops the most a majority tolerates: floor((5 - 1) / 2) = 2
    assert aggregate(DivideAndConquer(), rows).delta.tolist() == aggregate(two, rows).delta.tolist()


def _alie_round(n_honest=40, f=10, p=600, z=1.0, seed=0):
    """Non-IID-like honest updates (a small shared direction under large client-specific parts) and f identical
    ALIE updates mu - z sigma."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.zeros(p)
    shared[:60] = 0.05
    honest = shared + 0.1 * torch.randn(n_honest, p, generator=g) * torch.rand(p, generator=g)
    return honest, alie(honest, z).expand(f, p)


@pytest.mark.parametrize("dims", [10_000, 200])
def test_dnc_finds_alie_that_distance_and_angle_rules_keep(dims):
    honest, bad = _alie_round()
    rows = torch.cat([honest, bad]).tolist()
    agg = DivideAndConquer(f=10, dims=dims, seed=3)
    res = aggregate(agg, rows)
    # ALIE sits inside the honest spread: every ALIE row is nearer the mean than the farthest honest rows, and its
    # cosine with the honest mean is positive; DnC drops exactly the 10 ALIE rows
    keep_norm = torch.linalg.vector_norm(torch.tensor(rows) - torch.tensor(rows).mean(0), dim=1)
    assert keep_norm[40:].max() < keep_norm[:40].max()
    assert torch.nn.functional.cosine_similarity(bad[0], honest.mean(0), dim=0) > 0
    assert agg.dropped == 10
    assert torch.allclose(res.delta, honest.mean(0), atol=1e-6)


def test_dnc_subsampling_is_reproducible_from_its_seed_and_fresh_without_one():
    honest, bad = _alie_round(p=3000)
    rows = torch.cat([honest, bad]).tolist()
    a = aggregate(DivideAndConquer(f=12, dims=100, iterations=3, seed=7), rows).delta
    b = aggregate(DivideAndConquer(f=12, dims=100, iterations=3, seed=7), rows).delta
    assert torch.equal(a, b)
    unseeded = DivideAndConquer(f=12, dims=100, iterations=3)
    first = unseeded._generator.initial_seed()
    aggregate(unseeded, rows)
    assert unseeded._generator.initial_seed() != first  # a fresh draw each round


def test_dnc_falls_back_to_the_coordinate_median_when_the_eigensolver_fails(monkeypatch, caplog):
    import fedopt.aggregators.spectral as spectral

    def fail(_):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(spectral, "_top_projections", fail)
    agg = DivideAndConquer(f=1)
    res = aggregate(agg, [[1.0, 0.0], [3.0, 1.0], [2.0, 9.0]])
    assert res.delta.tolist() == [2.0, 1.0] and agg.dropped == 3 and "coordinate median instead" in caplog.text


def test_dnc_options_are_checked_naming_the_flag():
    for bad, flag in ((dict(f=-1), "f"), (dict(f=True), "f"), (dict(c=0), "c"), (dict(c=3.0), "c"),
                      (dict(dims=0), "dims"), (dict(iterations=1.5), "iterations"), (dict(seed=-2), "seed")):
        with pytest.raises(ConfigError, match=f"dnc {flag} .*--aggregator-option {flag}="):
            make_aggregator("dnc", **bad)
    with pytest.raises(ConfigError, match="dnc with f=5 and c=1 drops 5 of 10 updates per round"):
        make_aggregator("dnc", f=5).check_round_size(10)
    make_aggregator("dnc", f=4).check_round_size(10)


# ---- geometric median ---------------------------------------------------------------------------------------------
def test_geometric_median_of_a_symmetric_set_is_its_centre():
    c = torch.tensor([2.0, -1.0])
    rows = [c + d for d in (torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 5.0]),
                            torch.tensor([0.0, -5.0]))]
    res = aggregate(GeometricMedian(), [r.tolist() for r in rows])
    assert torch.allclose(res.delta, c, atol=1e-6)


def test_geometric_median_on_a_line_is_the_weighted_median():
    rows = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    # equal weights: the median 2; the mean would be 22.6
    assert geometric_median(rows, torch.ones(5), iterations=500).item() == pytest.approx(2.0, abs=1e-3)
    # weight 5 on 10 (of 9): more than half the weight sits at 10
    z = geometric_median(rows, torch.tensor([1.0, 1.0, 1.0, 5.0, 1.0]), iterations=500)
    assert z.item() == pytest.approx(10.0, abs=1e-3)


def test_geometric_median_starts_from_the_weighted_coordinate_median():
    # three honest values and two x1000 updates: the coordinate median 2 is the geometric median, and Weiszfeld
    # stays there; from the mean (400.6) the default 4 steps are still 117 away
    rows = torch.tensor([[0.0], [1.0], [2.0], [1000.0], [1000.0]])
    assert geometric_median(rows, torch.ones(5), iterations=0).item() == 2.0
    assert geometric_median(rows, torch.ones(5)).item() == pytest.approx(2.0, abs=1e-4)
    assert geometric_median(rows, torch.ones(5), start="mean").item() > 100
    # weights 1, 1, 1, 4: the cumulative weight passes half at the fourth value; equal weights on an even count
    # average the two middle values, as the usual median
    grid = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]])
    assert weighted_coordinate_median(grid, torch.tensor([1.0, 1.0, 1.0, 4.0])).tolist() == [4.0, 8.0]
    assert weighted_coordinate_median(grid, torch.ones(4)).tolist() == [2.5, 6.5]
    with pytest.raises(ConfigError, match="geomed start must be median or mean, not 'mode'"):
        make_aggregator("geomed", start="mode")


# ---- attacks ------------------------------------------------------------------------------------------------------
def test_each_non_omniscient_attack_transforms_a_known_update_exactly():
    x = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(Attack("sign_flip").apply(x), torch.tensor([-1.0, 2.0, -0.5]))
    assert torch.equal(Attack("scaling").apply(x), 1000 * x)
    assert torch.equal(Attack("scaling", {"factor": -3}).apply(x), torch.tensor([-3.0, 6.0, -1.5]))
    assert torch.equal(Attack("label_flip").apply(x), x)  # it poisons the data, not the update
    g1, g2 = Attack("gaussian", {"sigma": 2.0}).apply(torch.zeros(10_000), seed=5), \
        Attack("gaussian", {"sigma": 2.0}).apply(torch.zeros(10_000), seed=5)
    assert torch.equal(g1, g2) and abs(float(g1.std()) - 2.0) < 0.1 and abs(float(g1.mean())) < 0.1


def test_alie_sends_mean_minus_z_std_with_the_papers_z():
    honest = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 4.0]])  # mean (3, 4/3), unbiased std (2, 2.3094)
    z = NormalDist().inv_cdf(0.6)  # n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4 supporters, z = Phi^-1((10 - 4)/10)
    assert alie_z(10, 2) == pytest.approx(z) and alie_z(50, 10) == pytest.approx(NormalDist().inv_cdf(0.68))
    got = Attack("alie").craft(honest, n=10, f=2)
    assert torch.allclose(got, torch.tensor([3.0 - 2.0 * z, 4 / 3 - math.sqrt(16 / 3) * z]))
    assert torch.allclose(Attack("alie", {"z": 1.0}).craft(honest, 10, 2), torch.tensor([1.0, 4 / 3 - 4 / 3 ** 0.5]))


def test_ipm_sends_minus_epsilon_times_the_honest_mean():
    honest = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    assert torch.allclose(Attack("ipm").craft(honest, 3, 1), torch.tensor([-0.2, 0.1]))
    assert torch.allclose(Attack("ipm", {"epsilon": 2}).craft(honest, 3, 1), torch.tensor([-4.0, 2.0]))


def test_label_flip_wraps_only_the_byzantine_shards():
    x, y = torch.zeros(4, 2), torch.tensor([0, 3, 9, 5])
    shards = [ClientData((x, y), (x, y)), ClientData((x, y))]
    flipped = FlippedLabels(shards, frozenset({"0"}), classes=10)
    assert flipped[0].train[1].tolist() == [9, 6, 0, 4] and flipped[0].test[1].tolist() == y.tolist()
    assert flipped[1] is shards[1] and len(flipped) == 2


def test_byzantine_clients_are_a_seeded_fraction():
    a = byzantine_clients(50, 0.2, seed=3)
    assert len(a) == 10 and a == byzantine_clients(50, 0.2, seed=3) and a != byzantine_clients(50, 0.2, seed=4)
    assert all(0 <= int(c) < 50 for c in a)
    with pytest.raises(ConfigError, match="--attackers 0.01 of --clients 10 makes 0 Byzantine clients"):
        byzantine_clients(10, 0.01, 0)


def test_client_momentum_starts_from_the_first_update_then_averages():
    m = ClientMomentum(0.9)
    first = m("a", torch.tensor([1.0, 2.0]))
    assert first.tolist() == [1.0, 2.0]
    first.add_(100)  # the caller owns what it gets
    assert torch.allclose(m("a", torch.tensor([11.0, 0.0])), torch.tensor([0.9 + 1.1, 1.8]))
    assert m("b", torch.tensor([5.0])).tolist() == [5.0]  # per client


# ---- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat, flag", [
    (dict(attack="poison", attackers=0.2), "--attack must be one of"),
    (dict(attack="alie"), "--attack alie needs --attackers"),
    (dict(attackers=0.2), "--attackers and --attack-option need --attack"),
    (dict(attack="ipm", attackers=0.2, attack_options={"eps": 1}), "--attack-option eps: attack ipm takes epsilon"),
    (dict(attack="ipm", attackers=1.5), "--attackers must be a fraction"),
    (dict(client_momentum=1.0), "--client-momentum must be a number in"),
    (dict(attack="sign_flip", attackers=0.2, transport="ipc"), "give --attack to each `fedopt client`"),
    (dict(client_momentum=0.9, buffer_size=2, clients_per_round=4), "does not combine with --buffer-size"),
])
def test_config_errors_name_the_flag(flat, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(")):
        RunConfig.of(**flat)


def test_cli_refuses_a_bad_attack_with_exit_code_2(capsys, tmp_path):
    assert main(["simulate", "--attack", "alie", "--attackers", "0.2", "--transport", "ipc",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--attack runs in the in-process simulation" in err


def test_a_round_too_small_for_bulyan_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="bulyan with f=2 needs at least 11 updates"):
        Simulation(RunConfig.of(clients=10, aggregator="bulyan", aggregator_options={"f": 2}, out=str(tmp_path)))


@pytest.mark.parametrize("kw, flag", [
    (dict(attack="alie"), "--collude DIR --colluders K with K >= 2"),
    (dict(attack="sign_flip", collude="/tmp/x", colluders=2), "--collude and --colluders apply to --attack alie"),
    (dict(attack_options={"factor": 2}), "need --attack NAME"),
    (dict(attack="ipm", collude="/tmp/x"), "go together"),
    (dict(client_momentum=-0.1), "--client-momentum"),
])
def test_malicious_client_flags_are_checked(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        ClientConfig(connect="ipc:///tmp/c", shard=0, **kw)


# ---- the simulation's Byzantine clients ---------------------------------------------------------------------------
class Recorder:
    """An aggregator that keeps every update it is given (a plain mean), to see what clients sent."""

    name, linear, needs_all_updates, needs_plaintext = "recorder", False, True, False

    def __init__(self):
        self.sent = {}

    def begin(self, round, size):
        self.sent = {}

    def add(self, u):
        self.sent[u.client] = u.delta.detach().clone()

    def result(self):
        from fedopt.aggregators import Aggregate

        return Aggregate(torch.stack(list(self.sent.values())).mean(0), 1.0, len(self.sent))


def test_omniscient_attackers_craft_from_exactly_the_honest_updates_of_the_round(tmp_path):
    cfg = RunConfig.of(clients=10, rounds=2, local_epochs=1, attack="ipm", attackers=0.2, client_momentum=0.5,
                       attack_options={"epsilon": 2.0}, norm_factor=0, out=str(tmp_path), progress="off", plot=False)
    sim = Simulation(cfg)
    sim.server.aggregator = rec = Recorder()
    sim.run(None)
    bad = byzantine_clients(10, 0.2, 0)
    honest = torch.stack([d for c, d in rec.sent.items() if c not in bad])  # round 2: the honest clients' momenta
    assert len(rec.sent) == 10
    for c in bad:
        assert torch.allclose(rec.sent[c], -2.0 * honest.mean(0), atol=1e-6)


@pytest.mark.parametrize("attack, defence", [("scaling", "median"), ("scaling", "norm_bound"),
                                             ("sign_flip", "multi_krum"), ("sign_flip", "cosine_filter"),
                                             ("alie:z=5", "dnc")])
def test_a_defence_holds_where_fedavg_fails(tmp_path, attack, defence):
    def final(aggregator, attack=None):
        robust = {}
        if attack:
            name, _, z = attack.partition(":z=")
            robust = dict(attack=name, attackers=0.3, attack_options={"z": float(z)} if z else {})
        cfg = RunConfig.of(clients=10, rounds=15, local_epochs=1, norm_factor=0, aggregator=aggregator,
                           aggregator_options={"f": 3} if aggregator == "dnc" else {},
                           out=str(tmp_path), progress="off", plot=False, eval_every=15, **robust)
        return Simulation(cfg).run(None).records[-1]["accuracy"]

    clean = final("fedavg")
    assert clean > 0.8
    assert final("fedavg", attack) < 0.3  # 3 of 10 clients break the mean (chance is 0.1)
    assert final(defence, attack) > clean - 0.1


# ---- a malicious client over the bus ------------------------------------------------------------------------------
def test_bus_colluders_craft_alie_from_their_own_honest_updates_only(tmp_path):
    model = torch.nn.Linear(2, 3)
    data = ClientData((torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])))
    armed = [arm(ClientConfig(connect="ipc:///tmp/c", shard=i, attack="alie", collude=str(tmp_path), colluders=2),
                 model, data, {"clients": 8}) for i in (0, 1)]
    own = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    with ThreadPoolExecutor(2) as pool:  # each waits for the other's update of the round in the shared folder
        sent = list(pool.map(lambda k: armed[k][1](4, own[k], 0), [0, 1]))
    want = alie(torch.stack(own), alie_z(8, 2))  # n = the run's clients, f = the colluders
    assert all(torch.allclose(s, want) for s in sent)
    assert sorted(p.name for p in (tmp_path / "round-4").iterdir()) == ["0.npy", "1.npy"]
    flipped, _ = arm(ClientConfig(connect="ipc:///tmp/c", shard=0, attack="label_flip"), model, data, {})
    assert flipped.train[1].tolist() == [2, 1, 0, 2]  # C = 3 from the model's output width


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_scaling_client_over_the_bus_is_caught_by_the_coordinators_norm_bound(tmp_path):
    c = Cluster(tmp_path, transport="ipc")
    try:
        c.start_coordinator(*BASE, "--clients", "3", "--rounds", "2", "--seed", "1")
        c.start_client(0)
        c.start_client(1)
        c.start_client(2, "--attack", "scaling")
        rows = finished(c, timeout=100)
    finally:
        c.stop()
    assert "client 2 is Byzantine: attack scaling" in c.log("client-2")
    # every round, the x1000 update is rejected by the relative norm bound and the two honest ones are used
    assert [(r["clients"], r["rejected"]) for r in rows] == [(2, 1), (2, 1)]
