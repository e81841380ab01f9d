"""The standard loop: tensors and a Dataset train alike; Adam/AdamW, clipping and per-round schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedopt.aggregators import make_aggregator
from fedopt.config import RunConfig
from fedopt.errors import ConfigError
from fedopt.local_sgd import sgd_loop
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.engine import RoundServer
from fedopt.schedules import scheduled_lr
from fedopt.task import TrainConfig, evaluate_classifier


def _data(n=50):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_dataset_trains_exactly_like_the_same_tensors(optimizer):
    x, y = _data()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, optimizer=optimizer, weight_decay=0.01, seed=11)
    a, b = _model(), _model()
    ma = sgd_loop(_loss, a, (x, y), cfg)
    mb = sgd_loop(_loss, b, TensorDataset(x, y), cfg)
    assert ma["steps"] == mb["steps"] == 21 and ma["samples"] == mb["samples"] == 150
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert evaluate_classifier(a, (x, y)) == pytest.approx(evaluate_classifier(b, TensorDataset(x, y)))


def test_adam_is_torch_adam_and_clipping_bounds_every_step():
    x, y = _data()
    cfg = TrainConfig(epochs=1, batch_size=50, lr=0.05, optimizer="adam", seed=1)
    ours, ref = _model(), _model()
    sgd_loop(_loss, ours, (x, y), cfg)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    _loss(ref, (x, y)).backward()  # one full batch: the shuffle does not change the gradient
    opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # clipped SGD: one step moves the parameters by at most lr * clip_norm
    clipped = _model()
    before = torch.cat([p.detach().flatten() for p in clipped.parameters()])
    sgd_loop(_loss, clipped, (x * 100, y), TrainConfig(epochs=1, batch_size=50, lr=1.0, clip_norm=0.01))
    after = torch.cat([p.detach().flatten() for p in clipped.parameters()])
    assert float((after - before).norm()) <= 0.01 + 1e-6


def test_schedules_over_rounds_and_the_server_sends_each_rounds_rate():
    assert [scheduled_lr(1.0, "cosine", r, 4) for r in (1, 3)] == [1.0, pytest.approx(0.5)]
    assert scheduled_lr(1.0, "cosine", 4, 4, lr_min=0.2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(0.75 * math.pi)) / 2)
    assert [scheduled_lr(0.8, "step", r, 9, step=3, gamma=0.5) for r in (1, 3, 4, 7)] == [0.8, 0.8, 0.4, 0.2]
    cfg = RunConfig.of(lr=0.01, optimizer="adam", lr_schedule="cosine", rounds=10, clip_norm=5.0)
    model = _model()
    spec = ParamSpec.from_module(model)
    server = RoundServer(spec, spec.flatten(model), make_aggregator("fedavg"), make_server_optimizer("fedavg"),
                         cfg.train.train_config(), per_round=2, lr_at=cfg.lr_at)
    for r in (1, 6, 10):
        jobs = server.plan(r, {"0": 10, "1": 10})
        assert [j.config.lr for j in jobs] == [pytest.approx(cfg.lr_at(r))] * 2
        assert all(j.config.optimizer == "adam" and j.config.clip_norm == 5.0 for j in jobs)
    assert cfg.lr_at(1) == 0.01 and cfg.lr_at(10) < 0.001


@pytest.mark.parametrize("bad, word", [
    (dict(optimizer="rmsprop"), "optimizer"), (dict(lr_schedule="linear"), "lr-schedule"),
    (dict(optimizer="adam", momentum=0.9), "momentum"), (dict(clip_norm=0), "clip-norm"),
    (dict(lr_gamma=2), "lr-gamma"), (dict(lr_min=0.5, lr=0.1), "lr-min"), (dict(weight_decay=-1), "weight-decay"),
])
def test_bad_training_choices_name_the_field(bad, word):
    with pytest.raises(ConfigError, match=word):
        RunConfig.of(**bad)
