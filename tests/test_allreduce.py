"""Datacenter mode (clients/allreduce*.py): units in-process, end-to-end runs through ``fedopt allreduce --nproc``.

Everything binds 127.0.0.1 on free ports; every process a test starts runs in its own session and is killed as a group
in ``finally``.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from clients.allreduce.config import AllreduceConfig
from clients.allreduce.sync import (CommCounter, CountingGroup, LocalSGDAverager, ShardSampler, parse_compress,
                                    parse_sync, ring_bytes, step_hook, steps_per_rank)
from clients.allreduce.worker import train_worker
from fedopt.cli import Parser, main
from fedopt.cli.allreduce import allreduce_config, configure
from fedopt.data import PartitionSpec
from fedopt.data.digits import DigitsTask
from fedopt.errors import ConfigError
from fedopt.launch import config_argv, fedopt_command, free_port, one_thread_env, spawn, stop_processes
from fedopt.metrics import read_metrics
from fedopt.params import ParamSpec
from fedopt.task import BaseTask, TrainConfig, sgd_loop
from fedopt.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]


# ---- pure pieces ------------------------------------------------------------------------------------------------------
def test_parse_sync():
    assert parse_sync("step") is None
    assert parse_sync("local:8") == 8
    for bad in ("local", "local:0", "local:x", "ring", "local:-2"):
        with pytest.raises(ConfigError, match="sync"):
            parse_sync(bad)


def test_ring_bytes_is_two_n_minus_one_over_n():
    assert ring_bytes(1000, 1) == 0
    assert ring_bytes(1000, 2) == 1000
    assert ring_bytes(1000, 4) == 1500


@pytest.mark.parametrize("n,world,b", [(10, 2, 2), (11, 2, 3), (13, 3, 2), (7, 4, 1)])
def test_exact_shards_see_each_sample_once_and_match_one_worker_batches(n, world, b):
    # Prepare
    samplers = [ShardSampler(n, world, r, seed=5, exact=True) for r in range(world)]
    single = ShardSampler(n, 1, 0, seed=5, exact=True)
    for s in samplers + [single]:
        s.set_epoch(3)
    # Execute
    orders = [list(s) for s in samplers]
    one = list(single)
    # Assert: every sample once, and step k of the N ranks covers step k of one worker with batch N*b
    assert sorted(i for o in orders for i in o) == list(range(n))
    assert [len(o) for o in orders] == [len(s) for s in samplers]
    for k in range(max(math.ceil(len(o) / b) for o in orders)):
        union = sorted(i for o in orders for i in o[k * b:(k + 1) * b])
        assert union == sorted(one[k * world * b:(k + 1) * world * b])
    assert [math.ceil(len(o) / b) for o in orders] == steps_per_rank(n, world, b, True, None)


def test_sampler_epoch_offset_reshuffles_and_padding_is_even():
    s = ShardSampler(11, 2, 1, seed=0, exact=False)
    s.set_epoch(0)
    first = list(s)
    s.epoch_offset = 1
    s.set_epoch(0)
    assert list(s) != first
    assert len(first) == 6 and steps_per_rank(11, 2, 4, False, None) == [2, 2]
    assert steps_per_rank(11, 2, 4, True, 1) == [1, 1]


def test_config_validation_names_the_field():
    cases = [(dict(epochs=0), "epochs"), (dict(lr=0), "lr"), (dict(sync="local:0"), "sync"),
             (dict(outer_lr=0.7), "outer-lr"), (dict(sync="local:4", outer_lr=-1.0), "outer-lr"),
             (dict(outer_momentum=1.0), "outer-momentum"), (dict(zero=True, sync="local:4"), "zero"),
             (dict(backend="mpi"), "backend"), (dict(max_steps=0), "max-steps"),
             (dict(compress="powersgd:2", sync="local:4"), "--compress .* --sync step"),
             (dict(compress="powersgd"), "--compress"), (dict(compress="powersgd:0"), "--compress"),
             (dict(compress="powersgd:2:1"), "--compress"), (dict(compress="fp16:2"), "--compress"),
             (dict(compress="q8"), "--compress"), (dict(compress="powersgd:2+bf16"), "--compress"),
             (dict(compress="fp16+fp16"), "--compress"), (dict(compress="powersgd:2+"), "--compress"),
             (dict(compress="powersgd:2:1+fp16"), "--compress")]
    for kwargs, name in cases:
        with pytest.raises(ConfigError, match=name):
            AllreduceConfig(**kwargs)


def test_parse_compress():
    assert parse_compress(None) is None
    assert parse_compress("fp16") == ("fp16", 0, None, False) and parse_compress("bf16") == ("bf16", 0, None, False)
    assert parse_compress("powersgd:2") == ("powersgd", 2, None, False)
    assert parse_compress("powersgd:4:30") == ("powersgd", 4, 30, False)
    assert parse_compress("powersgd:2+fp16") == ("powersgd", 2, None, True)
    assert parse_compress("powersgd:2:2+fp16") == ("powersgd", 2, 2, True)


def test_worker_argv_round_trips_through_the_parser():
    p = Parser(prog="fedopt allreduce")
    configure(p)
    args = p.parse_args(["--task", "synthetic", "--task-option", "alpha=1.5", "--epochs", "3", "--lr", "0.25",
                         "--sync", "local:4", "--outer-lr", "0.7", "--resume", "--out", "/tmp/x", "--nproc", "2"])
    cfg = allreduce_config(args)
    hooked = allreduce_config(p.parse_args(["--compress", "powersgd:2:5"]))
    assert allreduce_config(p.parse_args(config_argv(hooked))) == hooked and hooked.compress == "powersgd:2:5"
    again = allreduce_config(p.parse_args(config_argv(cfg)))
    assert again == cfg and cfg.task_options == {"alpha": 1.5} and cfg.period == 4


@pytest.mark.parametrize("argv,needle", [
    (["--sync", "local:0"], "sync"),
    (["--zero", "--sync", "local:4"], "zero"),
    (["--backend", "nccl", "--device", "cpu"], "nccl"),
    (["--task", "no-such-task"], "unknown task"),
    (["--resume"], "no checkpoint"),
    (["--nproc", "0"], "nproc"),
    (["--compress", "bf16", "--backend", "gloo"], "--compress bf16 needs the nccl backend"),
    (["--compress", "powersgd:2", "--sync", "local:2"], "--compress"),
    (["--compress", "powersgd:2+q8"], "--compress"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    rc = main(["allreduce", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]


# ---- one in-process rank on gloo ---------------------------------------------------------------------------------------
@pytest.fixture
def one_rank(monkeypatch):
    """The environment torchrun gives a one-process group, on loopback."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class StackProbeDigits(DigitsTask):
    """Digits whose loss notes who called it: the training call chain is observed, not replaced."""

    seen: list = []

    def loss(self, model, batch):
        frames, f = [], sys._getframe(1)
        while f is not None and len(frames) < 8:
            frames.append(f)
            f = f.f_back
        codes = [f.f_code for f in frames]
        sampler = next((f.f_locals["config"].sampler for f in frames if f.f_code is sgd_loop.__code__), None)
        StackProbeDigits.seen.append((type(model), type(sampler), BaseTask.train.__code__ in codes,
                                      sgd_loop.__code__ in codes))
        return super().loss(model, batch)


def test_worker_calls_the_tasks_own_train_with_ddp_and_a_distributed_sampler(one_rank, tmp_path):
    # Execute: a datacenter epoch and a federated client's local training on the same task class
    StackProbeDigits.seen = []
    cfg = AllreduceConfig(task=f"{__name__}:StackProbeDigits", epochs=1, max_steps=3, batch_size=32,
                          out=str(tmp_path), progress="off")
    train_worker(cfg)
    datacenter = list(StackProbeDigits.seen)
    StackProbeDigits.seen = []
    task = StackProbeDigits()
    LocalTrainer(task).train("0", ParamSpec.from_module(task.build_model()).flatten(task.build_model()),
                             task.load_data(0, 2, 0, PartitionSpec("iid")), TrainConfig(max_steps=2))
    federated = list(StackProbeDigits.seen)
    # Assert: one function object (BaseTask.train -> sgd_loop) in both modes; DDP model + sampler only in datacenter
    assert StackProbeDigits.train is BaseTask.train
    assert len(datacenter) == 3 and all(s[2] and s[3] for s in datacenter + federated)
    assert {s[0] for s in datacenter} == {DistributedDataParallel}
    assert {s[1] for s in datacenter} == {ShardSampler}
    assert {s[1] for s in federated} == {type(None)}
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1] and recs[0]["steps"] == 3 and recs[0]["clients"] == 1
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "checkpoint.safetensors").exists()


def test_resume_zero_and_local_sgd_in_one_rank(one_rank, tmp_path, monkeypatch):
    base = dict(epochs=2, batch_size=64, lr=0.2, momentum=0.5, out=str(tmp_path), progress="off")
    train_worker(AllreduceConfig(zero=True, **base))
    first = read_metrics(tmp_path / "metrics.jsonl")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    train_worker(AllreduceConfig(zero=True, resume=True, **{**base, "epochs": 3}))
    resumed = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [1, 2, 3] and resumed[:2] == first
    # the resumed run (model + ZeRO momentum from the checkpoint) continues exactly like an uninterrupted one
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    train_worker(AllreduceConfig(zero=True, **{**base, "epochs": 3, "out": str(tmp_path / "straight")}))
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert straight[2]["loss"] == pytest.approx(resumed[2]["loss"], abs=1e-6)
    # local SGD: 23 steps an epoch (1437 samples / 64) averaged every 4 -> 5 syncs + 1 end-of-epoch flush
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "local"
    train_worker(AllreduceConfig(**{**base, "out": str(out), "epochs": 1, "momentum": 0.0},
                                 sync="local:4", outer_lr=0.7))
    (rec,) = read_metrics(out / "metrics.jsonl")
    assert rec["steps"] == 23 and rec["allreduce_calls"] == 6 and rec["accuracy"] > 0.5


def test_outer_nesterov_step_matches_the_formula(one_rank):
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    spec = ParamSpec.from_module(module)
    theta0 = spec.flatten(module).clone()
    counter = CommCounter(1)
    avg = LocalSGDAverager(module, spec, period=2, counter=counter, outer_lr=0.5, outer_momentum=0.9)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # two "inner steps" moving every parameter by +1
    avg.average_parameters(None)
    assert counter.calls == 0
    avg.average_parameters(None)
    g = theta0 - (theta0 + 1.0)  # pseudo-gradient anchor - average = -1
    expected = theta0 - 0.5 * (g + 0.9 * g)  # first Nesterov step: buf = g, update = g + momentum * buf
    assert counter.calls == 1 and torch.allclose(spec.flatten(module), expected, atol=1e-6)


def test_every_collective_of_torchs_hooks_is_counted(one_rank):
    # Prepare: a 2-layer model in one DDP per hook; the 40x30 weight is worth compressing at rank 2
    # ((40 + 30) * 2 * 2 < 1200), the 30x1 head and the biases travel plain
    dist.init_process_group("gloo", rank=0, world_size=1)
    sizes = {"w1": 40 * 30, "b1": 30, "w2": 30, "b2": 1}
    dense = 4 * sum(sizes.values())
    low_rank = 4 * ((40 + 30) * 2 + sizes["b1"] + sizes["w2"] + sizes["b2"])  # P and Q of w1, the rest as is
    got = {}
    for spec in (None, "fp16", "powersgd:2:3", "powersgd:2:3+fp16"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
        counter = CommCounter(1)
        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(*step_hook(parse_compress(spec), CountingGroup(dist.group.WORLD, counter), 50))
        per_step = []
        for step in range(5):
            ddp(torch.randn(8, 40)).square().mean().backward()
            per_step.append(counter.tensor_bytes - sum(per_step))
        got[spec] = (per_step, counter.calls, counter.bytes_sent)
    # Assert: plain and fp16 all-reduce the bucket once a step; PowerSGD plain for 3 steps, then three collectives
    # a step (uncompressed tensors, P, Q: the last two issued from future callbacks)
    assert got[None] == ([dense] * 5, 5, 0)  # one rank: nothing crosses a link
    assert got["fp16"][:2] == ([dense // 2] * 5, 5)
    assert got["powersgd:2:3"][:2] == ([dense] * 3 + [low_rank] * 2, 3 + 3 * 2)
    # +fp16: the same collectives, every one of them (warm-up, biases, P, Q) in half precision
    assert got["powersgd:2:3+fp16"][:2] == ([dense // 2] * 3 + [low_rank // 2] * 2, 3 + 3 * 2)


def test_powersgd_worker_reports_allreduce_bytes(one_rank, tmp_path):
    train_worker(AllreduceConfig(compress="powersgd:1:2", epochs=1, max_steps=4, batch_size=32, out=str(tmp_path),
                                 progress="off", plot=False))
    (rec,) = read_metrics(tmp_path / "metrics.jsonl")
    # digits MLP 64-64-10: 4,810 floats dense; rank 1: P, Q of both weights (64+64, 10+64) plus 74 bias floats
    assert rec["compress"] == "powersgd:1:2" and rec["steps"] == 4
    assert rec["allreduce_bytes"] == 4 * (2 * 4810 + 2 * (128 + 74 + 74))


def test_powersgd_rank2_step_ratio_on_the_digits_mlp(one_rank, tmp_path):
    # digits MLP 64-64-10 at rank 2: P, Q of 64x64 (128 + 128) and 10x64 (20 + 128) plus 74 bias floats = 478 of
    # 4,810 a step (10.06x); +fp16 halves every all-reduce, the 2 warm-up steps included
    for spec, half in (("powersgd:2:2", 1), ("powersgd:2:2+fp16", 2)):
        out = tmp_path / spec.replace(":", "_")
        train_worker(AllreduceConfig(compress=spec, epochs=1, max_steps=5, batch_size=32, out=str(out),
                                     progress="off", plot=False))
        (rec,) = read_metrics(out / "metrics.jsonl")
        assert rec["allreduce_bytes"] * half == 4 * (2 * 4810 + 3 * 478)


# ---- end to end: fedopt allreduce --nproc -----------------------------------------------------------------------------
def _start(out: Path, *flags: str) -> subprocess.Popen:
    return spawn(fedopt_command("allreduce", "--out", str(out), "--progress", "off", *flags), out.with_suffix(".log"),
                 one_thread_env(PYTHONPATH=str(ROOT)), cwd=ROOT)


def _finish(procs, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        rc = p.wait(max(1.0, deadline - time.monotonic()))
        assert rc == 0, Path(p.args[p.args.index("--out") + 1]).with_suffix(".log").read_text()[-3000:]


@pytest.mark.slow
def test_two_workers_batch_b_equal_one_worker_batch_2b(tmp_path):
    procs = [_start(tmp_path / "two", "--nproc", "2", "--batch-size", "8", "--epochs", "1", "--max-steps", "6"),
             _start(tmp_path / "one", "--nproc", "1", "--batch-size", "16", "--epochs", "1", "--max-steps", "6")]
    try:
        _finish(procs)
    finally:
        stop_processes(procs)
    two, one = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    torch.manual_seed(0)
    init = DigitsTask().build_model().state_dict()
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-5
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-3  # it did train


@pytest.mark.slow
def test_uneven_shards_finish_under_join_with_zero(tmp_path):
    # 1437 samples over 2 ranks with batch 359: rank 0 takes 3 steps (719 samples), rank 1 only 2 (718): the third
    # step's gradient all-reduce and ZeRO's shard broadcast are shadowed by rank 1 through torch's Join
    assert steps_per_rank(1437, 2, 359, True, None) == [3, 2]
    proc = _start(tmp_path / "uneven", "--nproc", "2", "--zero", "--momentum", "0.9", "--batch-size", "359",
                  "--epochs", "2", "--timeout", "60")
    try:
        _finish([proc], timeout=180)
    finally:
        stop_processes([proc])
    recs = read_metrics(tmp_path / "uneven" / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2] and all(r["steps"] == 3 for r in recs)
    assert all(r["allreduce_calls"] == 3 for r in recs)


@pytest.mark.slow
def test_digits_two_workers_step_and_local_sgd(tmp_path):
    # batch 18 -> 40 steps an epoch on every rank (1437 samples over 2 ranks), a multiple of H = 8
    common = ["--nproc", "2", "--epochs", "30", "--lr", "0.05", "--momentum", "0.9", "--batch-size", "18"]
    procs = [_start(tmp_path / "step", *common), _start(tmp_path / "local", *common, "--sync", "local:8")]
    try:
        _finish(procs)
    finally:
        stop_processes(procs)
    step, local = read_metrics(tmp_path / "step" / "metrics.jsonl"), read_metrics(tmp_path / "local" / "metrics.jsonl")
    assert [r["round"] for r in step] == list(range(1, 31)) == [r["round"] for r in local]
    assert step[-1]["accuracy"] >= 0.96 and step[-1]["clients"] == 2
    assert abs(local[-1]["accuracy"] - step[-1]["accuracy"]) <= 0.01
    calls_step, calls_local = sum(r["allreduce_calls"] for r in step), sum(r["allreduce_calls"] for r in local)
    assert calls_step == 30 * 40 and calls_local * 8 == calls_step
    assert sum(r["bytes_up"] for r in local) < sum(r["bytes_up"] for r in step)


@pytest.mark.slow
def test_kill_9_of_a_worker_restarts_the_group_and_every_epoch_is_logged_once(tmp_path):
    import psutil

    out = tmp_path / "fault"
    proc = _start(out, "--nproc", "2", "--max-restarts", "1", "--epochs", "6", "--lr", "0.3", "--batch-size", "18")
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(out / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.05)
        victims = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.environ().get("RANK") == "1"]
        assert len(victims) == 1
        victims[0].send_signal(signal.SIGKILL)
        _finish([proc], timeout=180)
    finally:
        stop_processes([proc])
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in recs] == list(range(1, 7))
    assert recs[0]["restarts"] == 0 and recs[-1]["restarts"] == 1
    assert recs[-1]["accuracy"] > 0.9 and (out / "model.safetensors").exists()
