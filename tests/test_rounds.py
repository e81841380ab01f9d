import torch

from fedopt.aggregators import Update, fedavg
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.engine import RoundServer, client_seed
from fedopt.task import TrainConfig


def server(**kw):
    spec = ParamSpec.from_module(torch.nn.Linear(2, 1))
    args = dict(per_round=3, seed=1)
    args.update(kw)
    return RoundServer(spec, torch.zeros(spec.size), fedavg(), make_server_optimizer("fedavg"), TrainConfig(), **args)


def test_selection_is_seeded_and_independent_of_candidate_order():
    s = server()
    ids = [str(i) for i in range(10)]
    assert s.select(4, ids) == s.select(4, list(reversed(ids)))
    assert s.select(4, ids) != s.select(5, ids) or s.select(6, ids) != s.select(5, ids)
    assert len(s.select(1, ids[:2])) == 2


def test_nan_wrong_length_and_straggler_updates_are_refused_and_recorded():
    s = server()
    s.begin(1)
    assert s.offer(Update("nan", torch.tensor([float("nan"), 0, 0]), 5)) is not None
    assert s.offer(Update("inf", torch.tensor([float("inf"), 0, 0]), 5)) is not None
    assert "wrong length" in s.offer(Update("short", torch.zeros(2), 5))
    assert "straggler" in s.offer(Update("slow", torch.ones(3), 5, partial=True))
    assert s.offer(Update("ok", torch.ones(3), 5)) is None
    out = s.close()
    assert out.applied and out.count == 1 and set(out.rejected) == {"nan", "inf", "short", "slow"}
    assert torch.equal(s.global_vec, torch.ones(3))


def test_fedprox_keeps_partial_work():
    s = server(keep_stragglers=True)
    s.begin(1)
    assert s.offer(Update("slow", torch.ones(3), 5, partial=True)) is None
    assert s.close().count == 1


def test_plan_gives_stragglers_a_partial_budget_and_per_client_seeds():
    s = server(stragglers=0.5, per_round=4)
    jobs = s.plan(1, {str(i): 32 for i in range(8)})
    assert len(jobs) == 4 and sum(j.straggler for j in jobs) == 2
    for j in jobs:
        full = j.config.epochs * j.config.steps_per_epoch(32)
        assert (j.config.max_steps is not None) == j.straggler
        assert j.config.max_steps is None or 1 <= j.config.max_steps <= full
        assert j.config.seed == client_seed(1, 1, j.client)
    assert len({j.config.seed for j in jobs}) == 4


def test_empty_round_leaves_the_model_alone():
    s = server()
    s.begin(1)
    out = s.close()
    assert not out.applied and torch.equal(s.global_vec, torch.zeros(3))
