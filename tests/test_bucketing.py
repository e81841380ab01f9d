"""Bucketing (fedopt.aggregators.bucketing): the bucket layout, hand-computed rounds, the conformance check, and
its errors (one line, naming the option; exit code 2 from the command line)."""

from __future__ import annotations

import pytest
import torch

from fedopt.aggregators import Bucketing, CoordinateMedian, GeometricMedian, Update, make_aggregator
from fedopt.aggregators.bucketing import bucket_order, buckets
from fedopt.cli import main
from fedopt.errors import ConfigError
from fedopt.testing import check_aggregator

COLLECTING = ["median", "trimmed_mean", "centered_clip", "krum", "multi_krum", "bulyan", "geomed"]


def run_round(agg, rows, samples=None, round=1, ids=None):
    agg.begin(round, len(rows[0]))
    for i, r in enumerate(rows):
        agg.add(Update(ids[i] if ids else str(i), torch.tensor(r, dtype=torch.float32), samples[i] if samples else 1))
    return agg.result()


@pytest.mark.parametrize("name", COLLECTING)
def test_bucketed_rules_pass_the_conformance_check(name):
    check_aggregator(lambda: make_aggregator(name, bucketing=2), clients=7)


def test_bucket_order_is_a_permutation_fixed_by_seed_round_and_ids_not_arrival():
    ids = [str(i) for i in range(10)]
    order = bucket_order(ids, seed=0, round=3)
    assert sorted(order) == list(range(10))
    shuffled = ids[::-1]
    # the same clients in another arrival order land in the same buckets
    assert [shuffled[i] for i in bucket_order(shuffled, 0, 3)] == [ids[i] for i in order]
    assert bucket_order(ids, 0, 3) == order
    assert {tuple(bucket_order(ids, 0, r)) for r in range(1, 6)} != {tuple(order)}  # rounds reshuffle
    assert buckets([4, 0, 3, 1, 2], 2) == [[4, 0], [3, 1], [2]]


def test_median_of_bucket_means_hand_computed():
    # 0, 0, 0, 100 in buckets of 2: whatever the shuffle, one bucket mean is 0 and the other 50; their median is 25
    rows = [[0.0], [0.0], [0.0], [100.0]]
    for round in range(1, 6):
        res = run_round(Bucketing(CoordinateMedian(), s=2), rows, round=round)
        assert res.delta.item() == 25.0 and res.count == 4 and res.weight == 4
    # s = 1 is the rule itself; s = n is the plain mean
    assert run_round(Bucketing(CoordinateMedian(), s=1), rows).delta.item() == 0.0
    assert run_round(Bucketing(CoordinateMedian(), s=4), rows).delta.item() == 25.0


def test_a_bucket_weighs_the_samples_of_its_updates():
    # s = 3 over 3 updates: one bucket, mean [1, 2], weight 1 + 2 + 3 = 6 (geomed of one point is that point)
    res = run_round(Bucketing(GeometricMedian(), s=3), [[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]], samples=[1, 2, 3])
    assert res.delta.tolist() == [1.0, 2.0] and res.weight == 6 and res.count == 3


def test_round_size_checks_count_buckets():
    # Krum with f = 2 needs 7 inputs: 10 clients make only 5 buckets of 2, 14 make 7
    with pytest.raises(ConfigError, match="needs at least 7 updates per round"):
        make_aggregator("krum", f=2, bucketing=2).check_round_size(10)
    make_aggregator("krum", f=2, bucketing=2).check_round_size(14)


@pytest.mark.parametrize("options, message", [
    (dict(bucketing=0), "bucketing s \\(updates per bucket\\) must be an integer >= 1, not 0"),
    (dict(bucketing=1.5), "must be an integer >= 1, not 1.5"),
    (dict(bucketing=2, bucket_seed="x"), "bucketing seed must be an integer"),
    (dict(bucket_seed=1), "bucket_seed needs bucketing=S"),
])
def test_bad_bucketing_options_are_one_line_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message) as e:
        make_aggregator("median", **options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["fedavg", "norm_bound"])
def test_streaming_rules_refuse_bucketing(name):
    with pytest.raises(ConfigError, match=f"aggregator '{name}' does not hold the round's updates"):
        make_aggregator(name, bucketing=2)


def test_cli_refuses_bucketing_a_streaming_rule_with_exit_code_2(capsys, tmp_path):
    assert main(["simulate", "--aggregator", "fedavg", "--aggregator-option", "bucketing=2",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bucketing" in err
