"""Learning-rate schedules over rounds, and the names of the client optimizers: plain math, no torch.

Kept apart from :mod:`fedopt.local_sgd` so that configuration (:mod:`fedopt.config`) validates and computes a round's
rate without importing torch.
"""

from __future__ import annotations

import math

__all__ = ["OPTIMIZERS", "SCHEDULES", "scheduled_lr"]

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
