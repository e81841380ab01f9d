"""Datacenter mode, side by side: ``fedopt allreduce`` against a plain hand-written torch DDP script.

1. Overhead: ``fedopt allreduce --nproc 2`` and ``benchmarks/plain_ddp.py`` under torchrun train the same model (the
   digits MLP, widened), on the same data and sampler, with the same per-worker batch and steps per epoch. Each run
   reports its training seconds per epoch; the step time of a run is its fastest epoch after the first (warm-up),
   and ``step_time_ratio`` = median over repeats of fedopt / median over repeats of plain. Runs alternate between
   the two so machine noise hits both alike.
2. Scaling: ``fedopt allreduce`` with 1 and with 2 processes on a compute-heavier model at a fixed per-worker batch
   (weak scaling). ``scaling_efficiency_2proc`` = throughput(2) / (2 * throughput(1)) = step_time(1) / step_time(2).

Every process is pinned to one intra-op thread (OMP_NUM_THREADS=1), so N processes use N cores. On CPU the backend is
gloo over loopback; on a CUDA machine both sides pick NCCL, one GPU per process. The last line is JSON with
``step_time_ratio``, ``scaling_efficiency_2proc`` and ``baseline_retries``.

The plain DDP baseline sometimes aborts as its interpreter exits ("terminate called without an active exception",
about one launch in four on a 2-core machine) after its epochs are done. A baseline launch that fails is run again, up
to ``BASELINE_ATTEMPTS`` times, and its measurement discarded; the retries are counted in the table and the JSON line.
fedopt's own runs are never retried: one that fails fails the benchmark.

    python benchmarks/allreduce.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import emit, table  # noqa: E402
from fedopt.launch import free_port, loopback_interface, one_thread_env  # noqa: E402


def _env() -> dict:
    env = one_thread_env(PYTHONPATH=str(ROOT))
    if "GLOO_SOCKET_IFNAME" not in env:
        lo = loopback_interface()
        if lo:
            env["GLOO_SOCKET_IFNAME"] = lo
    return env


#: launches of the plain DDP baseline per measurement before the benchmark gives up
BASELINE_ATTEMPTS = 3
#: baseline launches that failed and were run again, over the whole benchmark
baseline_retries: list[str] = []


def _run(cmd: list[str], timeout: float) -> None:
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {p.returncode}):\n{p.stdout[-3000:]}")


def _step_time(seconds: list[float], steps: list[int]) -> float:
    """A run's step time: the fastest epoch after the first (warm-up). On a shared machine other processes only ever
    add time, so the minimum over a run's epochs is its least-disturbed estimate; repeats then take the median."""
    per = [s / max(n, 1) for s, n in zip(seconds, steps)]
    return min(per[1:] if len(per) > 1 else per)


def fedopt_step(nproc: int, hidden: int, batch: int, steps: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        _run([sys.executable, "-m", "fedopt", "allreduce", "--nproc", str(nproc), "--task", "digits",
              "--task-option", f"hidden={hidden}", "--batch-size", str(batch), "--max-steps", str(steps),
              "--epochs", str(epochs), "--lr", "0.05", "--out", out, "--progress", "off"], timeout=600)
        recs = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]
    return _step_time([r["train_seconds"] for r in recs], [r["steps"] for r in recs])


def plain_step(nproc: int, hidden: int, batch: int, steps: int, epochs: int) -> float:
    """The baseline's step time; a launch that fails is retried (``BASELINE_ATTEMPTS`` in all), each in a fresh
    folder so a failed launch's result is never read."""
    for attempt in itertools.count(1):
        with tempfile.TemporaryDirectory() as d:
            result = Path(d, "plain.json")
            try:
                _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                      "--monitor-interval", "0.2", str(ROOT / "benchmarks" / "plain_ddp.py"), "--task", "digits",
                      "--task-option", f"hidden={hidden}", "--batch-size", str(batch), "--steps", str(steps),
                      "--epochs", str(epochs), "--lr", "0.05", "--result", str(result)], timeout=600)
            except RuntimeError as e:
                if attempt == BASELINE_ATTEMPTS:
                    raise RuntimeError(f"the plain DDP baseline failed {BASELINE_ATTEMPTS} launches in a row") from e
                why = next((line for line in str(e).splitlines() if "terminate called" in line),
                           str(e).splitlines()[0])
                baseline_retries.append(why)
                print(f"plain DDP baseline launch {attempt} failed ({why.strip()}): launching it again",
                      file=sys.stderr, flush=True)
                continue
            r = json.loads(result.read_text())
        return _step_time(r["train_seconds"], r["steps"])


def main() -> None:
    p = argparse.ArgumentParser(description="fedopt allreduce vs plain DDP")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run; noisier)")
    args = p.parse_args()
    import torch

    steps, epochs = (10, 3) if args.quick else (20, 8)
    device = "cuda (nccl)" if torch.cuda.is_available() else "cpu (gloo)"
    # overhead: a mid-size MLP 64-1024-10, batch 64 per worker; scaling: 64-4096-10, batch 256 per worker
    ov = dict(hidden=1024, batch=64, steps=steps, epochs=epochs)
    sc = dict(hidden=4096, batch=256, steps=steps, epochs=epochs)
    times: dict[str, list[float]] = {"fedopt": [], "plain": [], "fedopt 1 proc": [], "fedopt 2 proc": []}
    for _ in range(args.repeats):  # interleaved
        times["fedopt"].append(fedopt_step(2, **ov))
        times["plain"].append(plain_step(2, **ov))
        times["fedopt 1 proc"].append(fedopt_step(1, **sc))
        times["fedopt 2 proc"].append(fedopt_step(2, **sc))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fedopt"] / med["plain"]
    eff = med["fedopt 1 proc"] / med["fedopt 2 proc"]
    rows = [
        ("overhead", "fedopt allreduce, 2 proc", f"MLP 64-{ov['hidden']}-10, b={ov['batch']}",
         f"{med['fedopt'] * 1e3:.2f}", ", ".join(f"{t * 1e3:.2f}" for t in times["fedopt"])),
        ("overhead", "plain DDP script, 2 proc", f"MLP 64-{ov['hidden']}-10, b={ov['batch']}",
         f"{med['plain'] * 1e3:.2f}", ", ".join(f"{t * 1e3:.2f}" for t in times["plain"])),
        ("scaling", "fedopt allreduce, 1 proc", f"MLP 64-{sc['hidden']}-10, b={sc['batch']}",
         f"{med['fedopt 1 proc'] * 1e3:.2f}", ", ".join(f"{t * 1e3:.2f}" for t in times["fedopt 1 proc"])),
        ("scaling", "fedopt allreduce, 2 proc", f"MLP 64-{sc['hidden']}-10, b={sc['batch']}",
         f"{med['fedopt 2 proc'] * 1e3:.2f}", ", ".join(f"{t * 1e3:.2f}" for t in times["fedopt 2 proc"])),
    ]
    print(f"datacenter mode on {device}, {os.cpu_count()} cores, {steps} steps x {epochs} epochs per run, "
          f"{args.repeats} interleaved repeats (a run's step time: its fastest of epochs 2..{epochs}; "
          "then the median over repeats)")
    print(table(rows, ("part", "run", "model / per-worker batch", "median step ms", "per repeat ms")))
    best = min(times["fedopt"]) / min(times["plain"])
    paired = statistics.median(f / q for f, q in zip(times["fedopt"], times["plain"]))
    print(f"step time ratio fedopt / plain DDP: {ratio:.3f} (ratio of medians; best-of-repeats {best:.3f}, "
          f"median of adjacent pairs {paired:.3f})   "
          f"1->2 process scaling efficiency: {eff:.2f} (throughput x{2 * eff:.2f})")
    print(f"load average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"plain DDP baseline launches retried after a failure: {len(baseline_retries)} "
          f"(of {args.repeats} measurements; at most {BASELINE_ATTEMPTS} launches each)")
    emit({"step_time_ratio": round(ratio, 4), "scaling_efficiency_2proc": round(eff, 4),
          "baseline_retries": len(baseline_retries)})


if __name__ == "__main__":
    main()
