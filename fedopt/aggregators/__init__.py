"""Pluggable aggregators, by name. See :mod:`fedopt.aggregators.base` for the contract."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..errors import ConfigError
from .angular import CosineFilter
from .base import Aggregate, Aggregator, Update
from .bucketing import Bucketing
from .clipping import CenteredClip, NormBound
from .geomed import GeometricMedian
from .krum import Bulyan, Krum, MultiKrum
from .mean import WeightedMean, fedavg, mean, weighted
from .robust import CoordinateMedian, TrimmedMean
from .secure import SecureAggregator, secagg
from .spectral import DivideAndConquer

__all__ = [
    "Aggregate", "Aggregator", "Update", "WeightedMean", "CoordinateMedian", "TrimmedMean", "NormBound",
    "CenteredClip", "CosineFilter", "DivideAndConquer", "Bucketing", "Krum", "MultiKrum", "Bulyan", "GeometricMedian",
    "SecureAggregator", "fedavg", "mean", "weighted", "secagg", "make_aggregator", "AGGREGATORS", "register_aggregator",
]

AGGREGATORS: dict[str, Callable[..., Any]] = {
    "fedavg": fedavg,
    "mean": mean,
    "weighted": weighted,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "norm_bound": NormBound,
    "centered_clip": CenteredClip,
    "krum": Krum,
    "multi_krum": MultiKrum,
    "bulyan": Bulyan,
    "geomed": GeometricMedian,
    "cosine_filter": CosineFilter,
    "dnc": DivideAndConquer,
    "secagg": secagg,
}


def register_aggregator(name: str, factory: Callable[..., Any]) -> None:
    AGGREGATORS[name] = factory


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build a registered aggregator; ConfigError for an unknown name, a bad option, or ``secure=True`` on an
    aggregator that needs plaintext updates (median, trimmed_mean cannot run under secure aggregation).

    ``bucketing=s`` (and ``bucket_seed``) wraps the rule in :class:`~fedopt.aggregators.bucketing.Bucketing`: the rule
    sees the means of random buckets of ``s`` updates (Karimireddy et al., ICLR 2022).

    An ``inner`` aggregator given by name (``secure=True``, or ``make_aggregator("secagg", inner=...)``) is built
    here, so that secure aggregation sees what it needs of it (``needs_plaintext``) without a look-up of its own."""
    if "bucketing" in options:
        s, seed = options.pop("bucketing"), options.pop("bucket_seed", 0)
        inner = make_aggregator(name, **options)
        if not inner.needs_all_updates:
            raise ConfigError(f"--aggregator-option bucketing: aggregator {name!r} does not hold the round's updates "
                              f"(bucketing is for the robust rules that do: median, trimmed_mean, centered_clip, "
                              f"cosine_filter, dnc, krum, multi_krum, bulyan, geomed)")
        return Bucketing(inner, s, seed)
    if "bucket_seed" in options:
        raise ConfigError("--aggregator-option bucket_seed needs bucketing=S")
    if options.pop("secure", False) and name != "secagg":
        # the inner rule's own options (norm_bound's bound) build the inner; the rest are secagg's
        own = {k: options.pop(k) for k in list(options) if k in _parameters(AGGREGATORS.get(name))}
        return secagg(inner=_inner(name, **own), **options)
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


def _inner(inner: Any, **options: Any) -> Any:
    """A registered aggregator's name as an instance of it (built with ``options``); other values (an unknown name,
    one whose factory needs arguments) pass through, and secure aggregation refuses them by name."""
    if isinstance(inner, str) and inner in AGGREGATORS and inner != "secagg":
        try:
            return AGGREGATORS[inner](**options)
        except TypeError:
            return inner
    return inner


def _parameters(factory: Any) -> set[str]:
    """The keyword arguments a registered factory takes (none for an unknown name)."""
    try:
        return set(inspect.signature(factory).parameters) if factory is not None else set()
    except (TypeError, ValueError):
        return set()
