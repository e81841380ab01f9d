"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 with option II).

The server keeps a control variate ``c``; each client ``i`` keeps its own ``c_i`` between rounds. Local steps follow the
corrected gradient ``y <- y - lr * (g_i(y) - c_i + c)``. After ``K`` local steps from the global model ``x``, option II
gives ``c_i+ = c_i - c + (x - y) / (K lr)``, i.e. ``Δc_i = c_i+ - c_i = -c - Δy / (K lr)`` with ``Δy = y - x`` (the
client's delta). The server moves ``x`` by the aggregated ``Δy`` (through the aggregator and server optimizer like any
run) and ``c <- c + (1/N) Σ_{i in S} Δc_i`` (``|S|/N`` times the mean over the sampled clients).

The correction enters fedopt's standard loop as a zero-valued loss term ``Σ_p <p - p.detach(), corr_p>`` whose gradient
is exactly ``corr = c - c_i``, so :func:`~fedopt.task.sgd_loop` (FedProx, momentum, step budgets) is reused unchanged and
the reported training loss is the task's own. A task that writes its own ``train`` cannot take the correction: SCAFFOLD
refuses it with a :class:`ConfigError`.
"""

from __future__ import annotations

import torch

from fedopt.errors import ConfigError
from fedopt.params import ParamSpec
from fedopt.task import BaseTask, ClientData, Task, TrainConfig, sgd_loop

from clients.simulation.state import ClientStateStore

__all__ = ["ScaffoldServer", "ScaffoldClients", "control_delta", "check_scaffold_task"]


def check_scaffold_task(task: Task) -> None:
    """SCAFFOLD needs fedopt's standard loop: a task with ``loss`` whose ``train`` is :meth:`BaseTask.train`."""
    if getattr(type(task), "train", None) is not BaseTask.train or not callable(getattr(task, "loss", None)):
        raise ConfigError(f"algorithm scaffold needs a task that trains with fedopt's standard loop (gives loss(); "
                          f"task {getattr(task, 'name', task)!r} writes its own train)")


def control_delta(delta: torch.Tensor, control: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Option II: ``Δc_i = -c - Δy / (K lr)``; zero when the client took no step."""
    if steps <= 0:
        return torch.zeros_like(delta)
    return (delta / (-steps * lr)).sub_(control)


class ScaffoldServer:
    """The server control variate ``c`` and the round's running sum of the clients' ``Δc_i``."""

    def __init__(self, size: int, num_clients: int, device: torch.device | str = "cpu") -> None:
        self.num_clients = num_clients
        self.control = torch.zeros(size, device=device)
        self._sum = torch.zeros(size, device=device)
        self._count = 0

    def begin(self) -> None:
        self._sum.zero_()
        self._count = 0

    def add(self, delta_c_sum: torch.Tensor, count: int) -> None:
        """Fold in the sum of ``count`` clients' ``Δc_i`` (a worker's partial, or one client's)."""
        if count:
            self._sum.add_(delta_c_sum.to(self._sum.device))
            self._count += count

    def step(self) -> None:
        """``c <- c + (1/N) Σ Δc_i`` over the clients whose updates were kept this round."""
        if self._count:
            self.control.add_(self._sum, alpha=1.0 / self.num_clients)


class ScaffoldClients:
    """The client side for every client one process hosts: their ``c_i`` in a :class:`ClientStateStore` and the
    corrected local training. ``train`` returns the control delta to commit with :meth:`commit` once the update is
    accepted, so a rejected update leaves the client's state as it was."""

    def __init__(self, task: Task, spec: ParamSpec, budget_bytes: int, directory: str | None = None) -> None:
        check_scaffold_task(task)
        self.task = task
        self.spec = spec
        self.store = ClientStateStore(spec.size, budget_bytes, directory=directory)
        self.sum = torch.zeros(spec.size)
        self.count = 0

    def begin(self) -> None:
        self.sum.zero_()
        self.count = 0

    def train_fn(self, client: str, control: torch.Tensor):
        """A ``train(model, data, config)`` for :meth:`LocalTrainer.train` that applies ``c - c_i``."""
        mine = self.store.get(client)
        corr = control.detach().to("cpu", torch.float32, copy=True)
        if mine is not None:
            corr.sub_(mine)

        def train(model: torch.nn.Module, data: ClientData, config: TrainConfig) -> dict:
            state = dict(model.named_parameters())
            pairs = []
            for e in self.spec.entries:
                p = state.get(e.name)
                if p is not None and p.requires_grad:
                    pairs.append((p, corr[e.offset:e.offset + e.numel].view(e.shape).to(p.device, p.dtype)))

            def loss(m, batch):
                base = self.task.loss(m, batch)
                return base + sum(((p - p.detach()) * c).sum() for p, c in pairs)

            return sgd_loop(loss, model, data.train, config)

        return train

    def control_delta(self, delta: torch.Tensor, control: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        return control_delta(delta.detach().float().cpu(), control.detach().float().cpu(), steps, lr)

    def commit(self, client: str, delta_c: torch.Tensor) -> None:
        """Store ``c_i + Δc_i`` and add ``Δc_i`` to this process's round sum."""
        mine = self.store.get(client)
        self.store.put(client, delta_c if mine is None else mine.add_(delta_c))
        self.sum.add_(delta_c)
        self.count += 1

    def close(self) -> None:
        self.store.close()
