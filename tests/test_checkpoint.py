import os

import torch
from safetensors.torch import load_file
from torch import nn

from fedopt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_model
from fedopt.metrics import MetricsWriter, read_metrics
from fedopt.params import ParamSpec


def test_checkpoint_round_trip_and_no_temp_files_left(tmp_path):
    m = nn.Linear(3, 2)
    spec = ParamSpec.from_module(m)
    vec = spec.flatten(m)
    save_checkpoint(tmp_path, Checkpoint(4, vec, {"m": torch.ones(spec.size)}, spec, {"seed": 3}))
    save_checkpoint(tmp_path, Checkpoint(5, vec * 2, {"m": torch.ones(spec.size)}, spec, {"seed": 3}))
    ck = load_checkpoint(tmp_path)
    assert ck.round == 5 and torch.equal(ck.global_vec, vec * 2) and ck.state == {"seed": 3}
    assert torch.equal(ck.optimizer_state["m"], torch.ones(spec.size)) and ck.spec == spec
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.safetensors"]


def test_missing_checkpoint_is_none_and_model_file_is_a_state_dict(tmp_path):
    assert load_checkpoint(tmp_path) is None
    m = nn.Linear(3, 2)
    spec = ParamSpec.from_module(m)
    save_model(tmp_path / "model.safetensors", spec, spec.flatten(m))
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(sd["weight"], m.weight.detach())


def test_metrics_resume_keeps_each_round_once(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rec = lambda r: dict(round=r, accuracy=0.5, loss=1.0, clients=1, seconds=0.1, bytes_up=0, bytes_down=0)  # noqa
    with MetricsWriter(p) as w:
        for r in (1, 2, 3):
            w.write(rec(r))
    with open(p, "a") as f:
        f.write('{"round": 4, "acc')  # a line torn by a crash
    with MetricsWriter(p, resume_after=2) as w:
        w.write(rec(3))
    assert [r["round"] for r in read_metrics(p)] == [1, 2, 3]
