"""Byzantine robustness: every defence x every attack, final test accuracy on digits (Dirichlet 0.5), 20% of the
clients Byzantine, with 10 and with 50 clients; then centered clipping over the real bus, 8 client processes of which
2 run ALIE, against the same run with 8 honest clients.

    python benchmarks/robust.py                      # the table, a plot, the bus runs (12-15 minutes on 2 cores)
    python benchmarks/robust.py --no-bus --seeds 0   # a quicker look

Settings (fixed before any run, never tuned on the test set): every client trains in every round (30 rounds,
2 local epochs, lr 0.1, batch 16); each cell is the mean final accuracy over ``--seeds`` (a seed also draws which
clients are Byzantine). The engine's relative norm bound is off (``--norm-factor 0``) so that each aggregation
rule is measured alone; one extra line shows FedAvg under scaling with the engine's default bound back on.
Defences assume the true f = 20% of n: trimmed_mean trims beta = 0.2 from each end, krum/multi_krum/bulyan take
f = 0.2 n (bulyan only where n >= 4f + 3); centered_clip (1 iteration, the paper's; tau "auto" with f = 0.2 n: the
(n - f)-th smallest distance to the centre, see fedopt.aggregators.clipping) runs with client momentum 0.9 as the
paper pairs them (the "median tau" and +bucketing rows keep the median radius, the default); dnc drops f = 0.2 n;
norm_bound uses its default bound 3; geomed RFA's defaults. The "+bucketing" rows put Karimireddy, He, Jaggi's bucketing
(ICLR 2022; s = 2, their value) in front of the rule (``--aggregator-option bucketing=2``). Attacks use their
defaults (fedopt.attacks): scaling x1000, ALIE's z from n and f, IPM epsilon 0.1; ALIE and IPM are omniscient in
simulation. On the bus the two ALIE processes only share their own honest-trained updates (``--collude``).

Why ALIE at the paper's z does not take FedAvg down (the issue asks for a 30-point drop). Each of
the f attackers sends mu - z sigma (mu, sigma: the honest updates' coordinate-wise mean and standard deviation),
so the mean of the round is mu - (f/n) z sigma: every coordinate moves by (f/n) z sigma_j, the whole update by
(f/n) z ||sigma|| in L2, along -sigma. Baruch et al.'s z_max (s = floor(n/2 + 1) - f, z = Phi^-1((n - s)/n)) is
0.253 at n = 10, f = 2 and 0.468 at n = 50, f = 10 (0.319 on the bus, n = 8, f = 2), so the shift is 0.051 sigma
and 0.094 sigma per coordinate. The honest mean's own sampling error is sigma / sqrt(n - f) = 0.354 sigma and
0.158 sigma per coordinate, which FedAvg absorbs every round; ALIE adds less than that, in a direction (-sigma,
every coordinate pushed down by its spread) that is not the reverse of the descent direction. The attack is built
to sit inside the honest spread so that median-, Krum- and Bulyan-like rules *select* it; a rule that averages
gives it only its f/n share. (The CC authors' code uses (n - f - s)/(n - f): z = 0 at n = 10 and 0.253 at
n = 50, weaker still.) So the main table keeps the paper's z, and a second table, the ALIE strength sweep, runs
every defence again under ALIE with z = 1, 2 and 5 (``--attack-option z=...``): a larger z moves the mean by
(f/n) z sigma, and from z = 5 FedAvg falls to chance or near it at both sizes, while z = 1 is the strength at which
ALIE is still inside the honest spread by distance, rank and angle yet coherent enough to pull: at 50 clients it
takes several points from every distance-, rank- and angle-based rule here. What holds it is dnc
(fedopt.aggregators.spectral, Shejwalkar and Houmansadr's Divide-and-Conquer): f identical shifted updates are the
top singular direction of the centred updates.

Why sign flipping at 50 clients beats every distance-based rule here, and what does not lose to it. Measured with
centered clipping and client momentum 0.9 (50 clients, seeds 0 and 1): each honest momentum lies 0.35-0.75 from
the centre (the previous aggregate) while the honest mean is only 0.13-0.18 long, so the updates are dominated by
what differs between the clients' label mixes (about 29 samples each); a flipped momentum -m lies 0.40-0.53 from
the centre, inside the honest spread. No distance-based rule (clipping radius, Krum scores, geometric median,
coordinate ranks) can tell it from an honest client, and bucketing, which shrinks the honest spread by about
sqrt(2), does not separate it either (measured: no better). The angle does: at rounds 20, 25 and 30 every honest
momentum had cosine >= 0.15 with the centre and every flipped one <= -0.11 (earlier rounds overlap), and FedAvg over
the honest clients alone reaches 88.9 and 87.5 (seeds 0, 1) under sign flipping, as clean. ``cosine_filter``
(fedopt.aggregators.angular) uses it without trusted data: it keeps the updates with a positive cosine to the
round's coordinate-wise median, clips them to the median norm and averages them (FLTrust's trust score with a
robust reference in place of a root dataset); it runs without client momentum, with its defaults.

Drops are in accuracy points (clean - attacked). The last line::

    {"fedavg_worst_drop": ..., "best_defence_worst_drop": ..., "cc_alie_drop": ..., "cc_ipm_drop": ...,
     "bus_cc_alie_drop": ..., "fedavg_alie_sweep_worst_drop": ..., "best_defence_alie_sweep_worst_drop": ...,
     "cc_alie_sweep_worst_drop": ..., "bus_dnc_alie_z1_drop": ..., "cc_cost_ratio": ..., "dnc_cost_ratio": ...}

``fedavg_worst_drop`` is FedAvg's largest drop over attacks and both client counts; ``best_defence_worst_drop``
takes, for each attack and client count, the defence (any rule but fedavg) with the highest accuracy under it and
its drop from its own clean run, and reports the largest; ``cc_*_drop`` are centered clipping's drops (the
"cc+momentum" row, the larger of the two client counts); ``bus_cc_alie_drop`` is the bus pair's. The three
``*_alie_sweep_*`` keys are the same over the strength sweep (z = 1, 2, 5); ``bus_dnc_alie_z1_drop`` is a second
bus pair: dnc (f = 2, no client momentum), clean against 2 colluding processes running ALIE with z = 1.
``cc_cost_ratio`` and ``dnc_cost_ratio`` are the seconds of one round of centered clipping (L = 1) and of dnc
over FedAvg's, 100 updates of 10^6 values each (the last table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleave, median, pyplot, table  # noqa: E402

from clients.simulation.run import Simulation  # noqa: E402
from fedopt.attacks import alie_z, byzantine_clients  # noqa: E402
from fedopt.config import RunConfig  # noqa: E402
from fedopt.launch import fedopt_command, shared_cores_env, spawn, stop_processes  # noqa: E402

FRACTION = 0.2
ATTACKS = [None, "sign_flip", "scaling", "label_flip", "alie", "ipm"]
#: defence -> (aggregator, its options for n clients with f attackers, client momentum)
DEFENCES = {
    "fedavg": ("fedavg", lambda n, f: {}, 0.0),
    "median": ("median", lambda n, f: {}, 0.0),
    "trimmed_mean": ("trimmed_mean", lambda n, f: {"beta": FRACTION}, 0.0),
    "norm_bound": ("norm_bound", lambda n, f: {}, 0.0),
    "krum": ("krum", lambda n, f: {"f": f}, 0.0),
    "multi_krum": ("multi_krum", lambda n, f: {"f": f}, 0.0),
    "bulyan": ("bulyan", lambda n, f: {"f": f}, 0.0),
    "geomed": ("geomed", lambda n, f: {}, 0.0),
    "geomed+bucketing": ("geomed", lambda n, f: {"bucketing": 2}, 0.0),
    "cc+momentum": ("centered_clip", lambda n, f: {"f": f}, 0.9),
    "cc+momentum (median tau)": ("centered_clip", lambda n, f: {}, 0.9),
    "cc+momentum+bucketing": ("centered_clip", lambda n, f: {"bucketing": 2}, 0.9),
    "cosine_filter": ("cosine_filter", lambda n, f: {}, 0.0),
    "dnc": ("dnc", lambda n, f: {"f": f}, 0.0),
}
#: ALIE's z beyond the paper's z_max, for the strength sweep
SWEEP_Z = (1.0, 2.0, 5.0)


def simulate(clients: int, defence: str, attack: str | None, seed: int, rounds: int, epochs: int,
             norm_factor: float = 0.0, attack_options: dict | None = None) -> float:
    """Final test accuracy of one in-process run."""
    agg, options, momentum = DEFENCES[defence]
    f = round(FRACTION * clients)
    kw = dict(task="digits", clients=clients, partition="dirichlet", alpha=0.5, rounds=rounds, local_epochs=epochs,
              seed=seed, aggregator=agg, aggregator_options=options(clients, f), client_momentum=momentum,
              norm_factor=norm_factor, eval_every=rounds, progress="off", plot=False, out="runs/robust-bench")
    if attack is not None:
        kw.update(attack=attack, attackers=FRACTION, attack_options=attack_options or {})
    return Simulation(RunConfig.of(**kw)).run(None).records[-1]["accuracy"]


def bus_run(tmp: Path, name: str, rounds: int, epochs: int, alie: bool, aggregator: tuple = ("centered_clip",),
            momentum: float = 0.9, z: float | None = None) -> float:
    """Final accuracy of a real coordinator (``aggregator``: centered clipping unless given) and 8 client processes
    with client momentum ``momentum``; with ``alie``, 2 of them (chosen by seed 0) run ALIE (with ``z`` when given)
    sharing only their own updates."""
    n = 8
    url = f"ipc://{tmp}/{name}.sock"
    out = tmp / name
    env = shared_cores_env(n + 1)
    bad = byzantine_clients(n, 2 / n, 0) if alie else frozenset()
    procs = [spawn(fedopt_command(
        "coordinator", "--bind", url, "--insecure", "--out", str(out), "--progress", "lines", "--no-plot",
        "--task", "digits", "--clients", str(n), "--partition", "dirichlet", "--alpha", "0.5", "--seed", "0",
        "--rounds", str(rounds), "--local-epochs", str(epochs), "--eval-every", str(rounds),
        "--aggregator", *aggregator, "--norm-factor", "0", "--join-timeout", "300", "--deadline", "120"),
        tmp / f"{name}-coordinator.log", env)]
    for i in range(n):
        attack = ["--attack", "alie", "--collude", str(tmp / f"{name}-collude"), "--colluders", "2",
                  *(["--attack-option", f"z={z}"] if z is not None else [])] if str(i) in bad else []
        procs.append(spawn(fedopt_command("client", "--connect", url, "--insecure", "--shard", str(i),
                                          "--client-momentum", str(momentum), "--exit-with-parent", "--give-up", "300",
                                          "--log-level", "WARNING", *attack),
                           tmp / f"{name}-client-{i}.log", env))
    try:
        end = time.monotonic() + 900
        while procs[0].poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        if procs[0].returncode != 0:
            log = (tmp / f"{name}-coordinator.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"bus run {name}: the coordinator failed:\n{log}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows[-1]["accuracy"]
    finally:
        stop_processes(procs)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sizes = sorted(results)
    fig, axes = plt.subplots(len(sizes), 1, figsize=(12, 4 * len(sizes)), squeeze=False)
    for ax, n in zip(axes[:, 0], sizes):
        names = [d for d in DEFENCES if d in results[n]]
        width = 0.8 / len(names)
        for k, d in enumerate(names):
            ax.bar([a + k * width for a in range(len(ATTACKS))], [100 * results[n][d][a] for a in ATTACKS], width,
                   label=d, color=plt.cm.tab20(list(DEFENCES).index(d)))  # one colour per defence, every panel
        ax.set_xticks([a + 0.4 - width / 2 for a in range(len(ATTACKS))], [a or "none" for a in ATTACKS])
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"digits, Dirichlet 0.5, {n} clients, {int(FRACTION * 100)}% Byzantine")
        ax.set_ylim(0, 118)
        ax.legend(ncol=len(names), fontsize=7, loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


#: the rules timed by :func:`aggregator_costs` (name, options), f = 20% of the round
COST_RULES = [("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": FRACTION}), ("norm_bound", {}),
              ("centered_clip", {}), ("centered_clip", {"f": 20}), ("krum", {"f": 20}), ("multi_krum", {"f": 20}),
              ("bulyan", {"f": 20}), ("geomed", {}), ("cosine_filter", {}), ("dnc", {"f": 20})]


def aggregator_costs(n: int, d: int, repeats: int) -> dict[str, float]:
    """Seconds for one round of each rule of :data:`COST_RULES` on ``n`` random updates of ``d`` float32 values
    (begin, every add, result: what the coordinator pays each round), after one warm-up round of the same
    aggregator, the rules interleaved in each repeat; median of ``repeats``. Keys: the rule's name with its
    options."""
    import torch

    from fedopt.aggregators import Update, make_aggregator

    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.01
    rules = {name + "".join(f" {k}={v}" for k, v in options.items()): make_aggregator(name, **options)
             for name, options in COST_RULES}

    def round_of(agg) -> float:
        t = time.perf_counter()
        agg.begin(1, d)
        for i in range(n):
            agg.add(Update(str(i), rows[i], 1))
        agg.result()
        return time.perf_counter() - t

    for agg in rules.values():  # a first round warms each aggregator up (its matrix, its centre)
        round_of(agg)
    times = interleave({key: partial(round_of, agg) for key, agg in rules.items()}, repeats)
    return {k: median(v) for k, v in times.items()}


def plot_sweep(results: dict, sweep: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sizes = sorted(sweep)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        labels = ["none", f"z_max {alie_z(n, round(FRACTION * n)):.2f}", *(f"z={z:g}" for z in SWEEP_Z)]
        for d in sweep[n]:
            ys = [results[n][d][None], results[n][d]["alie"], *(sweep[n][d][z] for z in SWEEP_Z)]
            ax.plot(range(len(labels)), [100 * y for y in ys], marker="o", label=d,
                    color=plt.cm.tab20(list(DEFENCES).index(d)))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("ALIE strength")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"ALIE strength, {n} clients, {int(FRACTION * 100)}% Byzantine")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--plot", default="runs/robust-bench/robust.png")
    ap.add_argument("--no-bus", action="store_true")
    ap.add_argument("--no-cost", action="store_true", help="skip timing each rule at n = 100, d = 10^6")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # tiny model: intra-op threads only add contention
    started = time.perf_counter()
    results: dict[int, dict[str, dict]] = {}
    for n in a.clients:
        f = round(FRACTION * n)
        results[n] = {}
        for d in DEFENCES:
            if d == "bulyan" and n < 4 * f + 3:
                continue
            results[n][d] = {att: statistics.mean(simulate(n, d, att, s, a.rounds, a.local_epochs) for s in a.seeds)
                             for att in ATTACKS}
            print(f"  {n} clients, {d}: " + " ".join(f"{100 * v:.1f}" for v in results[n][d].values()), flush=True)
        rows = [(d, *(f"{100 * r[att]:.1f}" for att in ATTACKS)) for d, r in results[n].items()]
        print(f"\n{n} clients ({f} Byzantine), final test accuracy % (mean of seeds {a.seeds}); "
              f"bulyan needs n >= 4f+3 = {4 * f + 3}")
        print(table(rows, ("defence", *(att or "none" for att in ATTACKS))))
        bounded = statistics.mean(simulate(n, "fedavg", "scaling", s, a.rounds, a.local_epochs, norm_factor=4.0)
                                  for s in a.seeds)
        print(f"fedavg under scaling with the engine's default norm bound (--norm-factor 4): {100 * bounded:.1f}\n")
    # ALIE stronger than the paper's z: where FedAvg falls, and which defences hold
    sweep: dict[int, dict[str, dict[float, float]]] = {}
    for n in results:
        sweep[n] = {d: {z: statistics.mean(simulate(n, d, "alie", s, a.rounds, a.local_epochs,
                                                    attack_options={"z": z}) for s in a.seeds) for z in SWEEP_Z}
                    for d in results[n]}
        rows = [(d, f"{100 * results[n][d][None]:.1f}", f"{100 * results[n][d]['alie']:.1f}",
                 *(f"{100 * sweep[n][d][z]:.1f}" for z in SWEEP_Z)) for d in sweep[n]]
        print(f"\nALIE strength, {n} clients: final test accuracy % (z_max = {alie_z(n, round(FRACTION * n)):.3f})")
        print(table(rows, ("defence", "none", "alie z_max", *(f"alie z={z:g}" for z in SWEEP_Z))))
    if a.plot:
        plot(results, Path(a.plot))
        plot_sweep(results, sweep, Path(a.plot).with_name("robust-alie-z.png"))

    def drop(n, d, att):
        return 100 * (results[n][d][None] - results[n][d][att])

    def best_drops(accuracy: dict, labels, name) -> list[float]:
        """For each client count and each label (an attack, or an ALIE z), the rule other than fedavg most accurate
        under it in ``accuracy[n][rule][label]``, printed; the list of their drops from their own clean runs."""
        drops = []
        for n in accuracy:
            for label in labels:
                d = max((k for k in accuracy[n] if k != "fedavg"), key=lambda k: accuracy[n][k][label])
                drops.append(100 * (results[n][d][None] - accuracy[n][d][label]))
                print(f"best under {name(label):10s} with {n:2d} clients: {d:12s} {100 * accuracy[n][d][label]:.1f} "
                      f"(drop {drops[-1]:+.1f} from its clean {100 * results[n][d][None]:.1f})")
        return drops

    attacks = [att for att in ATTACKS if att is not None]
    fedavg_worst = max(drop(n, "fedavg", att) for n in results for att in attacks)
    best = best_drops(results, attacks, str)
    sweep_drops = {d: max(100 * (results[n][d][None] - sweep[n][d][z]) for n in sweep for z in SWEEP_Z)
                   for d in DEFENCES if all(d in sweep[n] for n in sweep)}
    best_sweep = best_drops(sweep, SWEEP_Z, lambda z: f"alie z={z:g}")
    bus_drop = bus_dnc_drop = None
    if not a.no_bus:
        with tempfile.TemporaryDirectory(prefix="fedopt-robust-") as tmp:
            clean = bus_run(Path(tmp), "clean", a.rounds, a.local_epochs, alie=False)
            attacked = bus_run(Path(tmp), "alie", a.rounds, a.local_epochs, alie=True)
            dnc = ("dnc", "--aggregator-option", "f=2")
            dnc_clean = bus_run(Path(tmp), "dnc-clean", a.rounds, a.local_epochs, False, dnc, momentum=0.0)
            dnc_alie = bus_run(Path(tmp), "dnc-alie", a.rounds, a.local_epochs, True, dnc, momentum=0.0, z=1.0)
        bus_drop = round(100 * (clean - attacked), 2)
        bus_dnc_drop = round(100 * (dnc_clean - dnc_alie), 2)
        print(f"\nbus, centered_clip + client momentum 0.9, 8 client processes: clean {100 * clean:.1f}, "
              f"2 colluding ALIE processes {100 * attacked:.1f} (drop {bus_drop:+.1f})")
        print(f"bus, dnc (f = 2), 8 client processes: clean {100 * dnc_clean:.1f}, 2 colluding ALIE processes "
              f"with z = 1 {100 * dnc_alie:.1f} (drop {bus_dnc_drop:+.1f})")
    cost_ratio = {}
    if not a.no_cost:
        torch.set_num_threads(2)  # the coordinator's share of this machine
        costs = aggregator_costs(100, 10 ** 6, 3)
        cost_ratio = {k: v / costs["fedavg"] for k, v in costs.items()}
        print("\none round of each rule after a first, 100 updates of 10^6 values (median of 3, rules interleaved):")
        print(table([(k, f"{v:.3f}", f"{cost_ratio[k]:.1f}") for k, v in costs.items()],
                    ("rule", "seconds", "x fedavg")))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    emit({"fedavg_worst_drop": round(fedavg_worst, 2), "best_defence_worst_drop": round(max(best), 2),
          "cc_alie_drop": round(max(drop(n, "cc+momentum", "alie") for n in results), 2),
          "cc_ipm_drop": round(max(drop(n, "cc+momentum", "ipm") for n in results), 2),
          "bus_cc_alie_drop": bus_drop,
          "fedavg_alie_sweep_worst_drop": round(sweep_drops["fedavg"], 2),
          "best_defence_alie_sweep_worst_drop": round(max(best_sweep), 2),
          "cc_alie_sweep_worst_drop": round(sweep_drops["cc+momentum"], 2), "bus_dnc_alie_z1_drop": bus_dnc_drop,
          "cc_cost_ratio": round(cost_ratio["centered_clip"], 2) if cost_ratio else None,
          "dnc_cost_ratio": round(cost_ratio["dnc f=20"], 2) if cost_ratio else None})


if __name__ == "__main__":
    main()
