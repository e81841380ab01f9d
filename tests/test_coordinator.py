"""End to end over real processes: coordinator + clients over tcp with CurveZMQ, matched against in-process."""

from __future__ import annotations

import math

import pytest

from _bus import Cluster, wait_for
from clients.simulation.run import simulate
from coordinator.registry import Registry, RoundTracker
from fedopt.config import RunConfig
from fedopt.keys import generate_keys

ROUND_OPTS = ["--task", "digits", "--clients", "3", "--rounds", "3", "--local-epochs", "1", "--seed", "7",
              "--partition", "iid", "--heartbeat", "0.5"]


def test_registry_keeps_client_ids_across_reconnects():
    reg = Registry()
    assert reg.hello(b"a", "0", "cpu") is None
    reg.ready(b"a", 10)
    assert reg.hello(b"b", "0", "cpu") == b"a"  # the same client on a new socket replaces the old one
    assert reg.get(b"a") is None and reg.peer_of("0") == b"b" and reg.sizes() == {}
    reg.ready(b"b", 12)
    assert reg.sizes() == {"0": 12}
    assert reg.remove(b"b").client == "0" and len(reg) == 0


def test_round_tracker_grants_uploads_within_its_slots():
    t = RoundTracker(3, ["0", "1", "2"], deadline_at=10.0, slots=2)
    assert t.offer("0") and t.offer("1") and t.offer("2") and not t.offer("9") and not t.offer("0")
    assert t.grants() == ["0", "1"] and t.grants() == []
    assert t.expects("0") and not t.expects("2")
    t.received("0", accepted=True)
    assert t.grants() == ["2"]
    assert t.drop("1") and not t.drop("1")
    t.received("2", accepted=False)
    assert t.complete and t.accepted == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_coordinator_and_clients_over_curve_match_in_process(tmp_path):
    keys = str(generate_keys(tmp_path / "keys", 3))
    c = Cluster(tmp_path, keys)
    try:
        c.start_coordinator(*ROUND_OPTS, "--fed-eval-every", "3")
        for i in range(3):
            c.start_client(i)
        assert wait_for(lambda: c.coordinator.poll() is not None, 180, "the run to finish") is not None
        assert c.coordinator.returncode == 0, c.log()
        for p in c.clients.values():
            p.wait(timeout=30)
            assert p.returncode == 0  # BYE "done" ends each client
    finally:
        c.stop()
    rows = c.rounds()
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["clients"] == 3 for r in rows)
    assert rows[-1]["fed_clients"] == 3 and math.isfinite(rows[-1]["fed_accuracy"])
    assert (c.out / "model.safetensors").exists() and (c.out / "checkpoint.safetensors").exists()
    ref = simulate(RunConfig.of(task="digits", clients=3, rounds=3, local_epochs=1, seed=7, partition="iid",
                             out=str(tmp_path / "ref"), progress="off"))
    assert abs(rows[-1]["accuracy"] - ref.records[-1]["accuracy"]) <= 0.005
