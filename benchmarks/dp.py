"""Utility of client-level DP-FedAvg on a many-client task: final accuracy at ε ∈ {1, 2, 4, 8, ∞}.

Task: digits replicated 10 times (``--task-option replicate=10``: about 14 examples per client) over N = 1,000 iid
clients, 100 per round (Poisson sampling, q = 0.1), 2 local epochs of SGD (lr 0.1, batch 16), server FedAvg with
lr 1.0, ``--rounds`` rounds (default 200). These settings were picked once, for every ε, on the non-private run; the
private runs only add ``--dp central --target-epsilon EPS --adaptive-clip 0.5 --accountant pld``: z is calibrated up
front so that ε after the planned rounds meets the target at δ = 1/N^1.1 (the default), and the clip follows the
noised median of the update norms (Andrew et al.; it does not change ε).

Two more rows compare central and distributed DP at ε = 8 with the same fixed clip C (the final adaptive clip of the
ε = 8 run: a released, noised value, so reusing it is post-processing): ``--dp central --dp-clip-norm C`` and
``--dp distributed --aggregator secagg --dp-clip-norm C`` (clients add Skellam noise inside SecAgg+, 16 bits, its own
RDP accountant, which needs somewhat more noise for the same ε).

Distributed DP leaves ``--bits`` to fedopt: the finest quantisation whose rounds of up to D + 4√D clients fit 20-bit
masked words with the noise's tail bound (12 bits here); each round's modulus and its SecAgg+ upload bytes (every
protocol message, masked vectors packed at k bits) are in the metrics: ``ddp_wire_bits`` is the widest modulus any
round used, ``ddp_upload_bytes_per_value`` the clients' whole protocol upload per model value.

Round cost, side by side: ``--cost-repeats`` interleaved repeats (default 3) of ``--cost-rounds`` rounds each of a plain
run, central DP with the default RDP accountant and with PLD, a plain secagg run and distributed DP; a round's seconds
count its DP work (clipping, noise, the accountant's ε and the budget check). Ratios are of the medians over the
repeats of each run's median round. The ε fedopt reports for the ε = 8 run is checked against dp_accounting's PLD
accountant driven directly here (Poisson-sampled Gaussian, the same q, z, δ and rounds): ``epsilon_rel_error``.

    python benchmarks/dp.py [--rounds 200] [--seed 1] [--quick]

Ends with one JSON line of the figures. About 15 minutes on 2 cores (``--quick``: 40 rounds, no distributed rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, table  # noqa: E402
from clients.simulation.run import Simulation  # noqa: E402
from fedopt.config import RunConfig  # noqa: E402
from fedopt.privacy import default_delta  # noqa: E402

N, PER_ROUND = 1000, 100


def run(rounds: int, seed: int, **extra) -> dict:
    cfg = RunConfig.of(task="digits", task_options={"replicate": 10}, clients=N, clients_per_round=PER_ROUND,
                       client_sampling="poisson", partition="iid", local_epochs=2, batch_size=16, lr=0.1,
                       server_opt="fedavg", server_lr=1.0, rounds=rounds, eval_every=rounds, seed=seed,
                       device="cpu", progress="off", plot=False, backend="vmap", out="/tmp/fedopt-bench-dp",
                       **extra)
    sim = Simulation(cfg)
    t0 = time.perf_counter()
    records = sim.run(None).records
    last = records[-1]
    dp = sim.server.privacy
    widths = [r["modulus_bits"] for r in records if r.get("modulus_bits")]
    return {"accuracy": last["accuracy"], "epsilon": last.get("epsilon"), "clip": last.get("dp_clip"),
            "z": dp.accountant.noise_multiplier if dp is not None else None,
            "round_s": statistics.median(r["seconds"] for r in records), "wall_s": time.perf_counter() - t0,
            "wire_bits": max(widths) if widths else None,
            "upload_per_value": sum(r["bytes_up"] for r in records if r.get("modulus_bits"))
            / max(1, sum(r["clients"] for r in records if r.get("modulus_bits"))) / sim.spec.size}


def round_costs(rounds: int, seed: int, repeats: int, clip: float, distributed: bool) -> dict:
    """Median round seconds of each run kind over ``repeats`` interleaved repeats (see the module docstring)."""
    kinds = {"plain": {}, "central_rdp": dict(dp="central", target_epsilon=8.0, adaptive_clip=0.5),
             "central_pld": dict(dp="central", target_epsilon=8.0, adaptive_clip=0.5, accountant="pld")}
    if distributed:
        kinds.update(secagg=dict(aggregator="secagg"),
                     distributed=dict(dp="distributed", aggregator="secagg", target_epsilon=8.0, dp_clip_norm=clip))
    seen: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind, extra in kinds.items():
            seen[kind].append(run(rounds, seed, **extra)["round_s"])
    return {k: statistics.median(v) for k, v in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="40 rounds, no distributed-DP row")
    ap.add_argument("--cost-rounds", type=int, default=40)
    ap.add_argument("--cost-repeats", type=int, default=3)
    args = ap.parse_args()
    rounds = 40 if args.quick else args.rounds
    delta = default_delta(N)
    rows, acc = [], {}
    base = run(rounds, args.seed)
    acc["inf"] = base["accuracy"]
    rows.append(("inf", "-", "-", "-", f"{base['accuracy']:.4f}", "0.00", f"{base['round_s'] * 1e3:.0f}"))
    central = dict(dp="central", adaptive_clip=0.5, accountant="pld")
    results = {}
    for eps in (8, 4, 2, 1):
        r = results[eps] = run(rounds, args.seed, target_epsilon=float(eps), **central)
        acc[str(eps)] = r["accuracy"]
        rows.append((eps, f"{r['epsilon']:.3f}", f"{r['z']:.3f}", "adaptive (pld)", f"{r['accuracy']:.4f}",
                     f"{100 * (r['accuracy'] - base['accuracy']):+.2f}", f"{r['round_s'] * 1e3:.0f}"))
    clip = round(results[8]["clip"], 4)
    fixed = run(rounds, args.seed, dp="central", target_epsilon=8.0, dp_clip_norm=clip, accountant="pld")
    rows.append((8, f"{fixed['epsilon']:.3f}", f"{fixed['z']:.3f}", f"C = {clip} (pld)", f"{fixed['accuracy']:.4f}",
                 f"{100 * (fixed['accuracy'] - base['accuracy']):+.2f}", f"{fixed['round_s'] * 1e3:.0f}"))
    ddp = plain_secagg = None
    if not args.quick:
        plain_secagg = run(rounds, args.seed, aggregator="secagg")
        rows.append(("inf", "-", "-", "secagg, no DP", f"{plain_secagg['accuracy']:.4f}",
                     f"{100 * (plain_secagg['accuracy'] - base['accuracy']):+.2f}",
                     f"{plain_secagg['round_s'] * 1e3:.0f}"))
        ddp = run(rounds, args.seed, dp="distributed", aggregator="secagg", target_epsilon=8.0, dp_clip_norm=clip)
        rows.append((8, f"{ddp['epsilon']:.3f}", f"{ddp['z']:.3f}", f"C = {clip}, distributed (skellam, "
                     f"{ddp['wire_bits']}-bit words)",
                     f"{ddp['accuracy']:.4f}", f"{100 * (ddp['accuracy'] - base['accuracy']):+.2f}",
                     f"{ddp['round_s'] * 1e3:.0f}"))
    cost = round_costs(args.cost_rounds, args.seed, args.cost_repeats, clip, not args.quick)
    print(f"digits x10, N = {N} clients, {PER_ROUND} per round (Poisson), {rounds} rounds, seed {args.seed}, "
          f"delta = 1/N^1.1 = {delta:.3g}")
    print(table(rows, ("target eps", "eps", "z", "clip", "final accuracy", "vs non-private (points)",
                       "median round ms")))
    print(f"round cost, {args.cost_repeats} interleaved repeats of {args.cost_rounds} rounds (median of medians, ms): "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in cost.items()))
    emit({"N": N, "per_round": PER_ROUND, "rounds": rounds, "delta": delta, "accuracy": acc,
          "z": {str(e): results[e]["z"] for e in results},
          "acc_eps8_minus_nodp": round(100 * (acc["8"] - acc["inf"]), 2),
          "ddp_minus_cdp_points": None if ddp is None else round(100 * (ddp["accuracy"] - fixed["accuracy"]), 2),
          "dp_round_ratio": round(cost["central_rdp"] / cost["plain"], 3),
          "dp_round_ratio_pld": round(cost["central_pld"] / cost["plain"], 3),
          "ddp_round_ratio_vs_secagg": round(cost["distributed"] / cost["secagg"], 3) if "secagg" in cost else None,
          "ddp_wire_bits": None if ddp is None else ddp["wire_bits"],
          "ddp_upload_bytes_per_value": None if ddp is None else round(ddp["upload_per_value"], 3),
          "epsilon_rel_error": epsilon_rel_error(results[8], rounds, delta)})


def epsilon_rel_error(r: dict, rounds: int, delta: float) -> float:
    """|ε fedopt reported - ε from dp_accounting's PLD accountant driven here| / the latter, for run ``r``."""
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(PER_ROUND / N, dp_accounting.GaussianDpEvent(r["z"]))
    acc.compose(event, rounds)
    want = acc.get_epsilon(delta)
    return round(abs(r["epsilon"] - want) / want, 6)


if __name__ == "__main__":
    main()
