"""Gossip benchmark: (a) consensus rate against randomized-gossip theory, (b) the busiest node's traffic against a
FedAvg coordinator's, (c) wall time to an accuracy target against FedAvg, both as real processes on loopback.

(a) Pure in-memory runs of the peers' own mixing code (:class:`clients.gossip_state.ModelState`): N peers, random
    pairs on the complete graph, equal weights. For randomized gossip (Boyd, Ghosh, Prabhakar & Shah, IEEE Trans. IT
    2006) each pairwise average is a projection ``W``, and ``E[W] = I - (N I - 11^T) / (N (N-1))``, whose second
    eigenvalue ``1 - 1/(N-1)`` is the expected per-exchange contraction of the squared consensus distance. We fit the
    measured per-exchange rate and report ``log(measured) / log(theory)`` (1.0 = as fast as theory).
(b) Measured in the real gossip run of (c): every peer counts, at its own sockets and per training round, the bytes
    it sent and received and the model messages among them; a round has ``slots`` exchange slots (``--exchanges``, plus
    ``--final-mixes`` in the last round). We report the busiest node-round in model-sizes per slot, as model payloads
    (model messages / slots; the budget the protocol enforces is 4) and as all bytes (headers, rumours and refusals
    included) / model bytes, next to the FedAvg coordinator's measured bytes per round in (c)'s FedAvg run. A
    simulation of the budget rule for N = 8 .. 256 shows that the bound does not depend on N.
(c) ``fedopt simulate --mode gossip --peers 8`` against ``fedopt simulate --transport tcp --clients 8`` (a coordinator and
    8 client processes), digits, Dirichlet alpha 0.5, same rounds and local epochs; the time from launch until the
    accuracy target is reached (gossip: the peers' mean accuracy), polled from the metrics files as they are written.

Usage: python benchmarks/gossip.py [--repeats R] [--rounds N] [--local-epochs E] [--target ACC]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, table  # noqa: E402

from clients.gossip.state import Bounds, ModelState, consensus_distance  # noqa: E402
from fedopt.launch import spawn, stop_processes  # noqa: E402

#: the mixing math alone: a swarm of honest peers, no clipping or clamping in the way of the rate being measured
HONEST = Bounds(norm_factor=1e9, dist_factor=1e9, clip_factor=1e9, max_weight_ratio=1e9)


# ---- (a) consensus rate ---------------------------------------------------------------------------------------------
def measured_rate(n: int, exchanges: int, trials: int, seed: int = 0) -> float:
    """Per-exchange contraction of the squared consensus distance, fitted over ``exchanges`` random pairs."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ratios = []
    for _ in range(trials):
        states = [ModelState(torch.randn(64, generator=g, dtype=torch.float64), 1, bounds=HONEST) for _ in range(n)]
        d0 = consensus_distance([s.vec for s in states]) ** 2
        for _ in range(exchanges):
            i, j = rng.sample(range(n), 2)
            before, v, _ = states[j].accept_push(states[i].vec.clone(), 1, states[i].version)
            states[i].complete_push(states[i].vec.clone(), states[i].version, before, 1, v)
        d = consensus_distance([s.vec for s in states]) ** 2
        ratios.append(d / d0)
    return statistics.mean(ratios) ** (1 / exchanges)  # theory bounds the expectation, so average before the log


# ---- (b) traffic per node -------------------------------------------------------------------------------------------
def busiest_node(n: int, rounds: int, slots: int = 5, max_accept: int = 1, tries: int = 6,
                 seed: int = 0) -> tuple[float, float, float]:
    """Simulated budget rule of :mod:`clients.gossip.peer`: per round each node has ``2 (1 + max_accept) slots`` model
    messages, keeps two per own slot still to come, and initiates one exchange per slot (up to ``tries`` picks).
    Returns (worst models per slot of one node-round, busiest node's mean per slot, fraction of slots exchanged)."""
    rng = random.Random(seed)
    worst, total, done = 0.0, [0] * n, 0
    for _ in range(rounds):
        moved, left = [0] * n, [slots] * n
        budget = 2 * (1 + max_accept) * slots
        for _ in range(slots):
            for i in rng.sample(range(n), n):
                left[i] -= 1
                for _ in range(tries):
                    j = rng.choice([k for k in range(n) if k != i])
                    if moved[j] + 2 + 2 * left[j] <= budget:
                        moved[i] += 2
                        moved[j] += 2
                        done += 1
                        break
        worst = max(worst, max(moved) / slots)
        total = [a + b for a, b in zip(total, moved)]
    return worst, max(total) / (rounds * slots), done / (n * rounds * slots)


def measured_load(out: Path, peers: int) -> dict:
    """Busiest node-round of a real gossip run, from the peers' metrics (counted at their sockets)."""
    from safetensors.torch import load_file

    model = load_file(str(out / "peer-000" / "model.safetensors"))
    model_bytes = 4 * sum(t.numel() for t in model.values())
    rows = [r for i in range(peers) for r in _read(out / f"peer-{i:03d}" / "metrics.jsonl") if r.get("slots")]
    return {"models_per_slot": max(r["models_moved"] / r["slots"] for r in rows),
            "bytes_per_slot": max((r["bytes_up"] + r["bytes_down"]) / (r["slots"] * model_bytes) for r in rows),
            "mean_models_per_slot": statistics.mean(r["models_moved"] / r["slots"] for r in rows),
            "model_bytes": model_bytes}


def coordinator_load(out: Path, model_bytes: int) -> float:
    """The FedAvg coordinator's bytes per round (median), in model-sizes."""
    rows = [r for r in _read(out / "metrics.jsonl") if r.get("bytes_up") is not None]
    return statistics.median((r["bytes_up"] + r["bytes_down"]) / model_bytes for r in rows) if rows else math.nan


# ---- (c) wall time to target ----------------------------------------------------------------------------------------
def _read(p: Path) -> list[dict]:
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def time_to_target(cmd: list[str], out: Path, peers: int | None, target: float, limit: float) -> tuple[float, dict]:
    """Seconds from launch until the run's accuracy reaches ``target`` (inf if never), and the run's end state."""
    t0 = time.monotonic()
    proc = spawn(cmd)
    hit = math.inf
    try:
        while time.monotonic() - t0 < limit:
            if peers:
                latest = [r[-1]["accuracy"] for r in (_read(out / f"peer-{i:03d}" / "metrics.jsonl")
                                                       for i in range(peers)) if r]
                acc = statistics.mean(latest) if len(latest) == peers else 0.0
            else:
                recs = [r for r in _read(out / "metrics.jsonl") if r.get("accuracy") is not None]
                acc = recs[-1]["accuracy"] if recs else 0.0
            if acc >= target and hit == math.inf:
                hit = time.monotonic() - t0
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        stop_processes([proc], grace=0.0)
    return hit, {"rc": proc.returncode, "seconds": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--limit", type=float, default=400.0, help="seconds one run may take")
    args = ap.parse_args()

    rows, ratios = [], []
    for n in (8, 32):
        theory = 1 - 1 / (n - 1)
        rate = measured_rate(n, exchanges=20 * n, trials=200)
        ratios.append(math.log(rate) / math.log(theory))
        rows.append((n, f"{rate:.4f}", f"{theory:.4f}", f"{ratios[-1]:.3f}", f"{math.ceil(math.log(1e-6) / math.log(rate))}"))
    print("(a) squared consensus distance per pairwise exchange (complete graph, random pairs)")
    print(table(rows, ("peers", "measured rate", "theory 1-1/(N-1)", "log ratio", "exchanges to 1e-6")))

    rows = []
    for n in (8, 32, 128, 256):
        worst, mean_busiest, frac = busiest_node(n, rounds=40 if n > 100 else 200)
        rows.append((n, f"{worst:.2f}", f"{mean_busiest:.2f}", f"{frac:.2%}", 2 * n))
    sim_table = table(rows, ("peers", "worst node-round", "busiest node mean", "slots exchanged", "FedAvg coordinator"))

    common = ["--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--alpha", "0.5", "--seed", "0",
              "--progress", "off", "--no-plot"]
    results: dict[str, list[float]] = {"gossip": [], "fedavg": []}
    loads, coord = [], []
    for rep in range(args.repeats):
        for name in ("gossip", "fedavg"):
            with tempfile.TemporaryDirectory(prefix="fedopt-bench-gossip-") as tmp:
                out = Path(tmp) / "out"
                if name == "gossip":
                    cmd = [sys.executable, "-m", "fedopt", "simulate", "--mode", "gossip", "--peers", "8",
                           "--clients", "8", *common, "--out", str(out)]
                    t, info = time_to_target(cmd, out, 8, args.target, args.limit)
                    if (out / "peer-000" / "model.safetensors").exists():
                        loads.append(measured_load(out, 8))
                else:
                    cmd = [sys.executable, "-m", "fedopt", "simulate", "--transport", "tcp", "--clients", "8",
                           *common, "--out", str(out)]
                    t, info = time_to_target(cmd, out, None, args.target, args.limit)
                    if loads:
                        coord.append(coordinator_load(out, loads[-1]["model_bytes"]))
                results[name].append(t)
                print(f"  repeat {rep + 1}: {name:<7} time to {args.target:.2f}: {t:.1f}s (run {info['seconds']:.1f}s, "
                      f"rc {info['rc']})", flush=True)

    busiest = max((x["models_per_slot"] for x in loads), default=math.nan)
    print("\n(b) models moved per exchange slot by the busiest node, measured at the peers' sockets (8 real peers)")
    print(table([("gossip: busiest node-round, model payloads", f"{busiest:.2f}"),
                 ("gossip: busiest node-round, all bytes / model bytes",
                  f"{max((x['bytes_per_slot'] for x in loads), default=math.nan):.2f}"),
                 ("gossip: mean node-round, model payloads",
                  f"{statistics.mean(x['mean_models_per_slot'] for x in loads) if loads else math.nan:.2f}"),
                 ("FedAvg coordinator per round (all bytes / model bytes, median)",
                  f"{statistics.median(coord) if coord else math.nan:.2f}")], ("node", "model-sizes")))
    print("    the budget rule simulated for larger swarms (models per slot; FedAvg: per round)")
    print(sim_table)
    g, f = statistics.median(results["gossip"]), statistics.median(results["fedavg"])
    print("\n(c) wall time to the accuracy target, 8 processes on loopback (median of repeats)")
    print(table([("gossip (8 peers)", f"{g:.1f}"), ("FedAvg (coordinator + 8 clients)", f"{f:.1f}")],
                ("run", f"seconds to {args.target:.2f}")))
    emit({"consensus_rate_vs_theory": round(min(ratios), 4),
          "busiest_node_models_per_round": round(busiest, 3) if math.isfinite(busiest) else None,
          "time_to_target_ratio_vs_fedavg": round(g / f, 3) if math.isfinite(g) and math.isfinite(f) else None})

if __name__ == "__main__":
    main()
