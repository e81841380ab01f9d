"""Client ("worker") momentum: a client sends the running average of its updates instead of the latest one.

Karimireddy, He, Jaggi (ICML 2021), Algorithm 2: ``m_i <- (1 - beta) g_i + beta m_i`` and the worker sends
``m_i``. Here the step is a round's model delta: ``m_i <- beta m_i + (1 - beta) delta_i``, started from the
client's first delta (as the authors' code starts its buffer from the first gradient), so early rounds are not
shrunk by (1 - beta). Averaging over rounds shrinks the honest clients' noise by about sqrt((1 - beta) / (1 + beta)),
so a Byzantine perturbation hidden in one round's noise stands out against the centred-clipping rule it is meant
for (``--aggregator centered_clip``). Asked for by ``--client-momentum BETA`` (``fedopt simulate``, ``fedopt
client``); the momentum is client state that survives between the rounds a client takes part in.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .errors import ConfigError

__all__ = ["ClientMomentum", "VectorStore"]


class VectorStore(Protocol):
    """Where per-client vectors live: ``get`` returns a tensor the caller may modify, or None; ``put`` copies."""

    def get(self, client: str) -> torch.Tensor | None: ...

    def put(self, client: str, vec: torch.Tensor) -> None: ...


class _Dict:
    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}

    def get(self, client: str) -> torch.Tensor | None:
        return self._rows.get(client)

    def put(self, client: str, vec: torch.Tensor) -> None:
        self._rows[client] = vec.detach().clone()


class ClientMomentum:
    """``momentum(client, delta) -> m``: the client's new momentum (a fresh tensor the caller owns).

    ``store`` holds each client's momentum between rounds (default: a dict in memory; a simulation passes its
    spilling :class:`~clients.simulation.state.ClientStateStore`)."""

    def __init__(self, beta: float, store: VectorStore | None = None) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ConfigError(f"--client-momentum must be a number in [0, 1), not {beta!r}")
        self.beta = float(beta)
        self.store = store if store is not None else _Dict()

    def __call__(self, client: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.store.get(client)
        if m is None:
            m = delta.detach().to(torch.float32, copy=True)
        else:
            m = m.to(delta.device, torch.float32).mul_(self.beta).add_(delta.detach().float(), alpha=1 - self.beta)
        self.store.put(client, m)
        return m.to(delta.dtype)
