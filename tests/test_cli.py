"""`fedopt simulate` end to end through the real console entry point, and its bad-input contract."""

import os
import subprocess
import sys

import pytest

from fedopt.cli import main
from fedopt.metrics import REQUIRED_KEYS, read_metrics


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedopt", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.parametrize("args, needle", [
    (["simulate", "--task", "nope"], "unknown task 'nope'"),
    (["simulate", "--clients", "0"], "clients must be an integer >= 1"),
    (["simulate", "--fraction", "0"], "fraction must be in (0, 1]"),
    (["simulate", "--fraction", "1.01"], "fraction must be in (0, 1]"),
    (["simulate", "--alpha", "0"], "alpha must be a number > 0"),
    (["simulate", "--alpha", "-2"], "alpha must be a number > 0"),
    (["simulate", "--config", "/no/such/file.toml"], "config file not found"),
    (["simulate", "--rounds", "abc"], "invalid int value"),
    (["simulate", "--clients", "5000", "--rounds", "1"], "cannot partition"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_input_gets_one_line_and_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(args)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_unknown_config_key_one_line(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("rounds = 2\nlearning_rate = 0.1\n")
    assert main(["simulate", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key 'learning_rate'" in err and len(err.splitlines()) == 1


@pytest.mark.slow  # whole runs through the console entry point
def test_simulate_writes_the_contract_files_and_is_reproducible(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = run_cli("simulate", "--rounds", "3", "--clients", "4", "--local-epochs", "1", "--seed", "11",
                    "--out", str(out), "--progress", "lines")
        assert r.returncode == 0, r.stderr
        assert "round    3/3" in r.stderr and "final accuracy" in r.stdout
        recs = read_metrics(out / "metrics.jsonl")
        assert [x["round"] for x in recs] == [1, 2, 3]
        assert all(k in x for x in recs for k in REQUIRED_KEYS)
        assert (out / "model.safetensors").exists() and (out / "accuracy.png").exists()
        outs.append([{k: v for k, v in x.items() if k != "seconds"} for x in recs])
    assert outs[0] == outs[1]


@pytest.mark.slow  # whole runs through the console entry point
def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('task = "synthetic"\npartition = "natural"\nclients = 30\nrounds = 5\n'
                   'clients-per-round = 5\nlocal-epochs = 1\n[task-options]\nalpha = 0.5\n')
    out = tmp_path / "o"
    r = run_cli("simulate", "--config", str(cfg), "--rounds", "2", "--out", str(out), "--progress", "off")
    assert r.returncode == 0, r.stderr
    recs = read_metrics(out / "metrics.jsonl")
    assert len(recs) == 2 and all(x["selected"] == 5 for x in recs)


def test_bundled_example_configs_parse():
    from fedopt.config import build_config

    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    for name in sorted(os.listdir(root)):
        if name.endswith(".toml"):
            build_config(os.path.join(root, name))


@pytest.mark.slow  # whole runs through the console entry point
def test_stragglers_dropped_by_fedavg_kept_by_fedprox(tmp_path):
    counts = {}
    for mu in ("0", "0.1"):
        out = tmp_path / mu
        r = run_cli("simulate", "--rounds", "2", "--clients", "10", "--stragglers", "0.5", "--mu", mu,
                    "--local-epochs", "1", "--out", str(out), "--progress", "off")
        assert r.returncode == 0, r.stderr
        counts[mu] = [(x["selected"], x["clients"], x["rejected"]) for x in read_metrics(out / "metrics.jsonl")]
    # (selected, aggregated, rejected) per round: FedAvg drops the 5 stragglers, FedProx keeps their partial work
    assert counts["0"] == [(10, 5, 5), (10, 5, 5)] and counts["0.1"] == [(10, 10, 0), (10, 10, 0)]
