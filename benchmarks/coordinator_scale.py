"""How many clients one coordinator holds, and what each costs: a load generator against a real coordinator.

(a) Capacity. A real ``fedopt coordinator`` process (digits model, ``--insecure`` TCP on 127.0.0.1) and N lightweight
    clients: DEALER sockets spread over --procs generator processes, each speaking the real protocol (HELLO, READY,
    heartbeats that count the models read, OFFER on TRAIN, UPDATE with a precomputed delta on PULL), for N in --sizes.
    All N are selected each round up to --sample (then a seeded sample of that many). Per N: the median round seconds
    (metrics.jsonl), the coordinator's CPU seconds per round (its process times, sampled as each round's line lands),
    and its RSS per connected client: (RSS once all N are ready - RSS before the first client) / N.
    With --edges E, the same N clients join E ``fedopt aggregator`` processes and the root sees E clients, each
    standing for its leaf clients (READY's ``clients``). The root samples --sample leaf clients a round, as the flat
    coordinator does, and tells each edge its quota (fedopt.engine.tiers); each edge asks only its sampled clients.
    Reported at N = 1,000 and 10,000: the root's round seconds and CPU per round, the edges' CPU per round (all of
    them together), and the RSS per client of root and edges together. The edges share this machine's cores with
    the root and the generators.
(b) Distributed simulation: ``fedopt simulate --nproc 2`` against one process on a compute-bound round (1,000 clients
    a round, a 105k-parameter MLP): the median round-time ratio, and the largest absolute difference of the final
    models with fedavg, mean, median and secagg on a small run.

Run: ``python benchmarks/coordinator_scale.py``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedopt.launch import fedopt_command, free_port, spawn, stop_processes  # noqa: E402
from fedopt.metrics import read_metrics  # noqa: E402

HEARTBEAT = 5.0  # seconds: the coordinator's (and so the generator's) heartbeat at this scale


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def swarm(url: str, ids: list[int], samples: int, size: int, ready, stop) -> None:
    """One generator process: a DEALER per client id until the coordinator says BYE.

    Woken by epoll on each socket's ZMQ_FD, not by ``zmq.Poller``: a zmq_poll over 2,500 sockets costs milliseconds
    however few have a message, and every upload hop of a round (the coordinator's PULL, this side's UPDATE, a few
    upload slots at a time) waits for one such wake-up. That cost belongs to the generator (real clients have a socket
    each), so it must not set the round time. ZMQ_FD is edge-triggered: a socket is drained while its ZMQ_EVENTS say
    POLLIN, and checked again after anything sent on it (a send can consume the FD's signal)."""
    import selectors

    import torch
    import zmq

    from fedopt import wire

    _raise_fd_limit()
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, len(ids) + 64)
    delta = torch.full((size,), 1e-3)
    metrics = {"loss": 1.0, "steps": 1, "samples": samples}
    socks, read, sel = {}, {}, selectors.DefaultSelector()
    for i in ids:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(url)
        s.send_multipart(wire.encode(wire.Hello(client=str(i), sender=str(i))))
        socks[s] = str(i)
        read[s] = 0
        sel.register(s.getsockopt(zmq.FD), selectors.EVENT_READ, s)
    beat, done, readied = time.monotonic(), 0, 0
    check = set(socks)  # sockets whose ZMQ_EVENTS must be read before waiting on their FDs
    while done < len(ids) and not stop.is_set():
        for key, _ in sel.select(0 if check else 0.1):
            check.add(key.data)
        for s in list(check):
            check.discard(s)
            while s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                msg = wire.decode(s.recv_multipart(zmq.NOBLOCK, copy=False))
                me = socks[s]
                if isinstance(msg, wire.Welcome):
                    s.send_multipart(wire.encode(wire.Ready(num_samples=samples, sender=me)))
                    readied += 1
                    if readied == len(ids):
                        ready.release()
                elif isinstance(msg, wire.Train):
                    read[s] += 1
                    s.send_multipart(wire.encode(wire.Offer(round=msg.round, num_samples=samples, sender=me)))
                elif isinstance(msg, wire.Pull):
                    s.send_multipart(wire.encode(wire.UpdateMsg(round=msg.round, num_samples=samples,
                                                                metrics=metrics, delta=delta, sender=me)))
                elif isinstance(msg, wire.Evaluate):
                    read[s] += 1
                elif isinstance(msg, wire.Bye):
                    done += 1
        if time.monotonic() - beat >= HEARTBEAT / 2:
            beat = time.monotonic()
            for s, me in socks.items():
                s.send_multipart(wire.encode(wire.Heartbeat(round=read[s], sender=me)))
            check.update(socks)  # the sends may have consumed their FDs' signals
    sel.close()
    for s in socks:
        s.close(0)
    ctx.term()


def capacity(n: int, sample: int, procs: int, rounds: int, tmp: Path, edges: int = 0) -> dict:
    """One coordinator and ``n`` generated clients for ``rounds`` rounds; the figures of (a). With ``edges`` > 0 the
    clients join that many ``fedopt aggregator`` processes (client i the edge i % edges), and the root sees the edges
    only; it samples ``sample`` leaf clients a round through them."""
    name = f"n{n}-e{edges}"
    url, out = f"tcp://127.0.0.1:{free_port()}", tmp / name
    per_round = min(n, sample)  # leaf clients a round, with or without edges
    coord = spawn(fedopt_command("coordinator", "--bind", url, "--insecure", "--task", "digits", "--clients", str(n),
                                 "--clients-per-round", str(per_round), "--min-clients", str(edges or per_round),
                                 "--rounds", str(rounds), "--heartbeat", str(HEARTBEAT), "--deadline", "600",
                                 "--join-timeout", "5" if edges else "600", "--out", str(out), "--progress", "off",
                                 "--no-plot", "--max-clients", str(n + 16)), tmp / f"{name}-coordinator.log")
    tier, urls = [], [url]
    if edges:
        urls = [f"tcp://127.0.0.1:{free_port()}" for _ in range(edges)]
        tier = [spawn(fedopt_command("aggregator", "--bind", u, "--upstream", url, "--id", f"edge-{i}", "--clients",
                                     str(len(range(i, n, edges))), "--insecure",
                                     "--deadline", "600", "--join-timeout", "600", "--max-clients", str(n + 16)),
                      tmp / f"{name}-edge-{i}.log") for i, u in enumerate(urls)]
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Semaphore(0), ctx.Event()
    gens = []
    try:
        proc = psutil.Process(coord.pid)
        log = tmp / f"{name}-coordinator.log"
        end = time.monotonic() + 120
        while "listening on" not in (log.read_text() if log.exists() else "") and time.monotonic() < end:
            time.sleep(0.1)
        procs_tier = [psutil.Process(e.pid) for e in tier]
        rss0 = proc.memory_info().rss + sum(p.memory_info().rss for p in procs_tier)
        from fedopt.task import resolve_task

        size = sum(p.numel() for p in resolve_task("digits").build_model().parameters())
        # each generator process speaks to one endpoint: the coordinator, or its share of the edges
        share = []
        for e, u in enumerate(urls):
            ids, gens_here = list(range(e, n, len(urls))), max(1, procs // len(urls))
            share += [(u, ids[k::gens_here]) for k in range(gens_here)]
        gens = [ctx.Process(target=swarm, args=(u, ids, 100, size, ready, stop), daemon=True) for u, ids in share]
        t0 = time.monotonic()
        for g in gens:
            g.start()
        for _ in gens:
            if not ready.acquire(timeout=900):
                raise RuntimeError(f"N={n}: the clients did not all get ready in 900 s")
        connect_s = time.monotonic() - t0
        rss_root = proc.memory_info().rss
        rss_ready = rss_root + sum(p.memory_info().rss for p in procs_tier)
        cpu, cpu_tier, seen = [], [], 0
        c0 = sum(proc.cpu_times()[:2])
        e0 = sum(sum(p.cpu_times()[:2]) for p in procs_tier)
        end = time.monotonic() + 1800
        while coord.poll() is None and time.monotonic() < end:
            rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
            if len(rows) > seen:
                c1 = sum(proc.cpu_times()[:2])
                e1 = sum(sum(p.cpu_times()[:2]) for p in procs_tier)
                cpu.append((c1 - c0) / (len(rows) - seen))
                cpu_tier.append((e1 - e0) / (len(rows) - seen))
                c0, e0, seen = c1, e1, len(rows)
            time.sleep(0.05)
        if coord.returncode != 0:
            raise RuntimeError(f"N={n}: the coordinator failed: {log.read_text()[-800:]}")
        rows = read_metrics(out / "metrics.jsonl")
        return {"n": n, "edges": edges, "per_round": per_round, "rounds": len(rows), "connect_s": connect_s,
                "round_s": statistics.median(r["seconds"] for r in rows),
                "cpu_s_per_round": statistics.median(cpu[1:] or cpu),  # the first includes the wait for clients
                "edges_cpu_s_per_round": statistics.median(cpu_tier[1:] or cpu_tier) if tier else None,
                "round_s_all": [round(r["seconds"], 3) for r in rows],
                # root and edges together (the root alone holds E connections behind edges)
                "rss_kb_per_client": (rss_ready - rss0) / n / 1024, "rss_mb": rss_ready / 2**20,
                "root_rss_mb": rss_root / 2**20}
    finally:
        stop.set()
        for g in gens:
            g.join(timeout=10)
            if g.is_alive():
                g.kill()
        stop_processes([coord, *tier])


def _simulate(tmp: Path, name: str, options: list[str], timeout: float) -> Path:
    """``fedopt simulate OPTIONS`` in a process, its output in ``tmp/name``; RuntimeError with its log if it fails."""
    out, log = tmp / name, tmp / f"{name}.log"
    run = spawn(fedopt_command("simulate", *options, "--out", str(out), "--progress", "off", "--no-plot"), log)
    if run.wait(timeout=timeout) != 0:
        raise RuntimeError(f"simulate {' '.join(options)} failed: {log.read_text()[-800:]}")
    return out


def distributed_sim(tmp: Path, repeats: int) -> tuple[float, float]:
    """(median round-time ratio --nproc 2 / one process on a compute-bound round, the largest model difference)."""
    from safetensors.torch import load_file

    big = ["--task-option", "hidden=1400", "--task-option", "replicate=10", "--clients", "1000",
           "--clients-per-round", "1000", "--rounds", "3", "--partition", "iid", "--seed", "1"]
    ratios = []
    for rep in range(repeats):  # side by side, alternating, so both see the same machine
        times = {}
        for nproc in (1, 2):
            out = _simulate(tmp, f"big-{nproc}-{rep}", [*big, "--nproc", str(nproc)], 1800)
            times[nproc] = statistics.median(r["seconds"] for r in read_metrics(out / "metrics.jsonl")[1:])
        ratios.append(times[2] / times[1])
        print(f"distributed simulation, repeat {rep}: one process {times[1]:.2f} s a round, 2 ranks {times[2]:.2f} s")
    worst = 0.0
    for agg in ("fedavg", "mean", "median", "secagg"):
        small = ["--clients", "12", "--clients-per-round", "9", "--rounds", "3", "--seed", "5", "--aggregator", agg]
        models = []
        for nproc in (1, 2):
            out = _simulate(tmp, f"eq-{agg}-{nproc}", [*small, "--nproc", str(nproc)], 600)
            models.append(load_file(out / "model.safetensors"))
        diff = max(float((models[0][k] - models[1][k]).abs().max()) for k in models[0])
        print(f"distributed simulation, {agg}: max |2 ranks - 1 process| = {diff:.3g}")
        worst = max(worst, diff)
    return statistics.median(ratios), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--sample", type=int, default=1000, help="clients selected per round at most")
    ap.add_argument("--procs", type=int, default=4, help="load generator processes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--edges", type=int, default=4, help="edge aggregators of the hierarchical runs (0: none)")
    ap.add_argument("--edge-sizes", default="1000,10000", help="N of the hierarchical runs")
    ap.add_argument("--sim-repeats", type=int, default=3)
    ap.add_argument("--no-sim", action="store_true")
    args = ap.parse_args()
    _raise_fd_limit()  # the coordinator inherits it: one descriptor per connection
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedopt-scale-") as d:
        for n in (int(x) for x in args.sizes.split(",") if x):
            rows.append(capacity(n, args.sample, args.procs, args.rounds, Path(d)))
            r = rows[-1]
            print(f"N={n}: {r['rounds']} rounds of {r['per_round']}, round {r['round_s']:.3f} s, coordinator "
                  f"{r['cpu_s_per_round']:.3f} CPU s a round, {r['rss_kb_per_client']:.1f} KB per client "
                  f"(RSS {r['rss_mb']:.0f} MB), all ready in {r['connect_s']:.1f} s", flush=True)
        hier = {}
        for n in map(int, args.edge_sizes.split(",")) if args.edges else ():
            r = capacity(n, args.sample, args.procs, args.rounds, Path(d), edges=args.edges)
            hier[n] = r
            print(f"N={n} behind {args.edges} edges: {r['rounds']} rounds of a {r['per_round']}-client sample, root "
                  f"round {r['round_s']:.3f} s (each: {r['round_s_all']}), root {r['cpu_s_per_round']:.3f} CPU s a "
                  f"round, edges {r['edges_cpu_s_per_round']:.3f} CPU s a round together, {r['rss_kb_per_client']:.1f} "
                  f"KB per client (root and edges, RSS {r['rss_mb']:.0f} MB; root {r['root_rss_mb']:.0f} MB), all "
                  f"ready in {r['connect_s']:.1f} s", flush=True)
        ratio = diff = None
        if not args.no_sim:
            ratio, diff = distributed_sim(Path(d), args.sim_repeats)
    print(f"\n{'N':>6s} {'per round':>9s} {'round s':>8s} {'CPU s/round':>11s} {'KB/client':>9s} {'RSS MB':>7s}")
    for r in rows:
        print(f"{r['n']:6d} {r['per_round']:9d} {r['round_s']:8.3f} {r['cpu_s_per_round']:11.3f} "
              f"{r['rss_kb_per_client']:9.1f} {r['rss_mb']:7.0f}")
    by_n = {r["n"]: r for r in rows}
    print(json.dumps({"clients_max": max((r["n"] for r in rows if r["rounds"] == args.rounds), default=None),
                      "rss_kb_per_client": round(by_n[max(by_n)]["rss_kb_per_client"], 2) if by_n else None,
                      "round_s_10000": by_n.get(10000, {}).get("round_s"), "round_s_1000": by_n.get(1000, {}).get("round_s"),
                      "hier_round_ratio_10000_vs_1000": round(hier[10000]["round_s"] / hier[1000]["round_s"], 3)
                      if {1000, 10000} <= hier.keys() else None,
                      **{f"hier_{k}_{n}": r[k] and round(r[k], 3) for n, r in hier.items()
                         for k in ("round_s", "cpu_s_per_round", "edges_cpu_s_per_round", "rss_kb_per_client")},
                      "dist_sim_time_ratio_2proc": ratio and round(ratio, 3), "dist_sim_max_abs_diff": diff}))


if __name__ == "__main__":
    main()
