"""Conformance checks a plug-in can run against itself: ``check_task`` and ``check_aggregator``.

They exercise the contracts the engines rely on and raise ``AssertionError`` with a message naming the broken rule.
Use them in your own test suite::

    from fedopt.testing import check_task
    def test_my_task():
        check_task(MyTask())
"""

from __future__ import annotations

import math

import torch

from .aggregators.base import Aggregator, Update
from .params import ParamSpec
from .task import ClientData, Task, TrainConfig

__all__ = ["check_task", "check_aggregator"]


def check_task(task: Task, num_shards: int = 2, seed: int = 0) -> None:
    """Model builds identically twice, shards load and are non-empty, train changes the model and returns metrics,
    evaluate returns an accuracy in [0, 1], and loading the same shard twice gives the same data."""
    m1, m2 = task.build_model(), task.build_model()
    s1, s2 = ParamSpec.from_module(m1), ParamSpec.from_module(m2)
    assert s1 == s2, "build_model() must give the same architecture every call"
    for shard in range(num_shards):
        data = task.load_data(shard, num_shards, seed)
        assert isinstance(data, ClientData), "load_data must return a ClientData"
        assert data.num_samples > 0, f"shard {shard} of {num_shards} is empty"
        n = data.train[0].shape[0]
        assert all(t.shape[0] == n for t in data.train), "train tensors must be aligned on their first dimension"
        again = task.load_data(shard, num_shards, seed)
        assert all(torch.equal(a, b) for a, b in zip(data.train, again.train)), "load_data must be deterministic"
    before = s1.flatten(m1).clone()
    metrics = task.train(m1, data, TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=seed))
    assert isinstance(metrics, dict), "train must return a dict of metrics"
    assert not torch.equal(before, s1.flatten(m1)), "train must change the model"
    eval_data = data.test if data.test is not None else data.train
    ev = task.evaluate(m1, eval_data)
    assert "accuracy" in ev and 0.0 <= ev["accuracy"] <= 1.0, "evaluate must report accuracy in [0, 1]"


def check_aggregator(make: callable, size: int = 64, clients: int = 5, seed: int = 0) -> None:
    """Streaming contract: begin/add/result, None for an empty round, no retained reference to the delta for
    streaming aggregators, identical updates aggregate to that update, wrong-length updates are refused."""
    g = torch.Generator().manual_seed(seed)
    agg: Aggregator = make()
    for attr in ("name", "linear", "needs_all_updates", "needs_plaintext"):
        assert hasattr(agg, attr), f"aggregator lacks attribute {attr!r}"
    agg.begin(1, size)
    assert agg.result() is None, "result() of an empty round must be None"
    x = torch.randn(size, generator=g)
    agg.begin(2, size)
    buf = torch.empty(size)
    for i in range(clients):
        buf.copy_(x)
        agg.add(Update(str(i), buf, num_samples=10 + i))
        if not agg.needs_all_updates:
            buf.fill_(math.nan)  # the caller may reuse its buffer after add()
    res = agg.result()
    assert res is not None and res.count == clients, "result must count every update"
    assert torch.allclose(res.delta, x, atol=1e-6), "identical updates must aggregate to that update"
    agg.begin(3, size)
    try:
        agg.add(Update("bad", torch.zeros(size + 1), num_samples=1))
    except Exception:
        pass
    else:
        raise AssertionError("an update of the wrong length must be refused")
