"""Tracker sinks, read back with each tool's own reader; skipped where the optional package is absent."""

from __future__ import annotations

import pytest

from fedopt.cli import main
from fedopt.metrics import read_metrics

RUN = ["simulate", "--clients", "3", "--rounds", "3", "--local-epochs", "1", "--progress", "off", "--no-plot"]


def test_tensorboard_events_hold_every_round(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--tracker", "tensorboard"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"fedopt/accuracy", "fedopt/loss", "fedopt/train_loss"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("fedopt/accuracy")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([r["accuracy"] for r in rows])


def test_mlflow_run_holds_params_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--tracker", "mlflow"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    from fedopt.trackers import default_mlflow_uri

    client = MlflowClient(tracking_uri=default_mlflow_uri(out))
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["clients"] == "3" and run.info.run_name == "run"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    assert main([*RUN, "--out", str(tmp_path / "r"), "--tracker", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert "fedopt[mlflow]" in err and err.count("\n") == 1
