"""Pluggable aggregators, by name. See :mod:`fedopt.aggregators.base` for the contract."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from .base import Aggregate, Aggregator, Update
from .mean import WeightedMean, fedavg, mean, weighted
from .robust import CoordinateMedian, TrimmedMean

__all__ = [
    "Aggregate", "Aggregator", "Update", "WeightedMean", "CoordinateMedian", "TrimmedMean",
    "fedavg", "mean", "weighted", "make_aggregator", "AGGREGATORS", "register_aggregator",
]

AGGREGATORS: dict[str, Callable[..., Any]] = {
    "fedavg": fedavg,
    "mean": mean,
    "weighted": weighted,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
}


def register_aggregator(name: str, factory: Callable[..., Any]) -> None:
    AGGREGATORS[name] = factory


def make_aggregator(name: str, **options: Any) -> Aggregator:
    try:
        factory = AGGREGATORS[name]
    except KeyError:
        raise ConfigError(f"unknown aggregator {name!r} (choose from {', '.join(sorted(AGGREGATORS))})") from None
    try:
        return factory(**options)
    except TypeError as e:
        raise ConfigError(f"aggregator {name!r}: {e}") from None
