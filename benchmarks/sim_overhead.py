"""Framework overhead of the in-process engine: fedopt's time per round vs a plain PyTorch loop doing the same local
training and averaging, side by side in one run (100 clients, digits, all clients every round).

Both sides train the same shards with the same model, batch size, epochs and learning rate; the plain loop is what
a user would write by hand (load the global state, SGD over shuffled mini-batches, weighted average of the results).
Rounds alternate between the two so machine noise hits both alike; the ratio is of per-round medians.

    python benchmarks/sim_overhead.py [--clients 100] [--rounds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median, table  # noqa: E402

from clients.simulation.run import Simulation  # noqa: E402
from fedopt.config import RunConfig  # noqa: E402


def plain_round(model, global_state, shards, epochs, bs, lr, gen):
    """One FedAvg round written by hand."""
    total = sum(x.shape[0] for x, _ in shards)
    avg = {k: torch.zeros_like(v) for k, v in global_state.items()}
    for x, y in shards:
        model.load_state_dict(global_state)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            for s in range(0, x.shape[0], bs):
                idx = perm[s : s + bs]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        w = x.shape[0] / total
        for k, v in model.state_dict().items():
            avg[k].add_(v, alpha=w)
    global_state.update(avg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig.of(clients=a.clients, rounds=a.rounds, local_epochs=a.epochs, batch_size=16, lr=0.05,
                    eval_every=10**6, progress="off", workers=1)
    fed_t, plain_t = [], []
    for rep in range(a.repeats):
        sim = Simulation(cfg.replace(seed=rep))
        model = sim.task.build_model()
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        shards = [s.train for s in sim.shards]
        gen = torch.Generator().manual_seed(rep)
        srv = sim.server
        for r in range(1, a.rounds + 1):
            t0 = time.perf_counter()
            jobs = srv.plan(r, sim.sizes)
            srv.begin(r)
            sim.executor.run_round(srv, jobs)
            srv.close()
            t1 = time.perf_counter()
            plain_round(model, global_state, shards, a.epochs, 16, 0.05, gen)
            t2 = time.perf_counter()
            if r > 1:  # the first round warms caches on both sides
                fed_t.append(t1 - t0)
                plain_t.append(t2 - t1)
        acc_fed = sim.evaluate()["accuracy"]
        model.load_state_dict(global_state)
        from fedopt.task import evaluate_classifier

        acc_plain = evaluate_classifier(model, sim.test)["accuracy"]
    ratio = median(fed_t) / median(plain_t)
    print(table([("fedopt in-process engine", f"{median(fed_t) * 1e3:.1f}", f"{acc_fed:.4f}"),
                 ("plain PyTorch loop", f"{median(plain_t) * 1e3:.1f}", f"{acc_plain:.4f}")],
                ("engine", "ms/round (median)", f"accuracy after {a.rounds} rounds")))
    print(f"\n{a.clients} clients, {a.rounds} rounds x {a.repeats} repeats, overhead ratio {ratio:.3f}")
    emit({"overhead_ratio": round(ratio, 4)})


if __name__ == "__main__":
    main()
