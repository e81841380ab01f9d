"""Learning-rate schedules over rounds, staleness weights of asynchronous updates, and the names of the client
optimizers: plain math, no torch.

Kept apart from :mod:`fedopt.local_sgd` so that configuration (:mod:`fedopt.config`) validates and computes a round's
rate without importing torch.
"""

from __future__ import annotations

import math
from typing import Callable

from .errors import ConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "scheduled_lr", "parse_staleness"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def scheduled_lr(lr: float, schedule: str, round: int, rounds: int, *, lr_min: float = 0.0, step: int = 10,
                 gamma: float = 0.1) -> float:
    """The learning rate of ``round`` (1-based) out of ``rounds``.

    ``constant``: ``lr``. ``cosine``: ``lr_min + (lr - lr_min) (1 + cos(pi (round-1) / rounds)) / 2``, so round 1
    trains at ``lr`` and the last round just above ``lr_min`` (Loshchilov & Hutter, ICLR 2017, without restarts).
    ``step``: ``lr * gamma ** ((round-1) // step)``.
    """
    if schedule == "constant":
        return float(lr)
    if schedule == "cosine":
        frac = (round - 1) / max(rounds, 1)
        return float(lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    if schedule == "step":
        return float(lr * gamma ** ((round - 1) // max(step, 1)))
    raise ValueError(f"lr-schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")


def parse_staleness(spec: str) -> Callable[[int], float]:
    """``--staleness SPEC`` (module docstring) as a function of tau; ConfigError naming the problem."""
    kind, _, rest = spec.partition(":")
    try:
        args = [float(x) for x in rest.split(",")] if rest else []
        if kind == "polynomial" and len(args) <= 1 and all(0 <= a <= 10 for a in args):
            a = args[0] if args else 0.5
            return lambda tau: (1.0 + tau) ** -a
        if kind == "sqrt" and not args:
            return lambda tau: 1.0 / (1.0 + math.sqrt(tau))
        if kind == "hinge" and len(args) in (0, 2) and all(x >= 0 for x in args):
            a, b = args or (10.0, 4.0)
            return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
        if kind == "constant" and not args:
            return lambda tau: 1.0
    except ValueError:
        pass
    raise ConfigError(f"--staleness {spec!r}: expected polynomial[:A], sqrt, hinge[:A,B] or constant")
