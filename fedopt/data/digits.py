"""The ``digits`` task: scikit-learn's bundled 8x8 handwritten digits, an MLP 64-64-10.

The 1,797 images ship inside scikit-learn (no download). Pixels are scaled from 0..16 to [0, 1]; the 80/20 split is
stratified by label with a fixed seed, so every run and every mode sees the same test set. A centralized MLP reaches
about 0.97 test accuracy on this split.
"""

from __future__ import annotations

import torch
from torch import nn

from ..task import register_task
from .array import ArrayTask

__all__ = ["DigitsTask", "digits_arrays"]

SPLIT_SEED = 0  # the train/test split is part of the data set, not of the run


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=SPLIT_SEED)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt).contiguous()  # noqa: E731
    return as_t(xtr, torch.float32), as_t(ytr, torch.long), as_t(xte, torch.float32), as_t(yte, torch.long)


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

    def arrays(self, seed: int):
        x, y, xt, yt = digits_arrays()
        if self.replicate > 1:
            x, y = x.repeat(self.replicate, 1), y.repeat(self.replicate)
        return x, y, xt, yt


register_task("digits", DigitsTask)
