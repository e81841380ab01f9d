"""The site-local example (examples/image_folder.py): PNG folders read through a torch Dataset, trained by three
``fedopt client --data DIR`` processes over the bus, and the same Task in ``fedopt simulate``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedopt.config import RunConfig
from fedopt.task import TrainConfig, resolve_task

from _bus import Cluster, wait_for

Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("horizontal", "vertical", "diagonal")
TASK = "examples.image_folder:ImageFolderTask"


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 grey image of stripes in one of three orientations, with a random phase and noise."""
    i, j = np.mgrid[0:16, 0:16]
    phase = rng.integers(0, 4)
    coord = {"horizontal": i, "vertical": j, "diagonal": i + j}[kind]
    img = ((coord + phase) // 2 % 2) * 200.0 + rng.normal(0, 25, (16, 16))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: int, seed: int, classes=CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(_image(c, rng)).save(root / c / f"{k:03d}.png")
    return root


@pytest.fixture
def folders(tmp_path):
    sites = [write_folder(tmp_path / f"site-{s}", 20, seed=s) for s in range(3)]
    # site 2 has no diagonal images: a site need not hold every class
    for f in (sites[2] / "diagonal").iterdir():
        f.unlink()
    test = write_folder(tmp_path / "test", 10, seed=99)
    everything = tmp_path / "all"
    for s in sites:
        for f in s.rglob("*.png"):
            dest = everything / f.parent.name / f"{s.name}-{f.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    return sites, test, everything


def test_dataset_task_trains_through_a_dataloader(folders):
    sites, test, _ = folders
    task = resolve_task(TASK, {"data_path": str(sites[0]), "test_path": str(test), "classes": ",".join(CLASSES)})
    data = task.load_data(0, 1, seed=0)
    assert not data.tensors and data.num_samples == 60
    model = task.build_model()
    torch.manual_seed(0)
    before = task.evaluate(model, task.load_test(0))["accuracy"]
    m = task.train(model, data, TrainConfig(epochs=8, batch_size=10, lr=0.01, optimizer="adam"))
    assert m["steps"] == 48 and m["samples"] == 480 and not m["partial"]
    after = task.evaluate(model, task.load_test(0))["accuracy"]
    assert after >= 0.9 > before


def test_bad_data_path_is_one_clear_line(tmp_path, capsys):
    from fedopt.cli import main

    code = main(["client", "--connect", f"ipc://{tmp_path}/x.sock", "--data", str(tmp_path / "missing"),
                 "--id", "a"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing" in err
    code = main(["client", "--connect", f"ipc://{tmp_path}/x.sock", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--id" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_sites_over_the_bus_and_the_same_task_simulated(folders, tmp_path, monkeypatch):
    sites, test, everything = folders
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    opts = ["--task", TASK, "--task-option", f"classes={','.join(CLASSES)}", "--task-option", f"test_path={test}",
            "--clients", "3", "--rounds", "4", "--local-epochs", "2", "--batch-size", "10", "--lr", "0.01",
            "--optimizer", "adam", "--seed", "1", "--no-plot"]
    c = Cluster(tmp_path, transport="ipc")
    try:
        c.start_coordinator(*opts)
        for i, site in enumerate(sites):
            c._spawn(["client", "--connect", c.url, "--data", str(site), "--id", f"site-{i}", "--give-up", "60"],
                     f"client-{i}.log")
        wait_for(lambda: c.coordinator.poll() is not None, 180, "the run to finish")
        assert c.coordinator.returncode == 0, c.log()
    finally:
        c.stop()
    rows = c.rounds()
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and all(r["clients"] == 3 for r in rows)
    assert rows[-1]["accuracy"] >= 0.9, rows
    for i, site in enumerate(sites):
        assert f"{60 if i < 2 else 40} samples" in c.log(f"client-{i}"), c.log(f"client-{i}")

    from clients.simulation.run import simulate

    cfg = RunConfig.of(task=TASK, task_options={"classes": ",".join(CLASSES), "test_path": str(test),
                                             "data_path": str(everything)},
                    clients=3, partition="iid", rounds=4, local_epochs=2, batch_size=10, lr=0.01, optimizer="adam",
                    seed=1, out=str(tmp_path / "sim"), progress="off", plot=False)
    sim = simulate(cfg)
    assert sim.records[-1]["accuracy"] >= 0.9
