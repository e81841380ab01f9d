"""Server optimizers: the aggregated delta as a pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2. With ``Δ_t`` the aggregated client delta
(local - global, so it already points downhill) and ``x_t`` the global model:

* ``fedavg``:     ``x ← x + η Δ``  (η = 1 is McMahan et al.'s FedAvg)
* ``fedavgm``:    ``m ← β m + Δ;  x ← x + η m``  (Hsu et al. 2019, server momentum)
* ``fedadagrad``: ``m ← β1 m + (1-β1) Δ;  v ← v + Δ²;                          x ← x + η m / (√v + τ)``
* ``fedyogi``:    ``m ← β1 m + (1-β1) Δ;  v ← v - (1-β2) Δ² sign(v - Δ²);       x ← x + η m / (√v + τ)``
* ``fedadam``:    ``m ← β1 m + (1-β1) Δ;  v ← β2 v + (1-β2) Δ²;                  x ← x + η m / (√v + τ)``

As in the paper, there is no bias correction and ``v`` starts at ``τ²`` (``v_{-1} ≥ τ²``). Defaults follow the
paper's experiments: β1 = 0.9, β2 = 0.99, τ = 1e-3.

Each optimizer steps the global vector in place and exposes its state as named tensors, so the coordinator checkpoints
it with the model and ``--resume`` continues the same trajectory.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["ServerOptimizer", "FedAvg", "FedAvgM", "FedAdagrad", "FedYogi", "FedAdam", "make_server_optimizer",
           "SERVER_OPTIMIZERS"]


class ServerOptimizer:
    """Base: ``step(x, delta)`` updates ``x`` in place; ``state_dict``/``load_state_dict`` for checkpoints."""

    name = "base"

    def __init__(self, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ConfigError(f"server learning rate must be > 0, not {lr}")
        self.lr = float(lr)
        self.state: dict[str, torch.Tensor] = {}

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        raise TypeError(f"{type(self).__name__} must implement step")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    def _buf(self, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        buf = self.state.get(name)
        if buf is None or buf.shape != like.shape:
            buf = self.state[name] = torch.full_like(like, fill)
        return buf


class FedAvg(ServerOptimizer):
    name = "fedavg"

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        x.add_(delta, alpha=self.lr)


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        if not 0 <= momentum < 1:
            raise ConfigError(f"server momentum must be in [0, 1), not {momentum}")
        self.momentum = float(momentum)

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        m = self._buf("m", x)
        m.mul_(self.momentum).add_(delta)
        x.add_(m, alpha=self.lr)


class _Adaptive(ServerOptimizer):
    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(lr)
        for n, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= b < 1:
                raise ConfigError(f"{n} must be in [0, 1), not {b}")
        if not tau > 0:
            raise ConfigError(f"tau must be > 0, not {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        m = self._buf("m", x)
        v = self._buf("v", x, self.tau**2)
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self._second_moment(v, delta * delta)
        x.addcdiv_(m, v.sqrt().add_(self.tau), value=self.lr)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        raise TypeError


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def _second_moment(self, v, d2):
        v.add_(d2)


class FedYogi(_Adaptive):
    name = "fedyogi"

    def _second_moment(self, v, d2):
        v.sub_((v - d2).sign_().mul_(d2), alpha=1 - self.beta2)


class FedAdam(_Adaptive):
    name = "fedadam"

    def _second_moment(self, v, d2):
        v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)


SERVER_OPTIMIZERS = {c.name: c for c in (FedAvg, FedAvgM, FedAdagrad, FedYogi, FedAdam)}


def make_server_optimizer(name: str, lr: float | None = None, **options) -> ServerOptimizer:
    try:
        cls = SERVER_OPTIMIZERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown server optimizer {name!r} (choose from {', '.join(SERVER_OPTIMIZERS)})") from None
    if lr is not None:
        options["lr"] = lr
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"server optimizer {name!r}: {e}") from None
