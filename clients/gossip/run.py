"""One peer of a swarm that trains without a coordinator (``fedopt gossip``, configured by a
:class:`~clients.gossip.config.GossipConfig`, whose fields are the flags named here).

A peer binds one socket, finds others from ``--peers`` (a seed list) and/or ``--discover`` (keyed UDP beacons on
``--interface``), pulls a newer model from the swarm if there is one (a newcomer, or a peer restarted from an old
checkpoint), then repeats for ``--rounds`` rounds: ``--local-epochs`` epochs of the task's training on its own shard,
then ``--exchanges`` push-pull exchanges, each with a random live neighbour, averaged by sample counts
(:mod:`clients.gossip.state`); the last round adds ``--final-mixes`` more.
With ``--topology ring|exponential|complete`` it runs synchronous D-PSGD instead (``--peers`` then lists every member in
rank order, this peer included). Nothing is central: any peer may leave, crash or join at any time.

Two threads: the socket thread (:class:`~clients.gossip.peer.PeerSockets`, the caller's thread) owns every socket and
answers neighbours at once; the training thread trains on a copy and adds its progress under the model lock, asking
the socket thread for an exchange between rounds. Each peer writes ``OUT/metrics.jsonl`` (accuracy on the shared test
set and on its local test split, the consensus distance to the neighbours it met, bytes moved),
``OUT/model.safetensors`` and, every round, ``OUT/checkpoint.safetensors`` for ``--resume``.

Security is the bus's: with ``--keys DIR`` (``fedopt keys generate DIR --clients N``) every peer's socket uses the
swarm's server key pair ``DIR/coordinator.key_secret`` and admits only the client keys in ``DIR/allowed``; a peer
connects to others with its own ``client-NNN`` key. An unknown key is refused and logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import zmq

from fedopt import bus
from fedopt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedopt.data import PartitionSpec
from fedopt.compress import parse_compressor
from fedopt.errors import ConfigError, FedoptError
from fedopt.metrics import RunOutput
from fedopt.params import ParamSpec
from fedopt.task import resolve_task
from fedopt.testing import Fault
from fedopt.trainer import LocalTrainer, pick_device

from clients.gossip.config import GossipConfig
from clients.gossip.peer import PeerSockets, Request
from clients.gossip.state import ModelState

__all__ = ["GossipPeer", "run_peer"]

log = logging.getLogger("fedopt.gossip")


class GossipPeer:
    """One peer: ``serve()`` trains ``cfg.rounds`` rounds, lingers to answer late neighbours, returns 0. ``server``
    secures its bound socket, ``client`` the connections it makes; ``faults`` come from :func:`fedopt.testing.faults`."""

    def __init__(self, cfg: GossipConfig, server: bus.Security, client: bus.Security,
                 faults: Mapping[Fault, object] | None = None) -> None:
        self.cfg = cfg
        self.slow = (faults or {}).get(Fault.SLOW_TRAIN, 0.0)
        torch.set_num_threads(1)  # a small model: extra intra-op threads only fight the other peers for cores
        self.task = resolve_task(cfg.task, dict(cfg.task_options))
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # every peer starts from the same initial model, as FedAvg's clients do
        self.trainer = LocalTrainer(self.task, None, self.device)
        self.spec: ParamSpec = self.trainer.spec
        self.data = self.task.load_data(cfg.shard, cfg.num_shards, cfg.seed, PartitionSpec(cfg.partition, cfg.alpha))
        self.data = self.data.to(self.device)
        test = self.task.load_test(cfg.seed) if hasattr(self.task, "load_test") else None
        self.test = None if test is None else tuple(t.to(self.device) for t in test)
        vec, version, self.start_round = self.spec.flatten(self.trainer.model).to(self.device), 0, 0
        ckpt = load_checkpoint(cfg.out) if cfg.resume else None
        if ckpt is not None:
            if ckpt.spec.to_dict() != self.spec.to_dict():
                raise ConfigError(f"checkpoint in {cfg.out} holds a different model than task {cfg.task!r}")
            vec, version, self.start_round = ckpt.global_vec.to(self.device), int(ckpt.state["version"]), ckpt.round
        self.state = ModelState(vec, self.data.num_samples, version, cfg.max_lag)
        self.address = cfg.address
        self.ctx = zmq.Context()
        self.auth = bus.start_authenticator(self.ctx, server)
        beacon = None
        if cfg.discover:
            from clients.gossip.discovery import Beacon, beacon_key

            beacon = Beacon(self.address, beacon_key(_swarm_secret(cfg)), cfg.interface, cfg.discovery_port)
        self.sockets = PeerSockets(
            self.ctx, self.address, cfg.bind, self.state, server, client, [] if cfg.topology else list(cfg.peers),
            exchange_timeout=cfg.exchange_timeout, peer_timeout=cfg.peer_timeout, max_accept=cfg.max_accept,
            linger=cfg.linger, members=list(cfg.peers) if cfg.topology else None, topology=cfg.topology,
            beacon=beacon, exit_with_parent=os.getppid() if cfg.exit_with_parent else None,
            compress=parse_compressor(cfg.compress) if cfg.compress else None, choco_gamma=cfg.choco_gamma)
        self.failure: BaseException | None = None
        if cfg.exit_with_parent and os.getppid() == 1:
            raise FedoptError("the process that started this peer has already exited")

    def serve(self) -> int:
        """Train and serve; 0 on success. When the socket thread dies, this logs one line and returns 1: the training
        thread's next request is answered ``stopped`` at once, so it ends and closes its pipe, and the context ends."""
        worker = threading.Thread(target=self._train_guarded, name="fedopt-gossip-trainer", daemon=True)
        worker.start()
        broken = None
        try:
            self.sockets.serve()
        except Exception as e:  # the sockets are closed already (serve's finally); say so once and stop
            broken = e
            log.error("the socket thread failed (%s: %s): stopping this peer", type(e).__name__, e)
        finally:
            worker.join(timeout=30)
            if self.auth is not None:
                self.auth.stop()
            if worker.is_alive():  # still training: its pipe is open, and ctx.term() would wait for it forever
                log.error("the training thread did not stop within 30 s: exiting without closing the context")
                return 1
            self.ctx.term()
        if broken is not None:
            return 1
        if self.failure is not None:
            raise self.failure
        return 0

    def _train_guarded(self) -> None:
        try:
            self._train()
        except _SocketsStopped:
            pass  # serve() has said why already
        except BaseException as e:  # surfaced by serve(); the socket thread must still stop
            log.exception("the training thread failed")
            self.failure = e
        finally:
            self.sockets.submit(Request("done", budget=1.0))
            self.sockets.release()

    def _train(self) -> None:
        a = self.cfg
        title = f"fedopt gossip {self.address}"
        out = RunOutput(a.out, a.rounds, a.progress, title=title,
                        resume_after=self.start_round if self.start_round else None, plot=a.plot)
        try:
            if not a.topology:  # a newcomer (or a restarted peer) pulls the swarm's model before training
                got = self._submit(Request("fetch", budget=a.join_wait))
                if got.get("action") in ("adopted", "mixed"):
                    log.info("joined: %s version %d from %s", got["action"], got["version"], got["peer"])
            self._counters = self._open_round(self.start_round + 1)
            for r in range(self.start_round + 1, a.rounds + 1):
                out.round_done(self._round(r))
                save_checkpoint(a.out, Checkpoint(r, self.state.snapshot()[0].cpu(), {}, self.spec,
                                                  {"version": self.state.version, "address": self.address}))
            vec, _ = self.state.snapshot()
            stats = self.sockets.stats
            out.finish(self.spec, vec.cpu(), {"peer": self.address, "exchanges": stats["exchanges"],
                                              "accepted": stats["accepted"], "timeouts": stats["timeouts"],
                                              "refused messages": stats["refused"]})
        finally:
            out.close()

    def _round(self, r: int) -> dict:
        a = self.cfg
        t0 = time.perf_counter()
        d0 = len(self.sockets.stats["distances"])
        if self.slow:
            time.sleep(self.slow)  # Fault.SLOW_TRAIN: a peer whose training takes longer
        vec, _ = self.state.snapshot()
        update = self.trainer.train(self.address, vec, self.data, a.train_config(r))
        self.state.add_progress(update.delta, r)
        slots = a.slots(r)
        if a.topology:
            got = self._submit(Request("sync", r, budget=a.exchange_timeout))
        else:
            # several pairwise mixes between local epochs (the last round adds --final-mixes): with one per round the
            # peers' models drift apart on non-IID shards faster than one random pair can pull them together
            kinds = ["push"] * a.exchanges + ["final"] * (slots - a.exchanges)
            results = [self._submit(Request(k, r, budget=3 * a.exchange_timeout)) for k in kinds]
            got = {"status": "ok" if any(x.get("status") == "ok" for x in results) else results[-1].get("status"),
                   "done": sum(x.get("status") == "ok" for x in results)}
        vec, version = self.state.snapshot()
        shared = self.trainer.evaluate(vec, self.test) if self.test is not None else {}
        local = self.trainer.evaluate(vec, self.data.test) if self.data.test is not None else {}
        dists = self.sockets.stats["distances"][d0:]
        (b_in, b_out, models), self._counters = self._counters, self._open_round(r + 1)
        return {
            "round": r,
            "accuracy": shared.get("accuracy", local.get("accuracy")),
            "loss": shared.get("loss", local.get("loss")),
            "local_accuracy": local.get("accuracy"),
            "train_loss": update.metrics.get("loss"),
            "clients": len(self.sockets.live_peers()) + 1,
            "exchange": got.get("status"),
            "exchanges_done": got.get("done", got.get("received")),
            "slots": slots,  # exchange slots this round (bytes per slot <= 2 (1 + max_accept) models)
            "consensus": sum(dists) / len(dists) if dists else None,  # mean ||x_self - x_neighbour|| this round
            "version": version,
            "seconds": time.perf_counter() - t0,
            "time": time.time(),  # wall clock at the end of the round (time-to-target across processes)
            "bytes_up": self._counters[1] - b_out,  # counted at the sockets, over this round's accept window
            "bytes_down": self._counters[0] - b_in,
            "models_moved": self._counters[2] - models,  # model messages sent + received in that window
        }

    def _submit(self, req: Request) -> dict:
        got = self.sockets.submit(req)
        if got.get("status") == "stopped":
            raise _SocketsStopped()
        return got

    def _open_round(self, r: int) -> tuple[int, int]:
        """Start round ``r``'s budget in the socket thread; returns its counters (bytes in, bytes out, models)."""
        got = self._submit(Request("round", r, budget=1.0, slots=self.cfg.slots(r)))
        return (got.get("bytes_in", self.sockets.bytes_in), got.get("bytes_out", self.sockets.bytes_out),
                got.get("models", self.sockets.stats["models"]))


class _SocketsStopped(FedoptError):
    """The socket thread has ended: the training thread stops too."""


def _swarm_secret(cfg: GossipConfig) -> bytes:
    """The beacon key's secret: the swarm's server secret key file with keys, else the swarm secret."""
    if cfg.keys:
        return hashlib.sha256(Path(cfg.keys, "coordinator.key_secret").read_bytes()).digest()
    return cfg.swarm_secret.encode()


def run_peer(cfg: GossipConfig, faults: Mapping[Fault, object] | None = None) -> int:
    """``fedopt gossip``: run one peer until its rounds are done and the swarm is quiet; 0 on success."""
    if cfg.advertise_on_interface:
        from clients.gossip.discovery import interface_address

        cfg = dataclasses.replace(cfg, advertise=f"tcp://{interface_address(cfg.interface)[0]}:"
                                                 f"{cfg.bind.rsplit(':', 1)[1]}")
    if not (cfg.peers or cfg.discover):
        log.warning("no --peers and no --discover: this peer trains alone until someone contacts it")
    key_name = cfg.key_name or (f"client-{cfg.shard:03d}" if cfg.keys else None)
    server = bus.security_for(cfg.bind, cfg.keys, cfg.insecure, "coordinator")
    client = bus.security_for(cfg.address, cfg.keys, True, "client", key_name) if cfg.keys else bus.Security()
    return GossipPeer(cfg, server, client, faults).serve()
