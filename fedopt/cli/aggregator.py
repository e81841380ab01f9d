"""``fedopt aggregator``: an edge aggregator between clients and the root coordinator (:mod:`coordinator.edge`).

Reads its flags into an :class:`~coordinator.edge.EdgeConfig`: where its clients connect (``--bind``, ``--keys``),
where the root is (``--upstream``, ``--upstream-keys``, ``--id``), and the round rules it applies to its own clients
(the bus and bounds options of ``fedopt coordinator`` that concern them).
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["configure", "run"]

#: the RunConfig fields an edge applies to its clients, with their flags' help
_RULES = {
    "deadline": (float, "seconds a round waits for its clients' updates (default 60; keep it below the root's)"),
    "min_clients": (int, "updates an edge needs to answer the root in a round (default 1)"),
    "join_timeout": (float, "seconds to wait for --clients before saying READY with fewer (default 30)"),
    "upload_slots": (int, "updates pulled at once (default 2)"),
    "max_clients": (int, "registrations held at once (default 2 x clients + 16)"),
    "max_samples": (int, "cap on one client's weight, its announced sample count (default 1000000)"),
    "max_share": (float, "cap on one client's share of the edge's weight (default 0.25, at least 1.5/clients)"),
    "norm_factor": (float, "reject updates with an L2 norm over this x the last round's median (default 4, 0 = off)"),
    "max_update_norm": (float, "absolute L2 bound on one update (default none)"),
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", required=True, help="where this edge's clients connect: tcp://HOST:PORT, ipc://PATH")
    p.add_argument("--upstream", required=True,
                   help="the root coordinator: tcp://HOST:PORT (several, comma-separated: the next when one is silent)")
    p.add_argument("--id", required=True,
                   help="this edge's client id at the root (with --upstream-keys: the id its key is enrolled under)")
    p.add_argument("--clients", type=int, required=True,
                   help="clients expected at this edge: it says READY to the root once they are (or --join-timeout)")
    p.add_argument("--keys", default=None,
                   help="this edge's CurveZMQ folder (fedopt keys generate): its coordinator key and allowed clients")
    p.add_argument("--upstream-keys", default=None,
                   help="key folder for the root: the root's coordinator.key and this edge's client secret")
    p.add_argument("--key-name", default=None, help="this edge's key name in --upstream-keys (e.g. client-008)")
    p.add_argument("--identities", default=None,
                   help="secagg: folder with identities/*.pub, this edge's clients' pinned identity keys")
    p.add_argument("--insecure", action="store_true", help="allow plain TCP without authentication (warns)")
    p.add_argument("--give-up", type=float, default=300.0, help="seconds without the root before exiting (default 300)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g = p.add_argument_group("rules for this edge's clients")
    for name, (kind, text) in _RULES.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, help=text)


def run(args: argparse.Namespace) -> int:
    from coordinator.edge import Edge, EdgeConfig

    from ..config import RunConfig
    from ..testing import Fault, faults

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rules = RunConfig.of(clients=args.clients, **{k: v for k, v in vars(args).items() if k in _RULES})
    cfg = EdgeConfig(bind=args.bind, upstream=args.upstream, id=args.id, run=rules, keys=args.keys,
                     upstream_keys=args.upstream_keys, key_name=args.key_name, insecure=args.insecure,
                     give_up=args.give_up, identities=args.identities)
    dump = faults().get(Fault.SECAGG_DUMP)  # FEDOPT_FAULTS: set only by tests
    return Edge(cfg, secagg_dump=None if dump is None else str(dump)).serve()
