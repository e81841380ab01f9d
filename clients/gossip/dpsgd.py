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

With ``--compress SPEC`` the round is CHOCO-Gossip's (:mod:`clients.gossip.choco`): a peer sends each neighbour the
compressed difference between its model and its public copy instead of the model, and mixes with the copies. A
difference is not screened like a model (clipping it would desynchronise the copies); it must decode to the right
size and leave the copy finite and within the model norm bound, or its sender's copy is dropped. A neighbour that misses a round is followed no more.
"""

from __future__ import annotations

import logging
import time

import torch

from fedopt import wire
from fedopt.compress import Packed
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
        body = {"model": vec}
        if self.choco is not None:  # one compressed difference for every neighbour (seeded per round and rank)
            q = self.choco.outgoing(vec, req.round * len(self.members) + self.rank)
            body = dict(encoding=q.encoding(), values=q.values, indices=q.indices, scales=q.scales)
        for addr in self.graph:
            self._dealer(addr).send(wire.GossipPush(round=req.round, version=version,
                                                    num_samples=self.state.num_samples, addr=self.address,
                                                    sender=self.address, **body))
            self.stats["models"] += 1
        self.sync = {"req": req, "vec": vec, "deadline": time.monotonic() + req.budget}
        self._check_sync()

    def _on_sync_push(self, addr: str, rnd: int, model: torch.Tensor | Packed) -> None:
        if addr not in self.graph:
            raise WireError(f"D-PSGD push from {addr!r}, which is not a neighbour of this peer in the topology")
        base = max(self.sync_done, self.round_open - 1)  # a resumed peer starts past round 1
        if not base < rnd <= base + 2:  # the round being run, or the next
            raise WireError(f"D-PSGD push from {addr} for round {rnd}, outside rounds {base + 1}-{base + 2}")
        if (self.choco is not None) != isinstance(model, Packed):
            raise WireError(f"D-PSGD push from {addr}: {'dense' if self.choco else 'compressed'} models, but this "
                            f"peer runs {'CHOCO-Gossip (--compress)' if self.choco else 'plain D-PSGD'}")
        if self.choco is None:
            with self.state.lock:
                model, _ = self.state.screen(model)  # refused when far off, clipped towards this peer's model
            model = model.clone()
        self.missing.discard(addr)
        self.inbox.setdefault(rnd, {})[self.members.index(addr)] = model
        if self.sync is not None:
            self._check_sync()

    def _check_sync(self) -> None:
        s = self.sync
        rnd = s["req"].round
        got = self.inbox.get(rnd, {})
        followed = None if self.choco is None else set(self.choco.followed())
        waiting = [a for a in self.graph if a not in self.missing and self.members.index(a) not in got
                   and (followed is None or self.members.index(a) in followed)]
        if waiting and time.monotonic() < s["deadline"]:
            return
        for a in waiting:
            log.warning("D-PSGD round %d: no model from %s by the deadline; mixing without it", rnd, a)
            self.missing.add(a)
        if self.choco is not None:
            got = self._choco_receive(rnd, got)
            mixed = self.choco.mix(s["vec"], self.row, set(got))
            got = {j: self.choco.hat[j] for j in got}  # distances below: to the copies, which track the models
        else:
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

    def _choco_receive(self, rnd: int, got: dict) -> dict:
        """Apply round ``rnd``'s compressed differences to the copies; those that fail are dropped (logged)."""
        applied = {}
        b = self.state.bounds  # a copy may be as large as a screened model: norm_factor times this peer's
        limit = b.norm_factor * max(float(torch.linalg.vector_norm(self.sync["vec"])), b.norm_floor)
        for j, q in sorted(got.items()):
            try:
                self.choco.receive(j, q, limit)
                applied[j] = q
            except WireError as e:
                log.warning("CHOCO round %d: %s's difference refused (%s); it is followed no more", rnd,
                            self.members[j], e)
        for j in set(self.choco.followed()) - set(applied):
            log.warning("CHOCO round %d: nothing from %s; its copy cannot be kept in step, it is followed no more",
                        rnd, self.members[j])
        return applied
