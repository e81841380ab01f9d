"""``fedopt simulate``: many clients on this machine, in one of three ways chosen by the run's config.

``--mode gossip`` starts peer processes (:mod:`clients.gossip.run`), ``--transport ipc|tcp`` a coordinator and real client
processes over the bus (:mod:`coordinator.local`), ``--nproc N`` N processes on torch.distributed sharing each round
(:mod:`clients.simulation.distributed`: this process launches them with torchrun, which may also start them itself,
across machines), and the default runs the in-process engine, a worker pool or vmap (:mod:`clients.simulation.run`).
Each is imported only when chosen.
"""

from __future__ import annotations

import argparse

import json
import os

from ..config import RunConfig
from ..errors import ConfigError
from ..launch import run_torchrun, under_torchrun
from ..task import resolve_task
from .options import (add_buffered_options, add_bus_options, add_round_options, config_out, parse_kv,
                      round_overrides)

__all__ = ["configure", "run_folder", "simulate_config", "run"]

#: how the --nproc launcher hands its ranks the run's config (JSON of RunConfig.flat())
CONFIG_ENV = "FEDOPT_SIMULATE_CONFIG"


def configure(p: argparse.ArgumentParser) -> None:
    add_round_options(p)
    S = argparse.SUPPRESS
    g = p.add_argument_group("execution")
    g.add_argument("--mode", choices=("federated", "gossip"), default=S)
    g.add_argument("--transport", choices=("inproc", "ipc", "tcp"), default=S,
                   help="inproc: this process (default); ipc/tcp: a coordinator and real client processes")
    g.add_argument("--processes", type=int, default=S,
                   help="client processes for --transport ipc|tcp, one per client (sets --clients when not given)")
    g.add_argument("--peers", type=int, default=S, help="--mode gossip: number of peer processes (default --clients)")
    g.add_argument("--topology", choices=("ring", "exponential", "complete"), default=S,
                   help="--mode gossip: synchronous D-PSGD on this graph (default: random pairwise gossip)")
    add_bus_options(p)
    g.add_argument("--nproc", type=int, default=S,
                   help="processes on torch.distributed (gloo on CPU, NCCL on GPUs) sharing each round's clients; "
                        "started with torchrun (default 1: this process)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last checkpoint (written every --checkpoint-every rounds)")
    g.add_argument("--checkpoint-every", type=int, default=S, help="rounds between checkpoints (default 10)")
    g.add_argument("--backend", choices=("sequential", "vmap"), default=S)
    g.add_argument("--workers", type=int, default=S,
                   help="simulation worker processes (default: 1 = in-process for small models, else cores)")
    g.add_argument("--algorithm", choices=("fedavg", "scaffold"), default=S,
                   help="fedavg: plain local SGD (FedProx with --mu); scaffold: SCAFFOLD control variates")
    g.add_argument("--state-budget-mb", type=float, default=S,
                   help="memory for per-client state (SCAFFOLD); past it, state spills to disk (default 256)")
    add_buffered_options(p)
    g = p.add_argument_group("Byzantine clients and client momentum (in-process synchronous rounds)")
    g.add_argument("--attack", default=S,
                   help="sign_flip | scaling | gaussian | label_flip | alie | ipm (fedopt.attacks): run by --attackers")
    g.add_argument("--attackers", type=float, default=S,
                   help="fraction of the clients that are Byzantine, chosen by --seed")
    g.add_argument("--attack-option", dest="attack_options", action="append", type=parse_kv, default=S,
                   metavar="KEY=VALUE", help="factor (scaling, 1000), sigma (gaussian, 200), z (alie: default from n "
                                             "and f), epsilon (ipm, 0.1) (repeatable)")
    g.add_argument("--client-momentum", type=float, default=S,
                   help="BETA: clients send m = BETA m + (1 - BETA) delta instead of delta (pair with "
                        "--aggregator centered_clip; default 0)")
    g = p.add_argument_group("virtual clock (metrics.jsonl gets virtual_seconds)")
    g.add_argument("--client-speed", default=S,
                   help="seconds of a client's full local job: lognormal:SIGMA[:MEDIAN] | classes:S1,S2,... | "
                        "trace:FILE")
    g.add_argument("--comm-seconds", type=float, default=S,
                   help="seconds a job spends on the network, model down and update up (default 0)")


def run_folder(args: argparse.Namespace) -> tuple[str, bool | None] | None:
    if under_torchrun() and (os.environ.get(CONFIG_ENV) or os.environ.get("RANK") != "0"):
        return None  # the launcher (or, under a user's own torchrun, rank 0) claims it
    return config_out(args), args.resume


def simulate_config(args: argparse.Namespace):
    """The RunConfig of ``fedopt simulate``: defaults < --config < flags; --processes K alone also means K clients."""
    from ..config import build_config, load_toml

    overrides = round_overrides(args, skip=("config", "resume"))
    if "processes" in overrides and "clients" not in overrides:
        # one client per process unless --clients says otherwise (flag or config file)
        overrides["clients"] = (load_toml(args.config) if args.config else {}).get("clients", overrides["processes"])
    return build_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    if under_torchrun():  # a rank of --nproc (the launcher's config), or of a user's own torchrun (the flags)
        from clients.simulation.distributed import simulate_rank

        given = os.environ.get(CONFIG_ENV)
        return simulate_rank(RunConfig.of(**json.loads(given)) if given else simulate_config(args), args.resume)
    cfg = simulate_config(args)
    if args.resume and (cfg.sim.mode == "gossip" or cfg.sim.transport != "inproc"):
        raise ConfigError("simulate --resume continues in-process and --nproc runs: for a bus run resume its "
                          "coordinator (fedopt coordinator --resume)")
    if cfg.sim.nproc > 1:
        from clients.simulation.distributed import check_distributed

        check_distributed(cfg)
        resolve_task(cfg.task, cfg.task_options)  # a bad task is one line here, not one per rank
        os.environ[CONFIG_ENV] = json.dumps(cfg.flat())
        try:
            return run_torchrun(cfg.sim.nproc, ["simulate", *(["--resume"] if args.resume else [])])
        finally:
            del os.environ[CONFIG_ENV]
    if cfg.sim.mode == "gossip":
        from clients.gossip.sim import simulate_gossip  # N peers as local processes

        return simulate_gossip(cfg)
    if cfg.sim.transport != "inproc":
        from coordinator.local import simulate_processes  # a coordinator + K client processes over the bus

        return simulate_processes(cfg)
    from clients.simulation.run import simulate  # in-process engine / worker pool / vmap

    simulate(cfg, args.resume)
    return 0


