"""Sampling leaf clients through edge aggregators (fedopt.engine.tiers): quotas, an edge's share, the root's plan,
and READY's leaf count on the wire and at the registry."""

from __future__ import annotations

import msgpack
import pytest
import torch

from coordinator.registry import Registry
from fedopt import wire
from fedopt.aggregators import fedavg
from fedopt.config import Bounds
from fedopt.engine import RoundServer
from fedopt.engine.tiers import edge_sample, leaf_quotas, parse_leaf_sample
from fedopt.errors import WireError
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.task import TrainConfig


@pytest.mark.parametrize("counts, k", [({"a": 2500, "b": 2500, "c": 2500, "d": 2500}, 1000),
                                       ({"a": 1, "b": 7, "e": 3000}, 5), ({"a": 10, "x": 1}, 11),
                                       ({"a": 10, "x": 1}, 50), ({"a": 4}, 0)])
def test_quotas_split_exactly_k_leaves_never_more_than_a_candidate_holds(counts, k):
    q = leaf_quotas(3, 7, counts, k)
    assert sum(q.values()) == min(k, sum(counts.values()))
    assert all(1 <= q[c] <= counts[c] for c in q)
    assert q == leaf_quotas(3, 7, dict(reversed(counts.items())), k)  # seeded by (seed, round), not dict order
    if k >= sum(counts.values()):
        assert q == counts


def test_an_edge_asks_its_quota_and_proportionally_more_after_a_failover():
    pool = [str(i) for i in range(2500)]
    asked = edge_sample(1, 4, "edge-0", pool, 250, 2500)
    assert len(asked) == 250 and set(asked) <= set(pool) and asked == sorted(asked)
    assert asked == edge_sample(1, 4, "edge-0", list(reversed(pool)), 250, 2500)
    assert asked != edge_sample(1, 5, "edge-0", pool, 250, 2500)  # another round, another draw
    assert len(edge_sample(1, 4, "e", pool + [f"m{i}" for i in range(2500)], 250, 2500)) == 500  # clients moved in
    assert len(edge_sample(1, 4, "e", pool[:10], 250, 2500)) == 1  # 250 * 10 / 2500, never more than it holds
    assert edge_sample(1, 4, "e", pool[:10], 2500, 2500) == sorted(pool[:10])  # the whole edge: all it holds


@pytest.mark.parametrize("config", [{"leaf_sample": 3}, {"leaf_sample": 5, "leaf_of": 4}, {"leaf_sample": -1,
                                    "leaf_of": 4}, {"leaf_sample": True, "leaf_of": 4}, {"leaf_sample": 1,
                                    "leaf_of": 0}, {"leaf_sample": 1.0, "leaf_of": 4}, {"leaf_sample": 1,
                                    "leaf_of": 1 << 41}])
def test_a_malformed_quota_from_the_root_is_refused_naming_the_fields(config):
    with pytest.raises(ValueError, match="leaf_sample"):
        parse_leaf_sample(config)


def test_no_quota_means_every_client_and_a_valid_one_is_read():
    assert parse_leaf_sample({"lr": 0.1}) is None
    assert parse_leaf_sample({"leaf_sample": 0, "leaf_of": 4}) == (0, 4)


def _server(per_round: int) -> RoundServer:
    spec = ParamSpec.from_module(torch.nn.Linear(2, 1))
    return RoundServer(spec, torch.zeros(spec.size), fedavg(), make_server_optimizer("fedavg", 1.0), TrainConfig(),
                       per_round=per_round, seed=9, bounds=Bounds(max_samples=100, max_share=1.0))


def test_a_root_with_edges_samples_leaves_and_grants_each_edge_at_most_its_quotas_weight():
    server = _server(per_round=1000)
    server.leaves = {"edge-0": 2500, "edge-1": 2500, "edge-2": 2500, "edge-3": 2500}
    sizes = {e: 250_000 for e in server.leaves}  # announced: 2,500 clients of 100 samples each, capped at 100 each
    jobs = server.plan(2, sizes)
    quotas = leaf_quotas(9, 2, server.leaves, 1000)
    assert {j.client: j.sample for j in jobs} == {e: (quotas[e], 2500) for e in quotas}
    server.begin(2)
    for e, q in quotas.items():
        # the announced weight, capped to 100 (max_samples), times the edge's share of the round's leaves, rounded up
        assert server.weight_of(e) == -(-100 * q // 2500) and server.granted(e, 10**6) == server.weight_of(e)
    flat = _server(per_round=3)  # no edges: the candidates themselves are sampled, as always
    assert [j.sample for j in flat.plan(2, {str(i): 10 for i in range(8)})] == [None] * 3


def test_a_plain_clients_ready_is_what_version_1_sent_and_a_leaf_count_is_bounded():
    frames = wire.encode(wire.Ready(num_samples=5, sender="3"))
    assert "clients" not in msgpack.unpackb(frames[0])
    assert wire.decode(wire.encode(wire.Ready(num_samples=50, clients=7))).clients == 7
    head = msgpack.unpackb(frames[0])
    for bad in (-1, True, 1 << 41, 2.0):
        with pytest.raises(WireError, match="clients"):
            wire.decode([msgpack.packb({**head, "clients": bad})])


def test_the_registry_lists_ready_edges_and_forgets_them_with_their_connection():
    reg = Registry()
    reg.hello(b"p1", "edge-a", "edge")
    reg.hello(b"p2", "7", "cpu")
    reg.ready(b"p1", 500, clients=5)
    reg.ready(b"p2", 10)
    assert reg.edges() == {"edge-a": 5}
    reg.ready(b"p1", 900, clients=9)  # a later READY changes nothing
    assert reg.edges() == {"edge-a": 5}
    reg.hello(b"p3", "edge-a", "edge")  # it reconnected: ready again only after its next READY
    assert reg.edges() == {}
    reg.ready(b"p3", 500, clients=4)
    reg.remove(b"p3")
    assert reg.edges() == {}
