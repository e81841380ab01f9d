import sys
import textwrap

import pytest
import torch
from torch import nn

from fedopt.errors import TaskError
from fedopt.task import BaseTask, ClientData, TrainConfig, resolve_task, sgd_loop


def test_unknown_task_lists_the_builtins():
    with pytest.raises(TaskError) as e:
        resolve_task("mnist")
    assert "digits" in str(e.value) and "synthetic" in str(e.value) and "\n" not in str(e.value)


def test_module_attr_resolves_class_instance_and_factory(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(textwrap.dedent('''
        from fedopt.data.digits import DigitsTask
        class Wide(DigitsTask):
            name = "wide"
            def __init__(self, hidden=128):
                super().__init__(hidden=hidden)
        INSTANCE = Wide(32)
        def factory():
            return Wide(16)
        NOT_A_TASK = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_task("mytask:Wide", {"hidden": 8}).hidden == 8
    assert resolve_task("mytask:INSTANCE").hidden == 32
    assert resolve_task("mytask:factory").hidden == 16
    with pytest.raises(TaskError, match="has no attribute 'Missing'"):
        resolve_task("mytask:Missing")
    with pytest.raises(TaskError, match="cannot import task module 'nomodule_xyz'"):
        resolve_task("nomodule_xyz:Task")
    with pytest.raises(TaskError, match="does not implement"):
        resolve_task("mytask:NOT_A_TASK")
    sys.modules.pop("mytask", None)


class Tiny(BaseTask):
    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(3, 2)

    def load_data(self, shard, num_shards, seed, partition=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 3, generator=g)
        return ClientData((x, (x[:, 0] > 0).long()))


def test_sgd_loop_counts_steps_and_honours_a_straggler_budget():
    t = Tiny()
    data = t.load_data(0, 1, 0)
    full = sgd_loop(t.loss, t.build_model(), data.train, TrainConfig(epochs=2, batch_size=8))
    assert full["steps"] == 10 and full["samples"] == 80 and not full["partial"]
    cut = sgd_loop(t.loss, t.build_model(), data.train, TrainConfig(epochs=2, batch_size=8, max_steps=3))
    assert cut["steps"] == 3 and cut["partial"]


def test_fedprox_term_pulls_towards_the_starting_model():
    t = Tiny()
    data = t.load_data(0, 1, 0)
    start = torch.cat([p.detach().flatten() for p in t.build_model().parameters()])
    dist = {}
    for mu in (0.0, 10.0):
        m = t.build_model()
        sgd_loop(t.loss, m, data.train, TrainConfig(epochs=5, batch_size=4, lr=0.1, mu=mu))
        dist[mu] = float((torch.cat([p.detach().flatten() for p in m.parameters()]) - start).norm())
    assert dist[10.0] < 0.5 * dist[0.0]


def test_same_seed_same_result():
    t = Tiny()
    data = t.load_data(0, 1, 0)
    outs = []
    for _ in range(2):
        m = t.build_model()
        sgd_loop(t.loss, m, data.train, TrainConfig(epochs=1, batch_size=4, seed=5))
        outs.append(m.weight.detach().clone())
    assert torch.equal(*outs)


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3)])
def test_local_sgd_matches_torch_optim_sgd(momentum, wd):
    from fedopt.task import LocalSGD

    t = Tiny()
    data = t.load_data(0, 1, 0)
    a, b = t.build_model(), t.build_model()
    oa = LocalSGD(list(a.parameters()), lr=0.1, momentum=momentum, weight_decay=wd)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=momentum, weight_decay=wd)
    for i in range(5):
        batch = tuple(x[i * 8:(i + 1) * 8] for x in data.train)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            t.loss(m, batch).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-7, rtol=0)
