"""The ``robust`` section of a run: Byzantine clients in simulation and client momentum."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .sections import number

__all__ = ["RobustConfig"]


@dataclass(frozen=True)
class RobustConfig:
    """``--attack NAME --attackers FRACTION [--attack-option KEY=VALUE]``: a seeded ``FRACTION`` of the clients are
    Byzantine and run the attack (:mod:`fedopt.attacks`); ``--client-momentum BETA``: every client sends its momentum
    (:mod:`fedopt.client_momentum`). Both run in the in-process simulation; over the bus they are `fedopt client`
    flags."""

    attack: str | None = None  # sign_flip | scaling | gaussian | label_flip | alie | ipm (None: every client honest)
    attackers: float = 0.0  # fraction of the clients that are Byzantine, chosen by --seed
    attack_options: dict = field(default_factory=dict)  # factor (scaling), sigma (gaussian), z (alie), epsilon (ipm)
    client_momentum: float = 0.0  # beta: clients send m = beta m + (1 - beta) delta (0: the delta itself)

    def __post_init__(self) -> None:
        from ..attacks import Attack

        number("attackers", self.attackers, 0, 1, what="a fraction")
        number("client_momentum", self.client_momentum, 0, 1, what="a number")
        if self.attack is not None:
            Attack(self.attack, self.attack_options)  # ConfigError naming --attack or --attack-option
            if self.attackers == 0:
                raise ConfigError(f"--attack {self.attack} needs --attackers FRACTION (the share of Byzantine clients)")
        elif self.attackers or self.attack_options:
            raise ConfigError("--attackers and --attack-option need --attack NAME")

    @property
    def active(self) -> bool:
        """Whether the run has Byzantine clients or client momentum."""
        return self.attack is not None or self.client_momentum > 0
