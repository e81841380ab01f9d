"""fedopt.compress: the compressors' math against naive references, exact byte counts, error feedback's invariant, and
the compressed UPDATE on the wire (every malformed layout refused with WireError before use)."""

from __future__ import annotations

import dataclasses
import math
import random
import re

import msgpack
import pytest
import torch

from fedopt import testing, wire
from fedopt.compress import ErrorFeedback, Memory, Packed, decompress, downlink, parse_compressor
from fedopt.compress import quantize as q
from fedopt.compress.sparsify import keep_count, random_k, top_k
from fedopt.errors import ConfigError, WireError

SPECS = ["topk:0.01+q8", "topk:0.1", "randk:0.1", "randk:0.05+q4:64", "q8", "q4", "q2", "fp16", "topk:1+q2:3"]


# ---- pure math -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", q.BITS)
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 257])
def test_pack_unpack_roundtrip_and_exact_length(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = q.pack(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(q.unpack(packed, bits, n), codes)
    if n == 3 and bits == 2:  # first code in the lowest bits; the unused high bits zero
        assert int(packed[0]) == int(codes[0]) | int(codes[1]) << 2 | int(codes[2]) << 4


@pytest.mark.parametrize("bits", q.BITS)
def test_quantize_error_bound_and_zero_block(bits):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    x[256:512] = 0.0  # a block of zeros decodes to zeros
    packed, scales = q.quantize(x, bits, 256, torch.Generator().manual_seed(2))
    assert scales.numel() == 4 and scales[1] == 0
    y = q.dequantize(packed, scales, 1000, bits, 256)
    step = (2 * scales / ((1 << bits) - 1)).repeat_interleave(256)[:1000]
    assert bool(((y - x).abs() <= step + 1e-6).all())
    assert bool((y[256:512] == 0).all())


def test_quantize_is_unbiased():
    x = torch.randn(200, generator=torch.Generator().manual_seed(3))
    c = parse_compressor("q2:50")
    mean = sum(decompress(c.compress(x, s), 200) for s in range(4000)) / 4000
    # per coordinate the error is below the step 2s/3, so the mean of 4000 draws is within 6 sigma of x
    sigma = (2 * x.abs().max() / 3) / math.sqrt(4000)
    assert float((mean - x).abs().max()) < 6 * float(sigma)


def test_top_k_matches_a_sort_and_random_k_is_seeded():
    x = torch.tensor([0.1, -5.0, 3.0, 0.0, -0.2, 4.0])
    assert top_k(x, 3).tolist() == [1, 2, 5]
    assert keep_count(6, 0.5) == 3 and keep_count(1000, 0.01) == 10 and keep_count(10, 1e-6) == 1
    a, b = random_k(1000, 10, 7), random_k(1000, 10, 7)
    assert torch.equal(a, b) and len(set(a.tolist())) == 10 and bool((a[1:] > a[:-1]).all())
    assert not torch.equal(a, random_k(1000, 10, 8))


@pytest.mark.parametrize("spec", SPECS)
def test_packed_bytes_are_exact(spec):
    P = 10_007
    c = parse_compressor(spec)
    p = c.compress(torch.randn(P), seed=5)
    k = P if c.sparsify is None else keep_count(P, c.fraction)
    value_bytes = {32: 4 * k, 16: 2 * k}.get(c.bits) or math.ceil(k * c.bits / 8) + 4 * math.ceil(k / c.block)
    index_bytes = 4 * k if c.sparsify == "topk" else 0
    assert p.nbytes == value_bytes + index_bytes
    frames = wire.encode(wire.UpdateMsg(encoding=p.encoding(), values=p.values, indices=p.indices, scales=p.scales))
    assert sum(len(memoryview(f)) for f in frames[1:]) == p.nbytes


def test_topk_1pct_q8_is_over_30x_smaller_than_dense():
    P = 100_000
    p = parse_compressor("topk:0.01+q8").compress(torch.randn(P), 0)
    assert p.nbytes == 1000 * 5 + 4 * 4  # 1000 int32 indices, 1000 codes, 4 block scales
    assert 4 * P / p.nbytes > 79


@pytest.mark.parametrize("spec, message", [
    ("", "--compress must be a spec"), ("topk", "fraction in (0, 1]"), ("topk:0", "fraction in (0, 1]"),
    ("topk:1.5", "fraction in (0, 1]"), ("q8+topk:0.1", "must come first"), ("q8+q4", "at most one value codec"),
    ("q3", "unknown stage 'q3'"), ("q8:0", "block size"), ("fp16:2", "fp16 takes no argument")])
def test_bad_specs_name_the_flag(spec, message):
    with pytest.raises(ConfigError, match="--compress") as e:
        parse_compressor(spec)
    assert message in str(e.value)


def test_error_feedback_loses_nothing():
    """Error feedback's invariant: what was sent plus the residual is exactly what was to be sent."""
    store = Memory()
    ef = ErrorFeedback(parse_compressor("topk:0.05+q8"), store)
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(500, generator=g) for _ in range(6)]
    before = [d.clone() for d in deltas]
    sent = torch.zeros(500)
    for r, d in enumerate(deltas):
        sent += decompress(ef.compress("3", d, seed=r), 500)
    assert torch.allclose(sent + store["3"], sum(before), atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(deltas, before))  # the caller's deltas are only read
    none = ErrorFeedback(parse_compressor("topk:0.05"), None)
    assert int((decompress(none.compress("3", deltas[0], seed=0), 500) != 0).sum()) == 25
    # full-precision values: the residual is zero exactly where they were sent
    exact = ErrorFeedback(parse_compressor("topk:0.05"), Memory())
    p = exact.compress("3", deltas[1], seed=0)
    assert bool((exact.store["3"][p.indices.long()] == 0).all()) and int((exact.store["3"] != 0).sum()) == 475


@pytest.mark.parametrize("n,k", [(100, 7), (300_000, 1), (300_000, 3_000), (150_000, 60_000),
                                 (2_500_000, 25_000)])
def test_top_k_equals_torch_topk_over_all_magnitudes(n, k):
    # Prepare: both paths (full sort: n < 2 * SAMPLE or k large; sampled threshold: strides 4 and 38, over 2 and 10
    # CHUNKs), heavy tails and a block of exact ties at the top
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, generator=g) ** 3
    x[n // 2 : n // 2 + 3] = 1e6
    # Execute
    got = top_k(x, k)
    # Assert: k distinct increasing indices whose magnitudes are torch.topk's (the same multiset)
    assert got.numel() == k and bool((got[1:] > got[:-1]).all())
    ref = torch.topk(x.abs(), k).values
    assert torch.equal(x[got].abs().sort(descending=True).values, ref)
    # the candidate pass in torch (not a CPU float32 vector, here float64) keeps the same magnitudes
    assert torch.equal(x[top_k(x.double(), k)].abs().sort(descending=True).values, ref)


def test_top_k_takes_ties_at_the_kth_magnitude_in_index_order():
    # values rounded to 0.1: thousands of coordinates share the k-th largest magnitude; the k kept are those above
    # it and the first of the tied ones by index, in increasing order
    n, k = 400_000, 4_000
    x = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 10).round() / 10
    got = top_k(x, k)
    kth = torch.topk(x.abs(), k).values[-1]
    above = (x.abs() > kth).nonzero().squeeze(1)
    tied = (x.abs() == kth).nonzero().squeeze(1)[: k - above.numel()]
    assert tied.numel() > 1 and torch.equal(got, torch.cat([above, tied]).sort().values)


def test_top_k_falls_back_when_the_sample_misses():
    # the strided sample (every 4th of 2**18) sees only large values, so its threshold lets through too few
    # coordinates (about 1.2 k / 4): the exact pass over all of |x| must take over
    n = 1 << 18
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.01
    x[::4] = 1000.0 + torch.arange(n // 4, dtype=torch.float32)
    assert torch.equal(top_k(x, 100), torch.arange(n - 400, n, 4))


def test_compress_is_deterministic_given_the_seed():
    x = torch.randn(3000)
    for spec in SPECS:
        c = parse_compressor(spec)
        a, b = c.compress(x, 11), c.compress(x, 11)
        assert torch.equal(decompress(a, 3000), decompress(b, 3000)), spec


# ---- on the wire ------------------------------------------------------------------------------------------------------
def _frames(p: Packed, **kw) -> list[bytes]:
    msg = wire.UpdateMsg(round=2, num_samples=9, encoding=p.encoding(), values=p.values, indices=p.indices,
                         scales=p.scales, **kw)
    return [bytes(f) for f in wire.encode(msg)]


@pytest.mark.parametrize("spec", SPECS)
def test_compressed_update_roundtrips_through_the_wire(spec):
    x = torch.randn(999)
    p = parse_compressor(spec).compress(x, 4)
    msg = wire.decode(_frames(p))
    testing.check_message(msg)
    assert msg.delta is None and msg.encoding == p.encoding()
    got = decompress(Packed.from_encoding(msg.encoding, msg.values, msg.indices, msg.scales), 999)
    assert torch.equal(got, decompress(p, 999))


def test_dense_update_header_is_unchanged():
    head = msgpack.unpackb(bytes(wire.encode(wire.UpdateMsg(delta=torch.zeros(3)))[0]))
    assert "encoding" not in head  # protocol version 1 receivers still read dense updates


def test_receiver_refuses_another_size_before_allocating():
    p = parse_compressor("randk:0.5").compress(torch.randn(100), 1)
    with pytest.raises(WireError, match="100 elements, the model has 99"):
        decompress(p, 99)


def _tamper(p: Packed, header=None, frames=None) -> list[bytes]:
    """An honest compressed UPDATE with its header's encoding or its tensor frames replaced."""
    out = _frames(p)
    head = msgpack.unpackb(out[0])
    for key, value in (header or {}).items():  # None: the key left out
        head["encoding"].pop(key) if value is None else head["encoding"].__setitem__(key, value)
    if frames:
        for i, raw in frames.items():
            out[1 + i] = raw
            head["tensors"][i]["shape"] = [len(raw) // wire.messages._ALLOWED[head["tensors"][i]["dtype"]]]
    out[0] = msgpack.packb(head)
    return out


def _ints(xs):
    return torch.tensor(xs, dtype=torch.int32).numpy().tobytes()


@pytest.mark.parametrize("case, match", [
    ("index past size", "indices must be strictly increasing and in"),
    ("negative index", "indices must be strictly increasing and in"),
    ("unsorted", "indices must be strictly increasing"),
    ("duplicate", "indices must be strictly increasing"),
    ("one value too few", "must have shape"),
    ("one scale too many", "must have shape"),
    ("packed one byte long", "must have shape"),
    ("padding bits", "unused high bits"),
    ("float indices", "dtype 'float32' is not allowed"),
    ("k over size", "k must be an int in"),
    ("no block", "block is given exactly when bits <= 8"),
    ("bits 3", "bits must be one of"),
    ("seed without randk", "seed is given exactly when"),
    ("all with k < size", "index 'all' needs k == size"),
    ("unknown key", "must hold size, k, index, bits"),
])
def test_malformed_compressed_updates_are_refused(case, match):
    x = torch.arange(1.0, 21.0)
    p = parse_compressor("topk:0.25+q2:2").compress(x, 0)  # k = 5: indices 15..19, 2 packed bytes, 3 scales
    assert p.indices.tolist() == [15, 16, 17, 18, 19] and p.values.numel() == 2 and p.scales.numel() == 3
    frames = {
        "index past size": lambda: _tamper(p, frames={1: _ints([15, 16, 17, 18, 20])}),
        "negative index": lambda: _tamper(p, frames={1: _ints([-1, 16, 17, 18, 19])}),
        "unsorted": lambda: _tamper(p, frames={1: _ints([15, 17, 16, 18, 19])}),
        "duplicate": lambda: _tamper(p, frames={1: _ints([15, 16, 16, 18, 19])}),
        "one value too few": lambda: _tamper(p, header={"k": 4}),
        "one scale too many": lambda: _tamper(p, frames={2: bytes(16)}),
        "packed one byte long": lambda: _tamper(p, frames={0: bytes(3)}),
        "padding bits": lambda: _tamper(p, frames={0: bytes([0, 0b100])}),
        "float indices": lambda: _float_indices(p),
        "k over size": lambda: _tamper(p, header={"k": 21}),
        "no block": lambda: _tamper(p, header={"block": None}),
        "bits 3": lambda: _tamper(p, header={"bits": 3}),
        "seed without randk": lambda: _tamper(p, header={"seed": 1}),
        "all with k < size": lambda: _tamper(p, header={"index": "all"}),
        "unknown key": lambda: _tamper(p, header={"kind": "topk"}),
    }[case]()
    with pytest.raises(WireError, match=match):
        wire.decode(frames)


def _float_indices(p: Packed) -> list[bytes]:
    out = _frames(p)
    head = msgpack.unpackb(out[0])
    head["tensors"][1]["dtype"] = "float32"
    out[0] = msgpack.packb(head)
    return out


def test_dense_tensors_may_not_be_integers_and_the_sender_learns_first():
    with pytest.raises(WireError, match="dtype 'int32' is not allowed"):
        wire.encode(wire.Train(model=torch.zeros(3, dtype=torch.int32)))
    p = parse_compressor("topk:0.25").compress(torch.arange(1.0, 21.0), 0)
    with pytest.raises(WireError, match="indices must be strictly increasing"):
        wire.encode(wire.UpdateMsg(encoding=p.encoding(), values=p.values, indices=p.indices.flip(0)))


def test_hostile_compressed_frames_decode_or_raise_wire_error():
    rng = random.Random(0)
    seeds = [_frames(parse_compressor(s).compress(torch.randn(50), 1)) for s in SPECS]
    p = downlink("q8").compress(torch.randn(50), 1)
    seeds.append([bytes(f) for f in wire.encode(wire.Train(round=1, encoding=p.encoding(), values=p.values,
                                                           scales=p.scales))])
    decoded = {wire.UpdateMsg: 0, wire.Train: 0, wire.GossipPush: 0}
    for _ in range(1500):
        frames = testing.hostile_frames(rng, seeds, model_size=50)
        try:
            msg = wire.decode(frames)
        except WireError:
            continue
        testing.check_message(msg)
        if isinstance(msg, tuple(decoded)) and msg.encoding:
            decoded[wire.GossipPush if isinstance(msg, wire.GossipPush) else type(msg)] += 1
    # the harness reaches the compressed layouts (of updates, models and gossip differences), not only their refusal
    assert decoded[wire.UpdateMsg] > 20 and decoded[wire.Train] > 5 and decoded[wire.GossipPush] > 5, decoded


def test_check_message_catches_a_lying_compressed_update():
    p = parse_compressor("topk:0.25").compress(torch.arange(1.0, 21.0), 0)
    bad = wire.UpdateMsg(encoding=p.encoding(), values=p.values, indices=p.indices.flip(0))
    with pytest.raises(AssertionError, match="strictly increasing"):
        testing.check_message(bad)
    with pytest.raises(AssertionError, match="delta is set in a compressed"):
        testing.check_message(dataclasses.replace(bad, indices=p.indices, delta=torch.zeros(20)))


# ---- the runtimes: simulation, the worker pool's body, the bus -----------------------------------------------------
def _digits(tmp_path, **flat):
    from fedopt.config import RunConfig

    return RunConfig.of(task="digits", clients=4, rounds=2, local_epochs=1, partition="iid", progress="off",
                        plot=False, out=str(tmp_path / "out"), **flat)


def _rounds(tmp_path) -> list[dict]:
    import json

    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_simulation_counts_compressed_bytes_and_keeps_residuals(tmp_path):
    from clients.simulation.run import Simulation

    sim = Simulation(_digits(tmp_path, compress="topk:0.1+q8", compress_down="q8"))
    store, seen = sim.executor.host.uplink.store, set()
    put = store.put
    store.put = lambda client, vec: (seen.add(client), put(client, vec))
    records = sim.run().records
    k = keep_count(4810, 0.1)  # the digits MLP: 64*64 + 64 + 64*10 + 10 parameters
    per_update = 4 * k + k + 4 * math.ceil(k / 256)
    assert [r["bytes_up"] for r in records] == [4 * per_update] * 2
    assert records[0]["bytes_down"] == 4 * (4810 + 4 * math.ceil(4810 / 256))  # q8 codes and scales, 4 clients
    assert seen == {"0", "1", "2", "3"}  # every client kept its error-feedback residual
    assert all(math.isfinite(r["accuracy"]) for r in records)


def test_unbiased_compressors_and_no_error_feedback_keep_no_residual(tmp_path):
    from clients.simulation.run import Simulation

    assert Simulation(_digits(tmp_path, compress="q8")).executor.host.uplink.store is None
    assert Simulation(_digits(tmp_path, compress="topk:0.1", error_feedback=False)).executor.host.uplink.store is None


def test_compress_refuses_what_it_does_not_combine_with_in_one_line():
    from fedopt.config import RunConfig

    for flat, named in [({"backend": "vmap"}, "--backend vmap"),
                        ({"mode": "gossip"}, r"--mode gossip without --topology \(CHOCO-Gossip runs on D-PSGD's "
                                             r"fixed graph\)")]:
        with pytest.raises(ConfigError, match=f"^--compress does not combine with {named} yet$"):
            RunConfig.of(compress="q8", **flat)
    assert RunConfig.of(compress="q4", mode="gossip", topology="ring", choco_gamma=0.5).compression.choco_gamma == 0.5
    for spec, why in [("topk:0.01+q8", "a shared random mask"), ("randk:0.1", "a shared random mask"),
                      ("q8", "already quantises")]:
        with pytest.raises(ConfigError, match=f"^--compress {re.escape(spec)} does not combine with --aggregator "
                                              f"secagg: .*{why}"):
            RunConfig.of(compress=spec, aggregator="secagg")
    with pytest.raises(ConfigError, match="^--compress-down does not combine with --aggregator secagg yet$"):
        RunConfig.of(compress_down="q8", aggregator="secagg")
    with pytest.raises(ConfigError, match="^--compress-down 'topk:0.1': a model is sent whole"):
        RunConfig.of(compress_down="topk:0.1")


def test_compressed_train_roundtrips_through_the_wire():
    model = torch.randn(1000)
    p = downlink("q8").compress(model, 7)
    train = wire.Train(round=7, config={"seed": 1}, encoding=p.encoding(), values=p.values, scales=p.scales)
    msg = wire.decode([bytes(f) for f in wire.encode(train)])
    got = decompress(Packed.from_encoding(msg.encoding, msg.values, msg.indices, msg.scales), 1000)
    assert msg.model is None and torch.equal(got, decompress(p, 1000))
    assert float((got - model).abs().max()) <= 2 * float(model.abs().max()) / 255 + 1e-6


def test_pool_worker_share_reports_its_compressed_bytes_and_keeps_clients_on_one_worker(tmp_path):
    """The body of a pool worker (``_run_share``), run in this process: its partial is the mean of the decoded
    updates, and it reports the bytes they took."""
    import queue
    from types import SimpleNamespace

    from fedopt.aggregators import make_aggregator
    from fedopt.data import PartitionSpec
    from fedopt.engine import RoundServer
    from fedopt.optimizers import make_server_optimizer
    from fedopt.params import ParamSpec
    from fedopt.task import TrainConfig, resolve_task

    from clients.simulation.host import ClientHost, make_uplink
    from clients.simulation.pool import PoolExecutor, _run_share
    from clients.simulation.shards import ShardSource

    cfg = _digits(tmp_path, compress="randk:0.5+q4")
    task = resolve_task("digits")
    spec = ParamSpec.from_module(task.build_model())
    shards = ShardSource(task, 4, 0, PartitionSpec("iid", 0.5), torch.device("cpu"))
    host = ClientHost(task, spec, shards, torch.device("cpu"), uplink=make_uplink(cfg, spec, 1 << 20))
    local = RoundServer(spec, torch.zeros(spec.size), make_aggregator("fedavg"), make_server_optimizer("fedavg"),
                        TrainConfig(), per_round=2)
    jobs = local.plan(1, {"0": 10, "1": 10})
    out: queue.Queue = queue.Queue()
    result = torch.zeros(spec.size)
    _run_share(host, local, 1, jobs, False, torch.zeros(spec.size), None, result, None, None, None, out, 0)
    kind, rank, info = out.get_nowait()
    k = keep_count(spec.size, 0.5)
    assert kind == "done" and info["count"] == 2 and info["bytes_up"] == 2 * (math.ceil(k / 2) + 4 * math.ceil(k / 256))
    assert int((result != 0).sum()) <= 2 * k  # the mean of two random-k updates
    fake = SimpleNamespace(workers=2, sticky=True)
    shares = PoolExecutor.assign(fake, [SimpleNamespace(client=str(c)) for c in range(5)], {})
    assert [[j.client for j in s] for s in shares] == [["0", "2", "4"], ["1", "3"]]


def test_token_bucket_paces_sends_at_its_rate():
    t = [0.0]
    bucket = testing.TokenBucket(100, clock=lambda: t[0])
    assert [bucket.due(50), bucket.due(100), bucket.due(10)] == [0.0, 0.5, 0.6]  # a burst, then the rate
    t[0] = 10.0
    assert bucket.due(100) == 10.0 and bucket.due(1) == pytest.approx(10.01)
    assert testing.faults({testing.FAULTS_ENV: '{"slow_uplink": 1e6}'}) == {testing.Fault.SLOW_UPLINK: 1e6}
    with pytest.raises(ConfigError, match="slow_uplink takes bytes per second"):
        testing.faults({testing.FAULTS_ENV: '{"slow_uplink": 0}'})


def test_compressed_updates_over_the_bus_real_processes(tmp_path):
    """The one real-process test: a coordinator and two client processes over ipc; the clients compress, the
    coordinator decodes, and the bytes counted at its socket are the compressed ones."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedopt", "simulate", "--transport", "ipc", "--processes", "2", "--rounds", "2",
           "--local-epochs", "1", "--partition", "iid", "--heartbeat", "0.5", "--compress", "topk:0.1+q8",
           "--compress-down", "q8",
           "--progress", "off", "--no-plot", "--out", str(out)]
    from fedopt.launch import one_thread_env

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=one_thread_env())
    assert done.returncode == 0, done.stderr[-2000:]
    records = _rounds(tmp_path)
    k = keep_count(4810, 0.1)
    payload = 4 * k + k + 4 * math.ceil(k / 256)
    # per client: the compressed tensors plus the UPDATE and OFFER headers and a few heartbeats; dense is 19,240
    assert len(records) == 2 and all(2 * payload < r["bytes_up"] < 2 * (payload + 1500) for r in records)
    model = 4810 + 4 * math.ceil(4810 / 256)  # --compress-down q8: the TRAIN each client decodes
    assert all(2 * model < r["bytes_down"] < 2 * (model + 1500) for r in records), [r["bytes_down"] for r in records]
    assert "dropped messages   0" in done.stdout + done.stderr


def test_the_coordinators_reused_scatter_vector_gives_the_in_process_model(tmp_path):
    # over the bus the coordinator scatters each top-k update into one zeroed vector it keeps (fedavg), zeroing the
    # positions again after folding it in; the in-process simulation decodes every update into a fresh vector. Same
    # seeds, same residuals, same packed updates: the models agree to float rounding (the bus folds updates in
    # arrival order). A position left over from an earlier update would add a whole coordinate's value
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fedopt.launch import one_thread_env

    flags = ["--rounds", "3", "--clients", "4", "--local-epochs", "1", "--partition", "iid", "--compress",
             "topk:0.05+q8", "--progress", "off", "--no-plot"]
    done = subprocess.run([sys.executable, "-m", "fedopt", "simulate", "--transport", "ipc", "--processes", "4",
                           "--heartbeat", "0.5", *flags, "--out", str(tmp_path / "bus")],
                          capture_output=True, text=True, timeout=120, env=one_thread_env())
    assert done.returncode == 0, done.stderr[-2000:]
    from fedopt.cli import main

    assert main(["simulate", *flags, "--out", str(tmp_path / "sim")]) == 0
    bus, sim = (load_file(tmp_path / d / "model.safetensors") for d in ("bus", "sim"))
    assert max(float((bus[k] - sim[k]).abs().max()) for k in sim) < 1e-6
