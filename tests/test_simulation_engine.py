"""The simulation engine: lazy shards, executor choice, SCAFFOLD end to end, fallbacks and clear errors."""

from __future__ import annotations

import torch
import pytest

from clients.simulation.scaffold import ScaffoldServer, control_delta
from clients.simulation.shards import ShardSource
from clients.simulation.run import SequentialExecutor, Simulation, default_workers
from fedopt.config import RunConfig
from fedopt.data import PartitionSpec
from fedopt.data.digits import DigitsTask
from fedopt.errors import ConfigError
from fedopt.task import sgd_loop

BASE = dict(task="digits", clients=12, rounds=2, local_epochs=1, lr=0.05, batch_size=16, progress="off", seed=3)


def run(**kw):
    sim = Simulation(RunConfig.of(**{**BASE, **kw}))
    res = sim.run(None)
    return sim, res


def drive(sim: Simulation, rounds: int) -> None:
    """Rounds as Simulation.run does them, leaving the executor open for inspection."""
    srv = sim.server
    for r in range(1, rounds + 1):
        jobs = srv.plan(r, sim.sizes)
        srv.begin(r)
        sim.scaffold.begin()
        sim.executor.run_round(srv, jobs)
        if srv.close().applied:
            sim.scaffold.step()


def test_shards_are_lazy_and_bounded_by_the_cache():
    task = DigitsTask()
    src = ShardSource(task, 50, 0, PartitionSpec("dirichlet", 0.5), cache_bytes=4096)
    assert len(src) == 50 and sum(src.sizes.values()) == 1437
    assert len(src._cache) == 0  # nothing loaded to count sizes: the task gives shard_sizes
    for i in range(50):
        assert src[i].num_samples == src.sizes[str(i)]
    assert src._cached_bytes <= 4096
    eager = task.load_data(7, 50, 0, PartitionSpec("dirichlet", 0.5))
    assert torch.equal(src[7].train[0], eager.train[0])
    with pytest.raises(IndexError):
        src[50]


def test_default_is_in_process_for_small_models():
    sim = Simulation(RunConfig.of(**BASE))
    assert isinstance(sim.executor, SequentialExecutor)
    assert default_workers(sim.cfg.replace(workers=3), sim.spec) == 3


def test_sequential_run_restores_torch_threads_and_learns():
    before = torch.get_num_threads()
    sim, res = run(rounds=4, local_epochs=2, clients=5, lr=0.1)
    assert torch.get_num_threads() == before
    assert sim.evaluate()["accuracy"] > 0.5


def test_scaffold_control_delta_is_option_two():
    delta, c = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    # c_i+ - c_i = -c + (x - y) / (K lr) with y - x = delta
    assert torch.allclose(control_delta(delta, c, 4, 0.5), -c - delta / 2.0)
    assert torch.equal(control_delta(delta, c, 0, 0.5), torch.zeros(2))


def test_scaffold_keeps_client_state_between_rounds_and_moves_the_server_variate():
    sim = Simulation(RunConfig.of(**{**BASE, "algorithm": "scaffold", "clients": 6, "clients_per_round": 3}))
    drive(sim, 3)
    store = sim.executor.host.scaffold.store
    trained = len(store)
    assert 3 <= trained <= 6
    assert sim.scaffold.control.abs().sum() > 0
    # the server variate is (1/N) times the sum of every stored client variate when all start at zero
    total = sum(store.get(str(i)) for i in range(6) if str(i) in store)
    assert torch.allclose(sim.scaffold.control, total / 6, atol=1e-2)
    sim.executor.close()


def test_scaffold_spills_client_state_past_the_budget():
    sim = Simulation(RunConfig.of(**{**BASE, "algorithm": "scaffold", "clients": 8, "state_budget_mb": 0.02}))
    ex = sim.executor
    drive(sim, 2)
    store = ex.host.scaffold.store
    assert store.memory_bytes <= 0.02 * 2**20 and store.disk_rows > 0 and len(store) == 8
    ex.close()


class OwnTrain(DigitsTask):
    def train(self, model, data, config):
        return sgd_loop(self.loss, model, data.train, config)


def test_scaffold_refuses_a_task_with_its_own_train(monkeypatch):
    from fedopt import task as task_mod

    monkeypatch.setitem(task_mod._REGISTERED, "own-train", OwnTrain)
    with pytest.raises(ConfigError, match="scaffold needs a task"):
        Simulation(RunConfig.of(**{**BASE, "task": "own-train", "algorithm": "scaffold"}))


def test_scaffold_server_step_scales_by_one_over_n():
    s = ScaffoldServer(3, num_clients=4)
    s.begin()
    s.add(torch.tensor([4.0, 0.0, -8.0]), 2)
    s.step()
    assert torch.equal(s.control, torch.tensor([1.0, 0.0, -2.0]))


def test_cuda_without_a_gpu_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        Simulation(RunConfig.of(**{**BASE, "device": "cuda"}))


def test_bad_algorithm_and_budget_are_config_errors():
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        RunConfig.of(algorithm="fedsplit")
    with pytest.raises(ConfigError, match="state-budget-mb"):
        RunConfig.of(state_budget_mb=-1)
