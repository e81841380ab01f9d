"""Buffered asynchronous aggregation (FedBuff) against synchronous FedAvg and FedAsync, on a virtual clock.

(a) Equivalence: FedBuff with C = K = O = every client and no delays against synchronous FedAvg, 10 steps: the
    largest absolute difference between the two global models.
(b) Time to target (simulation; digits, Dirichlet 0.5, 100 clients, one local epoch): synchronous FedAvg selects 10
    clients a round and waits for the slowest; FedBuff keeps C clients training and steps every K = 5
    arrivals; FedAsync is K = 1. The target is synchronous FedAvg's final accuracy after --rounds rounds; each
    method's virtual seconds to first reach it. Two clocks: lognormal client speeds (sigma 1, median 100 s per local
    job) and NVIDIA FLARE's three device classes (100/200/400 s, 5 s of communication); two concurrencies: C = 50
    (the regime buffered aggregation is for: many clients in flight) and C = 10. Each asynchronous method gets its
    own server learning rate, the one of LRS that reaches the target first on a held-out tuning seed (never one of
    the reported seeds); synchronous FedAvg gets the one of LRS with the best final accuracy on that seed. Speedup = sync's seconds / FedBuff's, and FedAsync's / FedBuff's; each figure is the median
    over --seeds seeds (FedAsync's only where both reached the target), and the share of runs where FedBuff reached
    it first; the JSON line reports C = 50.

(c) The real bus: a coordinator and 8 client processes over ipc (digits, 8 shards), every client's local job slowed
    to --job-seconds by an injected delay, two of them 3x and 10x slower. Synchronous FedAvg (all 8 a round, waiting
    for the slowest) for --bus-rounds rounds sets the target; FedBuff (C = 8, K = 4) runs until it reaches it. Wall
    seconds to the target: sync's sum of round seconds, FedBuff's elapsed_seconds (both from the first jobs, not the
    wait for clients to start). Speedup = sync / FedBuff, median over --bus-repeats runs.

Run: ``python benchmarks/async_fl.py``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.simulation.run import Simulation  # noqa: E402
from fedopt.config import RunConfig  # noqa: E402
from fedopt.launch import fedopt_command, one_thread_env, spawn, stop_processes  # noqa: E402
from fedopt.metrics import read_metrics  # noqa: E402
from fedopt.testing import Fault, fault_env  # noqa: E402

#: concurrency (clients in flight) of the asynchronous runs; server learning rates they choose from; the tuning seed
CONCURRENCY = (50, 10)
LRS = (1.0, 2.0, 3.0, 5.0, 8.0)
TUNING_SEED = 1000
CLOCKS = {"lognormal": dict(client_speed="lognormal:1.0"),
          "classes": dict(client_speed="classes:100,200,400", comm_seconds=5.0)}


def run(seed: int, **kw) -> list[dict]:
    cfg = RunConfig.of(task="digits", partition="dirichlet", alpha=0.5, local_epochs=1, seed=seed, progress="off",
                       plot=False, **kw)
    return Simulation(cfg).run().records


def time_to(records: list[dict], target: float) -> float | None:
    for r in records:
        if r["accuracy"] is not None and r["accuracy"] >= target - 1e-12:
            return r["virtual_seconds"]
    return None


_SYNC: dict = {}


def synchronous(args, seed: int, clock_kw: dict, lr: float | None = None) -> list[dict]:
    """Synchronous FedAvg, 10 clients a round, at server lr ``lr`` (default: the best on the tuning seed)."""
    if lr is None:
        lr = sync_lr(args, clock_kw)
    key = (seed, tuple(sorted(clock_kw.items())), lr)
    if key not in _SYNC:
        _SYNC[key] = run(seed, rounds=args.rounds, clients=args.clients, clients_per_round=10, server_lr=lr,
                         **clock_kw)
    return _SYNC[key]


def sync_lr(args, clock_kw: dict) -> float:
    """Synchronous FedAvg's server lr: the one of LRS with the best final accuracy on the tuning seed."""
    return max(LRS, key=lambda x: synchronous(args, TUNING_SEED, clock_kw, x)[-1]["accuracy"])


def asynchronous(args, seed: int, clock_kw: dict, concurrency: int, k: int, lr: float) -> list[dict]:
    """FedBuff (K = ``k``) or FedAsync (K = 1) with ``concurrency`` clients in flight and server lr ``lr``."""
    steps = 20 * args.rounds // k  # the same budget of client updates for every K: twice sync's 10 a round
    return run(seed, rounds=steps, clients=args.clients, clients_per_round=10, buffer_size=k, concurrency=concurrency,
               server_lr=lr, **clock_kw)


def best_lr(args, clock_kw: dict, concurrency: int, k: int) -> float:
    """The server lr of LRS that reaches synchronous FedAvg's final accuracy first on the tuning seed."""
    sync = synchronous(args, TUNING_SEED, clock_kw)
    times = {lr: time_to(asynchronous(args, TUNING_SEED, clock_kw, concurrency, k, lr), sync[-1]["accuracy"])
             for lr in LRS}
    return min(LRS, key=lambda lr: (times[lr] is None, times[lr] or 0.0))


def equivalence() -> float:
    base = dict(clients=10, rounds=10)
    torch.manual_seed(0)
    sync = Simulation(RunConfig.of(task="digits", seed=1, local_epochs=1, progress="off", plot=False, **base)).run()
    buf = Simulation(RunConfig.of(task="digits", seed=1, local_epochs=1, progress="off", plot=False, **base,
                                  buffer_size=10, concurrency=10, dispatch_threshold=10)).run()
    return float((sync.global_vec - buf.global_vec).abs().max())


def bus_run(tmp: Path, name: str, rounds: int, job_seconds: float, extra: list[str]) -> list[dict]:
    """A coordinator (this machine's fedopt, in a process) and 8 clients over ipc; client 6 is 3x and client 7 10x
    slower than the others. Returns the coordinator's metrics rows."""
    out, url = tmp / name, f"ipc://{tmp}/{name}.sock"
    common = ["--task", "digits", "--local-epochs", "1", "--heartbeat", "0.5"]
    procs = [spawn(fedopt_command("coordinator", "--bind", url, "--insecure", "--clients", "8", "--rounds",
                                  str(rounds), "--out", str(out), "--progress", "off", "--no-plot", "--deadline",
                                  "120", *common, *extra), tmp / f"{name}-coordinator.log", one_thread_env())]
    try:
        for i in range(8):
            slow = job_seconds * (10 if i == 7 else 3 if i == 6 else 1)
            procs.append(spawn(fedopt_command("client", "--connect", url, "--insecure", "--shard", str(i),
                                              "--exit-with-parent"), tmp / f"{name}-client-{i}.log",
                               one_thread_env(**fault_env({Fault.SLOW_TRAIN: slow}))))
        end = time.monotonic() + 900
        while procs[0].poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        if procs[0].returncode != 0:
            raise RuntimeError(f"{name}: the coordinator failed: {(tmp / f'{name}-coordinator.log').read_text()[-800:]}")
        return read_metrics(out / "metrics.jsonl")
    finally:
        stop_processes(procs)


def bus_speedup(rounds: int, job_seconds: float) -> tuple[float, float | None, float]:
    """(sync seconds to its final accuracy, FedBuff seconds to it, the target) on the real bus."""
    with tempfile.TemporaryDirectory(prefix="fedopt-async-") as d:
        tmp = Path(d)
        sync = bus_run(tmp, "sync", rounds, job_seconds, [])
        target = sync[-1]["accuracy"]
        t_sync = sum(r["seconds"] for r in sync)
        buff = bus_run(tmp, "fedbuff", 6 * rounds, job_seconds,
                       ["--buffer-size", "4", "--concurrency", "8", "--eval-every", "1"])
        return t_sync, time_to([{**r, "virtual_seconds": r["elapsed_seconds"]} for r in buff], target), target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=100, help="synchronous rounds that set the target")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bus-rounds", type=int, default=10)
    ap.add_argument("--bus-repeats", type=int, default=1)
    ap.add_argument("--job-seconds", type=float, default=0.5, help="a normal client's injected local job time")
    ap.add_argument("--no-bus", action="store_true")
    args = ap.parse_args()
    diff = equivalence()
    print(f"equivalence (C = K = O = 10 clients, 10 steps): max |FedBuff - FedAvg| = {diff:.3g}")
    rows, speed = [], {}
    for clock, clock_kw in CLOCKS.items():
        print(f"{clock}: synchronous FedAvg's server lr {sync_lr(args, clock_kw):g}")
        for c in CONCURRENCY:
            lr = {k: best_lr(args, clock_kw, c, k) for k in (5, 1)}
            for seed in range(args.seeds):
                sync = synchronous(args, seed, clock_kw)
                target, t_sync = sync[-1]["accuracy"], sync[-1]["virtual_seconds"]
                t = {k: time_to(asynchronous(args, seed, clock_kw, c, k, lr[k]), target) for k in (5, 1)}
                rows.append((clock, c, seed, target, t_sync, t[5], t[1], lr))
                if t[5]:
                    speed.setdefault(("sync", c), []).append(t_sync / t[5])
                if t[5] and t[1]:
                    speed.setdefault(("fedasync", c), []).append(t[1] / t[5])
                first = (t[5] or math.inf) < (t[1] or math.inf)  # reached the target, and before FedAsync did
                speed.setdefault(("first", c), []).append(float(first))
    print(f"\n{'clock':10s} {'C':>3s} {'seed':>4s} {'target':>7s} {'sync s':>9s} {'FedBuff s':>10s} {'FedAsync s':>11s}"
          f"  server lr (FedBuff, FedAsync)")
    for clock, c, seed, target, ts, tb, ta, lr in rows:
        show = lambda t: f"{t:.0f}" if t is not None else "not reached"  # noqa: E731
        print(f"{clock:10s} {c:3d} {seed:4d} {target:7.3f} {ts:9.0f} {show(tb):>10s} {show(ta):>11s}  {lr[5]:g}, {lr[1]:g}")
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    speed_bus = []
    for rep in range(0 if args.no_bus else args.bus_repeats):
        t_sync, t_buff, target = bus_speedup(args.bus_rounds, args.job_seconds)
        print(f"bus run {rep}: target {target:.3f}: sync {t_sync:.1f} s, FedBuff "
              f"{'not reached' if t_buff is None else f'{t_buff:.1f} s'}")
        if t_buff:
            speed_bus.append(t_sync / t_buff)
    for c in CONCURRENCY:
        first = speed.get(("first", c), [])
        print(f"C = {c}: FedBuff vs sync {med(speed.get(('sync', c), []))}x, vs FedAsync "
              f"{med(speed.get(('fedasync', c), []))}x where both reached the target (medians over clocks and seeds); "
              f"FedBuff reached it first in {sum(first):.0f} of {len(first)} runs")
    print(json.dumps({"sync_equivalence_max_abs_diff": diff, "speedup_vs_sync_sim": med(speed.get(("sync", 50), [])),
                      "speedup_vs_fedasync_sim": med(speed.get(("fedasync", 50), [])),
                      "fedbuff_first_fraction_sim": round(statistics.fmean(speed[("first", 50)]), 3),
                      "speedup_vs_sync_bus": med(speed_bus)}))


if __name__ == "__main__":
    main()
