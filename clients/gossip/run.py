"""``fedopt gossip``: one peer of a swarm that trains without a coordinator.

A peer binds one socket, finds others from ``--peers`` (a seed list) and/or ``--discover`` (keyed UDP beacons on
``--interface``), pulls a newer model from the swarm if there is one (a newcomer, or a peer restarted from an old
checkpoint), then repeats for ``--rounds`` rounds: ``--local-epochs`` epochs of the task's training on its own shard,
then ``--exchanges`` push-pull exchanges, each with a random live neighbour, averaged by sample counts
(:mod:`clients.gossip.state`); the last round adds ``--final-mixes`` more.
With ``--topology ring|exponential|complete`` it runs synchronous D-PSGD instead (``--peers`` then lists every member in
rank order, this peer included). Nothing is central: any peer may leave, crash or join at any time.

Two threads: the socket thread (:class:`~clients.gossip_peer.PeerSockets`, the caller's thread) owns every socket and
answers neighbours at once; the training thread trains on a copy and adds its progress under the model lock, asking
the socket thread for an exchange between rounds. Each peer writes ``OUT/metrics.jsonl`` (accuracy on the shared test
set and on its local test split, the consensus distance to the neighbours it met, bytes moved),
``OUT/model.safetensors`` and, every round, ``OUT/checkpoint.safetensors`` for ``--resume``.

Security is the bus's: with ``--keys DIR`` (``fedopt keys generate DIR --clients N``) every peer's socket uses the
swarm's server key pair ``DIR/coordinator.key_secret`` and admits only the client keys in ``DIR/allowed``; a peer
connects to others with its own ``client-NNN`` key. An unknown key is refused and logged.
"""

from __future__ import annotations

import argparse
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
from fedopt.errors import ConfigError, FedoptError
from fedopt.metrics import RunOutput
from fedopt.params import ParamSpec
from fedopt.testing import Fault, faults
from fedopt.schedules import OPTIMIZERS, SCHEDULES, scheduled_lr
from fedopt.task import TrainConfig, resolve_task
from fedopt.trainer import LocalTrainer, pick_device

from clients.gossip.peer import PeerSockets, Request
from clients.gossip.state import ModelState
from clients.gossip.topology import TOPOLOGIES

__all__ = ["GossipPeer", "configure", "run", "simulate_gossip"]

log = logging.getLogger("fedopt.gossip")


class GossipPeer:
    """One peer: ``serve()`` trains ``args.rounds`` rounds, lingers to answer late neighbours, returns 0."""

    def __init__(self, args: argparse.Namespace, server: bus.Security, client: bus.Security,
                 faults: Mapping[Fault, object] | None = None) -> None:
        self.args = args
        self.slow = (faults or {}).get(Fault.SLOW_TRAIN, 0.0)
        torch.set_num_threads(1)  # a small model: extra intra-op threads only fight the other peers for cores
        self.task = resolve_task(args.task, dict(args.task_options))
        self.device = pick_device(args.device)
        torch.manual_seed(args.seed)  # every peer starts from the same initial model, as FedAvg's clients do
        self.trainer = LocalTrainer(self.task, None, self.device)
        self.spec: ParamSpec = self.trainer.spec
        n = args.num_shards
        self.data = self.task.load_data(args.shard, n, args.seed, PartitionSpec(args.partition, args.alpha))
        self.data = self.data.to(self.device)
        test = self.task.load_test(args.seed) if hasattr(self.task, "load_test") else None
        self.test = None if test is None else tuple(t.to(self.device) for t in test)
        vec, version, self.start_round = self.spec.flatten(self.trainer.model).to(self.device), 0, 0
        ckpt = load_checkpoint(args.out) if args.resume else None
        if ckpt is not None:
            if ckpt.spec.to_dict() != self.spec.to_dict():
                raise ConfigError(f"checkpoint in {args.out} holds a different model than task {args.task!r}")
            vec, version, self.start_round = ckpt.global_vec.to(self.device), int(ckpt.state["version"]), ckpt.round
        self.state = ModelState(vec, self.data.num_samples, version, args.max_lag)
        self.address = args.advertise or args.bind
        self.ctx = zmq.Context()
        self.auth = bus.start_authenticator(self.ctx, server)
        beacon = None
        if args.discover:
            from clients.gossip.discovery import Beacon, beacon_key

            beacon = Beacon(self.address, beacon_key(_swarm_secret(args)), args.interface, args.discovery_port)
        members = args.peers if args.topology else None
        if args.topology and self.address not in members:
            raise ConfigError(f"--topology {args.topology}: --peers must list every member in rank order, this peer "
                              f"({self.address}) included")
        self.sockets = PeerSockets(
            self.ctx, self.address, args.bind, self.state, server, client, [] if args.topology else args.peers,
            exchange_timeout=args.exchange_timeout, peer_timeout=args.peer_timeout, max_accept=args.max_accept,
            linger=args.linger, members=members, topology=args.topology, beacon=beacon,
            exit_with_parent=os.getppid() if args.exit_with_parent else None)
        self.failure: BaseException | None = None
        if args.exit_with_parent and os.getppid() == 1:
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
        a = self.args
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
        a = self.args
        t0 = time.perf_counter()
        d0 = len(self.sockets.stats["distances"])
        if self.slow:
            time.sleep(self.slow)  # Fault.SLOW_TRAIN: a peer whose training takes longer
        vec, _ = self.state.snapshot()
        lr = scheduled_lr(a.lr, a.lr_schedule, r, a.rounds, lr_min=a.lr_min, step=a.lr_step, gamma=a.lr_gamma)
        cfg = TrainConfig(epochs=a.local_epochs, batch_size=a.batch_size, lr=lr, momentum=a.momentum,
                          weight_decay=a.weight_decay, optimizer=a.optimizer, clip_norm=a.clip_norm,
                          seed=a.seed * 100_003 + a.shard * 1009 + r)
        update = self.trainer.train(self.address, vec, self.data, cfg)
        self.state.add_progress(update.delta, r)
        slots = self._slots(r)
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

    def _slots(self, r: int) -> int:
        a = self.args
        return 1 if a.topology else a.exchanges + (a.final_mixes if r == a.rounds else 0)

    def _open_round(self, r: int) -> tuple[int, int]:
        """Start round ``r``'s budget in the socket thread; returns its counters (bytes in, bytes out, models)."""
        got = self._submit(Request("round", r, budget=1.0, slots=self._slots(r)))
        return (got.get("bytes_in", self.sockets.bytes_in), got.get("bytes_out", self.sockets.bytes_out),
                got.get("models", self.sockets.stats["models"]))


class _SocketsStopped(FedoptError):
    """The socket thread has ended: the training thread stops too."""


def _swarm_secret(args: argparse.Namespace) -> bytes:
    """The beacon key's secret: the swarm's server secret key file with --keys, else --swarm-secret."""
    if args.keys:
        return hashlib.sha256(Path(args.keys, "coordinator.key_secret").read_bytes()).digest()
    secret = args.swarm_secret or os.environ.get("FEDOPT_SWARM_SECRET")
    if not secret:
        raise ConfigError("--discover needs a shared secret to key beacons: give --keys DIR or --swarm-secret TEXT")
    return secret.encode()


# ---- `fedopt gossip` --------------------------------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    from fedopt.options import parse_kv

    g = p.add_argument_group("network")
    g.add_argument("--bind", required=True, help="this peer's socket: tcp://IP:PORT or ipc://PATH (default %(default)s)")
    g.add_argument("--advertise", default=None, help="the address others reach this peer at (default: --bind)")
    g.add_argument("--peers", default="", help="seed peers URL,URL,... (with --topology: every member, rank order) (default %(default)s)")
    g.add_argument("--discover", action="store_true", help="find peers on the LAN by UDP broadcast beacons")
    g.add_argument("--interface", default=os.environ.get("FEDOPT_INTERFACE"),
                   help="network interface for --discover (default $FEDOPT_INTERFACE)")
    g.add_argument("--discovery-port", type=int, default=5670, help="UDP port of the beacons (default 5670)")
    g.add_argument("--swarm-secret", default=None, help="beacon key without --keys (or $FEDOPT_SWARM_SECRET) (default %(default)s)")
    g.add_argument("--keys", default=None, help="key directory from `fedopt keys generate` (CurveZMQ) (default %(default)s)")
    g.add_argument("--key-name", default=None, help="this peer's key name (default client-NNN for --shard NNN)")
    g.add_argument("--insecure", action="store_true", help="allow plain TCP without authentication (warns)")
    g = p.add_argument_group("task and training")
    g.add_argument("--task", default="digits", help="default %(default)s")
    g.add_argument("--task-option", dest="task_options", action="append", type=parse_kv, default=[])
    g.add_argument("--shard", type=int, required=True, help="this peer's data shard (default %(default)s)")
    g.add_argument("--num-shards", type=int, required=True, help="number of shards the data set is cut into (default %(default)s)")
    g.add_argument("--partition", default="dirichlet", choices=("iid", "dirichlet", "natural"), help="default %(default)s")
    g.add_argument("--alpha", type=float, default=0.5, help="default %(default)s")
    g.add_argument("--seed", type=int, default=0, help="default %(default)s")
    g.add_argument("--rounds", type=int, default=30, help="local rounds (each: local epochs, then one exchange) (default %(default)s)")
    g.add_argument("--local-epochs", type=int, default=1, help="default %(default)s")
    g.add_argument("--batch-size", type=int, default=16, help="default %(default)s")
    g.add_argument("--lr", type=float, default=0.1, help="default %(default)s")
    g.add_argument("--momentum", type=float, default=0.0, help="sgd momentum (default %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="local optimizer (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="default %(default)s")
    g.add_argument("--clip-norm", type=float, default=None, help="clip each step's gradient to this L2 norm")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                   help="learning rate over rounds (default %(default)s)")
    g.add_argument("--lr-min", type=float, default=0.0, help="cosine: the rate it decays towards (default %(default)s)")
    g.add_argument("--lr-step", type=int, default=10, help="step: rounds between decays (default %(default)s)")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="step: factor of each decay (default %(default)s)")
    g.add_argument("--device", default="cpu", help="default %(default)s")
    g = p.add_argument_group("gossip")
    g.add_argument("--topology", choices=TOPOLOGIES, default=None, help="synchronous D-PSGD on this graph (default %(default)s)")
    g.add_argument("--exchange-timeout", type=float, default=3.0,
                   help="seconds one neighbour has to answer (a round tries for up to 3x this) (default %(default)s)")
    g.add_argument("--peer-timeout", type=float, default=15.0, help="seconds of silence before a peer expires (default %(default)s)")
    g.add_argument("--exchanges", type=int, default=5,
                   help="pairwise exchanges (slots) after each round's local training (default 5)")
    g.add_argument("--max-accept", type=int, default=1,
                   help="exchanges accepted per slot (bounds a node's traffic to 2 (1 + this) models per slot) (default %(default)s)")
    g.add_argument("--join-wait", type=float, default=5.0, help="seconds a newcomer tries to fetch a model (default %(default)s)")
    g.add_argument("--final-mixes", type=int, default=6,
                   help="exchanges that end the last round, only among peers whose training is over (default 6)")
    g.add_argument("--linger", type=float, default=4.0,
                   help="after training, serve until quiet this long, for peers still finishing (default 4)")
    g.add_argument("--max-lag", type=int, default=10,
                   help="rounds of training behind at which a model counts as stale (default 10)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    g.add_argument("--out", default="runs/gossip", help="default %(default)s")
    g.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto", help="default %(default)s")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw OUT/accuracy.png")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.shard < args.num_shards:
        raise ConfigError(f"--shard {args.shard} is out of range for --num-shards {args.num_shards}")
    for name in ("rounds", "local_epochs", "batch_size", "max_accept", "exchanges"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lr", "exchange_timeout", "peer_timeout", "join_wait"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    if args.final_mixes < 0 or args.linger < 0 or args.max_lag < 0:
        raise ConfigError("--final-mixes, --linger and --max-lag must be >= 0")
    args.peers = [u.strip() for u in args.peers.split(",") if u.strip()]
    for u in args.peers:
        if not u.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"--peers entry {u!r} must start with tcp:// or ipc://")
    if args.topology and len(args.peers) < 2:
        raise ConfigError("--topology needs --peers listing every member (at least 2) in rank order")
    if args.discover and not args.interface:
        raise ConfigError("--discover needs --interface NAME (or $FEDOPT_INTERFACE): the LAN to beacon on")
    if not (args.peers or args.discover):
        log.warning("no --peers and no --discover: this peer trains alone until someone contacts it")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _check(args)
    address = args.advertise or args.bind
    if args.discover and not args.advertise and args.bind.startswith("tcp://0.0.0.0:"):
        from clients.gossip.discovery import interface_address

        address = args.advertise = f"tcp://{interface_address(args.interface)[0]}:{args.bind.rsplit(':', 1)[1]}"
    key_name = args.key_name or (f"client-{args.shard:03d}" if args.keys else None)
    server = bus.security_for(args.bind, args.keys, args.insecure, "coordinator")
    client = bus.security_for(address, args.keys, True, "client", key_name) if args.keys else bus.Security()
    return GossipPeer(args, server, client, faults()).serve()  # FEDOPT_FAULTS: set only by tests


def simulate_gossip(cfg) -> int:
    """``fedopt simulate --mode gossip --peers N``: N peers as local processes (see :mod:`clients.gossip.sim`)."""
    from clients.gossip.sim import simulate_gossip as _simulate

    return _simulate(cfg)
