"""Rounds to reach a test-accuracy target on digits (defaults of `fedopt simulate`) for each server optimizer
(Reddi et al., ICLR 2021). Counts rounds, not seconds, so it is immune to machine noise.

    python benchmarks/server_optimizers.py [--target 0.93] [--rounds 60] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, table  # noqa: E402

from clients.simulation.run import Simulation  # noqa: E402
from fedopt.config import RunConfig  # noqa: E402
from fedopt.metrics import RunOutput  # noqa: E402

SETTINGS = {  # server learning rates: 1.0 for the averaging family; the adaptive ones tuned over {0.01, 0.03, 0.1}
    "fedavg": {},
    "fedavgm": {"server_lr": 1.0, "server_options": {"momentum": 0.5}},
    "fedadam": {"server_lr": 0.03},
    "fedyogi": {"server_lr": 0.03},
    "fedadagrad": {"server_lr": 0.03},
}


def rounds_to(target: float, name: str, rounds: int, seed: int, out: Path) -> tuple[int | None, float]:
    cfg = RunConfig.of(server_opt=name, rounds=rounds, seed=seed, progress="off", out=str(out / f"{name}-{seed}"),
                    workers=1, **SETTINGS[name])
    output = RunOutput(cfg.out, cfg.federation.rounds, "off")
    try:
        recs = Simulation(cfg).run(output).records
    finally:
        output.close()
    hit = next((r["round"] for r in recs if r["accuracy"] is not None and r["accuracy"] >= target), None)
    return hit, recs[-1]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.93)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/server-opt-bench")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # tiny models: intra-op threads only add contention
    rows, med = [], {}
    for name in SETTINGS:
        res = [rounds_to(a.target, name, a.rounds, s, Path(a.out)) for s in a.seeds]
        hits = [h if h is not None else a.rounds + 1 for h, _ in res]
        med[name] = statistics.median(hits)
        rows.append((name, " ".join(str(h) for h in hits), med[name],
                     f"{statistics.mean(acc for _, acc in res):.4f}"))
    print(table(rows, ("server optimizer", f"rounds to {a.target} per seed", "median", f"acc@{a.rounds}")))
    print(f"({a.rounds + 1} means the target was not reached in {a.rounds} rounds)")
    emit({"rounds_to_target": med, "fedadam_no_more_rounds_than_fedavg": med["fedadam"] <= med["fedavg"]})


if __name__ == "__main__":
    main()
