"""Buffered asynchronous rounds (FedBuff) over the real bus: equivalence with synchronous FedAvg, a client killed
mid-job, the coordinator killed and resumed, and secure buffers (each one a SecAgg+ cohort)."""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _bus import BASE, Cluster, finished, signed_sum, survivors_sum_matches, wait_for
from fedopt.checkpoint import load_checkpoint
from fedopt.cli import main
from fedopt.config import RunConfig
from fedopt.engine import RoundServer
from fedopt.keys import generate_keys
from fedopt.task import resolve_task
from fedopt.testing import Fault, SecAggExit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_c_equals_k_equals_o_equals_every_client_is_synchronous_fedavg_on_the_bus(tmp_path):
    common = ["simulate", "--transport", "ipc", "--clients", "4", "--rounds", "10", "--local-epochs", "1", "--seed",
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
            c.start_client(i, faults={Fault.SLOW_TRAIN: 0.2 * (i + 1)})  # staggered: a buffer often holds one update
        wait_for(lambda: len(c.rounds()) >= 3, 120, "three steps")
        time.sleep(random.uniform(0, 0.5))  # a random point in the run, then the next moment the buffer is not empty
        wait_for(lambda: any((c.out / "buffer").glob("*.safetensors")), 60, "an update in the buffer", step=0.01)
        os.killpg(c.coordinator.pid, signal.SIGKILL)
        c.coordinator.wait(timeout=10)
        applied = len(c.rounds())
        ckpt = load_checkpoint(c.out).round
        waiting = len(list((c.out / "buffer").glob(f"{ckpt + 1}-*.safetensors")))  # accepted, not yet applied
        c.start_coordinator(*opts, resume=True)
        rows = finished(c)
    finally:
        c.stop()
    assert [r["version"] for r in rows] == list(range(1, 11))  # every version exactly once: none lost, none repeated
    assert applied >= 3 and "resuming after round" in c.log()
    # the buffer as it was: its accepted updates are offered again, not trained again
    assert (f"version {ckpt + 1}: {waiting} updates restored to the buffer" in c.log()) == (waiting > 0)


def test_each_secure_buffer_is_a_cohort_whose_sum_is_exactly_what_its_survivors_masked(tmp_path):
    """5 client processes, C = 5, K = 4, --aggregator secagg: each full buffer is one SecAgg+ cohort; client 4 dies
    in its cohort after sharing keys. Every cohort's sum is the exact modular sum of its survivors' encoded updates,
    and the global model is plaintext FedBuff's on the same staleness-weighted arrivals within the quantisation
    bound (one step per version)."""
    secure_buffers_match_plaintext(tmp_path, clients=5, buffer=4, versions=3)


def secure_buffers_match_plaintext(tmp_path, clients: int, buffer: int, versions: int) -> dict:
    """The secure-buffers check with C = ``clients`` processes, K = ``buffer``, the last client killed at its first
    cohort's masking stage; returns the figures (also run with K = 10 for the README)."""
    keys = str(generate_keys(tmp_path / "keys", clients))
    dump, dying = tmp_path / "dump", clients - 1
    seam = {Fault.SECAGG_DUMP: dump}
    c = Cluster(tmp_path, keys)
    opts = [*BASE, "--clients", str(clients), "--rounds", str(versions), "--buffer-size", str(buffer), "--concurrency",
            str(clients), "--aggregator", "secagg", "--deadline", "40", "--seed", "4"]
    try:
        c.start_coordinator(*opts, faults=seam)
        for i in range(clients):
            c.start_client(i, faults={**seam, **({Fault.EXIT_AT_SECAGG_STAGE: SecAggExit("mask")} if i == dying
                                                  else {})})
        rows = finished(c)
    finally:
        c.stop()
    assert [r["version"] for r in rows] == list(range(1, versions + 1)), c.log()[-3000:]
    assert all(r["aborted"] is None for r in rows), c.log()[-3000:]
    assert "injected fault: SIGKILL" in c.log(f"client-{dying}")
    metas = [survivors_sum_matches(dump, r["cohort"]) for r in rows]
    assert [m["dropped"] for m in metas if m["dropped"]] == [[str(dying)]]
    assert [r["clients"] for r in rows] == [len(m["survivors"]) for m in metas]
    assert sum(r["clients"] for r in rows) == versions * buffer - 1

    # plaintext FedBuff on the same arrivals: the survivors' staleness-weighted float updates, weighted as folded in
    cfg = RunConfig.of(task="digits", clients=clients, partition="iid", aggregator="secagg", seed=4,
                       buffer_size=buffer, concurrency=clients)

    def initial() -> RoundServer:
        return RoundServer.for_run(cfg, resolve_task("digits"), torch.device("cpu"))

    secure, plain = initial(), initial()
    step = 10.0 / (2 ** 15 - 1)  # one quantisation step: clip / (2^(bits-1) - 1) with secagg's defaults
    worst = 0.0
    for r, meta in zip(rows, metas):
        total = np.load(dump / f"sum-{r['cohort']}.npy")
        assert meta["modulus_bits"] <= 32  # K = 4 weighted clients: no round needs 64-bit words
        signed = signed_sum(total, meta["modulus_bits"]).astype(np.float64)
        decoded = signed[:-1] * step / signed[-1]  # what the coordinator learned: the weighted mean
        weights = [int(np.load(dump / f"encoded-{r['cohort']}-{u}.npy")[-1]) for u in meta["survivors"]]
        updates = [np.load(dump / f"update-{r['cohort']}-{u}.npy").astype(np.float64) for u in meta["survivors"]]
        exact = sum(w * x for w, x in zip(weights, updates)) / sum(weights)
        worst = max(worst, float(np.abs(decoded - exact).max()))
        secure.optimizer.step(secure.global_vec, torch.from_numpy(decoded).float())
        plain.optimizer.step(plain.global_vec, torch.from_numpy(exact).float())
    assert worst <= step
    final = load_checkpoint(c.out).global_vec
    applied = float((final - secure.global_vec).abs().max())
    vs_plain = float((final - plain.global_vec).abs().max())
    assert applied <= 1e-6  # the coordinator applied exactly what it summed
    assert vs_plain <= versions * step
    assert float((final - initial().global_vec).abs().max()) > 10 * step  # and the model moved
    return {"cohort_mean_max_abs_diff": worst, "model_vs_plaintext_max_abs_diff": vs_plain,
            "model_vs_decoded_sums_max_abs_diff": applied, "quantisation_step": step,
            "survivors": [len(m["survivors"]) for m in metas]}
