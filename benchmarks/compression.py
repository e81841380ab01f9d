"""Update compression (issue 16): upload bytes and final accuracy per method, counted by the simulator and at the
bus's sockets, and round wall-clock with a 10^7-parameter model over loopback, plain and with a slow uplink.

(a) simulator: digits (Dirichlet 0.5) with 10 clients (all per round) and 100 clients (20 per round), and the
    synthetic task (30 users, natural partition); each method runs the same rounds from the same seeds, as many as
    the setup's uncompressed run needs to level off (``ROUNDS``; ``--rounds`` sets one count for all). Upload ratio =
    uncompressed bytes_up / the method's bytes_up (metrics.jsonl, summed over the run); final accuracy = the mean of
    the evaluations in the run's last tenth of rounds (a single last round is noisy: on the synthetic task the
    uncompressed run's last-round accuracy moved 0.826-0.885 between rounds 300 and 1,000 of one seed); accuracy
    delta = the method's final accuracy minus the uncompressed run's of the same seed, in points. Medians over
    ``--repeats`` seeds. Compression delays update mass (error feedback sends it later), so a short horizon measures
    how much slower a method starts, not where it ends: on digits-100 after 100 rounds top-k 1% + q8 was 8 points
    behind a run still climbing. The summary keys take the worst setup.
(b) bus: the same digits run with 10 real client processes over tcp loopback (``simulate --transport tcp``): the
    ratio of bytes_up counted at the coordinator's socket (headers, OFFERs and heartbeats included), next to (a)'s.
(c) wall clock: a real coordinator and 8 real clients over tcp, a 10^7-parameter model whose local training adds
    seeded noise (it isolates communication and coding): the median round time (rounds 2..) uncompressed vs
    top-k 1% + 8-bit with error feedback; plainly on loopback, then with each client's uploads through a token bucket
    (``Fault.SLOW_UPLINK``, ``--uplink-mbps``). The runs alternate (uncompressed, compressed, ...) ``--wall-repeats``
    times; ratio = the median over those pairs of uncompressed round seconds / compressed round seconds.

(d) datacenter: ``fedopt allreduce --nproc 2`` on its default task (digits MLP, 10 epochs) uncompressed, with
    ``--compress powersgd:2`` (torch's PowerSGD hook; plain all-reduce for the first 10% of steps),
    ``powersgd:2:2`` (the 2-step minimum warm-up) and both again inside torch's ``fp16_compress_wrapper``
    (``+fp16``), seeds interleaved. On the 64-64-10 MLP a rank-2 step sends 478 of 4,810 elements (P and Q 404, biases
    74, which PowerSGD leaves uncompressed): 10.06x, so fp32 PowerSGD stays below 10x over any run with a warm-up. Bytes are every all-reduced tensor's, counted
    by the hook's process group (``allreduce_bytes``); ratio = uncompressed / compressed over the whole run and over
    the last epoch (after the warm-up); accuracy delta vs the same seed uncompressed. Then the same MLP with 256
    hidden units (``--task-option hidden=256``: 19,210 parameters, of which 266 biases; rank 2 sends 1,438 a step,
    13.36x), uncompressed, ``powersgd:2`` and ``powersgd:2:2``; its keys are ``powersgd_wide_*`` (the 2-step warm-up).

(e) gossip: ``fedopt simulate --mode gossip --topology ring --peers 8`` (D-PSGD, digits) dense against CHOCO-Gossip
    with ``--compress q4`` (gamma 1), seeds interleaved: bytes moved at the sockets over the run (ratio dense /
    CHOCO), final mean accuracy, the final models' consensus distance, and the peers' per-round distance to their
    neighbours (CHOCO: to its public copies) in the first and last round.

Run: ``python benchmarks/compression.py`` (about 25 minutes on 2 cores; ``--quick`` for a smoke run). Prints the
tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedopt.task import BaseTask, ClientData  # noqa: E402

METHODS = [("none", None, True), ("fp16", "fp16", True), ("q8", "q8", True), ("q4", "q4", True),
           ("topk1%+q8 EF", "topk:0.01+q8", True), ("topk1%+q8 no EF", "topk:0.01+q8", False),
           ("topk1%+q8 EF q8-down", "topk:0.01+q8 down:q8", True)]
SETUPS = {"digits-10": dict(task="digits", clients=10, partition="dirichlet", alpha=0.5),
          "digits-100": dict(task="digits", clients=100, clients_per_round=20, partition="dirichlet", alpha=0.5),
          "synthetic": dict(task="synthetic", clients=30, partition="natural")}
#: rounds of each setup's runs: where its uncompressed run levels off (digits-100's clients take one local step a
#: round and join one round in five: at 100 rounds its uncompressed run is at 0.88 and still climbing, 0.95 at 1,000)
ROUNDS = {"digits-10": 100, "digits-100": 1000, "synthetic": 300}
WIDE = 10_000_000


class WideTask(BaseTask):
    """A 10^7-parameter model whose training adds seeded noise to every weight: costs little, compresses like a
    real update (no ties), and leaves the round's time to communication and coding."""

    name = "compression-bench"

    def __init__(self, params: int = WIDE) -> None:
        self.params = params

    def build_model(self) -> nn.Module:
        m = nn.Module()
        m.w = nn.Parameter(torch.zeros(self.params))
        return m

    def load_data(self, shard, num_shards, seed, partition=None) -> ClientData:
        return ClientData((torch.zeros(10, 1), torch.zeros(10, dtype=torch.long)))

    def train(self, model, data, config) -> dict:
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            model.w.add_(torch.randn(self.params, generator=g), alpha=1e-3)
        return {"loss": 0.0, "steps": 1, "samples": 10, "partial": False}

    def evaluate(self, model, data) -> dict:
        return {"accuracy": 0.0, "loss": 0.0}


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def simulated(setup: dict, spec: str | None, ef: bool, seed: int, rounds: int) -> tuple[int, float]:
    """(bytes_up over the run, final accuracy) of one in-process simulation; ``spec`` "UP down:DOWN" also
    compresses the downlink. Final accuracy: the mean of the evaluations in the last tenth of the rounds (every
    ``rounds // 50`` rounds), so one noisy last round does not decide a comparison."""
    from clients.simulation.run import simulate
    from fedopt.config import RunConfig

    every = max(1, rounds // 50)
    with tempfile.TemporaryDirectory(prefix="fedopt-cmp-") as tmp:
        up, _, down = (spec or "").partition(" down:")  # "UP down:DOWN": --compress UP --compress-down DOWN
        cfg = RunConfig.of(rounds=rounds, local_epochs=1, seed=seed, progress="off", plot=False, out=tmp,
                           compress=up or None, compress_down=down or None, error_feedback=ef, eval_every=every,
                           **setup)
        with redirect_stdout(StringIO()):  # each run's summary
            recs = simulate(cfg).records
    last = [r["accuracy"] for r in recs if r["round"] > rounds - max(1, rounds // 10) and r.get("accuracy") is not None]
    return sum(r["bytes_up"] for r in recs), statistics.fmean(last or [recs[-1]["accuracy"]])


def _compress_flags(spec: str | None) -> list[str]:
    up, _, down = (spec or "").partition(" down:")
    return (["--compress", up] if up else []) + (["--compress-down", down] if down else [])


def over_bus(setup: dict, spec: str | None, rounds: int) -> int:
    """bytes_up counted at the coordinator's socket: ``simulate --transport tcp`` with a process per client."""
    from fedopt.launch import fedopt_command, one_thread_env

    import subprocess

    with tempfile.TemporaryDirectory(prefix="fedopt-cmpbus-") as tmp:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in setup.items()]
        cmd = fedopt_command("simulate", "--transport", "tcp", "--rounds", str(rounds),
                             "--local-epochs", "1", "--progress", "off", "--no-plot", "--out", tmp,
                             "--eval-every", str(rounds), *flags, *_compress_flags(spec))
        subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=one_thread_env())
        return sum(r["bytes_up"] for r in _records(Path(tmp)))


def wall_round(spec: str | None, rounds: int, uplink_rate: float | None) -> float:
    """Median round seconds (rounds 2..) of a real coordinator with 8 real clients and WideTask over tcp."""
    from coordinator.local import spawn_client
    from fedopt.launch import fedopt_command, free_port, one_thread_env, spawn, stop_processes
    from fedopt.testing import Fault, fault_env

    clients = 8
    with tempfile.TemporaryDirectory(prefix="fedopt-cmpwall-") as tmp:
        url, out = f"tcp://127.0.0.1:{free_port()}", Path(tmp) / "out"
        path = f"{ROOT / 'benchmarks'}:{ROOT}"
        # --upload-slots 8: every client has its own uplink, so none waits for another's credit; --heartbeat 5:
        # credit lasts 3 heartbeats, longer than a slow 40 MB upload
        cmd = fedopt_command("coordinator", "--bind", url, "--insecure", "--task", "compression:WideTask",
                             "--clients", str(clients), "--rounds", str(rounds), "--out", str(out), "--progress",
                             "off", "--heartbeat", "5", "--upload-slots", str(clients), "--deadline", "300",
                             "--log-level", "WARNING", "--partition", "iid", "--no-plot",
                             *(["--compress", spec] if spec else []))
        coord = spawn(cmd, env=one_thread_env(PYTHONPATH=path))
        env = one_thread_env(PYTHONPATH=path, **fault_env({Fault.SLOW_UPLINK: uplink_rate} if uplink_rate else {}))
        procs = [spawn_client(url, i, clients, None, ["--insecure", "--log-level", "WARNING"], env=env)
                 for i in range(clients)]
        try:
            coord.wait(timeout=900)
        finally:
            stop_processes([coord, *procs])
        return statistics.median(r["seconds"] for r in _records(out)[1:])


def datacenter(spec: str | None, seed: int, hidden: int = 64) -> tuple[int, int, float]:
    """(allreduce_bytes over the run, of the last epoch, final accuracy) of ``fedopt allreduce --nproc 2`` on the
    digits MLP with ``hidden`` units."""
    from fedopt.launch import fedopt_command, one_thread_env

    import subprocess

    with tempfile.TemporaryDirectory(prefix="fedopt-cmpdc-") as tmp:
        cmd = fedopt_command("allreduce", "--nproc", "2", "--seed", str(seed), "--out", tmp, "--progress", "off",
                             "--no-plot", "--task-option", f"hidden={hidden}", *(["--compress", spec] if spec else []))
        subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=one_thread_env(PYTHONPATH=str(ROOT)))
        recs = _records(Path(tmp))
    return sum(r["allreduce_bytes"] for r in recs), recs[-1]["allreduce_bytes"], recs[-1]["accuracy"]


def gossip(spec: str | None, seed: int, rounds: int) -> dict:
    """Bytes up over the run, final mean accuracy and consensus of an 8-peer ring (dense D-PSGD or CHOCO)."""
    from fedopt.launch import fedopt_command, one_thread_env

    import subprocess

    with tempfile.TemporaryDirectory(prefix="fedopt-cmpgossip-") as tmp:
        cmd = fedopt_command("simulate", "--mode", "gossip", "--topology", "ring", "--peers", "8", "--rounds",
                             str(rounds), "--seed", str(seed), "--out", tmp, "--progress", "off", "--no-plot",
                             *(["--compress", spec] if spec else []))
        subprocess.run(cmd, check=True, capture_output=True, timeout=900, env=one_thread_env(PYTHONPATH=str(ROOT)))
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        near = [[r["consensus"] for r in _records(Path(tmp) / f"peer-{i:03d}")] for i in range(8)]
        return {"bytes": sum(r["bytes_up"] for r in _records(Path(tmp))), "acc": summary["mean_accuracy"],
                "consensus": summary["consensus_distance"], "first": statistics.mean(n[0] for n in near),
                "last": statistics.mean(n[-1] for n in near)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="seeds per simulated method (default 3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of every simulated run (default: each setup's, " +
                    ", ".join(f"{k} {v}" for k, v in ROUNDS.items()) + ")")
    ap.add_argument("--bus-rounds", type=int, default=3, help="rounds of each bus byte count (default 3)")
    ap.add_argument("--wall-rounds", type=int, default=4, help="rounds of each wall-clock run (default 4)")
    ap.add_argument("--wall-repeats", type=int, default=3, help="interleaved wall-clock runs per method (default 3)")
    ap.add_argument("--uplink-mbps", type=float, default=32.0, help="emulated slow uplink, Mbit/s (default 32)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 10 rounds, 2 wall-clock rounds: a smoke run")
    ap.add_argument("--gossip-rounds", type=int, default=20, help="rounds of each gossip run (default 20)")
    ap.add_argument("--skip", action="append", default=[], choices=("sim", "bus", "wall", "datacenter", "gossip"))
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.rounds, a.bus_rounds, a.wall_rounds, a.wall_repeats = 1, 10, 2, 3, 1
    torch.set_num_threads(1)
    result: dict = {}
    sim_ratio: dict = {}
    if "sim" not in a.skip:
        rows = []
        for name, setup in SETUPS.items():
            rounds = a.rounds or ROUNDS[name]
            runs = {m: [simulated(setup, spec, ef, seed, rounds) for seed in range(a.repeats)]
                    for m, spec, ef in METHODS}
            base = runs["none"]
            for m, _, _ in METHODS:
                ratio = statistics.median(b[0] / r[0] for b, r in zip(base, runs[m]))
                acc = statistics.median(r[1] for r in runs[m])
                delta = statistics.median(100 * (r[1] - b[1]) for b, r in zip(base, runs[m]))
                rows.append((name, rounds, m, f"{ratio:.1f}x", f"{acc:.4f}", f"{delta:+.2f}"))
                key = m.replace("%", "").replace("+", "_").replace(" ", "_").lower()
                result[f"{name}/{key}/upload_ratio"] = round(ratio, 2)
                result[f"{name}/{key}/acc_delta_points"] = round(delta, 2)
                sim_ratio[(name, m)] = ratio
                if m in ("topk1%+q8 EF", "q8"):  # the summary keys: the worst setup's
                    key = "topk" if m.startswith("topk") else "int8"
                    if key == "topk":  # compressed / uncompressed
                        result["topk_bytes_ratio"] = max(result.get("topk_bytes_ratio", 0.0), round(1 / ratio, 4))
                    result[f"{key}_acc_drop"] = max(result.get(f"{key}_acc_drop", -100.0), round(-delta, 2))
        print(f"(a) simulator, medians over {a.repeats} seeds (final accuracy: the mean of the evaluations in the "
              f"last tenth of the rounds; delta in points vs uncompressed, same seed)")
        print(_table(rows, ("setup", "rounds", "method", "upload ratio", "final acc", "acc delta")))
    if "bus" not in a.skip:
        rows = []
        setup = SETUPS["digits-10"]
        counted = {m: over_bus(setup, spec, a.bus_rounds) for m, spec, ef in METHODS if ef}
        for m, b in counted.items():
            ratio = counted["none"] / b
            sim = sim_ratio.get(("digits-10", m))
            rows.append(("digits-10", m, f"{b}", f"{ratio:.1f}x", "-" if sim is None else f"{sim:.1f}x"))
            result[f"bus/digits-10/{m.replace('%', '').replace('+', '_').replace(' ', '_').lower()}/upload_ratio"] = \
                round(ratio, 2)
        print(f"\n(b) bytes_up at the coordinator's socket, 10 client processes, {a.bus_rounds} rounds")
        print(_table(rows, ("setup", "method", "bytes up", "ratio at socket", "ratio simulated")))
    if "wall" not in a.skip:
        rate = a.uplink_mbps * 1e6 / 8
        specs = (None, "topk:0.01+q8")
        times: dict = {(spec, slow): [] for slow in (False, True) for spec in specs}
        for _ in range(a.wall_repeats):  # interleaved: load on the machine hits both alike
            for slow in (False, True):
                for spec in specs:
                    times[(spec, slow)].append(wall_round(spec, a.wall_rounds, rate if slow else None))
        rows = []
        for slow in (False, True):
            dense, comp = times[(None, slow)], times[("topk:0.01+q8", slow)]
            ratio = statistics.median(d / c for d, c in zip(dense, comp))  # per interleaved pair
            where = f"slow uplink {a.uplink_mbps:g} Mbit/s" if slow else "loopback"
            rows.append((where, f"{statistics.median(dense):.2f} s", f"{statistics.median(comp):.2f} s",
                         f"{ratio:.2f}x", " ".join(f"{d:.2f}/{c:.2f}" for d, c in zip(dense, comp))))
            result[f"wall/{'slow_uplink' if slow else 'loopback'}/speedup"] = round(ratio, 2)
            if not slow:
                result["round_time_ratio_loopback"] = round(1 / ratio, 3)  # compressed / uncompressed
        print(f"\n(c) round wall clock, 8 clients, 10^7 parameters: per run the median of rounds 2..{a.wall_rounds}, "
              f"then the median over {a.wall_repeats} interleaved runs")
        print(_table(rows, ("link", "uncompressed", "topk1%+q8 EF", "speedup", "runs (s, dense/topk)")))
    if "datacenter" not in a.skip:
        # the default MLP (64 hidden: biases cap rank 2 at 10.06x a step), then 256 hidden units (13.36x a step)
        models = {64: (None, "powersgd:2", "powersgd:2:2", "powersgd:2+fp16", "powersgd:2:2+fp16"),
                  256: (None, "powersgd:2", "powersgd:2:2")}
        runs = {(h, spec): [] for h, specs in models.items() for spec in specs}
        for seed in range(a.repeats):  # interleaved: machine noise hits every method alike
            for h, spec in runs:
                runs[(h, spec)].append(datacenter(spec, seed, h))
        rows = []
        for h, spec in runs:
            base, mine = runs[(h, None)], runs[(h, spec)]
            whole = statistics.median(b[0] / m[0] for b, m in zip(base, mine))
            last = statistics.median(b[1] / m[1] for b, m in zip(base, mine))
            delta = statistics.median(100 * (m[2] - b[2]) for b, m in zip(base, mine))
            acc = statistics.median(m[2] for m in mine)
            rows.append((f"64-{h}-10", spec or "none", f"{statistics.median(m[0] for m in mine)}", f"{whole:.2f}x",
                         f"{last:.2f}x", f"{acc:.4f}", f"{delta:+.2f}"))
            prefix = "powersgd" if h == 64 else "powersgd_wide"
            if spec == "powersgd:2" or (h == 256 and spec == "powersgd:2:2"):
                result[f"{prefix}_bytes_ratio"] = round(1 / whole, 4)  # compressed / uncompressed, whole run
                result[f"{prefix}_bytes_ratio_after_warmup"] = round(1 / last, 4)
                result[f"{prefix}_acc_drop"] = round(-delta, 2)
            if spec == "powersgd:2+fp16":
                result["powersgd_fp16_bytes_ratio"] = round(1 / whole, 4)  # compressed / uncompressed, whole run
                result["powersgd_fp16_acc_drop"] = round(-delta, 2)
        print(f"\n(d) fedopt allreduce --nproc 2, digits, 10 epochs, all-reduced bytes per rank, medians over "
              f"{a.repeats} seeds")
        print(_table(rows, ("model", "compress", "bytes", "ratio run", "ratio last epoch", "final acc",
                            "acc delta")))
    if "gossip" not in a.skip:
        runs = {spec: [] for spec in (None, "q4")}
        for seed in range(a.repeats):
            for spec in runs:
                runs[spec].append(gossip(spec, seed, a.gossip_rounds))
        rows = []
        for spec, rs in runs.items():
            ratio = statistics.median(b["bytes"] / r["bytes"] for b, r in zip(runs[None], rs))
            delta = statistics.median(100 * (r["acc"] - b["acc"]) for b, r in zip(runs[None], rs))
            med = {k: statistics.median(r[k] for r in rs) for k in ("acc", "consensus", "first", "last")}
            rows.append(("dense D-PSGD" if spec is None else f"CHOCO {spec}", f"{ratio:.2f}x", f"{med['acc']:.4f}",
                         f"{delta:+.2f}", f"{med['consensus']:.3f}", f"{med['first']:.3f} -> {med['last']:.3f}"))
            if spec is not None:
                result["gossip_bytes_ratio"] = round(1 / ratio, 4)  # compressed / uncompressed
                result["gossip_acc_drop"] = round(-delta, 2)
        print(f"\n(e) gossip, ring of 8 peers, digits, {a.gossip_rounds} rounds, medians over {a.repeats} seeds")
        print(_table(rows, ("method", "bytes ratio", "final acc", "acc delta", "final consensus",
                            "neighbour distance round 1 -> last")))
    print(json.dumps(result), flush=True)


def _table(rows, header) -> str:
    from _common import table  # benchmarks/_common.py

    return table(rows, header)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
