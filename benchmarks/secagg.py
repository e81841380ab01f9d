"""Secure aggregation, side by side in one run: bytes, client masking, server unmasking, a full round, and Flower.

Setting (issue 4): n = 100 clients, P = 10^6 parameters, 10% of the clients drop during the masked-input stage:
they advertised and shared keys, but their masked vectors never arrive, so the server must reconstruct their mask
keys and remove their pairwise masks from each surviving neighbour (the expensive kind of dropout: Bonawitz et al.
CCS 2017, Section 7; Bell et al. CCS 2020). SecAgg+ graph: k = 2*ceil(log2 n) neighbours, t = k/2 + 1, 16-bit
quantisation, FedAvg weights folded into the masked vector. The word width follows from W, the public weight cap
(``--max-samples``, fedopt's default 10^6) lowered to the largest count the round's clients announced (50 each
here): 32-bit words while n * W * (2^15 - 1) < 2^31, i.e. W <= 655 for n = 100.

Measured, each as a median over ``--repeats`` (spreads are printed too; the machine may be shared and noisy):

The protocol is run the way the in-process aggregator runs it: the one server-side driver
(:class:`fedopt.secagg.SecAggDriver`) over :class:`fedopt.secagg.MemoryTransport`, which holds a real
:class:`fedopt.secagg.SecAggClient` per client, carries the packed messages of the bus, counts their bytes and
times the client code per message kind; the server's time is the time in the driver, less the clients' time.

* bytes each client sends: every secagg message it sends (advertise, shares, masked vector, unmask response) packed
  with :mod:`fedopt.secagg.codec` (msgpack body + raw frame, as on the bus), against plain FedAvg's UPDATE at the
  same wire precision (4 bytes per parameter: float32 vs uint32), encoded by :mod:`fedopt.wire` when present;
* client masking time (the client's handling of its update, its encoding excepted: decrypt shares, key agreement,
  PRG masks) against the PRG floor: the AES-256-CTR keystream that client must generate (one stream for b_u, one
  per neighbour that shared keys, each ``4 * vector_length`` bytes), timed with bare cipher calls right before and
  right after *each* client's update (averaged), so job and floor see the same load; the ratio is the median over
  all clients and repeats. Masking, encoding and unmasking split long vectors across threads (``--threads``,
  default: the usable CPUs up to 8); the floor is generated over the same threads and ranges, so the ratio
  compares like with like;
* server unmasking time (close MaskedInput, take the unmask responses, reconstruct seeds and keys, remove masks,
  decode the sum; the clients' answers are not counted) against its PRG floor (one stream per survivor's b_u, one
  per (surviving neighbour, dropped client) pair), timed the same way;
* client encoding (clip + quantise from the float32 delta, up to the client's ``on_encoded`` hook) is reported
  apart, not in the masking ratio;
* a full simulated round. Definition, identical for both sides apart from secure aggregation itself: the timer
  starts at ``begin`` and stops after ``result``; in between each of the n clients produces its P-float32 update
  (a float64 normal draw cast to float32, standing in for local training, which this benchmark leaves out so the
  ratio is the *worst* case: a real round adds the same training time to both sides) and the survivors' updates
  go to the aggregator; the 10% dropped clients also produce an update, which never arrives. ``secagg``: begin runs
  AdvertiseKeys + ShareKeys for all n; each add clips, quantises, weights and masks (one real SecAggClient per
  client); result runs Unmask and decodes. Plain: streaming FedAvg (``fedavg()``), whose add is one weighted
  in-place update. Both aggregators are created once and reused across rounds, as in a run (secagg's identity
  keys are enrolled once, before timing). The two rounds of a repeat run back to back, alternating which goes
  first, and the reported ratio is the median of the per-repeat ratios;
* Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod`` in its simulation engine, child process,
  ``benchmarks/flower_secaggplus.py``) at ``--flower-n``/``--flower-p`` with the same dropout, against fedopt's
  secagg round at the same n and P, timed ``--repeats`` times just before and just after Flower's round.

Last line: JSON with bytes_ratio, client_prg_ratio, server_prg_ratio, round_ratio, speedup_vs_flower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedopt.aggregators import SecureAggregator, Update, fedavg
from fedopt.aggregators.secure import round_encoding
from fedopt.secagg import (
    MemoryTransport,
    RoundConfig,
    SecAggClient,
    SecAggDriver,
    generate_identity,
    identity_public_bytes,
)
from fedopt.secagg import parallel, prg


def aes_ctr_speed(repeats: int = 5, total: int = 64 << 20) -> float:
    """Bytes per second of AES-256-CTR keystream (1 MiB calls into a reused buffer)."""
    chunk = 1 << 20
    zeros, buf = bytes(chunk), bytearray(chunk + 15)
    rates = []
    for _ in range(repeats):
        enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        t = time.perf_counter()
        for _ in range(total // chunk):
            enc.update_into(zeros, buf)
        rates.append(total / (time.perf_counter() - t))
    return statistics.median(rates)


def prg_floor(seeds: int, nbytes: int) -> float:
    """Seconds to generate ``seeds`` AES-256-CTR keystreams of ``nbytes`` each (a fresh key per stream, as the
    masking code does), in 1 MiB calls into reused buffers, split over the same threads and ranges as masking
    (:func:`fedopt.secagg.parallel.for_ranges`): the PRG floor of one masking or unmasking job."""
    chunk = prg.CHUNK_BYTES
    keys = [os.urandom(32) for _ in range(seeds)]

    def walk(start: int, stop: int) -> None:
        sc = prg.scratch()
        for key in keys:
            enc = prg.cipher(key, start * 4 // 16)
            for i in range(start * 4, stop * 4, chunk):
                sc.fill(enc, min(chunk, stop * 4 - i))

    t = time.perf_counter()
    parallel.for_ranges(walk, nbytes // 4, 4)
    return time.perf_counter() - t


def plain_update_bytes(P: int) -> tuple[int, str]:
    delta = torch.zeros(P, dtype=torch.float32)
    try:
        from fedopt import wire

        frames = wire.encode(wire.UpdateMsg(round=1, sender="client-000", num_samples=50,
                                            metrics={"loss": 0.5, "steps": 4}, delta=delta))
        return sum(memoryview(f).nbytes for f in frames), "fedopt.wire UPDATE"
    except ImportError:
        import msgpack

        head = msgpack.packb({"v": 1, "type": "UPDATE", "round": 1, "sender": "client-000", "num_samples": 50,
                              "metrics": {"loss": 0.5, "steps": 4}, "tensors": [{"dtype": "float32", "shape": [P]}]})
        return len(head) + 4 * P, "msgpack header + float32 frame"


def protocol_round(n: int, P: int, dropout: float, seed: int = 0, max_weight: int = 1_000_000) -> dict:
    """One round over the protocol's driver and the in-memory transport (the in-process aggregator's path), timing
    the client and the server parts and counting bytes. The encoding is the aggregator's for a cap of
    ``max_weight`` (32-bit words when they cannot wrap, else 64-bit)."""
    ids = [f"client-{i:03d}" for i in range(n)]
    idents = {u: generate_identity() for u in ids}
    pinned = {u: identity_public_bytes(k) for u, k in idents.items()}
    quant = round_encoding(SecureAggregator(clip=10.0, bits=16, max_weight=max_weight), n, {u: 50 for u in ids})
    cfg = RoundConfig.create(1, ids, quant.vector_length(P), modulus_bits=quant.modulus_bits)
    dropped = set(ids[:: max(1, round(1 / dropout))][: round(dropout * n)]) if dropout else set()
    clients = {u: SecAggClient(u, idents[u], pinned, max_weight) for u in ids}
    encoded_at: dict[str, float] = {}  # when each client's encoding was done and its masking began
    for u, sa in clients.items():
        sa.on_encoded = lambda r, v, u=u: encoded_at.__setitem__(u, time.perf_counter())
    transport = MemoryTransport(clients)
    driver = SecAggDriver(cfg, quant, transport.send, identities=pinned)
    word = cfg.dtype.itemsize * cfg.vector_length
    t_setup = time.perf_counter()
    driver.start()
    transport.pump(driver)  # AdvertiseKeys + ShareKeys, every client: the driver waits for masked inputs
    t_setup = time.perf_counter() - t_setup
    rng = np.random.default_rng(seed)
    mask_times, mask_floors, encode_times = [], [], []
    for u in ids:
        if u in dropped:
            continue
        x = rng.normal(0, 0.01, P).astype(np.float32)  # a model delta is float32
        # PRG(b_u) + one stream per neighbour that shared keys, each of vector_length words; the floor is timed
        # right before and right after this client's encoding and masking
        streams = 1 + len(cfg.neighbours(u) & driver.expected)
        f0 = prg_floor(streams, word)
        before = transport.client_seconds.get("update", 0.0)
        t = time.perf_counter()
        transport.provide_update(u, x, 50)
        client_s = transport.client_seconds["update"] - before
        mask_floors.append((f0 + prg_floor(streams, word)) / 2)
        encode_times.append(encoded_at[u] - t)
        mask_times.append(client_s - encode_times[-1])
        transport.deliver(driver)  # the server adds y_u to its running sum
        del x
    # Unmask: close MaskedInput, every survivor answers, the driver rebuilds seeds and keys, removes masks, decodes
    survivors = driver.answered
    dropped_now = driver.expected - survivors
    server_streams = len(survivors) + sum(len(cfg.neighbours(v) & survivors) for v in dropped_now)
    f0 = prg_floor(server_streams, word)
    before = transport.client_seconds.get("unmask", 0.0)
    t = time.perf_counter()
    driver.close_stage()
    transport.pump(driver)
    elapsed = time.perf_counter() - t
    server_floor = (f0 + prg_floor(server_streams, word)) / 2
    t_clients_unmask = transport.client_seconds["unmask"] - before
    t_server = elapsed - t_clients_unmask  # time in the driver: the clients' answers are timed by the transport
    out = driver.outcome
    assert out is not None and set(out.survivors) == survivors
    survivor_bytes = [transport.sent[u] for u in ids if u in survivors]
    return {"k": cfg.k, "t": cfg.t, "setup": t_setup, "encode": statistics.median(encode_times),
            "mask": mask_times, "mask_floor": mask_floors, "server": t_server, "server_floor": server_floor,
            "client_unmask": t_clients_unmask / max(transport.client_calls.get("unmask", 0), 1),
            "client_sent": statistics.median(survivor_bytes), "dropped": len(out.dropped)}


def sim_round(n: int, P: int, dropout: float, agg, rnd: int, seed: int = 0) -> float:
    """One simulated round (see the module docstring): begin, n clients produce a P-update, the survivors' updates
    are added, result. ``agg`` is reused across rounds, as in a run (secagg's identity keys are enrolled once)."""
    secure = isinstance(agg, SecureAggregator)
    ids = [f"client-{i:03d}" for i in range(n)]
    drop = set(ids[: round(dropout * n)])
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    if secure:
        agg.begin(rnd, P, participants={u: 50 for u in ids})
    else:
        agg.begin(rnd, P)
    for u in ids:
        delta = torch.from_numpy(rng.normal(0, 0.01, P).astype(np.float32))
        if u not in drop:
            agg.add(Update(u, delta, 50))
    res = agg.result()
    elapsed = time.perf_counter() - t
    assert res is not None and res.count == n - len(drop), "round did not aggregate"
    return elapsed


def flower_round(n: int, P: int, dropout: float, timeout: float) -> dict | None:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flower_secaggplus.py")
    try:
        out = subprocess.run([sys.executable, script, str(n), str(P), str(dropout)], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flower-n", type=int, default=None, help="Flower's n (default: --clients)")
    ap.add_argument("--flower-p", type=int, default=None, help="Flower's P (default: --params)")
    ap.add_argument("--flower-timeout", type=float, default=900.0)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--max-samples", type=int, default=1_000_000,
                    help="the public cap on one client's weight (the run's --max-samples); sets the word width")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for masking, encoding and unmasking (default: fedopt's, the usable CPUs up to 8)")
    a = ap.parse_args()
    parallel.set_threads(a.threads)
    n, P, d = a.clients, a.params, a.dropout

    speed, proto, rounds_s, rounds_p, round_ratios = [], [], [], [], []
    aggs = {True: SecureAggregator(clip=10.0, bits=16, max_weight=a.max_samples), False: fedavg()}
    sim_round(n, min(P, 10_000), d, aggs[True], 1)  # enrolment (identity keys), once per run as in a real run
    rnd = 1
    for rep in range(a.repeats):
        speed.append(aes_ctr_speed())
        proto.append(protocol_round(n, P, d, seed=rep, max_weight=a.max_samples))
        times = {}
        for secure in ((False, True) if rep % 2 == 0 else (True, False)):  # alternate which goes first
            rnd += 1
            times[secure] = sim_round(n, P, d, aggs[secure], rnd, seed=rep)
        rounds_p.append(times[False])
        rounds_s.append(times[True])
        round_ratios.append(times[True] / times[False])
    med = statistics.median
    aes = med(speed)
    client_ratios = [t / f for p in proto for t, f in zip(p["mask"], p["mask_floor"])]
    client_ratio = med(client_ratios)
    server_ratios = [p["server"] / p["server_floor"] for p in proto]
    server_ratio = med(server_ratios)
    plain_bytes, plain_how = plain_update_bytes(P)
    client_bytes = med([p["client_sent"] for p in proto])
    bytes_ratio = client_bytes / plain_bytes
    round_ratio = med(round_ratios)
    p0 = proto[0]

    def spread(xs) -> str:
        return f"{min(xs):.2f}-{max(xs):.2f}"
    rows = [
        ("AES-256-CTR keystream, one thread", f"{aes / 1e9:.2f} GB/s", ""),
        ("graph", f"k = {p0['k']}, t = {p0['t']}", f"{p0['dropped']} of {n} drop at masked input"),
        ("bytes sent per client", f"{client_bytes:,.0f} B", f"plain {plain_bytes:,} B ({plain_how})"),
        ("client: encode (clip+quantise)", f"{med([p['encode'] for p in proto]) * 1e3:.1f} ms", "not masking"),
        ("client: masked_input", f"{med([med(p['mask']) for p in proto]) * 1e3:.1f} ms",
         f"PRG floor beside it {med([med(p['mask_floor']) for p in proto]) * 1e3:.1f} ms; "
         f"ratio {client_ratio:.2f}x (per-client spread {spread(client_ratios)})"),
        ("client: unmask answer", f"{med([p['client_unmask'] for p in proto]) * 1e3:.2f} ms", ""),
        ("server: unmask", f"{med([p['server'] for p in proto]) * 1e3:.0f} ms",
         f"PRG floor beside it {med([p['server_floor'] for p in proto]) * 1e3:.0f} ms; "
         f"ratio {server_ratio:.2f}x (spread {spread(server_ratios)})"),
        ("setup (advertise + share keys, all clients)", f"{med([p['setup'] for p in proto]) * 1e3:.0f} ms", ""),
        ("round: plain FedAvg", f"{med(rounds_p):.2f} s", f"{n} updates produced, {n - round(d * n)} aggregated"),
        ("round: secagg", f"{med(rounds_s):.2f} s",
         f"same, masked and unmasked; paired ratio {round_ratio:.2f}x (spread {spread(round_ratios)})"),
    ]
    speedup = None
    if not a.no_flower:
        fn, fp = a.flower_n or n, a.flower_p or P
        # fedopt's round is timed both before and after Flower's, so both see the same machine load
        ours_t = [sim_round(fn, fp, d, aggs[True], rnd + 1 + r, seed=r) for r in range(a.repeats)]
        fl = flower_round(fn, fp, d, a.flower_timeout)
        ours_t += [sim_round(fn, fp, d, aggs[True], rnd + 1 + a.repeats + r, seed=r) for r in range(a.repeats)]
        ours = med(ours_t)
        if fl and "round_seconds" in fl:
            speedup = fl["round_seconds"] / ours
            rows.append((f"Flower SecAgg+ round (n={fn}, P={fp:.0e})", f"{fl['round_seconds']:.2f} s",
                         f"shares {fl['num_shares']}, t {fl['threshold']}, ok={fl['aggregate_ok']}"))
            rows.append((f"fedopt secagg round (n={fn}, P={fp:.0e})", f"{ours:.2f} s",
                         f"speedup {speedup:.1f}x (fedopt spread {min(ours_t):.2f}-{max(ours_t):.2f} s)"))
        else:
            rows.append((f"Flower SecAgg+ (n={fn}, P={fp:.0e})", "failed", str(fl)[:80]))
    w = max(len(r[0]) for r in rows)
    print(f"secure aggregation, n = {n}, P = {P:,}, dropout {d:.0%}, {a.repeats} repeats (medians), "
          f"{parallel.threads()} secagg thread(s), {torch.get_num_threads()} torch thread(s)")
    for name, val, note in rows:
        print(f"  {name:<{w}}  {val:>14}  {note}")
    print(f"  ratios: bytes {bytes_ratio:.4f}x, client/PRG {client_ratio:.2f}x, server/PRG {server_ratio:.2f}x, "
          f"round {round_ratio:.2f}x, vs Flower {speedup if speedup is None else round(speedup, 1)}")
    print(json.dumps({"bytes_ratio": round(bytes_ratio, 4), "client_prg_ratio": round(client_ratio, 3),
                      "server_prg_ratio": round(server_ratio, 3), "round_ratio": round(round_ratio, 3),
                      "speedup_vs_flower": None if speedup is None else round(speedup, 2)}))


if __name__ == "__main__":
    main()
