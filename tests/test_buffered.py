"""FedBuff (fedopt.engine.buffered) and the virtual clock (fedopt.engine.clock): exact outcomes, no timing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clients.simulation.run import Simulation
from fedopt.aggregators import Update, fedavg
from fedopt.checkpoint import BufferJournal
from fedopt.cli import main
from fedopt.config import RunConfig
from fedopt.engine import RoundServer
from fedopt.engine.buffered import Arrival, BufferedEngine
from fedopt.engine.clock import parse_speeds
from fedopt.errors import ConfigError, RoundError
from fedopt.optimizers import make_server_optimizer
from fedopt.params import ParamSpec
from fedopt.schedules import parse_staleness
from fedopt.task import TrainConfig


def test_c_equals_k_equals_o_equals_every_client_is_synchronous_fedavg_bit_for_bit():
    base = dict(clients=6, rounds=10, local_epochs=1, seed=4, progress="off", plot=False)
    sync = Simulation(RunConfig.of(**base)).run()
    buffered = Simulation(RunConfig.of(**base, buffer_size=6, concurrency=6, dispatch_threshold=6)).run()
    assert float((sync.global_vec - buffered.global_vec).abs().max()) == 0.0
    assert [r["accuracy"] for r in sync.records] == [r["accuracy"] for r in buffered.records]
    assert all(r["staleness"] == {"0": 6} and r["version"] == r["round"] for r in buffered.records)


def test_each_secure_buffer_is_one_secagg_cohort_within_the_dequantisation_bound_of_plaintext_fedbuff():
    base = dict(clients=8, rounds=1, local_epochs=1, seed=4, progress="off", plot=False, buffer_size=4, concurrency=6)
    plain = Simulation(RunConfig.of(**base)).run()
    secure = Simulation(RunConfig.of(**base, aggregator="secagg")).run()
    # the same four arrivals, summed under masks: each coordinate is off by at most one quantisation step,
    # clip / (2^(bits-1) - 1) with secagg's defaults (clip 10, 16 bits), and the model moved
    step = 10.0 / (2 ** 15 - 1)
    diff = float((plain.global_vec - secure.global_vec).abs().max())
    assert 0 < diff <= step
    assert secure.records[0]["clients"] == plain.records[0]["clients"] == 4
    assert secure.records[0]["staleness"] == plain.records[0]["staleness"]


@pytest.mark.parametrize("spec, taus, want", [
    ("polynomial", (0, 3, 8), (1.0, 0.5, 1 / 3)),
    ("polynomial:1", (0, 1, 4), (1.0, 0.5, 0.2)),
    ("sqrt", (0, 4, 9), (1.0, 1 / 3, 0.25)),
    ("hinge", (4, 5, 6), (1.0, 1 / 11, 1 / 21)),
    ("hinge:2,1", (1, 2, 3), (1.0, 1 / 3, 1 / 5)),
    ("constant", (0, 100), (1.0, 1.0)),
])
def test_staleness_functions(spec, taus, want):
    f = parse_staleness(spec)
    assert [f(t) for t in taus] == pytest.approx(list(want))


@pytest.mark.parametrize("spec", ["poly", "polynomial:x", "hinge:1", "sqrt:2", "constant:1", "polynomial:-1"])
def test_a_bad_staleness_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="--staleness"):
        parse_staleness(spec)


class Script:
    """Clients 'a'..'d'; each job's update is a delta of ones from whichever model it was sent; arrivals come in the
    order the test scripts (client names), so staleness is exact."""

    def __init__(self, order: list[str]) -> None:
        self.order, self.pending, self.dispatched = list(order), {}, []

    def available(self):
        return {c: 10 for c in "abcd"}

    def dispatch(self, job, model, version):
        self.dispatched.append((job.client, version))
        self.pending[job.client] = Arrival(job.client, version, Update(job.client, torch.ones(3), 10))

    def collect(self):
        client = self.order.pop(0)
        return self.pending.pop(client)

    def now(self):
        return 0.0

    def close(self):
        pass


def server() -> RoundServer:
    spec = ParamSpec.from_module(torch.nn.Linear(2, 1))
    return RoundServer(spec, torch.zeros(3), fedavg(), make_server_optimizer("fedavg"), TrainConfig(), per_round=4)


def test_staleness_scales_each_update_and_the_buffer_steps_every_k_arrivals():
    s = server()
    ex = Script(["a", "b", "c", "a", "d", "b"])
    # C = 4 = every client, so which clients start is not drawn; K = 2, O = 1: a finished client restarts at once
    records = BufferedEngine(s, ex, steps=3, concurrency=4, buffer=2,
                             staleness=parse_staleness("polynomial:1")).run()
    # step 1: a, b (tau 0) -> model 1; a restarted before the step (from version 0), b after it (version 1)
    # step 2: c (tau 1: weight 1/2), a (tau 1: 1/2) -> model 1.5
    # step 3: d (from version 0, tau 2: 1/3), b (tau 1: 1/2) -> model 1.5 + 5/12
    assert [r["staleness"] for r in records] == [{"0": 2}, {"1": 2}, {"1": 1, "2": 1}]
    assert torch.allclose(s.global_vec, torch.full((3,), 1.5 + 5 / 12))
    assert ex.dispatched[:6] == [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("a", 0), ("b", 1)]


def test_updates_older_than_max_staleness_are_dropped_and_counted():
    s = server()
    ex = Script(["a", "b", "c", "d", "a"])
    records = BufferedEngine(s, ex, steps=3, concurrency=4, buffer=1, max_staleness=1,
                             staleness=parse_staleness("constant")).run()
    # K = 1 (FedAsync): a -> v1, b (tau 1) -> v2; c, d (tau 2) are dropped and counted; a (restarted at v1) -> v3
    assert [(r["version"], r["stale_dropped"]) for r in records] == [(1, 0), (2, 0), (3, 2)]
    assert torch.allclose(s.global_vec, torch.full((3,), 3.0))


def test_buffered_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--buffer-size"):
        RunConfig.of(clients=4, buffer_size=5)
    with pytest.raises(ConfigError, match="--concurrency"):
        RunConfig.of(clients=4, buffer_size=2, concurrency=9)
    with pytest.raises(ConfigError, match="does not combine with --algorithm scaffold"):
        RunConfig.of(clients=4, buffer_size=2, algorithm="scaffold")
    with pytest.raises(ConfigError, match="give --buffer-size"):
        RunConfig.of(clients=4, max_staleness=3)


def test_client_speeds_are_seeded_per_client_and_partial_work_costs_its_share(tmp_path):
    a, b = parse_speeds("lognormal:1.0", comm=5.0, seed=1), parse_speeds("lognormal:1.0", comm=5.0, seed=1)
    assert [a.full_job(str(i)) for i in range(20)] == [b.full_job(str(i)) for i in range(20)]
    assert a.duration("3", 5, 10) == pytest.approx(5.0 + a.full_job("3") / 2)
    classes = parse_speeds("classes:100,200,400", seed=0)
    assert {classes.full_job(str(i)) for i in range(60)} == {100.0, 200.0, 400.0}
    median = sorted(a.full_job(str(i)) for i in range(401))[200]
    assert 70 < median < 140  # lognormal with median 100 (seeded: exact for this seed, the bound is the spec's)
    (tmp_path / "t.csv").write_text("# client,seconds\n0,12.5\n1,30\n")
    t = parse_speeds(f"trace:{tmp_path / 't.csv'}", comm=1.0)
    assert (t.duration("0", 10, 10), t.duration("1", 5, 10)) == (13.5, 16.0)
    with pytest.raises(ConfigError, match="no entry for client '2'"):
        t.full_job("2")
    for bad in ("lognormal", "classes:0,1", "uniform:3", f"trace:{tmp_path / 'none.csv'}"):
        with pytest.raises(ConfigError, match="--client-speed"):
            parse_speeds(bad)


def test_simulate_buffered_writes_versions_staleness_and_virtual_time(tmp_path):
    out = tmp_path / "run"
    rc = main(["simulate", "--clients", "8", "--rounds", "4", "--local-epochs", "1", "--buffer-size", "2",
               "--concurrency", "4", "--client-speed", "classes:100,200,400", "--comm-seconds", "5", "--out",
               str(out), "--progress", "off", "--no-plot"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert all(sum(r["staleness"].values()) == r["clients"] == 2 for r in rows)
    times = [r["virtual_seconds"] for r in rows]
    assert times == sorted(times) and times[0] >= 105.0  # the fastest class plus its communication
    sync = tmp_path / "sync"
    assert main(["simulate", "--clients", "8", "--rounds", "2", "--local-epochs", "1", "--client-speed",
                 "classes:100,200,400", "--out", str(sync), "--progress", "off", "--no-plot"]) == 0
    rows = [json.loads(line) for line in (sync / "metrics.jsonl").read_text().splitlines()]
    slowest = max(parse_speeds("classes:100,200,400", seed=0).full_job(str(i)) for i in range(8))
    assert [r["virtual_seconds"] for r in rows] == [slowest, 2 * slowest]  # a synchronous round waits for it


def test_a_buffer_that_can_never_fill_is_an_error_not_a_hang():
    class Poison(Script):
        def dispatch(self, job, model, version):
            self.order.append(job.client)  # every client comes back at once, with NaN
            self.pending[job.client] = Arrival(job.client, version, Update(job.client, torch.full((3,), math.nan), 10))

    with pytest.raises(RoundError, match="no update accepted in the last 101 arrivals"):
        BufferedEngine(server(), Poison([]), steps=3, concurrency=2, buffer=1).run()


class Crash(Exception):
    """The coordinator's process ends here (``kill -9``): nothing after it runs."""


def test_the_buffer_survives_a_crash_between_steps(tmp_path):
    """K = 2: a and b make version 1 (checkpointed); c (tau 1, weight 1/2) waits in the buffer when the process dies.
    The resumed engine starts with c in its buffer, so the next arrival (a, tau 0) completes version 2."""
    journal = BufferJournal(tmp_path)
    saved = {}

    def checkpoint(v, state):
        saved.update(version=v, state=state, model=s.global_vec.clone())

    class Dies(Script):
        def collect(self):
            if not self.order:
                raise Crash
            return super().collect()

    s = server()
    with pytest.raises(Crash):
        BufferedEngine(s, Dies(["a", "b", "c"]), steps=3, concurrency=4, buffer=2, journal=journal,
                       staleness=parse_staleness("polynomial:1"), checkpoint=checkpoint).run()
    assert saved["version"] == 1 and len(list((tmp_path / "buffer").glob("2-*.safetensors"))) == 1

    s = server()
    s.global_vec.copy_(saved["model"])
    records = BufferedEngine(s, Script(["a"]), steps=2, concurrency=4, buffer=2, journal=journal, start=2,
                             resumed=json.loads(json.dumps(saved["state"])),
                             staleness=parse_staleness("polynomial:1")).run()
    assert [(r["version"], r["staleness"], r["clients"]) for r in records] == [(2, {"0": 1, "1": 1}, 2)]
    assert torch.allclose(s.global_vec, torch.full((3,), 1.0 + (0.5 + 1.0) / 2))
    assert list((tmp_path / "buffer").glob("*.safetensors")) == []  # applied: the journal is empty again


def test_the_journal_keeps_only_the_version_being_built(tmp_path):
    j = BufferJournal(tmp_path)
    j.add(3, torch.ones(2), {"client": "a"})
    j.add(4, torch.full((2,), 2.0), {"client": "b"})
    j.add(4, torch.full((2,), 3.0), {"client": "c"})
    (tmp_path / "buffer" / "4-9.safetensors").write_bytes(b"torn")  # unreadable: skipped
    got = BufferJournal(tmp_path).load(4)
    assert [(info["client"], float(d[0])) for d, info in got] == [("b", 2.0), ("c", 3.0)]
    assert not (tmp_path / "buffer" / "3-1.safetensors").exists()  # an applied version's file is removed
    j.clear()
    assert list((tmp_path / "buffer").glob("*.safetensors")) == []


def test_a_torn_checkpoint_is_one_config_error_naming_it(tmp_path):
    from fedopt.checkpoint import load_checkpoint

    (tmp_path / "checkpoint.safetensors").write_bytes(b"torn")
    with pytest.raises(ConfigError, match="checkpoint.safetensors is unreadable"):
        load_checkpoint(tmp_path)
