"""A malicious ``fedopt client``: the attacks of :mod:`fedopt.attacks` applied by a real client process.

``fedopt client --attack NAME [--attack-option KEY=VALUE] ...`` speaks the protocol like any client and trains
honestly on its own shard; only the update it sends changes (:func:`arm` builds the transform the training thread
applies to each finished delta, after ``--client-momentum`` if given):

* ``sign_flip``, ``scaling``, ``gaussian``: applied to its own update (the gaussian draw is seeded by the round's
  training seed, which the coordinator sends).
* ``label_flip``: its shard's training labels go through y -> C - 1 - y (C: the model's output width) when the
  shard is loaded; it then sends its honestly trained update.
* ``alie``, ``ipm``: not omniscient here. The ``--colluders K`` attackers of a run share one folder
  (``--collude DIR``) and nothing else: each writes its own honest-trained update of the round there
  (``DIR/round-R/ID.npy``, written to a temporary name and renamed), waits up to ``COLLUDE_WAIT`` seconds for
  the other K - 1, and crafts from the updates it found (its own included): ALIE's mean and standard deviation, and
  IPM's mean, are estimates from the attackers' own data, never from an honest client's update. ALIE's z is the
  paper's for n = the run's clients (every client selected each round) and f = K, unless ``z`` is given; ALIE needs
  K >= 2 (one update has no spread), IPM works alone (K = 1: -epsilon times its own update).

The shared folder stands for whatever channel colluding attackers have outside the run; the coordinator sees only
the crafted update, as from any client.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from fedopt.attacks import Attack, flip_labels
from fedopt.client_momentum import ClientMomentum
from fedopt.config import number
from fedopt.errors import ConfigError
from fedopt.task import ClientData

if TYPE_CHECKING:
    from clients.federated.config import ClientConfig

__all__ = ["arm", "check_attacker", "COLLUDE_WAIT"]

log = logging.getLogger("fedopt.client")
COLLUDE_WAIT = 30.0  # seconds an omniscient attacker waits for its colluders' updates of a round

Transform = Callable[[int, torch.Tensor, int], torch.Tensor]  # (round, delta, training seed) -> what is sent


def check_attacker(cfg: "ClientConfig") -> None:
    """ConfigError naming the flag for an attack a client cannot run as configured."""
    number("client_momentum", cfg.client_momentum, 0, 1, what="a number")
    if not isinstance(cfg.colluders, int) or isinstance(cfg.colluders, bool) or cfg.colluders < 1:
        raise ConfigError(f"--colluders must be an integer >= 1, not {cfg.colluders!r}")
    if cfg.attack is None:
        if cfg.attack_options or cfg.collude is not None or cfg.colluders != 1:
            raise ConfigError("--attack-option, --collude and --colluders need --attack NAME")
        return
    attack = Attack(cfg.attack, dict(cfg.attack_options))
    if not attack.omniscient and (cfg.collude is not None or cfg.colluders != 1):
        raise ConfigError(f"--collude and --colluders apply to --attack alie or ipm, not {cfg.attack}")
    if (cfg.collude is None) != (cfg.colluders == 1):
        raise ConfigError("--collude DIR and --colluders K (K >= 2) go together")
    if cfg.attack == "alie" and cfg.colluders < 2:
        raise ConfigError("--attack alie over the bus estimates the spread of updates from the colluders' own: "
                          "give --collude DIR --colluders K with K >= 2")


def arm(cfg: "ClientConfig", model: torch.nn.Module, data: ClientData,
        settings: dict) -> tuple[ClientData, Transform | None]:
    """This client's data (label-flipped for ``label_flip``) and the transform of its updates (None: sends them as
    trained). ``settings`` is the coordinator's WELCOME config (its ``clients`` is ALIE's n)."""
    momentum = ClientMomentum(cfg.client_momentum) if cfg.client_momentum else None
    attack = Attack(cfg.attack, dict(cfg.attack_options)) if cfg.attack is not None else None
    if attack is None and momentum is None:
        return data, None
    if attack is not None and attack.name == "label_flip":
        data = _flipped(model, data)
    pool = _Pool(Path(cfg.collude), cfg.client_id, cfg.colluders) if cfg.collude is not None else None
    n = int(settings.get("clients") or cfg.colluders)
    if attack is not None:
        log.warning("client %s is Byzantine: attack %s %s", cfg.client_id, attack.name, attack.options)

    def transform(rnd: int, delta: torch.Tensor, seed: int) -> torch.Tensor:
        x = momentum(cfg.client_id, delta) if momentum is not None else delta
        if attack is None:
            return x
        if not attack.omniscient:
            return attack.apply(x, seed)
        rows = pool.share(rnd, x) if pool is not None else x[None]
        return attack.craft(rows, n, rows.shape[0] if pool is None else cfg.colluders)

    return data, transform


def _flipped(model: torch.nn.Module, data: ClientData) -> ClientData:
    if not data.tensors or len(data.train) < 2 or data.train[1].dtype not in (torch.int64, torch.int32):
        raise ConfigError("--attack label_flip needs a classification task whose shards are (x, y) tensors with "
                          "integer labels")
    x, y = data.train[0], data.train[1]
    with torch.no_grad():
        classes = int(model(x[:1].to(next(model.parameters()).device)).shape[-1])
    return ClientData((x, flip_labels(y, classes), *data.train[2:]), data.test)


class _Pool:
    """The colluders' shared folder: ``share(round, x)`` -> the k x P updates the colluders wrote for the round."""

    def __init__(self, folder: Path, client: str, colluders: int) -> None:
        self.folder, self.client, self.colluders = folder, client, colluders

    def share(self, rnd: int, x: torch.Tensor) -> torch.Tensor:
        where = self.folder / f"round-{rnd}"
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".{self.client}.{os.getpid()}.tmp"  # not *.npy: colluders never read a half-written file
        with open(tmp, "wb") as f:
            np.save(f, x.detach().cpu().float().numpy())
        os.replace(tmp, where / f"{self.client}.npy")
        deadline = time.monotonic() + COLLUDE_WAIT
        while len(list(where.glob("*.npy"))) < self.colluders and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = []
        for path in sorted(where.glob("*.npy")):
            try:
                row = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                continue
            if row.shape == (x.numel(),) and row.dtype == np.float32:
                rows.append(torch.from_numpy(row))
        if len(rows) < self.colluders:
            log.warning("client %s: %d of %d colluders' updates for round %d", self.client, len(rows),
                        self.colluders, rnd)
        (self.folder / f"round-{rnd - 2}" / f"{self.client}.npy").unlink(missing_ok=True)  # long read by all
        return torch.stack(rows).to(x.device, x.dtype)
