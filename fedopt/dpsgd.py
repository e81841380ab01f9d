"""Sample-level DP-SGD inside a client (``--dp-sgd``), through Opacus (an optional extra: ``pip install
'fedopt[opacus]'``; without it, asking for DP-SGD is one ConfigError naming the extra).

Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), as Opacus implements it (Yousefpour et al.,
"Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021): each local step takes a Poisson sample of
the client's examples (rate B/n), clips every example's gradient to ``dp_sgd_clip`` and adds Gaussian noise of
standard deviation ``dp_sgd_noise`` times the clip. The client's ε is Opacus's RDP accountant over every step the
client has taken in the run (its ledger is kept per client across rounds), at δ = 1/n^1.1 for its n examples; it is
reported in the update's metrics as ``dp_sgd_epsilon`` (and ``dp_sgd_delta``).

It protects each example of a client's data (sample-level), not the client's participation (client-level: ``--dp``).
Only tasks that train with fedopt's standard loop (they give ``loss``, not ``train``) can use it, and it replaces that
loop's optimizer with ``torch.optim.SGD`` (momentum and weight decay as configured) wrapped by Opacus. The noise comes
from torch's generator, which the trainer seeds per (round, client): reproducible, not cryptographically secure
(Opacus's ``secure_mode`` needs torchcsprng, which is not wired here).
"""

from __future__ import annotations

import math
import warnings

import torch

from .errors import ConfigError
from .local_sgd import num_samples

__all__ = ["DPSGD", "require_opacus"]


def require_opacus():
    """The ``opacus`` module; ConfigError naming the extra when it is not installed."""
    try:
        import opacus
    except ImportError:
        raise ConfigError("--dp-sgd needs the opacus extra: pip install 'fedopt[opacus]' (Opacus, for per-example "
                          "gradient clipping and its accountant)") from None
    return opacus


class DPSGD:
    """DP-SGD for the clients one :class:`~fedopt.trainer.LocalTrainer` trains, with one Opacus RDP accountant per
    client (its ε grows with every step it takes in the run)."""

    def __init__(self) -> None:
        require_opacus()
        self.accountants: dict[str, object] = {}
        self.epsilon: dict[str, float] = {}  # client -> ε after its last training

    def train(self, task, model: torch.nn.Module, data, config, client: str) -> dict:
        """Train ``client`` on ``data`` (a ClientData) with DP-SGD; the standard loop's metrics plus ε and δ.
        ConfigError for a task with its own ``train`` or a model Opacus cannot privatise (e.g. BatchNorm)."""
        from torch.utils.data import DataLoader, TensorDataset

        from .task import BaseTask

        base = getattr(task, "_task", task)  # the simulation host wraps the task to swap its train per call
        if getattr(type(base), "train", None) is not BaseTask.train or not callable(getattr(base, "loss", None)):
            raise ConfigError("--dp-sgd needs a task that trains with fedopt's standard loop (one that gives loss(), "
                              "not its own train())")
        n = num_samples(data.train)
        dataset = TensorDataset(*data.train) if data.tensors else data.train
        loader = DataLoader(dataset, batch_size=min(config.batch_size, n))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        with warnings.catch_warnings():  # the module docstring says what Opacus warns of: no secure RNG here
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return self._train(task, model, data, config, client, loader, optimizer, params, n)

    def _train(self, task, model, data, config, client, loader, optimizer, params, n) -> dict:
        from opacus import PrivacyEngine
        from opacus.accountants import RDPAccountant

        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = self.accountants.setdefault(client, RDPAccountant())  # the client's ledger, run-long
        try:
            private, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=config.dp_sgd_noise,
                max_grad_norm=config.dp_sgd_clip, poisson_sampling=True)
        except Exception as e:  # Opacus's validator: a layer it cannot clip per example
            raise ConfigError(f"--dp-sgd: Opacus cannot privatise this task's model: {e}") from None
        model.train()
        total, steps, samples = torch.zeros(()), 0, 0
        budget = config.max_steps if config.max_steps is not None else math.inf
        try:
            for _ in range(config.epochs):
                for batch in loader:
                    if steps >= budget:
                        break
                    batch = tuple(b.to(params[0].device) for b in batch)
                    optimizer.zero_grad(set_to_none=True)
                    if batch[0].shape[0]:
                        loss = task.loss(private, batch)
                        loss.backward()
                        total += loss.detach().cpu()
                    optimizer.step()  # an empty Poisson batch still takes a step: noise alone
                    steps += 1
                    samples += int(batch[0].shape[0])
        finally:
            private.cleanup()  # the model loses Opacus's hooks and per-example gradients
        delta = 1.0 / n ** 1.1
        eps = float(engine.accountant.get_epsilon(delta)) if steps else 0.0
        self.epsilon[client] = eps
        full = config.epochs * len(loader)
        return {"loss": float(total) / max(steps, 1), "steps": steps, "samples": samples, "partial": steps < full,
                "dp_sgd_epsilon": eps, "dp_sgd_delta": delta}
