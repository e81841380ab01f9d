"""Start-up with and without the per-machine data cache (fedopt.data.cache), side by side in one run.

Runs ``fedopt simulate --transport ipc --processes N`` and ``fedopt simulate --mode gossip --peers N`` twice each:
with ``FEDOPT_CACHE=off`` (every process loads and partitions the data itself) and with a warm cache (a first run
fills it). Start-up is the wall time minus the rounds' own time (the sum of ``seconds`` in metrics.jsonl; for gossip,
the slowest peer's). Prints a table, then one JSON line of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _round_seconds(out: Path) -> float:
    files = [out / "metrics.jsonl"] if (out / "metrics.jsonl").exists() else sorted(out.rglob("metrics.jsonl"))
    per_file = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        per_file.append(sum(r.get("seconds", 0.0) for r in rows))
    return max(per_file) if per_file else 0.0


def run_once(args: list[str], out: Path, env: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedopt", "simulate", *args, "--out", str(out), "--progress", "off",
                    "--no-plot"], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall - _round_seconds(out), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--task-option", default="replicate=1", help="digits option, e.g. replicate=20 for more data")
    a = p.parse_args()
    n = a.processes
    modes = {
        "ipc": ["--transport", "ipc", "--processes", str(n), "--clients", str(n)],
        "gossip": ["--mode", "gossip", "--peers", str(n), "--clients", str(n)],
    }
    common = ["--rounds", str(a.rounds), "--local-epochs", "1", "--task-option", a.task_option]
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedopt-cache-bench-") as tmp:
        base = {**os.environ, "FEDOPT_CACHE_DIR": f"{tmp}/cache"}
        for mode, flags in modes.items():
            off = run_once(flags + common, Path(tmp) / f"{mode}-off", {**base, "FEDOPT_CACHE": "off"})
            run_once(flags + common, Path(tmp) / f"{mode}-fill", base)  # fills the cache
            on = run_once(flags + common, Path(tmp) / f"{mode}-on", base)
            results[mode] = (off, on)
    print(f"{'mode':<8} {'start-up off':>13} {'start-up on':>12} {'total off':>10} {'total on':>9}")
    for mode, ((s0, w0), (s1, w1)) in results.items():
        print(f"{mode:<8} {s0:>12.2f}s {s1:>11.2f}s {w0:>9.2f}s {w1:>8.2f}s")
    print(json.dumps({f"{m}_startup_ratio": round(r[0][0] / r[1][0], 3) for m, r in results.items()}
                     | {f"{m}_total_ratio": round(r[0][1] / r[1][1], 3) for m, r in results.items()}))


if __name__ == "__main__":
    main()
