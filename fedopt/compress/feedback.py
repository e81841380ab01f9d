"""Error feedback: a client adds what compression left out of its last update to its next one.

EF-SGD (Karimireddy, Rebjock, Stich, Jaggi; "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
ICML 2019) and memory for sparsified SGD (Stich, Cordonnier, Jaggi; NeurIPS 2018): with residual ``e`` (zero at first)
a client sends ``C(delta + e)`` and keeps ``e <- delta + e - D(C(delta + e))``. Nothing is lost, only delayed, which is
what lets top-k at 1% converge like the uncompressed run; without it a biased compressor can stall.

The residual is client state, kept by the client runtime in a ``store`` with ``get(client) -> Tensor | None`` and
``put(client, vec)`` (a simulation's :class:`~clients.simulation.state.ClientStateStore`, a federated client's
:class:`Memory`). In cross-device FL a client that rarely returns keeps a stale residual; that is the method's known
limit (FetchSGD moves the memory to the server for that reason).

Measured (benchmarks/compression.py, digits Dirichlet 0.5, 100 clients, 20 a round, top-k 1% + q8): error
feedback delays update mass, and a run must be long enough to wait for it. After 100 rounds the top-k run was 8
points behind (seed 0: 0.80 against 0.88, the uncompressed run still climbing); after 1,000, where the uncompressed
run levels off at 0.94, it is within +0.11 points (median of 3 seeds). Without error feedback it stays 4.7 points
behind. Decaying the residual at each participation (0.9: 0.75, 0.5: 0.57 at 100 rounds), k per tensor (0.79) and
EF21 with partial participation (Fatkhullin et al. 2021: 0.79) did not shorten the delay; a larger k does (5%: 0.87).

Cost: one pass over the update (``e += delta`` in place, into the tensor ``get`` returned), the compressor's own work
(top-k: a sampled threshold and one chunked pass, see :func:`~fedopt.compress.sparsify.top_k`), and O(k) to take what
was sent out of the residual (``e[sent] -= decoded``; exactly zero where values travel at full precision). No dense
temporary beyond the residual itself: a client's first update is copied once to become it.
"""

from __future__ import annotations

import torch

from .pipeline import Compressor, Packed, decoded

__all__ = ["ErrorFeedback", "Memory"]


class Memory(dict):
    """The simplest residual store: a dict with ``put`` (a federated client holds its one residual here). It keeps
    the tensor it is given (no copy): the caller gives it up."""

    def put(self, client: str, vec: torch.Tensor) -> None:
        self[client] = vec.detach()


class ErrorFeedback:
    """``compress(client, delta, seed) -> Packed``: the update plus the client's residual, compressed; the receiver
    decodes it with :func:`~fedopt.compress.pipeline.decompress`. ``store`` None: no error feedback (each update
    compressed on its own). ``delta`` is only read."""

    def __init__(self, compressor: Compressor, store=None) -> None:
        self.compressor, self.store = compressor, store

    def compress(self, client: str, delta: torch.Tensor, seed: int) -> Packed:
        x = delta.detach().reshape(-1).to("cpu", torch.float32)
        if self.store is None:
            return self.compressor.compress(x, seed)
        e = self.store.get(client)
        if e is None:
            e = x.clone() if x.data_ptr() == delta.data_ptr() else x  # delta stays the caller's
        else:
            e += x
        packed = self.compressor.compress(e, seed)
        at, vals = decoded(packed)
        if at is None:
            e -= vals
        else:
            e[at] -= vals
        self.store.put(client, e)
        return packed
