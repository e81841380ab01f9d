"""The attack table: every attack class of the README's threat model, run against real processes, side by side with a
clean control of the same seed.

The attackers and their harnesses are the adversarial tests (``tests/adversarial/``): one piece of code serves both.
This script runs them with the larger settings of the figures (2,000 sybil ids, 10,000 fuzzed messages at a training
coordinator and at training gossip peers), collects what each test records (its final accuracy, the control's, and
memory growth), and prints a table and one JSON line::

    {"attacks_total": N, "attacks_held": N, "max_accuracy_drop": points, "max_rss_growth_models": models}

An attack is *held* when its test passed: the run completed every round, honest accuracy stayed within 2 points of the
control (5 over a 10,000-message fuzz), memory stayed bounded. ``max_rss_growth_models`` is the coordinator's growth
above the control's with a client that never reads its socket, in model sizes.

    python benchmarks/adversarial.py                 # everything (about 15-25 minutes on 2 cores)
    python benchmarks/adversarial.py --quick         # the CI-sized settings (about 8 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["test_coordinator_attacks.py", "test_secagg_attacks.py", "test_gossip_attacks.py", "test_fuzz_live.py"]


def run_suite(env: dict, junit: Path, retries: int) -> dict[str, str]:
    """Run the adversarial tests; returns ``test id -> passed|failed``. A test that failed is run again up to
    ``retries`` times (a crashed run on a loaded machine is retried, not counted as a broken defence) and its last
    result kept; its records from every try stay in the report file, the last ones count."""
    paths = [str(ROOT / "tests" / "adversarial" / m) for m in MODULES]
    results: dict[str, str] = {}
    todo = paths
    for attempt in range(1 + retries):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "timeout=1800", *todo]
        subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            results[name] = "failed" if failed else ("skipped" if case.find("skipped") is not None else "passed")
        failed = [n for n, r in results.items() if r == "failed"]
        if not failed:
            break
        # junit names a test "<package>.<module>::<test>"; every module lives in tests/adversarial/
        todo = [f"{ROOT / 'tests' / 'adversarial' / n.split('::')[0].split('.')[-1]}.py::{n.split('::')[1]}"
                for n in failed]
        print(f"retrying {len(todo)} failed test(s)", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized settings (100 sybil ids, 2,000 fuzzed messages)")
    ap.add_argument("--sybils", type=int, default=None, help="fake ids in the sybil attack (default 2000)")
    ap.add_argument("--fuzz", type=int, default=None, help="fuzzed messages at a running coordinator and peers "
                                                           "(default 10000)")
    ap.add_argument("--retries", type=int, default=1, help="reruns of a failed test (default 1)")
    a = ap.parse_args()
    sybils = a.sybils or (100 if a.quick else 2000)
    fuzz = a.fuzz or (2000 if a.quick else 10000)
    with tempfile.TemporaryDirectory(prefix="fedopt-attacks-") as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "FEDOPT_ATTACK_REPORT": str(report), "FEDOPT_SYBILS": str(sybils),
               "FEDOPT_FUZZ_EXAMPLES": str(fuzz), "PYTHONPATH": str(ROOT)}
        results = run_suite(env, Path(tmp) / "junit.xml", a.retries)
        rows: dict[str, dict] = {}
        if report.exists():
            for line in report.read_text().splitlines():
                row = json.loads(line)
                rows[row["attack"]] = row  # the last try of each attack counts
    attacks = [n for n, r in results.items() if r != "skipped"]
    held = [n for n in attacks if results[n] == "passed"]
    print(f"\n{'attack':58} {'accuracy':>9} {'clean':>7} {'drop':>7} {'memory':>14}")
    drops, growth = [], []
    for name, row in sorted(rows.items()):
        acc, clean = row.get("accuracy"), row.get("clean")
        drop = None if acc is None or clean is None else 100 * (clean - acc)
        if drop is not None:
            drops.append(drop)
        mem = ""
        if row.get("rss_growth_models") is not None:
            growth.append(row["rss_growth_models"])
            mem = f"{row['rss_growth_models']:+.2f} models"
        elif row.get("rss_growth_mib") is not None:
            mem = f"+{row['rss_growth_mib']:.1f} MiB"
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{name[:58]:58} {fmt(acc):>9} {fmt(clean):>7} {'-' if drop is None else f'{drop:+.2f}':>7} {mem:>14}")
    print(f"\n{len(held)} of {len(attacks)} attack tests held; failed: "
          f"{', '.join(n.split('::')[1] for n in attacks if n not in held) or 'none'}")
    print(json.dumps({"attacks_total": len(attacks), "attacks_held": len(held),
                      "max_accuracy_drop": round(max(drops), 2) if drops else None,
                      "max_rss_growth_models": round(max(growth), 2) if growth else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
