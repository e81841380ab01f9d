import pytest
import torch

from fedopt.aggregators import Update, fedavg, make_aggregator, mean, weighted
from fedopt.errors import ConfigError
from fedopt.testing import check_aggregator


@pytest.mark.parametrize("name", ["fedavg", "mean", "median", "trimmed_mean"])
def test_builtin_aggregators_pass_the_conformance_check(name):
    check_aggregator(lambda: make_aggregator(name))


def test_fedavg_of_identical_updates_is_that_update_bit_exactly():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    agg = fedavg()
    agg.begin(1, 1000)
    for i, n in enumerate([1, 7, 300, 12, 5]):
        agg.add(Update(str(i), x.clone(), n))
    assert torch.equal(agg.result().delta, x)


def test_fedavg_matches_hand_computation():
    agg = fedavg()
    agg.begin(1, 2)
    agg.add(Update("a", torch.tensor([1.0, 0.0]), 1))
    agg.add(Update("b", torch.tensor([4.0, 8.0]), 3))
    res = agg.result()
    # (1*1 + 3*4)/4 = 3.25, (0 + 3*8)/4 = 6
    assert torch.allclose(res.delta, torch.tensor([3.25, 6.0]))
    assert res.weight == 4 and res.count == 2


def test_weighted_by_table_and_callable_and_mean():
    a, b = Update("a", torch.tensor([2.0]), 10), Update("b", torch.tensor([6.0]), 1)
    for agg, want in [(weighted({"a": 1.0, "b": 3.0}), 5.0), (weighted(lambda u: u.num_samples), 26 / 11),
                      (mean(), 4.0)]:
        agg.begin(1, 1)
        agg.add(a)
        agg.add(b)
        assert agg.result().delta.item() == pytest.approx(want)


def test_weighted_unknown_client_without_default_is_an_error():
    agg = weighted({"a": 1.0})
    agg.begin(1, 1)
    with pytest.raises(ConfigError, match="no weight configured for client 'zz'"):
        agg.add(Update("zz", torch.zeros(1), 1))


def test_merging_partials_equals_adding_every_update():
    g = torch.Generator().manual_seed(0)
    ups = [Update(str(i), torch.randn(50, generator=g), int(torch.randint(1, 100, (1,), generator=g))) for i in range(9)]
    whole = fedavg()
    whole.begin(1, 50)
    for u in ups:
        whole.add(u)
    parts = []
    for chunk in (ups[:4], ups[4:]):
        p = fedavg()
        p.begin(1, 50)
        for u in chunk:
            p.add(u)
        parts.append(p.result())
    merged = fedavg()
    merged.begin(1, 50)
    for p in parts:
        merged.merge(p.delta, p.weight, p.count)
    assert torch.allclose(merged.result().delta, whole.result().delta, atol=1e-6)
    assert merged.result().count == 9


def test_zero_weight_round_has_no_result_and_negative_weight_is_refused():
    agg = weighted({"a": 0.0})
    agg.begin(1, 1)
    agg.add(Update("a", torch.ones(1), 1))
    assert agg.result() is None
    with pytest.raises(ConfigError):
        weighted({"b": -1.0})


def test_median_and_trimmed_mean_resist_an_outlier():
    rows = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([1e6])]
    for name, want in [("median", 2.5), ("trimmed_mean", 2.5)]:
        agg = make_aggregator(name, **({"beta": 0.25} if name == "trimmed_mean" else {}))
        agg.begin(1, 1)
        for i, r in enumerate(rows):
            agg.add(Update(str(i), r, 1))
        assert agg.result().delta.item() == pytest.approx(want)


def test_unknown_aggregator_names_the_choices():
    with pytest.raises(ConfigError, match="unknown aggregator 'nope'.*fedavg"):
        make_aggregator("nope")


def test_rules_that_hold_every_update_copy_it_in_and_reuse_their_matrix_safely():
    from fedopt.aggregators.robust import _Collecting

    class FirstRow(_Collecting):  # returns a view of its matrix: the result must survive the next round
        name = "first_row"

        def _combine(self, rows):
            return rows[0]

    agg = FirstRow()
    agg.begin(1, 3)
    sent = torch.tensor([1.0, 2.0, 3.0])
    agg.add(Update("a", sent, 1))
    sent += 10  # the caller reuses its tensor after add()
    first = agg.result().delta
    assert first.tolist() == [1.0, 2.0, 3.0]
    # more updates than the matrix holds (it starts at 4 rows, then doubles), then a smaller round, then a new size
    med = make_aggregator("median")
    for n, size in ((9, 3), (3, 3), (5, 2)):
        rows = [torch.arange(size, dtype=torch.float32) + i for i in range(n)]
        agg.begin(2, size)
        med.begin(2, size)
        for i, r in enumerate(rows):
            agg.add(Update(str(i), r, 1))
            med.add(Update(str(i), r, 1))
        assert agg.result().delta.tolist() == rows[0].tolist()
        assert med.result().delta.tolist() == torch.stack(rows).median(dim=0).values.tolist()
    assert first.tolist() == [1.0, 2.0, 3.0]  # round 1's result, untouched by three rounds in the same matrix
