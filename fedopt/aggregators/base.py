"""The Aggregator contract, and the update it consumes.

An aggregator turns the round's client updates into one aggregated delta. Its life in a round::

    agg.begin(round, size)      # size: the flat vector's length
    agg.add(update)             # once per accepted update, in arrival order
    agg.result()                # -> Aggregate, or None when no update carried weight

Contract:

* ``add`` does not keep a reference to ``update.delta`` unless ``needs_all_updates`` is True, so a caller may reuse
  or free the buffer right after ``add`` returns (this is what keeps streaming aggregation at O(P) memory).
* ``add`` raises :class:`ConfigError` for an update of the wrong length; the caller logs and drops it.
* ``result`` returns ``None`` when nothing was added or every weight was 0: the round made no progress.
* Linear aggregators (``linear = True``) also accept pre-aggregated partials through :meth:`merge`, which is how
  simulation workers send one message per worker instead of one per client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Update", "Aggregate", "Aggregator"]


@dataclass
class Update:
    """One client's contribution to a round."""

    client: str  # the client's id
    delta: torch.Tensor  # flat vector: local model - global model
    num_samples: int  # samples the client trained on (FedAvg's weight)
    metrics: dict = field(default_factory=dict)  # the client's training metrics (loss, steps, ...)
    partial: bool = False  # True when the client did only part of its local work (a straggler)


@dataclass
class Aggregate:
    """The round's combined update."""

    delta: torch.Tensor  # the weighted mean of the accepted deltas
    weight: float  # sum of the accepted weights
    count: int  # number of client updates folded in


@runtime_checkable
class Aggregator(Protocol):
    name: str
    linear: bool  # the result is a weighted mean, so partial results can be merged
    needs_all_updates: bool  # keeps every update until result() (robust statistics); not streaming
    needs_plaintext: bool  # must see individual updates in the clear (cannot run under secure masking)

    def begin(self, round: int, size: int) -> None: ...

    def add(self, update: Update) -> None: ...

    def result(self) -> Aggregate | None: ...
