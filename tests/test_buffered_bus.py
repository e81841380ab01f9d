"""Buffered asynchronous rounds (FedBuff) over the real bus: equivalence with synchronous FedAvg, a client killed
mid-job, and the coordinator killed and resumed."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from safetensors.torch import load_file

from _bus import BASE, Cluster, finished, wait_for
from fedopt.cli import main
from fedopt.testing import Fault

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_c_equals_k_equals_o_equals_every_client_is_synchronous_fedavg_on_the_bus(tmp_path):
    common = ["simulate", "--transport", "ipc", "--clients", "4", "--rounds", "6", "--local-epochs", "1", "--seed",
              "2", "--progress", "off", "--no-plot"]
    assert main([*common, "--out", str(tmp_path / "sync")]) == 0
    assert main([*common, "--out", str(tmp_path / "buf"), "--buffer-size", "4", "--concurrency", "4",
                 "--dispatch-threshold", "4"]) == 0
    a, b = load_file(tmp_path / "sync" / "model.safetensors"), load_file(tmp_path / "buf" / "model.safetensors")
    # the same clients, seeds and weights; only the order updates land in (and so float rounding) may differ
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_a_client_killed_mid_job_never_stalls_a_buffer(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(*BASE, "--clients", "4", "--rounds", "24", "--buffer-size", "2", "--concurrency", "3",
                            "--deadline", "60")
        for i in range(3):
            c.start_client(i, faults={Fault.SLOW_TRAIN: 0.25})  # the run outlasts the 1.5 s it takes to see a death
        c.start_client(3, faults={Fault.SLOW_TRAIN: 30})  # caught mid-job whenever it is drawn
        wait_for(lambda: "training round" in c.log("client-3"), 90, "client 3 to be started")
        os.killpg(c.clients[3].pid, signal.SIGKILL)
        rows = finished(c)
    finally:
        c.stop()
    assert [r["version"] for r in rows] == list(range(1, 25)) and all(r["clients"] == 2 for r in rows)
    assert sum(r["rejected"] for r in rows) == 1  # its job failed once (dead after 3 silent heartbeats), then freed
    assert "client 3 is silent for 3 heartbeats: dead" in c.log()


def test_coordinator_killed_and_resumed_loses_no_applied_step(tmp_path):
    c = Cluster(tmp_path)
    opts = [*BASE, "--clients", "3", "--rounds", "10", "--buffer-size", "2", "--concurrency", "3"]
    try:
        c.start_coordinator(*opts)
        for i in range(3):
            c.start_client(i)
        wait_for(lambda: len(c.rounds()) >= 3, 120, "three steps")
        time.sleep(random.uniform(0, 0.5))  # a random point in the run
        os.killpg(c.coordinator.pid, signal.SIGKILL)
        c.coordinator.wait(timeout=10)
        applied = len(c.rounds())
        c.start_coordinator(*opts, resume=True)
        rows = finished(c)
    finally:
        c.stop()
    assert [r["version"] for r in rows] == list(range(1, 11))  # every version exactly once: none lost, none repeated
    assert applied >= 3 and "resuming after round" in c.log()
