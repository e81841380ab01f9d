"""``fedopt coordinator``: serve federated rounds over the bus (:class:`coordinator.server.Coordinator`).

Builds the coordinator from the command line: the bind security (``--keys`` or ``--insecure``), the run's config
(defaults < ``--config`` < flags) and, for secure aggregation, the clients' pinned identities.
"""

from __future__ import annotations

import argparse
import logging

from .. import bus
from ..config import build_config
from ..identity import find_identity_dir, load_pinned
from .options import add_buffered_options, add_bus_options, add_round_options, config_out, round_overrides
from ..testing import Fault, faults

__all__ = ["configure", "run_folder", "run"]

log = logging.getLogger("fedopt.coordinator")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", required=True, help="address to listen on: tcp://HOST:PORT, ipc://PATH")
    p.add_argument("--keys", default=None, help="CurveZMQ key directory made by `fedopt keys generate`")
    p.add_argument("--insecure", action="store_true", help="allow plain TCP without authentication (warns)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed round in --out")
    p.add_argument("--identities", default=None,
                   help="secagg: folder with identities/*.pub, the clients' pinned identity keys (default: --keys)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_round_options(p)
    add_bus_options(p)
    add_buffered_options(p)


def run_folder(args: argparse.Namespace) -> tuple[str, bool]:
    return config_out(args), args.resume


def run(args: argparse.Namespace) -> int:
    from coordinator.server import Coordinator

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    security = bus.security_for(args.bind, args.keys, args.insecure, "coordinator")
    cfg = build_config(args.config, round_overrides(args, skip=("config", "bind", "keys", "insecure", "resume",
                                                                 "log_level", "identities")))
    ident = find_identity_dir(args.identities, args.keys)
    pinned = load_pinned(ident) if ident is not None and cfg.federation.aggregator == "secagg" else None
    if cfg.federation.aggregator == "secagg" and pinned is None:
        log.warning("secure aggregation without --identities: only the clients check key advertisements")
    dump = faults().get(Fault.SECAGG_DUMP)  # FEDOPT_FAULTS: set only by tests
    return Coordinator(cfg, args.bind, security, resume=args.resume, identities=pinned,
                       secagg_dump=None if dump is None else str(dump)).serve()
