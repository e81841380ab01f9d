"""Synchronous D-PSGD rounds on a fixed topology (Lian et al., "Can decentralized algorithms outperform centralized
algorithms?", NeurIPS 2017), the socket-thread half: a mixin of :class:`clients.gossip.peer.PeerSockets`.

In round ``t`` each peer sends its model to its graph neighbours, waits for theirs (or the deadline: a missing
neighbour's weight goes to itself and it is not waited for again until it is heard from), and mixes with
Metropolis-Hastings weights (:mod:`clients.gossip.topology`).

Bounds: a push counts only from a graph neighbour (its address bound to its key over CurveZMQ, see
:mod:`clients.gossip.peer`), only for the round being run or the next one, and only its last copy: the inbox holds at
most ``2 * degree`` models whatever neighbours send. Each model is screened (finite, norm and distance bounds of
:meth:`~clients.gossip.state.ModelState.screen`) before it is stored. A push for any other round is dropped and does
not count as hearing from that neighbour.
"""

from __future__ import annotations

import logging
import time

import torch

from fedopt import wire
from fedopt.errors import WireError

from clients.gossip.topology import mh_weights, mix_row, neighbours

__all__ = ["SyncRounds"]

log = logging.getLogger("fedopt.gossip")


class SyncRounds:
    """Needs ``self.state``, ``self.address``, ``self._dealer(addr)``, ``self.stats`` and ``self._finish`` (the host)."""

    def _init_sync(self, members: list[str], topology: str) -> None:
        self.rank = members.index(self.address)
        n = len(members)
        self.row = mh_weights(self.rank, n, topology)
        self.graph = [members[j] for j in neighbours(self.rank, n, topology)]
        self.missing: set[str] = set()
        self.inbox: dict[int, dict[int, torch.Tensor]] = {}

    def _start_sync(self, req) -> None:
        vec, version = self.state.snapshot()
        for addr in self.graph:
            self._dealer(addr).send(wire.GossipPush(round=req.round, version=version,
                                                    num_samples=self.state.num_samples, addr=self.address,
                                                    model=vec, sender=self.address))
            self.stats["models"] += 1
        self.sync = {"req": req, "vec": vec, "deadline": time.monotonic() + req.budget}
        self._check_sync()

    def _on_sync_push(self, addr: str, rnd: int, model: torch.Tensor) -> None:
        if addr not in self.graph:
            raise WireError(f"D-PSGD push from {addr!r}, which is not a neighbour of this peer in the topology")
        base = max(self.sync_done, self.round_open - 1)  # a resumed peer starts past round 1
        if not base < rnd <= base + 2:  # the round being run, or the next
            raise WireError(f"D-PSGD push from {addr} for round {rnd}, outside rounds {base + 1}-{base + 2}")
        with self.state.lock:
            model, _ = self.state.screen(model)  # refused when far off, clipped towards this peer's model
        self.missing.discard(addr)
        self.inbox.setdefault(rnd, {})[self.members.index(addr)] = model.clone()
        if self.sync is not None:
            self._check_sync()

    def _check_sync(self) -> None:
        s = self.sync
        rnd = s["req"].round
        got = self.inbox.get(rnd, {})
        waiting = [a for a in self.graph if a not in self.missing and self.members.index(a) not in got]
        if waiting and time.monotonic() < s["deadline"]:
            return
        for a in waiting:
            log.warning("D-PSGD round %d: no model from %s by the deadline; mixing without it", rnd, a)
            self.missing.add(a)
        mixed = mix_row(self.rank, s["vec"], got, self.row)
        with self.state.lock:
            self.state.vec.copy_(mixed)  # a mix adds no training: the version (a training clock) stays
            self.state.motion.extend(float(torch.linalg.vector_norm(s["vec"] - v)) for v in got.values())
        self.inbox = {r: v for r, v in self.inbox.items() if r > rnd}
        self.sync_done = rnd
        self.sync = None
        self.stats["exchanges"] += len(got)
        self.stats["distances"] += [float(torch.linalg.vector_norm(s["vec"] - v)) for v in got.values()]
        self._finish(s["req"], status="ok", received=len(got))
