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
    aggregator that needs plaintext updates (median, trimmed_mean cannot run under secure aggregation).

    An ``inner`` aggregator given by name (``secure=True``, or ``make_aggregator("secagg", inner=...)``) is built
    here, so that secure aggregation sees what it needs of it (``needs_plaintext``) without a look-up of its own."""
    if options.pop("secure", False) and name != "secagg":
        return secagg(inner=_inner(name), **options)
    if "inner" in options:
        options["inner"] = _inner(options["inner"])
    try:
        factory = AGGREGATORS[name]
    except KeyError:
        raise ConfigError(f"unknown aggregator {name!r} (choose from {', '.join(sorted(AGGREGATORS))})") from None
    try:
        return factory(**options)
    except TypeError as e:
        raise ConfigError(f"aggregator {name!r}: {e}") from None


def _inner(inner: Any) -> Any:
    """A registered aggregator's name as an instance of it; other values (an unknown name, one whose factory needs
    arguments) pass through, and secure aggregation refuses them by name."""
    if isinstance(inner, str) and inner in AGGREGATORS and inner != "secagg":
        try:
            return AGGREGATORS[inner]()
        except TypeError:
            return inner
    return inner
