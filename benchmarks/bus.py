"""The bus side by side with raw pyzmq: one-way throughput, coordinator ingest, and coordinator memory while streaming.

(a) one-way transfer of a 40 MB and a 400 MB update, fedopt's Endpoint (wire encode + decode, zero-copy) vs a raw
    pyzmq DEALER -> ROUTER send of the same bytes (copy=False); ratio = raw time / bus time (>= 0.8 wanted).
(b) a real ``fedopt coordinator`` with 8 real ``fedopt client`` processes and a 10M-parameter (40 MB) model whose
    local training is a no-op: round time vs the floor = raw pyzmq moving the same bytes (8 x 40 MB down, 8 x 40 MB
    up) + a numpy sum of the 8 updates; ratio = round time / floor (<= 1.5 wanted).
(c) the coordinator's peak RSS during rounds 2.. minus its RSS after round 1, in units of one update (< 3 wanted).

Run: ``python benchmarks/bus.py``. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import zmq
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedopt import bus, wire  # noqa: E402
from fedopt.keys import generate_keys  # noqa: E402
from fedopt.launch import fedopt_command, free_port, one_thread_env, spawn, stop_processes  # noqa: E402
from fedopt.task import BaseTask, ClientData  # noqa: E402

MB = 1_000_000


class BigTask(BaseTask):
    """A 10M-parameter model whose training moves every weight a little and costs nothing (isolates the bus)."""

    name = "bus-bench"

    def __init__(self, params: int = 10_000_000) -> None:
        self.params = params

    def build_model(self) -> nn.Module:
        m = nn.Module()
        m.w = nn.Parameter(torch.zeros(self.params))
        return m

    def load_data(self, shard, num_shards, seed, partition=None) -> ClientData:
        return ClientData((torch.zeros(10, 1), torch.zeros(10, dtype=torch.long)))

    def train(self, model, data, config) -> dict:
        with torch.no_grad():
            model.w.add_(0.001)
        return {"loss": 0.0, "steps": 1, "samples": 10, "partial": False}

    def evaluate(self, model, data) -> dict:
        return {"accuracy": 0.0, "loss": 0.0}


def pair(ctx, url):
    r = ctx.socket(zmq.ROUTER)
    d = ctx.socket(zmq.DEALER)
    for s in (r, d):
        s.setsockopt(zmq.LINGER, 0)
    r.bind(url)
    d.connect(url)
    return r, d


def one_way(nbytes: int, repeats: int) -> tuple[float, float]:
    """Median seconds for one message of ``nbytes``: (raw pyzmq, fedopt bus), interleaved so load hits both."""
    ctx = zmq.Context()
    url = f"tcp://127.0.0.1:{free_port()}"
    r, d = pair(ctx, url)
    d.send(b"hi")
    r.recv_multipart()
    vec = torch.rand(nbytes // 4)
    raw_buf = vec.numpy().copy()
    src, dst = bus.Endpoint(d), bus.Endpoint(r)
    raw_t, bus_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d.send_multipart([b"h", raw_buf], copy=False)
        frames = r.recv_multipart(copy=False)
        np.frombuffer(frames[2].buffer, dtype=np.float32)
        raw_t.append(time.perf_counter() - t0)
        del frames
        t0 = time.perf_counter()
        src.send(wire.UpdateMsg(round=1, num_samples=1, delta=vec))
        got = dst.recv(30)
        assert got is not None and got[1].delta.numel() == vec.numel()
        bus_t.append(time.perf_counter() - t0)
        del got
    r.close(0), d.close(0)
    ctx.term()
    return statistics.median(raw_t), statistics.median(bus_t)


def floor_round(clients: int, nbytes: int, repeats: int) -> float:
    """Raw pyzmq: the model down to each client and each update back, plus a numpy sum; median seconds."""
    ctx = zmq.Context()
    url = f"tcp://127.0.0.1:{free_port()}"
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.bind(url)
    ds = []
    for i in range(clients):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(url)
        d.send(b"hi")
        ds.append(d)
    ids = [r.recv_multipart()[0] for _ in ds]
    model = np.random.rand(nbytes // 4).astype(np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in ids:
            r.send_multipart([i, model], copy=False)
        got = [d.recv(copy=False) for d in ds]
        for d, g in zip(ds, got):
            d.send(g, copy=False)
        total = np.zeros_like(model)
        for _ in ds:
            f = r.recv_multipart(copy=False)[1]
            total += np.frombuffer(f.buffer, dtype=np.float32)
        times.append(time.perf_counter() - t0)
    for s in (r, *ds):
        s.close(0)
    ctx.term()
    return statistics.median(times)


def coordinator_round(clients: int, rounds: int, secagg: bool = False, curve: bool = False) -> tuple[float, float]:
    """Median round seconds (rounds 2..) and RSS growth in updates of a real coordinator with real clients.

    ``secagg``: the same with ``--aggregator secagg`` (masked inputs are uploaded on credit too); ``curve``: over
    CurveZMQ instead of plain tcp."""
    from coordinator.local import spawn_client

    with tempfile.TemporaryDirectory(prefix="fedopt-busbench-") as tmp:
        url = f"tcp://127.0.0.1:{free_port()}"  # the same transport as the floor
        out = Path(tmp) / "out"
        env = one_thread_env(PYTHONPATH=f"{ROOT / 'benchmarks'}{os.pathsep}{ROOT}")
        keys = str(generate_keys(Path(tmp) / "keys", clients)) if secagg or curve else None
        security = ["--keys", keys] if curve else ["--insecure"]
        extra = ["--aggregator", "secagg", "--deadline", "120", "--identities", keys] if secagg else []
        cmd = fedopt_command("coordinator", "--bind", url, "--task", "bus:BigTask", "--clients", str(clients),
                             "--rounds", str(rounds), "--out", str(out), "--progress", "off", "--heartbeat", "5",
                             "--log-level", "WARNING", "--partition", "iid", *security, *extra)
        coord = spawn(cmd, env=env)
        client_args = ["--log-level", "WARNING", *([] if curve else ["--insecure"]),
                       *(["--identities", keys] if secagg else [])]
        procs = [spawn_client(url, i, clients, keys if curve else None, client_args, env=env) for i in range(clients)]
        ps = psutil.Process(coord.pid)
        base = peak = None
        try:
            end = time.monotonic() + 600
            while coord.poll() is None and time.monotonic() < end:
                try:
                    rss = ps.memory_info().rss
                except psutil.Error:
                    break
                done = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
                if done >= 1 and base is None:
                    base = rss
                elif base is not None and done < rounds:
                    peak = max(peak or rss, rss)
                time.sleep(0.002)
        finally:
            stop_processes([coord, *procs])
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = statistics.median(r["seconds"] for r in rows[1:])
    return secs, (peak - base) / (BigTask().params * 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", action="store_true",
                    help="only: coordinator RSS growth (in updates) with 4 and 8 clients over plain tcp, CurveZMQ, "
                         "and secagg over CurveZMQ; bounded means it does not grow with the number of clients")
    a = ap.parse_args()
    results = {}
    rows = []
    if a.memory:
        for name, kw in (("tcp", {}), ("curve", {"curve": True}), ("secagg_curve", {"curve": True, "secagg": True})):
            for n in (4, 8):
                secs, growth = coordinator_round(n, 6, **kw)
                results[f"rss_growth_updates_{name}_{n}"] = growth
                rows.append((f"{name}, {n} clients", f"{secs:.2f} s/round", f"{growth:.2f} updates"))
        for r in rows:
            print(f"{r[0]:<30}{r[1]:>20}{r[2]:>22}")
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))
        return
    for size, reps in ((40, 7), (400, 3)):
        raw, via = one_way(size * MB, reps)
        results[f"throughput_ratio_{size}mb"] = raw / via
        rows.append((f"one-way {size} MB", f"raw {size / raw:7.0f} MB/s", f"bus {size / via:7.0f} MB/s",
                     f"{raw / via:.2f}"))
    # 8 client processes and the coordinator share this machine's cores, so single rounds swing with scheduling:
    # medians over 11 rounds (the first, which includes registration, is left out) and 7 floor repeats
    floor = floor_round(8, 40 * MB, 7)
    secs, growth = coordinator_round(8, 12)
    results["ingest_ratio"] = secs / floor
    results["rss_growth_updates"] = growth
    rows.append(("8 x 40 MB round", f"floor {floor:7.3f} s", f"bus {secs:7.3f} s", f"{secs / floor:.2f}"))
    rows.append(("coordinator peak RSS growth", "", f"{growth:.2f} updates", ""))
    print(f"{'measurement':<30}{'reference':>20}{'fedopt':>22}{'ratio':>8}")
    for r in rows:
        print(f"{r[0]:<30}{r[1]:>20}{r[2]:>22}{r[3]:>8}")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
