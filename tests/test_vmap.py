"""The vmap backend trains exactly what the sequential backend trains, and falls back with one line when it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients.simulation.run import SequentialExecutor, Simulation
from clients.simulation.vmap import VmapExecutor
from fedopt import task as task_mod
from fedopt.config import RunConfig
from fedopt.data.digits import DigitsTask
from fedopt.task import sgd_loop

BASE = dict(task="digits", clients=8, rounds=2, lr=0.05, batch_size=16, progress="off", seed=5, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def final(**kw):
    sim = Simulation(RunConfig.of(**{**BASE, **kw}))
    return sim, sim.run(None).global_vec


@pytest.mark.parametrize("extra", [
    dict(local_epochs=2),
    dict(local_epochs=2, momentum=0.9, mu=0.1),
    dict(local_epochs=1, stragglers=0.5, mu=0.01, clients_per_round=6),
    dict(local_epochs=1, algorithm="scaffold", clients_per_round=4, rounds=3),
    dict(local_epochs=1, aggregator="median"),
])
def test_vmap_matches_sequential(extra):
    seq_sim, seq = final(**extra)
    vm_sim, vm = final(backend="vmap", **extra)
    assert isinstance(seq_sim.executor, SequentialExecutor) and isinstance(vm_sim.executor, VmapExecutor)
    assert torch.allclose(seq, vm, atol=2e-5), (seq - vm).abs().max()


class BatchNormTask(DigitsTask):
    def build_model(self):
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


class OwnTrainTask(DigitsTask):
    def train(self, model, data, config):
        return sgd_loop(self.loss, model, data.train, config)


class SumLossTask(DigitsTask):
    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum")


@pytest.mark.parametrize("factory, why", [
    (BatchNormTask, "buffers"),
    (OwnTrainTask, "writes its own train"),
    (SumLossTask, "not a mean over the samples"),
])
def test_unvmappable_tasks_fall_back_with_one_line(monkeypatch, capsys, factory, why):
    monkeypatch.setitem(task_mod._REGISTERED, "odd", factory)
    sim = Simulation(RunConfig.of(**{**BASE, "task": "odd", "backend": "vmap", "rounds": 1}))
    err = capsys.readouterr().err.strip().splitlines()
    assert isinstance(sim.executor, SequentialExecutor)
    assert len(err) == 1 and "vmap backend unavailable" in err[0] and why in err[0], err
