"""What a run leaves behind besides metrics.jsonl: config.toml, partition.json, best.safetensors, per-client and
per-class accuracy, the plot; and `fedopt plot` comparing runs."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from fedopt.cli import main
from fedopt.config import build_config, load_toml
from fedopt.metrics import read_metrics

pytest.importorskip("matplotlib")

RUN = ["simulate", "--clients", "4", "--rounds", "3", "--local-epochs", "1", "--progress", "off", "--seed", "2"]


def _run(out, *extra):
    assert main([*RUN, "--out", str(out), *extra]) == 0
    return read_metrics(out / "metrics.jsonl")


def test_a_run_writes_its_config_partition_best_model_and_per_client_accuracy(tmp_path, capsys):
    out = tmp_path / "a"
    rows = _run(out, "--eval-clients", "--optimizer", "adam", "--lr", "0.01", "--lr-schedule", "cosine")
    # config.toml is the whole resolved configuration and re-creates it
    cfg = build_config(str(out / "config.toml"))
    assert cfg.train.optimizer == "adam" and cfg.train.lr_schedule == "cosine" and cfg.federation.clients == 4 and cfg.out == str(out)
    assert build_config(None, load_toml(out / "config.toml")) == cfg
    # partition.json: per-client sizes and label counts, consistent with each other
    part = json.loads((out / "partition.json").read_text())
    assert part["clients"] == 4 and part["partition"] == "dirichlet" and part["classes"] == 10
    assert [sum(c) for c in part["label_counts"]] == part["sizes"] and sum(part["sizes"]) == 1437
    # --eval-clients: per-class accuracy on the test set and each client's own accuracy
    last = rows[-1]
    assert len(last["per_class"]) == 10 and sorted(last["per_client"]) == ["0", "1", "2", "3"]
    assert all(0 <= a <= 1 for a in last["per_class"] + list(last["per_client"].values()))
    # best.safetensors holds the round with the best test accuracy
    best = max(rows, key=lambda r: r["accuracy"])
    from safetensors import safe_open

    with safe_open(str(out / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert int(meta["round"]) == best["round"] and float(meta["accuracy"]) == pytest.approx(best["accuracy"])
    assert set(load_file(out / "best.safetensors")) == set(load_file(out / "model.safetensors"))
    assert (out / "accuracy.png").stat().st_size > 0


def test_fedopt_plot_compares_runs_and_refuses_to_overwrite(tmp_path, capsys):
    _run(tmp_path / "sgd", "--no-plot")
    _run(tmp_path / "adam", "--no-plot", "--optimizer", "adam", "--lr", "0.01")
    png = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "sgd"), str(tmp_path / "adam"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "sgd"), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and err.count("\n") == 1
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_plot_axes_have_integer_ticks_and_the_mode_s_label(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedopt import plots

    made = []
    real = plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        made.append(axes)
        return fig, axes

    rounds = [{"round": r, "accuracy": r / 10, "loss": 1 / r} for r in range(1, 4)]
    epochs = [{**r, "epoch": r["round"]} for r in rounds]
    plt.subplots = spy
    try:
        plots.plot_runs([("a", rounds)], tmp_path / "a.png", "t")
        plots.plot_runs([("b", epochs)], tmp_path / "b.png", "t")
    finally:
        plt.subplots = real
    (acc_r, loss_r), (acc_e, _) = made
    assert acc_r.get_xlabel() == loss_r.get_xlabel() == "round" and acc_e.get_xlabel() == "epoch"
    assert loss_r.get_ylabel() == "test loss"
    assert all(float(t).is_integer() for t in acc_r.get_xticks())
