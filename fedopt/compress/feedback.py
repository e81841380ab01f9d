"""Error feedback: a client adds what compression left out of its last update to its next one.

EF-SGD (Karimireddy, Rebjock, Stich, Jaggi; "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
ICML 2019) and memory for sparsified SGD (Stich, Cordonnier, Jaggi; NeurIPS 2018): with residual ``e`` (zero at first)
a client sends ``C(delta + e)`` and keeps ``e <- delta + e - D(C(delta + e))``. Nothing is lost, only delayed, which is
what lets top-k at 1% converge like the uncompressed run; without it a biased compressor can stall.

The residual is client state, kept by the client runtime in a ``store`` with ``get(client) -> Tensor | None`` and
``put(client, vec)`` (a simulation's :class:`~clients.simulation.state.ClientStateStore`, a federated client's
:class:`Memory`). In cross-device FL a client that rarely returns keeps a stale residual; that is the method's known
limit (FetchSGD moves the memory to the server for that reason).
"""

from __future__ import annotations

import torch

from .pipeline import Compressor, Packed, decompress

__all__ = ["ErrorFeedback", "Memory"]


class Memory(dict):
    """The simplest residual store: a dict with ``put`` (a federated client holds its one residual here)."""

    def put(self, client: str, vec: torch.Tensor) -> None:
        self[client] = vec.detach().to("cpu", torch.float32, copy=True)


class ErrorFeedback:
    """``compress(client, delta, seed) -> (Packed, dense)``: the compressed update and what the receiver will decode
    from it. ``store`` None: no error feedback (each update compressed on its own)."""

    def __init__(self, compressor: Compressor, store=None) -> None:
        self.compressor, self.store = compressor, store

    def compress(self, client: str, delta: torch.Tensor, seed: int) -> tuple[Packed, torch.Tensor]:
        x = delta.detach().reshape(-1).to("cpu", torch.float32)
        if self.store is not None:
            e = self.store.get(client)
            if e is not None:
                x = x + e
        packed = self.compressor.compress(x, seed)
        dense = decompress(packed, x.numel())
        if self.store is not None:
            self.store.put(client, x - dense)
        return packed, dense
