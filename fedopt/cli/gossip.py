"""``fedopt gossip``: the flags of one gossip peer, read into a :class:`~clients.gossip.config.GossipConfig`.

The peer itself is :mod:`clients.gossip.run`; the peers ``simulate --mode gossip`` starts get their config back as
these flags (:func:`fedopt.launch.config_argv`), so every field is a flag of the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from clients.gossip.config import GossipConfig
from clients.gossip.topology import TOPOLOGIES

from ..schedules import OPTIMIZERS, SCHEDULES
from ..testing import faults
from .options import parse_kv

__all__ = ["configure", "gossip_config", "run"]

#: the fields whose flags the command line takes as they are; peers, task_options and swarm_secret are read apart
_FIELDS = [f.name for f in dataclasses.fields(GossipConfig) if f.name not in ("peers", "task_options", "swarm_secret")]


def configure(p: argparse.ArgumentParser) -> None:
    D = GossipConfig  # the defaults are the config's: a flag left out and a field left out mean the same
    g = p.add_argument_group("network")
    g.add_argument("--bind", required=True, help="this peer's socket: tcp://IP:PORT or ipc://PATH (default %(default)s)")
    g.add_argument("--advertise", default=None, help="the address others reach this peer at (default: --bind)")
    g.add_argument("--peers", default="", help="seed peers URL,URL,... (with --topology: every member, rank order) (default %(default)s)")
    g.add_argument("--discover", action="store_true", help="find peers on the LAN by UDP broadcast beacons")
    g.add_argument("--interface", default=os.environ.get("FEDOPT_INTERFACE"),
                   help="network interface for --discover (default $FEDOPT_INTERFACE)")
    g.add_argument("--discovery-port", type=int, default=D.discovery_port, help="UDP port of the beacons (default 5670)")
    g.add_argument("--swarm-secret", default=None, help="beacon key without --keys (or $FEDOPT_SWARM_SECRET) (default %(default)s)")
    g.add_argument("--keys", default=None, help="key directory from `fedopt keys generate` (CurveZMQ) (default %(default)s)")
    g.add_argument("--key-name", default=None, help="this peer's key name (default client-NNN for --shard NNN)")
    g.add_argument("--insecure", action="store_true", help="allow plain TCP without authentication (warns)")
    g = p.add_argument_group("task and training")
    g.add_argument("--task", default=D.task, help="default %(default)s")
    g.add_argument("--task-option", dest="task_options", action="append", type=parse_kv, default=[])
    g.add_argument("--shard", type=int, required=True, help="this peer's data shard (default %(default)s)")
    g.add_argument("--num-shards", type=int, required=True, help="number of shards the data set is cut into (default %(default)s)")
    g.add_argument("--partition", default=D.partition, choices=("iid", "dirichlet", "natural"), help="default %(default)s")
    g.add_argument("--alpha", type=float, default=D.alpha, help="default %(default)s")
    g.add_argument("--seed", type=int, default=D.seed, help="default %(default)s")
    g.add_argument("--rounds", type=int, default=D.rounds, help="local rounds (each: local epochs, then one exchange) (default %(default)s)")
    g.add_argument("--local-epochs", type=int, default=D.local_epochs, help="default %(default)s")
    g.add_argument("--batch-size", type=int, default=D.batch_size, help="default %(default)s")
    g.add_argument("--lr", type=float, default=D.lr, help="default %(default)s")
    g.add_argument("--momentum", type=float, default=D.momentum, help="sgd momentum (default %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=D.optimizer, help="local optimizer (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay, help="default %(default)s")
    g.add_argument("--clip-norm", type=float, default=None, help="clip each step's gradient to this L2 norm")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default=D.lr_schedule,
                   help="learning rate over rounds (default %(default)s)")
    g.add_argument("--lr-min", type=float, default=D.lr_min, help="cosine: the rate it decays towards (default %(default)s)")
    g.add_argument("--lr-step", type=int, default=D.lr_step, help="step: rounds between decays (default %(default)s)")
    g.add_argument("--lr-gamma", type=float, default=D.lr_gamma, help="step: factor of each decay (default %(default)s)")
    g.add_argument("--device", default=D.device, help="default %(default)s")
    g = p.add_argument_group("gossip")
    g.add_argument("--topology", choices=TOPOLOGIES, default=None, help="synchronous D-PSGD on this graph (default %(default)s)")
    g.add_argument("--compress", default=None, metavar="SPEC",
                   help="with --topology: CHOCO-Gossip, neighbours get compressed differences (e.g. q8, topk:0.1+q8)")
    g.add_argument("--choco-gamma", type=float, default=D.choco_gamma,
                   help="with --compress: CHOCO's consensus step in (0, 1] (default %(default)s)")
    g.add_argument("--exchange-timeout", type=float, default=D.exchange_timeout,
                   help="seconds one neighbour has to answer (a round tries for up to 3x this) (default %(default)s)")
    g.add_argument("--peer-timeout", type=float, default=D.peer_timeout, help="seconds of silence before a peer expires (default %(default)s)")
    g.add_argument("--exchanges", type=int, default=D.exchanges,
                   help="pairwise exchanges (slots) after each round's local training (default 5)")
    g.add_argument("--max-accept", type=int, default=D.max_accept,
                   help="exchanges accepted per slot (bounds a node's traffic to 2 (1 + this) models per slot) (default %(default)s)")
    g.add_argument("--join-wait", type=float, default=D.join_wait, help="seconds a newcomer tries to fetch a model (default %(default)s)")
    g.add_argument("--final-mixes", type=int, default=D.final_mixes,
                   help="exchanges that end the last round, only among peers whose training is over (default 6)")
    g.add_argument("--linger", type=float, default=D.linger,
                   help="after training, serve until quiet this long, for peers still finishing (default 4)")
    g.add_argument("--max-lag", type=int, default=D.max_lag,
                   help="rounds of training behind at which a model counts as stale (default 10)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    g.add_argument("--out", default=D.out, help="default %(default)s")
    g.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default=D.progress, help="default %(default)s")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw OUT/accuracy.png")
    g.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)


def gossip_config(args: argparse.Namespace) -> GossipConfig:
    """The peer's config from its flags: ``--peers`` split at commas, the swarm secret from ``$FEDOPT_SWARM_SECRET``
    unless given. Raises ConfigError naming the flag."""
    return GossipConfig(**{name: getattr(args, name) for name in _FIELDS},
                        peers=tuple(u.strip() for u in args.peers.split(",") if u.strip()),
                        task_options=dict(args.task_options),
                        swarm_secret=args.swarm_secret or os.environ.get("FEDOPT_SWARM_SECRET"))


def run(args: argparse.Namespace) -> int:
    from clients.gossip.run import run_peer

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_peer(gossip_config(args), faults())  # FEDOPT_FAULTS: set only by tests
