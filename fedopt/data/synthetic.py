"""The ``synthetic`` task: Synthetic(alpha, beta) from Li et al., "Federated Optimization in Heterogeneous Networks"
(FedProx, MLSys 2020), Section 5.1, with multinomial logistic regression.

For user k: ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)``; ``W_k`` (10x60) and ``b_k`` (10) have entries
``~ N(u_k, 1)``; ``v_k`` (60) has entries ``~ N(B_k, 1)``; ``x ~ N(v_k, Sigma)`` with ``Sigma = diag(j^-1.2)``;
``y = argmax(softmax(W_k x + b_k))``. alpha controls how much local models differ, beta how much local data differ.
User sizes are ``int(lognormal(4, 2)) + 50`` and each user's data is split 90/10 into train and test.
The IID variant (``synthetic-iid``) uses one shared ``W, b ~ N(0, 1)`` and ``v = 0`` for every user.
The natural partition gives one user to one client; the shared test set is the union of the users' test splits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .array import ArrayTask

__all__ = ["SyntheticTask", "synthetic_iid", "synthetic_users"]

DIM, CLASSES = 60, 10


def synthetic_users(alpha: float, beta: float, users: int, seed: int, iid: bool = False):
    """Per-user ``(x, y)`` arrays drawn as in the FedProx paper."""
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, users).astype(int) + 50
    cov = np.array([(j + 1) ** -1.2 for j in range(DIM)])
    shared_w, shared_b = rng.normal(0, 1, (DIM, CLASSES)), rng.normal(0, 1, CLASSES)
    out = []
    for k in range(users):
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(DIM)
        else:
            u_k, b_k = rng.normal(0, np.sqrt(alpha)), rng.normal(0, np.sqrt(beta))
            w, b = rng.normal(u_k, 1, (DIM, CLASSES)), rng.normal(u_k, 1, CLASSES)
            v = rng.normal(b_k, 1, DIM)
        x = rng.normal(v, np.sqrt(cov), (sizes[k], DIM))
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of logits is argmax of probabilities
        out.append((x.astype("float32"), y.astype("int64")))
    return out


class SyntheticTask(ArrayTask):
    """Synthetic(alpha, beta); ``iid=True`` for the IID variant. Multinomial logistic regression 60 -> 10."""

    name = "synthetic"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, users: int = 30, iid: bool = False) -> None:
        super().__init__()
        if alpha < 0 or beta < 0 or users < 1:
            raise ValueError("alpha and beta must be >= 0 and users >= 1")
        self.alpha, self.beta, self.users, self.iid = float(alpha), float(beta), int(users), bool(iid)
        self._natural: dict[int, list[np.ndarray]] = {}

    def build_model(self) -> nn.Module:
        return nn.Linear(DIM, CLASSES)

    def arrays(self, seed: int):
        data = synthetic_users(self.alpha, self.beta, self.users, seed, self.iid)
        rng = np.random.default_rng(seed + 1)
        xs, ys, xts, yts, natural, offset = [], [], [], [], [], 0
        for x, y in data:
            perm = rng.permutation(len(y))
            cut = int(0.9 * len(y))
            tr, te = perm[:cut], perm[cut:]
            xs.append(x[tr]), ys.append(y[tr]), xts.append(x[te]), yts.append(y[te])
            natural.append(np.arange(offset, offset + len(tr)))
            offset += len(tr)
        self._natural[seed] = natural
        cat = lambda parts, dt: torch.as_tensor(np.concatenate(parts), dtype=dt)  # noqa: E731
        return cat(xs, torch.float32), cat(ys, torch.long), cat(xts, torch.float32), cat(yts, torch.long)

    def natural_shards(self, seed: int):
        self._data(seed)
        return self._natural[seed]


def synthetic_iid(users: int = 30) -> SyntheticTask:
    """The built-in ``synthetic-iid``: Synthetic(0, 0) with every user's data drawn from one distribution."""
    return SyntheticTask(0.0, 0.0, users, iid=True)
