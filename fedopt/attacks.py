"""Byzantine clients: what a malicious client does to the update it sends, as pure functions on tensors.

An attacker is a client: it receives the model, may train honestly, and sends something else. Nothing here runs
inside an aggregator; the simulation (:mod:`clients.simulation.byzantine`) and the bus client
(:mod:`clients.federated.attacker`) wrap an honest client's training output with an :class:`Attack`.

Attacks (``--attack NAME``, options ``--attack-option KEY=VALUE``)::

    sign_flip   -x: the negated update (the "bit flipping" of Karimireddy et al.'s experiments)
    scaling     factor * x (factor 1000: boosted model replacement; Bagdasaryan et al. 2020 scale by n/eta)
    gaussian    a draw from N(0, sigma^2 I) instead of the update (Blanchard et al. 2017's Gaussian Byzantine,
                sigma 200), seeded per (run, round, client)
    label_flip  trains honestly on labels y -> C - 1 - y (C classes) and sends that update; acts on the data
    alie        "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): every attacker sends
                mu - z * sigma, mu and sigma the coordinate-wise mean and standard deviation of the honest
                updates, z the paper's z_max for n updates with f attackers (:func:`alie_z`), or option z
    ipm         inner-product manipulation (Xie, Koyejo, Gupta, UAI 2019): -epsilon * mean(honest updates),
                epsilon 0.1 (the value of Karimireddy et al.'s IPM experiments)

``alie`` and ``ipm`` are *omniscient*: they need the honest updates of the round. In simulation the attacker sees
every honest update of the round before it crafts its own (the omniscient threat model of both papers); over the
bus the colluding attackers estimate the statistics from their own honest-trained updates only
(:mod:`clients.federated.attacker`).

With client momentum (``--client-momentum``) an attacker transforms what an honest client of the run would send,
its momentum; the omniscient statistics are over the honest clients' momenta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["ATTACKS", "OMNISCIENT", "Attack", "alie", "alie_z", "byzantine_clients", "flip_labels", "gaussian", "ipm",
           "scale", "sign_flip"]

#: attack -> its options and their defaults
ATTACKS: dict[str, dict[str, float | None]] = {
    "sign_flip": {},
    "scaling": {"factor": 1000.0},
    "gaussian": {"sigma": 200.0},
    "label_flip": {},
    "alie": {"z": None},
    "ipm": {"epsilon": 0.1},
}
OMNISCIENT = frozenset({"alie", "ipm"})


def sign_flip(delta: torch.Tensor) -> torch.Tensor:
    return -delta


def scale(delta: torch.Tensor, factor: float) -> torch.Tensor:
    return delta * factor


def gaussian(delta: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """A draw from N(0, sigma^2 I) shaped like ``delta``, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(delta.shape, generator=g) * sigma).to(delta.device, delta.dtype)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f supporters are needed, z_max = Phi^-1((n - s) / n).
    (The authors of CC used (n - f - s) / (n - f) in their code; this is the paper's formula.) 0 when undefined."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n if n > 0 else 0.0
    return NormalDist().inv_cdf(p) if 0 < p < 1 else 0.0


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """mu - z * sigma over the k x P ``honest`` rows (sigma: the unbiased standard deviation; 0 for one row)."""
    mu = honest.mean(dim=0)
    if honest.shape[0] < 2:
        return mu
    return mu - z * honest.std(dim=0)


def ipm(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    return -epsilon * honest.mean(dim=0)


def flip_labels(y: torch.Tensor, classes: int) -> torch.Tensor:
    """The label permutation of the label-flip attack: y -> classes - 1 - y."""
    return (classes - 1) - y


def byzantine_clients(clients: int, fraction: float, seed: int) -> frozenset[str]:
    """The ids of the Byzantine clients of a run: round(fraction * clients) of ``0 .. clients-1`` drawn by
    ``seed`` (the same run has the same attackers). ConfigError when that is no client or every client."""
    k = math.floor(fraction * clients + 0.5)
    if not 0 < k < clients:
        raise ConfigError(f"--attackers {fraction} of --clients {clients} makes {k} Byzantine clients: give a "
                          f"fraction that makes at least one and leaves one honest client")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xB1A5])
    return frozenset(str(i) for i in rng.choice(clients, size=k, replace=False).tolist())


@dataclass(frozen=True)
class Attack:
    """One attack and its options (defaults from :data:`ATTACKS` filled in); validated on construction."""

    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ConfigError(f"--attack must be one of {', '.join(ATTACKS)}, not {self.name!r}")
        known = ATTACKS[self.name]
        if not isinstance(self.options, dict):
            raise ConfigError("--attack-option must be KEY=VALUE pairs")
        for key, value in self.options.items():
            if key not in known:
                takes = ", ".join(known) if known else "no options"
                raise ConfigError(f"--attack-option {key}: attack {self.name} takes {takes}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"--attack-option {key} must be a finite number, not {value!r}")
        if self.name in ("gaussian", "ipm") and any(v <= 0 for v in self.options.values()):
            raise ConfigError(f"--attack-option {', '.join(self.options)} must be > 0 for {self.name}")
        object.__setattr__(self, "options", {**known, **self.options})

    @property
    def omniscient(self) -> bool:
        """Needs the round's honest updates (:meth:`craft`) rather than its own (:meth:`apply`)."""
        return self.name in OMNISCIENT

    def apply(self, delta: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """What a non-omniscient attacker sends instead of ``delta`` (label_flip: ``delta``, already poisoned)."""
        if self.name == "sign_flip":
            return sign_flip(delta)
        if self.name == "scaling":
            return scale(delta, self.options["factor"])
        if self.name == "gaussian":
            return gaussian(delta, self.options["sigma"], seed)
        if self.name == "label_flip":
            return delta
        raise ConfigError(f"attack {self.name} needs the round's honest updates: use craft()")

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        """What every omniscient attacker sends, from the k x P ``honest`` updates of a round of ``n`` updates of
        which ``f`` are Byzantine."""
        if self.name == "alie":
            z = self.options["z"]
            return alie(honest, alie_z(n, f) if z is None else z)
        if self.name == "ipm":
            return ipm(honest, self.options["epsilon"])
        raise ConfigError(f"attack {self.name} transforms its own update: use apply()")
