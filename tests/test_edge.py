"""Edge aggregators (``fedopt aggregator``): what an edge refuses, and, over real processes, 2 edges x 4 clients
against 8 clients on a flat coordinator, and an edge killed mid-run."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from _bus import BASE, Cluster, finished, survivors_sum_matches, wait_for
from coordinator.edge import Edge, EdgeConfig
from fedopt import wire
from fedopt.cli import main
from fedopt.config import RunConfig
from fedopt.data import PartitionSpec
from fedopt.engine.round import capped_weights
from fedopt.errors import ConfigError
from fedopt.params import ParamSpec
from fedopt.task import resolve_task
from fedopt.keys import generate_keys
from fedopt.secagg.quantize import QuantConfig
from fedopt.testing import Fault, SecAggExit


def _welcome(**config) -> wire.Welcome:
    spec = ParamSpec.from_module(torch.nn.Linear(2, 1)).to_dict()
    return wire.Welcome(spec=spec, config={"seed": 0, "heartbeat": 0.5, "secagg": False, "buffered": False,
                                           "aggregator": "fedavg", **config})


@pytest.mark.parametrize("config, says", [({"secagg": True}, "secagg"), ({"aggregator": "median"}, "median"),
                                          ({"buffered": True}, "buffered")])
def test_an_edge_refuses_a_root_it_cannot_pre_aggregate_for(tmp_path, config, says):
    edge = Edge(EdgeConfig(bind=f"ipc://{tmp_path}/e.sock", upstream=f"ipc://{tmp_path}/root.sock", id="e",
                           run=RunConfig.of(clients=1)))
    try:
        with pytest.raises(ConfigError, match=says):
            edge._welcomed(_welcome(**config))
        edge._welcomed(_welcome())  # a linear rule: accepted
        assert edge.server is not None and edge.live.interval == edge.uplink.heartbeat
    finally:
        edge.close()


def test_bad_edge_flags_get_one_line_naming_the_flag_and_exit_2(capsys):
    with pytest.raises(ConfigError, match="--id"):
        EdgeConfig(bind="ipc://x", upstream="ipc://root", id="", run=RunConfig.of(clients=1))
    assert main(["aggregator", "--bind", "ipc://x", "--upstream", "root:5555", "--id", "e", "--clients", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--upstream 'root:5555'" in err
    assert main(["aggregator", "--bind", "ipc://x", "--upstream", "ipc://r", "--id", "e", "--clients", "2",
                 "--max-share", "2"]) == 2
    assert "max-share" in capsys.readouterr().err


ROUNDS = ["--clients", "8", "--rounds", "3", "--seed", "7"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_edges_of_four_clients_give_the_flat_coordinators_model(tmp_path):
    # Honest comparison: FedAvg caps each weight (max_samples, max_share). On these shards no cap binds at any tier
    # (8 clients at the flat coordinator, 4 at each edge, 2 edges at the root), so both runs weigh by sample counts.
    task = resolve_task("digits", {})
    sizes = {str(i): task.load_data(i, 8, 7, PartitionSpec("iid", 0.5)).num_samples for i in range(8)}
    edges = {"a": {c: sizes[c] for c in "0123"}, "b": {c: sizes[c] for c in "4567"}}
    totals = {e: sum(s.values()) for e, s in edges.items()}
    for weights in (sizes, *edges.values(), totals):
        assert capped_weights(weights, 1_000_000, 0.25) == weights
    tree = Cluster(tmp_path)
    try:
        # the root waits for both edges (--min-clients 2); --clients 8 is the run's shard count, sent in WELCOME
        tree.start_coordinator(*BASE, *ROUNDS, "--min-clients", "2", "--join-timeout", "1", "--no-plot")
        urls = {e: tree.start_edge(e, "--clients", "4") for e in edges}
        for e, shards in edges.items():
            for i in shards:
                tree.start_client(int(i), connect=urls[e])
        # meanwhile the flat run: a coordinator in this process, 8 client processes over ipc
        assert main(["simulate", "--transport", "ipc", *BASE, *ROUNDS, "--out", str(tmp_path / "flat"),
                     "--progress", "off", "--no-plot"]) == 0
        rows = finished(tree, 90)
    finally:
        tree.stop()
    assert all(r["clients"] == 2 for r in rows) and all("4 clients aggregated" in tree.log(f"edge-{e}") for e in edges)
    a, b = load_file(tmp_path / "flat" / "model.safetensors"), load_file(tree.out / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max abs diff, flat coordinator vs 2 edges x 4 clients: {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_edge_killed_mid_run_hands_its_clients_to_the_other(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(*BASE, "--clients", "4", "--rounds", "14", "--join-timeout", "1", "--no-plot")
        urls = {e: c.start_edge(e, "--clients", "2") for e in "ab"}
        for i in range(4):
            order = ("a", "b") if i < 2 else ("b", "a")
            # slow enough that the run outlasts the 1.5 s it takes to see a death, and the move
            c.start_client(i, connect=",".join(urls[e] for e in order), faults={Fault.SLOW_TRAIN: 0.2})
        wait_for(lambda: any(r["clients"] == 2 for r in c.rounds()), 60, "a round with both edges")
        os.kill(c.edges["a"].pid, signal.SIGKILL)
        rows = finished(c, 90)
    finally:
        c.stop()
    assert [r["round"] for r in rows] == list(range(1, 15))  # every round once: none lost, none repeated
    assert rows[-1]["clients"] == 1 and "client 0 connected" in c.log("edge-b")
    assert "4 clients aggregated" in c.log("edge-b")  # a's clients trained at b


# ---- secure aggregation at the edges: each edge runs its own SecAgg+ cohort ----------------------------------------
SECURE = ["--aggregator", "secagg", "--clients", "6", "--seed", "7"]


def _secure_tree(tmp_path, rounds: int, at_a: int = 3, client_faults: dict[int, dict] | None = None,
                 root: tuple[str, ...] = ("--min-clients", "2", "--deadline", "60")) -> tuple[Cluster, dict]:
    """A root running secagg over ipc, edges a (clients 0 .. at_a - 1) and b (the rest of 6) with their own cohorts;
    each edge writes the sums it learns to tmp/dump-EDGE (Fault.SECAGG_DUMP), as do its clients their own encoded
    updates."""
    keys = str(generate_keys(tmp_path / "keys", 6))
    tree = Cluster(tmp_path, transport="ipc")
    dumps = {e: tmp_path / f"dump-{e}" for e in "ab"}
    tree.start_coordinator(*BASE, *SECURE, "--rounds", str(rounds), "--join-timeout", "1", *root, "--no-plot")
    sizes = {"a": at_a, "b": 6 - at_a}
    urls = {e: tree.start_edge(e, "--clients", str(sizes[e]), "--identities", keys, "--deadline", "20",
                               faults={Fault.SECAGG_DUMP: dumps[e]}) for e in "ab"}
    for i in range(6):
        e = "a" if i < at_a else "b"
        tree.start_client(i, "--identities", keys, connect=urls[e],
                          faults={Fault.SECAGG_DUMP: dumps[e], **(client_faults or {}).get(i, {})})
    return tree, dumps


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_secagg_at_two_edges_gives_the_flat_secure_model_within_the_quantisation_step(tmp_path):
    # One round from the same initial model: the clients' updates are the same in both runs (same shards and seeds),
    # and each decoded mean is within one quantisation step of their exact weighted mean (fedopt.secagg.quantize:
    # the weights travel exactly), so the two global models differ by at most two steps per coordinate.
    tree, dumps = _secure_tree(tmp_path, rounds=1)
    try:
        assert main(["simulate", "--transport", "ipc", *BASE, *SECURE, "--rounds", "1", "--out",
                     str(tmp_path / "flat"), "--progress", "off", "--no-plot"]) == 0
        rows = finished(tree, 120)
    finally:
        tree.stop()
    assert [r["clients"] for r in rows] == [2]
    for e in "ab":  # each edge's sum is its three clients' encoded updates, added exactly: masks cancelled
        assert survivors_sum_matches(dumps[e], 1)["survivors"] == (["0", "1", "2"] if e == "a" else ["3", "4", "5"])
        assert "3 clients aggregated" in tree.log(f"edge-{e}")
    assert "secure aggregation among" not in tree.log()  # the root ran no cohort: it took two sums
    a, b = load_file(tmp_path / "flat" / "model.safetensors"), load_file(tree.out / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    step = QuantConfig(10.0, 16).step  # secagg's default clip and bits
    print(f"max abs diff, flat secagg vs 2 edges x 3 clients with their own cohorts: {diff:.3g} (step {step:.3g})")
    assert diff <= 2 * step + 1e-6


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_client_killed_in_an_edges_secure_cohort_leaves_the_round_to_close(tmp_path):
    # client 0 of edge a's four dies on the message that starts the masked-input stage of round 1: it shared its keys,
    # so the cohort unmasks without it (its masks rebuilt from t = 2 of its 3 neighbours' shares). With three clients
    # the protocol itself would abort (k = 2, t = 2: one survivor short), as on a flat coordinator
    tree, dumps = _secure_tree(tmp_path, rounds=2, at_a=4,
                               client_faults={0: {Fault.EXIT_AT_SECAGG_STAGE: SecAggExit("mask", 1)}})
    try:
        rows = finished(tree, 150)
    finally:
        tree.stop()
    assert "injected fault: SIGKILL" in tree.log("client-0")
    assert [r["round"] for r in rows] == [1, 2] and [r["clients"] for r in rows] == [2, 2]
    meta = survivors_sum_matches(dumps["a"], 1)
    assert meta["survivors"] == ["1", "2", "3"] and meta["dropped"] == ["0"]
    assert survivors_sum_matches(dumps["a"], 2)["survivors"] == ["1", "2", "3"]
    assert survivors_sum_matches(dumps["b"], 1)["survivors"] == ["4", "5"]
    assert "3 clients aggregated" in tree.log("edge-a")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_edge_whose_cohort_aborts_passes_and_the_root_closes_the_round_without_waiting_its_deadline(tmp_path):
    # edge a has three clients; client 0 dies at the masked-input stage of round 1, and with k = 2, t = 2 the
    # protocol aborts (one survivor short). Edge a sends PASS: the root stops waiting for it and closes round 1 on
    # edge b alone (--min-clients 1), well inside its 200 s deadline. Round 2: edge a's cohort is its two live
    # clients, and both edges answer
    tree, dumps = _secure_tree(tmp_path, rounds=2, at_a=3,
                               client_faults={0: {Fault.EXIT_AT_SECAGG_STAGE: SecAggExit("mask", 1)}},
                               root=("--min-clients", "1", "--deadline", "200"))
    try:
        rows = finished(tree, 280)
    finally:
        tree.stop()
    assert "injected fault: SIGKILL" in tree.log("client-0")
    assert "no update, PASS" in tree.log("edge-a")
    assert "client a dropped (passed: secure round:" in tree.log()
    assert [r["round"] for r in rows] == [1, 2] and [r["clients"] for r in rows] == [1, 2]
    # the root closed round 1 when edge a passed (its cohort gave up after its own 20 s stage deadline), not at 200 s
    assert rows[0]["seconds"] < 200
    assert survivors_sum_matches(dumps["b"], 1)["survivors"] == ["3", "4", "5"]


def test_an_edge_runs_its_own_cohort_for_a_secagg_root_and_refuses_options_it_cannot_use(tmp_path):
    edge = Edge(EdgeConfig(bind=f"ipc://{tmp_path}/e.sock", upstream=f"ipc://{tmp_path}/root.sock", id="e",
                           run=RunConfig.of(clients=1)))
    try:
        for bad in ({"clip": "x"}, {"inner": "median"}, {"clip": 1.0, "eval": 1}, [1]):
            with pytest.raises(ConfigError, match="secagg"):
                edge._welcomed(_welcome(secagg=True, aggregator="secagg", secagg_options=bad))
        edge._welcomed(_welcome(secagg=True, aggregator="secagg", secagg_options={"clip": 5.0, "bits": 12}))
        assert edge.server.external and edge.server.aggregator.clip == 5.0
    finally:
        edge.close()


def test_a_leaf_count_claim_is_bounded_by_the_weight_and_the_run_before_it_counts(tmp_path):
    # an edge (a ClientLink, as the root is) takes READY's leaf count only when each leaf weighs at least 1 and there
    # are no more leaves than the run's clients; a refused READY leaves the peer not ready
    edge = Edge(EdgeConfig(bind=f"ipc://{tmp_path}/e.sock", upstream=f"ipc://{tmp_path}/root.sock", id="e",
                           run=RunConfig.of(clients=10)))
    try:
        edge._welcomed(_welcome())
        for peer, claim in ((b"p1", wire.Ready(num_samples=5, clients=6)), (b"p2", wire.Ready(num_samples=99,
                                                                                            clients=11))):
            edge._handle(peer, wire.Hello(client=peer.decode()))
            edge._handle(peer, claim)
        assert edge.registry.edges() == {} and edge.registry.sizes() == {} and edge.dropped_messages == 2
        edge._handle(b"p3", wire.Hello(client="p3"))
        edge._handle(b"p3", wire.Ready(num_samples=50, clients=10))
        assert edge.registry.edges() == {"p3": 10} and edge.registry.sizes() == {"p3": 50}
    finally:
        edge.close()
