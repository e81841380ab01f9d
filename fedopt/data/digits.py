"""The ``digits`` task: scikit-learn's bundled 8x8 handwritten digits, an MLP 64-64-10.

The 1,797 images ship inside scikit-learn (no download). Pixels are scaled from 0..16 to [0, 1]; the 80/20 split is
stratified by label with a fixed seed, so every run and every mode sees the same test set. A centralized MLP reaches
about 0.97 test accuracy on this split.
"""

from __future__ import annotations

import gzip
import math
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from .array import ArrayTask

__all__ = ["DigitsTask", "digits_arrays"]

SPLIT_SEED = 0  # the train/test split is part of the data set, not of the run


def _digits_file() -> Path:
    """scikit-learn's bundled copy of the UCI digits (1797 rows of 64 pixels + label), found without importing
    scikit-learn: the import costs more than a second of start-up and nothing else of it is needed."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits task needs scikit-learn installed (it ships the data set)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.exists():
        raise DataError(f"scikit-learn's digits data file is missing: {path}")
    return path


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with every class split in the same proportion (largest-remainder rounding, so the test
    set has exactly ceil(test_fraction * n) samples)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    want = test_fraction * counts
    take = np.floor(want).astype(int)
    short = math.ceil(test_fraction * len(labels)) - int(take.sum())
    take[np.argsort(-(want - take), kind="stable")[:short]] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with gzip.open(_digits_file(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = raw[:, :-1] / 16.0, raw[:, -1].astype(np.int64)
    tr, te = stratified_split(y, 0.2, SPLIT_SEED)
    return (torch.from_numpy(np.ascontiguousarray(x[tr])), torch.from_numpy(y[tr]),
            torch.from_numpy(np.ascontiguousarray(x[te])), torch.from_numpy(y[te]))


class DigitsTask(ArrayTask):
    """Handwritten digits, MLP 64 -> hidden -> 10 with ReLU."""

    name = "digits"

    def __init__(self, hidden: int = 64, replicate: int = 1) -> None:
        super().__init__()
        if hidden < 1 or replicate < 1:
            raise ValueError("hidden and replicate must be >= 1")
        self.hidden = hidden
        self.replicate = replicate  # repeat the train set k times, for many-client scale tests

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def data_seed(self, seed: int) -> int:
        return SPLIT_SEED

    def cache_key(self) -> dict:
        source = _digits_file().stat()
        return {"replicate": self.replicate, "source_bytes": source.st_size, "source_mtime": source.st_mtime_ns}

    def arrays(self, seed: int):
        x, y, xt, yt = digits_arrays()
        if self.replicate > 1:
            x, y = x.repeat(self.replicate, 1), y.repeat(self.replicate)
        return x, y, xt, yt
