"""``fedopt client``: the flags of one federated client, read into a :class:`~clients.federated.config.ClientConfig`.

The client itself is :mod:`clients.federated.client`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from clients.federated.config import ClientConfig

from ..testing import faults
from .options import parse_kv

__all__ = ["configure", "client_config", "run"]

_FIELDS = [f.name for f in dataclasses.fields(ClientConfig) if f.name not in ("task_options", "attack_options")]


def configure(p: argparse.ArgumentParser) -> None:
    D = ClientConfig  # the defaults are the config's
    p.add_argument("--connect", required=True,
                   help="the coordinator: tcp://HOST:PORT or ipc://PATH; several, comma-separated, for failover "
                        "between edge aggregators (a silent one is left for the next)")
    p.add_argument("--keys", default=None, help="key directory holding coordinator.key and this client's secret")
    p.add_argument("--key-name", default=None, help="this client's key name (default client-NNN for --shard NNN)")
    p.add_argument("--insecure", action="store_true", help="allow plain TCP without authentication (warns)")
    p.add_argument("--task", default=None, help="must match the coordinator's task (default: the coordinator's)")
    p.add_argument("--task-option", dest="task_options", action="append", type=parse_kv, default=[])
    p.add_argument("--data", default=None, metavar="PATH",
                   help="this site's own data: passed to the task as data_path=PATH (the task reads it; with no "
                        "--shard the whole of it is this client's data)")
    p.add_argument("--shard", type=int, default=None,
                   help="this client's data shard index (required without --data)")
    p.add_argument("--num-shards", type=int, default=None, help="number of shards (default: the run's clients)")
    p.add_argument("--id", default=None, help="stable client id (default: the shard index)")
    p.add_argument("--device", default=D.device, help="auto | cpu | cuda")
    p.add_argument("--heartbeat", type=float, default=D.heartbeat, help="heartbeat interval before the coordinator's is known")
    p.add_argument("--give-up", type=float, default=D.give_up,
                   help="seconds without a coordinator before exiting (default 300)")
    p.add_argument("--identities", default=None,
                   help="secagg: folder with identities/*.pub (every client's pinned identity) and this client's "
                        "identity secret (default: --keys)")
    g = p.add_argument_group("a malicious client, for robustness tests (clients.federated.attacker)")
    g.add_argument("--attack", default=None, help="sign_flip | scaling | gaussian | label_flip | alie | ipm")
    g.add_argument("--attack-option", dest="attack_options", action="append", type=parse_kv, default=[],
                   metavar="KEY=VALUE", help="factor (scaling), sigma (gaussian), z (alie), epsilon (ipm)")
    g.add_argument("--collude", default=None, metavar="DIR",
                   help="alie/ipm: a folder the colluding attackers share their honest-trained updates in")
    g.add_argument("--colluders", type=int, default=D.colluders,
                   help="attackers sharing --collude, this one included (alie needs >= 2)")
    p.add_argument("--client-momentum", type=float, default=D.client_momentum,
                   help="BETA: send m = BETA m + (1 - BETA) delta instead of delta (for --aggregator centered_clip)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client's config from its flags. Raises ConfigError naming the flag."""
    return ClientConfig(**{name: getattr(args, name) for name in _FIELDS}, task_options=dict(args.task_options),
                        attack_options=dict(args.attack_options))


def run(args: argparse.Namespace) -> int:
    from clients.federated.client import run_client

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = client_config(args)
    return run_client(cfg, faults())  # FEDOPT_FAULTS: set only by tests; a malformed one stops before any dialling
