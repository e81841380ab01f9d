"""fedopt's simulation engine vs Flower's (Ray) simulation engine, side by side on one workload, in one run.

Workload: digits, MLP 64-64-10, Dirichlet(0.5) over N clients, 1 local epoch, batch 16, SGD lr 0.05, every client in
every round, 20 rounds (Flower at N=1000: fewer rounds; per-round medians are compared), N in {10, 100, 1000}.
Contenders, each in its own child process so start-up and the peak RSS of its whole process tree (psutil, sampled in a
thread) are measured the same way:

* ``flower``      Flower's ServerApp/ClientApp + FedAvg through ``flwr.simulation.run_simulation`` (Ray backend,
                   one CPU per client actor), central evaluation every round;
* ``fedopt``      ``fedopt simulate`` (the command line, so start-up counts) with the default backend, the vmap
                   backend and a 2-worker pool;
* ``loop``        floor: a plain PyTorch loop (one model, torch.optim.SGD, FedAvg by sample count) in one process;
* ``vmapfloor``   floor: a hand-written batched torch.func loop (all clients' parameters stacked, padded batches).

Per-round time is the median over rounds after the first (every contender evaluates the global model each round).
Usage: ``python benchmarks/simulation_vs_flower.py [--quick]``; needs the ``bench`` extra (flwr[simulation]).
The last line is JSON with the ratios issue 7 names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, BS, ALPHA = 0.05, 16, 0.5
SEED = int(os.environ.get("FEDOPT_BENCH_SEED", "0"))  # children inherit it (see --accuracy-seeds)


# ---- the shared workload (data exactly as fedopt partitions it) ---------------------------------------------------------
_TASK = {}


def workload(n: int):
    from fedopt.data import PartitionSpec
    from fedopt.data.digits import DigitsTask

    if n not in _TASK:
        task = DigitsTask()
        _TASK[n] = (task, PartitionSpec("dirichlet", ALPHA))
    return _TASK[n]


def evaluate(model, test) -> float:
    import torch

    with torch.no_grad():
        return float((model(test[0]).argmax(1) == test[1]).float().mean())


def local_sgd(model, x, y, seed: int) -> None:
    """The plain PyTorch client: one epoch of minibatch SGD in a seeded shuffled order."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    for s in range(0, x.shape[0], BS):
        idx = order[s:s + BS]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---- children: each prints one JSON line {"times": [...], "accuracy": [...]} -----------------------------------------
def child_loop(n: int, rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    task, part = workload(n)
    torch.manual_seed(SEED)
    model = task.build_model()
    shards = [task.load_data(i, n, SEED, part).train for i in range(n)]
    test = task.load_test(SEED)
    glob = [p.detach().clone() for p in model.parameters()]
    total = sum(x.shape[0] for x, _ in shards)
    times, accs = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        acc = [torch.zeros_like(g) for g in glob]
        for i, (x, y) in enumerate(shards):
            with torch.no_grad():
                for p, g in zip(model.parameters(), glob):
                    p.copy_(g)
            local_sgd(model, x, y, r * 100003 + i)
            with torch.no_grad():
                for a, p in zip(acc, model.parameters()):
                    a.add_(p, alpha=x.shape[0] / total)
        glob = acc
        with torch.no_grad():
            for p, g in zip(model.parameters(), glob):
                p.copy_(g)
        accs.append(evaluate(model, test))
        times.append(time.perf_counter() - t0)
    return {"times": times, "accuracy": accs}


def child_vmapfloor(n: int, rounds: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(1)
    task, part = workload(n)
    torch.manual_seed(SEED)
    model = task.build_model()
    shards = [task.load_data(i, n, SEED, part).train for i in range(n)]
    test = task.load_test(SEED)
    X, Y = torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards])
    sizes = torch.tensor([x.shape[0] for x, _ in shards])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    steps = int(math.ceil(int(sizes.max()) / BS))
    w = (sizes / sizes.sum()).float()

    def loss(p, x, y, m):
        per = F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (per * m).sum() / m.sum().clamp(min=1)

    step = vmap(grad(loss))
    glob = {k: v.detach().clone() for k, v in model.named_parameters()}
    times, accs = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        idx = torch.full((n, steps * BS), -1, dtype=torch.long)
        for i in range(n):
            k = int(sizes[i])
            idx[i, :k] = torch.randperm(k, generator=torch.Generator().manual_seed(r * 100003 + i)) + offsets[i]
        idx = idx.view(n, steps, BS)
        params = {k: v.unsqueeze(0).repeat(n, *[1] * v.dim()) for k, v in glob.items()}
        for t in range(steps):
            i = idx[:, t]
            m = (i >= 0).float()
            i = i.clamp(min=0)
            g = step(params, X[i], Y[i], m)
            params = {k: params[k] - LR * g[k] for k in params}
        glob = {k: torch.einsum("c,c...->...", w, v) for k, v in params.items()}
        with torch.no_grad():
            accs.append(float((functional_call(model, glob, (test[0],)).argmax(1) == test[1]).float().mean()))
        times.append(time.perf_counter() - t0)
    return {"times": times, "accuracy": accs}


def child_flower(n: int, rounds: int) -> dict:
    import logging

    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        task, part = workload(n)
        pid = int(context.node_config["partition-id"])
        x, y = task.load_data(pid, n, SEED, part).train
        model = task.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        local_sgd(model, x, y, int(msg.content["config"]["server-round"]) * 100003 + pid)
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "metrics": MetricRecord({"num-examples": int(x.shape[0])})})
        return Message(content=reply, reply_to=msg)

    stamps, accs = [], []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        task, _ = workload(n)
        torch.manual_seed(SEED)
        model = task.build_model()
        test = task.load_test(SEED)

        def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            acc = evaluate(model, test)
            stamps.append(time.perf_counter())
            accs.append(acc)
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                       evaluate_fn=central)

    run_simulation(server_app, client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return {"times": [b - a for a, b in zip(stamps, stamps[1:])], "accuracy": accs[1:]}


# ---- the parent: run each contender in a child, sample its process tree's memory ---------------------------------------
def tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(argv: list[str], timeout: float) -> dict:
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        ps = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], tree_rss(ps))
            except psutil.Error:
                break
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        out, err = child.communicate()
    finally:
        done.set()
        th.join()
        try:
            os.killpg(child.pid, 9)  # Ray leaves daemons in the child's session: end them all
        except ProcessLookupError:
            pass
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(argv[1:6])}...): {err.strip().splitlines()[-3:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak[0] / 2**20, "e2e": wall}


def run_fedopt(n: int, rounds: int, backend: str, workers: int | None, timeout: float) -> dict:
    out = tempfile.mkdtemp(prefix="fedopt-bench-")
    argv = [sys.executable, "-m", "fedopt", "simulate", "--task", "digits", "--clients", str(n), "--rounds",
            str(rounds), "--local-epochs", "1", "--batch-size", str(BS), "--lr", str(LR), "--partition", "dirichlet",
            "--alpha", str(ALPHA), "--seed", str(SEED), "--backend", backend, "--progress", "off", "--no-plot", "--out", out,
            "--device", "cpu"]
    if workers:
        argv += ["--workers", str(workers)]
    return _measure_cli(argv, out, timeout)


def _measure_cli(argv: list[str], out: str, timeout: float) -> dict:
    # the CLI prints a summary, not JSON: wrap it so the child's last line is the metrics as JSON
    code = ("import json,sys;from fedopt.cli import main;rc=main(sys.argv[1:]);"
            "from fedopt.metrics import read_metrics;m=read_metrics(sys.argv[sys.argv.index('--out')+1]+"
            "'/metrics.jsonl');print(json.dumps({'times':[r['seconds'] for r in m],"
            "'accuracy':[r['accuracy'] for r in m]}));sys.exit(rc)")
    return measure([sys.executable, "-c", code] + argv[3:], timeout)


def median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def accuracy_over_seeds(k: int, rounds: int = 20) -> None:
    """Final accuracy after ``rounds`` rounds, fedopt and Flower, per seed: one seed's figure is noisy this early in
    training (about one SGD step per client per round at N = 100), so the comparison is of means over seeds."""
    me = [sys.executable, os.path.abspath(__file__), "--child"]
    acc: dict[tuple[str, int], list[float]] = {}
    for seed in range(k):
        os.environ["FEDOPT_BENCH_SEED"] = str(seed)
        global SEED
        SEED = seed
        for n in (10, 100):
            for name, go in (("flower", lambda: measure(me + ["flower", "--n", str(n), "--rounds", str(rounds)], 1800)),
                             ("fedopt", lambda: run_fedopt(n, rounds, "sequential", None, 900))):
                a = go()["accuracy"][-1]
                acc.setdefault((name, n), []).append(a)
                print(f"seed {seed} N={n:<4} {name:<7} final accuracy {a:.4f}", file=sys.stderr, flush=True)
    out = {}
    for n in (10, 100):
        f, o = statistics.mean(acc[("flower", n)]), statistics.mean(acc[("fedopt", n)])
        print(f"N={n:<4} mean over {k} seeds: Flower {f:.4f}, fedopt {o:.4f}, difference {100 * (o - f):+.2f} points")
        out[f"accuracy_gap_points_{n}"] = round(100 * (o - f), 2)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {10, 100}, 5 rounds: a smoke run of a few minutes")
    ap.add_argument("--child", choices=("loop", "vmapfloor", "flower"))
    ap.add_argument("--n", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--accuracy-seeds", type=int, default=0, metavar="K",
                    help="only compare final accuracy, fedopt vs Flower, at N = 10 and 100 over seeds 0..K-1")
    a = ap.parse_args()
    if a.child:
        fn = {"loop": child_loop, "vmapfloor": child_vmapfloor, "flower": child_flower}[a.child]
        print(json.dumps(fn(a.n, a.rounds)), flush=True)
        return
    if a.accuracy_seeds:
        return accuracy_over_seeds(a.accuracy_seeds)
    sizes = [10, 100] if a.quick else [10, 100, 1000]
    rounds = 5 if a.quick else 20
    flower_rounds = {10: rounds, 100: rounds, 1000: 3}
    me = [sys.executable, os.path.abspath(__file__), "--child"]
    rows, res = [], {}
    for n in sizes:
        runs = {
            "flower": lambda: measure(me + ["flower", "--n", str(n), "--rounds", str(flower_rounds[n])], 1800),
            "loop": lambda: measure(me + ["loop", "--n", str(n), "--rounds", str(rounds)], 900),
            "vmapfloor": lambda: measure(me + ["vmapfloor", "--n", str(n), "--rounds", str(rounds)], 900),
            "fedopt": lambda: run_fedopt(n, rounds, "sequential", None, 900),
            "fedopt-vmap": lambda: run_fedopt(n, rounds, "vmap", None, 900),
            "fedopt-pool2": lambda: run_fedopt(n, rounds, "sequential", 2, 900),
        }
        for name, go in runs.items():
            r = go()
            res[(name, n)] = r
            med = median_after_first(r["times"])
            rows.append((name, n, len(r["times"]), med, r["accuracy"][-1], r["peak_mb"], r["e2e"]))
            print(f"{name:<13} N={n:<5} rounds {len(r['times']):>3}  per-round median {med:8.4f} s  "
                  f"final acc {r['accuracy'][-1]:.4f}  peak {r['peak_mb']:7.1f} MB  e2e {r['e2e']:7.2f} s",
                  file=sys.stderr, flush=True)
    print(f"\n{'contender':<13} {'N':>5} {'rounds':>6} {'s/round':>9} {'accuracy':>9} {'peak MB':>8} {'e2e s':>7}")
    for name, n, k, med, acc, mb, e2e in rows:
        print(f"{name:<13} {n:>5} {k:>6} {med:>9.4f} {acc:>9.4f} {mb:>8.1f} {e2e:>7.2f}")
    big = sizes[-1]
    m = lambda name, n: median_after_first(res[(name, n)]["times"])  # noqa: E731
    fl_acc = res[("flower", 100)]["accuracy"][-1]
    print(f"\naccuracy at N=100 after {rounds} rounds: fedopt {res[('fedopt', 100)]['accuracy'][-1]:.4f}, "
          f"fedopt vmap {res[('fedopt-vmap', 100)]['accuracy'][-1]:.4f}, Flower {fl_acc:.4f}")
    out = {
        "ratio_to_loop_100": m("fedopt", 100) / m("loop", 100),
        "ratio_to_loop_1000": m("fedopt", big) / m("loop", big),
        "ratio_to_vmap_floor_1000": m("fedopt-vmap", big) / m("vmapfloor", big),
        "speedup_vs_flower_100": m("flower", 100) / m("fedopt", 100),
        "speedup_vs_flower_1000": m("flower", big) / m("fedopt", big),
        "vmap_speedup_vs_flower_1000": m("flower", big) / m("fedopt-vmap", big),
        "memory_ratio_vs_flower": res[("fedopt", big)]["peak_mb"] / res[("flower", big)]["peak_mb"],
        "e2e_speedup_vs_flower_100": res[("flower", 100)]["e2e"] / res[("fedopt", 100)]["e2e"],
    }
    if a.quick:
        print(f"(quick run: the *_1000 keys were measured at N={big})")
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))


if __name__ == "__main__":
    main()
