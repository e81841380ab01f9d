"""Byzantine clients and client momentum in the in-process simulation (``--attack``, ``--client-momentum``).

The executor :class:`ByzantineClients` trains every job with one :class:`~clients.simulation.host.ClientHost`, as
the sequential executor does, and changes only what a client *sends*: the aggregator and the engine are the run's
own and never know who is Byzantine. A round::

    honest clients   train; send their delta, or their momentum with --client-momentum
    Byzantine ones   label_flip: train on flipped labels (their shard is wrapped) and send that honestly
                     sign_flip, scaling, gaussian: train honestly, send the attack applied to what they would send
                     alie, ipm (omniscient): see every honest update of this round first, then each sends the one
                     vector crafted from them (n = the round's selected clients, f = the Byzantine among them)

Which clients are Byzantine is drawn once from ``--seed`` (:func:`fedopt.attacks.byzantine_clients`). Honest
clients are trained before Byzantine ones in every round, so the omniscient attacker has the whole honest round in
hand; the order of arrival changes no aggregator's result beyond float rounding.
"""

from __future__ import annotations

import dataclasses

import torch

from fedopt.aggregators import Update
from fedopt.attacks import Attack, byzantine_clients, flip_labels
from fedopt.client_momentum import ClientMomentum
from fedopt.config import RunConfig
from fedopt.engine import Job, RoundServer, client_seed
from fedopt.errors import ConfigError
from fedopt.params import ParamSpec
from fedopt.task import ClientData, Task

from clients.simulation.host import ClientHost
from clients.simulation.state import ClientStateStore

__all__ = ["ByzantineClients", "FlippedLabels", "num_classes"]


def _labelled(data: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
    if not data.tensors or len(data.train) < 2 or data.train[1].dtype not in (torch.int64, torch.int32):
        raise ConfigError("--attack label_flip needs a classification task whose shards are (x, y) tensors with "
                          "integer labels")
    return data.train[0], data.train[1]


def num_classes(task: Task, model: torch.nn.Module, data: ClientData) -> int:
    """C of the label permutation: ``task.num_classes`` when the task says, else the width of the model's output."""
    if isinstance(getattr(task, "num_classes", None), int):
        return task.num_classes
    x, _ = _labelled(data)
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


class FlippedLabels:
    """A shard list (like :class:`~clients.simulation.shards.ShardSource`) whose ``flipped`` clients' training labels
    go through the label-flip permutation; every other shard, and every test split, is the original."""

    def __init__(self, shards, flipped: frozenset[str], classes: int) -> None:
        self.shards, self.flipped, self.classes = shards, flipped, classes

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> ClientData:
        data = self.shards[i]
        if str(int(i)) not in self.flipped:
            return data
        x, y = _labelled(data)
        return ClientData((x, flip_labels(y, self.classes), *data.train[2:]), data.test)


class ByzantineClients:
    """The simulation's executor when the run has Byzantine clients or client momentum (see the module docstring)."""

    def __init__(self, task: Task, spec: ParamSpec, shards, device: torch.device, cfg: RunConfig,
                 state_budget_bytes: int = 256 << 20) -> None:
        r = cfg.robust
        self.attack = Attack(r.attack, r.attack_options) if r.attack is not None else None
        self.byzantine = byzantine_clients(cfg.federation.clients, r.attackers, cfg.seed) if self.attack \
            else frozenset()
        self.seed, self.sizes = cfg.seed, shards.sizes
        self.host = ClientHost(task, spec, shards, device, cfg.train.buffers)
        self.trainer = self.host.trainer
        if self.attack is not None and self.attack.name == "label_flip":
            first = shards[int(min(self.byzantine, key=int))]
            self.host.shards = FlippedLabels(shards, self.byzantine, num_classes(task, self.trainer.model, first))
        self._store = ClientStateStore(spec.size, state_budget_bytes, torch.float32) if r.client_momentum else None
        self.momentum = ClientMomentum(r.client_momentum, self._store) if self._store is not None else None

    def run_round(self, server: RoundServer, jobs: list[Job]) -> None:
        honest = [j for j in jobs if j.client not in self.byzantine]
        bad = [j for j in jobs if j.client in self.byzantine]
        omniscient = self.attack is not None and self.attack.omniscient
        seen: list[torch.Tensor] = []

        def send_honest(u: Update) -> str | None:
            u = self._sent(u)
            if omniscient:
                seen.append(u.delta.detach().clone())
            return server.offer(u)

        def send_attacked(u: Update) -> str | None:
            u = self._sent(u)
            seed = client_seed(self.seed, server.round, u.client)
            return server.offer(dataclasses.replace(u, delta=self.attack.apply(u.delta, seed)))

        self.host.run(server, honest, server.global_vec, sink=send_honest)
        if not bad:
            return
        if not omniscient:
            self.host.run(server, bad, server.global_vec, sink=send_attacked)
            return
        crafted = self.attack.craft(torch.stack(seen), len(jobs), len(bad)) if seen else None
        for job in bad:
            if job.straggler and not server.keep_stragglers:
                server.reject(job.client, "straggler dropped")
            elif crafted is None:
                server.reject(job.client, "Byzantine: no honest update this round to craft from")
            else:
                server.offer(Update(job.client, crafted, self.sizes[job.client]))

    def _sent(self, u: Update) -> Update:
        """What the client sends of its training output: the delta, or its momentum."""
        if self.momentum is None:
            return u
        return dataclasses.replace(u, delta=self.momentum(u.client, u.delta))

    def close(self) -> None:
        self.host.close()
        if self._store is not None:
            self._store.close()
