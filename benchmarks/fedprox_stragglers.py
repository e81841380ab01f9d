"""FedProx vs FedAvg under systems heterogeneity (Li et al., MLSys 2020, Figure 1), on this machine.

Synthetic(1, 1): 30 users (natural partition), 10 per round, E = 20 local epochs, batch 10, lr 0.01, and 90% of the
selected clients are stragglers doing a random part of their work. FedAvg (mu = 0) drops the stragglers; FedProx
(mu = 1) keeps their partial work. Prints both accuracy curves, saves them to OUT/fedprox_vs_fedavg.png, and ends
with a JSON line of the final accuracies (mean of the last 10 rounds, to smooth the round-to-round noise).

    python benchmarks/fedprox_stragglers.py [--rounds 100] [--seeds 0] [--out runs/fedprox-bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, table  # noqa: E402

from clients.simulation.run import Simulation  # noqa: E402
from fedopt.config import build_config  # noqa: E402
from fedopt.metrics import RunOutput  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fedprox_synthetic.toml"


def run(mu: float, rounds: int, seed: int, out: Path) -> list[float]:
    cfg = build_config(str(EXAMPLE), {"mu": mu, "rounds": rounds, "seed": seed, "out": str(out), "progress": "off",
                                      "workers": 1})
    output = RunOutput(cfg.out, cfg.federation.rounds, "off")
    try:
        res = Simulation(cfg).run(output)
    finally:
        output.close()
    return [r["accuracy"] for r in res.records]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/fedprox-bench")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # tiny models: intra-op threads only add contention
    out = Path(a.out)
    curves: dict[str, list[list[float]]] = {"FedAvg (mu=0, drops stragglers)": [], "FedProx (mu=1, keeps them)": []}
    for seed in a.seeds:
        for (label, mu) in zip(curves, (0.0, 1.0)):
            curves[label].append(run(mu, a.rounds, seed, out / f"mu{mu}-seed{seed}"))
    mean_curve = {k: [statistics.mean(c[i] for c in v) for i in range(a.rounds)] for k, v in curves.items()}
    marks = sorted({1, *range(10, a.rounds + 1, max(a.rounds // 10, 1)), a.rounds})
    print(table([(r, *(f"{mean_curve[k][r - 1]:.4f}" for k in curves)) for r in marks], ("round", *curves)))
    final = {k: statistics.mean(v[-10:]) for k, v in mean_curve.items()}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for k, v in mean_curve.items():
            ax.plot(range(1, a.rounds + 1), v, label=k)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_title("Synthetic(1,1), 90% stragglers")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "fedprox_vs_fedavg.png", dpi=100)
        print(f"\ncurves: {out / 'fedprox_vs_fedavg.png'}")
    except ImportError:
        pass
    fa, fp = final.values()
    print(f"final accuracy (mean of last 10 rounds): FedAvg {fa:.4f}, FedProx {fp:.4f}")
    emit({"fedavg_final_accuracy": round(fa, 4), "fedprox_final_accuracy": round(fp, 4),
          "fedprox_at_least_as_good": fp >= fa})


if __name__ == "__main__":
    main()
