"""The worker pool: same model as in-process, per-client updates for aggregators that need them, clean teardown."""

from __future__ import annotations

import psutil
import pytest
import torch

from clients.simulation.pool import PoolExecutor
from clients.simulation.run import Simulation
from fedopt.config import RunConfig
from fedopt.errors import RoundError

BASE = dict(task="digits", clients=9, rounds=2, local_epochs=1, lr=0.05, batch_size=16, progress="off", seed=2,
            device="cpu")

pytestmark = pytest.mark.slow  # spawns worker processes (each imports torch)


def children() -> set[int]:
    """Worker processes (multiprocessing's resource tracker is shared by design and outlives any one pool)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("extra", [dict(), dict(aggregator="median", algorithm="scaffold", clients_per_round=5)])
def test_pool_matches_in_process_and_leaves_no_process(extra):
    before = children()
    torch.set_num_threads(1)
    ref = Simulation(RunConfig.of(**{**BASE, **extra, "workers": 1})).run(None).global_vec
    sim = Simulation(RunConfig.of(**{**BASE, **extra, "workers": 2}))
    assert isinstance(sim.executor, PoolExecutor)
    got = sim.run(None).global_vec
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    assert children() - before == set()


def test_a_worker_that_dies_ends_the_run_with_a_clear_error():
    sim = Simulation(RunConfig.of(**{**BASE, "workers": 2}))
    ex = sim.executor
    ex._wait_ready()
    ex._procs[1].kill()
    with pytest.raises(RoundError, match="fedopt-sim-worker-1 exited"):
        sim.run(None)
    assert all(not p.is_alive() for p in ex._procs) or not ex._procs
