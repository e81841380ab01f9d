"""Pluggable aggregators, by name. See :mod:`fedopt.aggregators.base` for the contract."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from .base import Aggregate, Aggregator, Update
from .mean import WeightedMean, fedavg, mean, weighted
from .robust import CoordinateMedian, TrimmedMean
from .secure import SecureAggregator, secagg

__all__ = [
    "Aggregate", "Aggregator", "Update", "WeightedMean", "CoordinateMedian", "TrimmedMean",
    "SecureAggregator", "fedavg", "mean", "weighted", "secagg", "make_aggregator", "AGGREGATORS", "register_aggregator",
]

AGGREGATORS: dict[str, Callable[..., Any]] = {
    "fedavg": fedavg,
    "mean": mean,
    "weighted": weighted,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "secagg": secagg,
}


def register_aggregator(name: str, factory: Callable[..., Any]) -> None:
    AGGREGATORS[name] = factory


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build a registered aggregator; ConfigError for an unknown name, a bad option, or ``secure=True`` on an
    aggregator that needs plaintext updates (median, trimmed_mean cannot run under secure aggregation)."""
    if options.pop("secure", False) and name != "secagg":
        return secagg(inner=name, **options)
    try:
        factory = AGGREGATORS[name]
    except KeyError:
        raise ConfigError(f"unknown aggregator {name!r} (choose from {', '.join(sorted(AGGREGATORS))})") from None
    try:
        return factory(**options)
    except TypeError as e:
        raise ConfigError(f"aggregator {name!r}: {e}") from None
