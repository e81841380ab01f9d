"""``fedopt simulate --nproc N``: ranks on torch.distributed (gloo, loopback) give one process's results."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from fedopt.cli import main
from fedopt.config import RunConfig
from fedopt.errors import ConfigError

from clients.simulation.distributed import check_distributed

#: the fields of a metrics line that depend on the model and the plan only (not on time or the host)
SAME = ("round", "accuracy", "loss", "clients", "rejected", "selected", "train_loss", "bytes_up", "bytes_down")


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("aggregator", ["fedavg", "median"])
def test_two_ranks_give_the_metrics_and_model_of_one_process(tmp_path, aggregator):
    """fedavg merges each rank's partial mean; median gathers every update: both as one process does."""
    common = ["simulate", "--clients", "12", "--clients-per-round", "9", "--rounds", "3", "--seed", "5",
              "--aggregator", aggregator, "--progress", "off", "--no-plot"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    if aggregator == "fedavg":  # and --resume: rank 0 reads the checkpoint of round 2 and tells the other rank
        assert main([*common, "--rounds", "2", "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
        assert main([*common, "--out", str(tmp_path / "two"), "--nproc", "2", "--resume"]) == 0
    else:
        assert main([*common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert {k: b[k] for k in SAME} == pytest.approx({k: a[k] for k in SAME}, abs=1e-6)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.parametrize("flags, named", [
    (dict(algorithm="scaffold"), "--algorithm scaffold"), (dict(buffer_size=2), "--buffer-size"),
    (dict(workers=2), "--workers"), (dict(transport="ipc"), "--transport")])
def test_what_ranks_do_not_combine_with_is_one_line(flags, named):
    with pytest.raises(ConfigError, match=f"--nproc .* does not combine with {named}"):
        check_distributed(RunConfig.of(clients=4, nproc=2, **flags))


def test_resume_continues_after_the_last_checkpoint_as_an_uninterrupted_run(tmp_path):
    common = ["simulate", "--clients", "6", "--rounds", "5", "--seed", "3", "--checkpoint-every", "2", "--progress",
              "off", "--no-plot"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--rounds", "3", "--out", str(tmp_path / "cut")]) == 0  # checkpoints after rounds 2 and 3
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert [r["round"] for r in b] == [1, 2, 3, 4, 5]
    assert [(r["accuracy"], r["loss"]) for r in a] == [(r["accuracy"], r["loss"]) for r in b]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)  # seeded per round and client: bit for bit


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert main(["simulate", "--clients", "4", "--rounds", "1", "--out", str(tmp_path / "none"), "--resume",
                 "--progress", "off"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["simulate", "--clients", "4", "--rounds", "1", "--out", str(tmp_path / "s"), "--algorithm", "scaffold",
                 "--progress", "off", "--no-plot"]) == 0
    assert main(["simulate", "--clients", "4", "--rounds", "2", "--out", str(tmp_path / "s"), "--algorithm", "scaffold",
                 "--resume", "--progress", "off"]) == 2
    assert "does not combine with --algorithm scaffold" in capsys.readouterr().err
