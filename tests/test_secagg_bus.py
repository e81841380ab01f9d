"""Secure aggregation over the real bus: the SECAGG wire type, identity files, a multi-process run matched against the
in-process engine, and real client processes SIGKILLed at every protocol stage (the round's sum checked bit for bit
against the survivors' own quantised updates), down to an aborted round the coordinator survives."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from _bus import BASE, Cluster, survivors_sum_matches, wait_for
from fedopt import bus, wire
from fedopt.errors import AuthError, WireError
from fedopt.identity import load_identity, load_pinned, write_identities
from fedopt.keys import generate_keys
from fedopt.secagg import codec, generate_identity, identity_public_bytes
from fedopt.secagg.messages import MaskedInput
from fedopt.testing import Fault, SecAggExit

DIGITS = BASE


# ---- fast: the wire type and the identity files -----------------------------------------------------------------------
def test_secagg_message_crosses_the_wire_with_its_vector_frame_intact():
    vec = np.arange(7, dtype=np.uint64) * (1 << 40)
    frames = [bytes(f) for f in wire.encode(wire.SecAgg(round=4, parts=codec.pack(MaskedInput(4, "2", vec)),
                                                        sender="2"))]
    got = wire.decode(frames)
    assert isinstance(got, wire.SecAgg) and got.round == 4 and len(got.parts) == 2
    msg = codec.unpack(got.parts)
    assert msg.sender == "2" and msg.vector.dtype == np.uint64 and np.array_equal(msg.vector, vec)
    with pytest.raises(WireError, match="declares 2 part"):
        wire.decode(frames[:2])  # a frame missing
    head = wire.encode(wire.SecAgg(round=1, parts=[b"x"]))[0]
    with pytest.raises(WireError, match="must count"):
        wire.decode([bytes(head).replace(b"\xa5parts\x01", b"\xa5parts\x00")])  # zero parts declared
    with pytest.raises(WireError):  # the frame passes the bus's checks, the codec refuses its content
        codec.unpack(wire.decode([head, b"not msgpack \xc1"]).parts)


def test_identity_files_pin_each_client_to_its_id(tmp_path):
    d = write_identities(tmp_path / "ids", ["0", "1"], ["client-000", "client-001"])
    pinned = load_pinned(d)
    assert set(pinned) == {"0", "1"} and all(len(k) == 32 for k in pinned.values())
    key = load_identity(d, "client-001", "1", pinned)
    assert identity_public_bytes(key) == pinned["1"]
    with pytest.raises(AuthError, match="not of this client"):
        load_identity(d, "client-001", "0", pinned)  # a secret used under another client's id
    forged = dict(pinned, **{"1": identity_public_bytes(generate_identity())})
    with pytest.raises(AuthError, match="does not match"):
        load_identity(d, "client-001", "1", forged)
    (d / "identities" / "client-000.pub").write_text("garbage\n")
    with pytest.raises(AuthError, match="not a fedopt identity file"):
        load_pinned(d)
    with pytest.raises(AuthError, match="holds no identity keys"):
        load_pinned(tmp_path / "nowhere")


def test_keys_generate_writes_identities_beside_the_curve_keys(tmp_path):
    d = generate_keys(tmp_path / "keys", 3)
    assert set(load_pinned(d)) == {"0", "1", "2"}
    assert (d / "clients" / "client-002.identity_secret").stat().st_mode & 0o077 == 0
    bus.security_for("tcp://127.0.0.1:1", str(d), False, "client", "client-002")  # still one Curve secret each


# ---- slow: real processes -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ipc_processes_match_the_in_process_secagg_run(tmp_path):
    from clients.simulation.run import simulate
    from coordinator.local import simulate_processes
    from fedopt.config import RunConfig

    common = dict(task="digits", clients=4, rounds=3, local_epochs=1, seed=3, partition="iid", aggregator="secagg",
                  progress="off")
    assert simulate_processes(RunConfig.of(**common, transport="ipc", processes=4, heartbeat=0.5,
                                        out=str(tmp_path / "bus"))) == 0
    rows = [json.loads(line) for line in (tmp_path / "bus" / "metrics.jsonl").read_text().splitlines()]
    ref = simulate(RunConfig.of(**common, out=str(tmp_path / "ref")))
    assert [r["clients"] for r in rows] == [4, 4, 4] and all(r["aborted"] is None for r in rows)
    assert rows[-1]["accuracy"] > 0.5  # it learned
    assert abs(rows[-1]["accuracy"] - ref.records[-1]["accuracy"]) <= 0.005
    # the clients' training loss comes with their OFFERs (the masked inputs themselves are uploaded on PULL)
    for got, want in zip(rows, ref.records):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_clients_killed_at_every_stage_then_too_many(tmp_path):
    """6 clients over tcp + CurveZMQ. Round 1: one dies before sharing keys; 2: one after sharing (before its masked
    input); 3: one after its masked input; 4: two of the last three die after sharing -> fewer than t survive ->
    abort; the killed two come back and round 5 completes."""
    keys = str(generate_keys(tmp_path / "keys", 6))
    dump = tmp_path / "dump"
    c = Cluster(tmp_path, keys)
    seam = {Fault.SECAGG_DUMP: dump}
    try:
        c.start_coordinator(*DIGITS, "--aggregator", "secagg", "--clients", "6", "--rounds", "5",
                            "--min-clients", "3", "--join-timeout", "2", "--deadline", "40", "--seed", "1",
                            faults=seam)
        faults = {5: SecAggExit("share", 1), 4: SecAggExit("mask", 2), 3: SecAggExit("unmask", 3),
                  2: SecAggExit("mask", 4), 1: SecAggExit("mask", 4)}
        for i in range(6):
            c.start_client(i, faults={**seam, **({Fault.EXIT_AT_SECAGG_STAGE: faults[i]} if i in faults else {})})
        wait_for(lambda: len(c.rounds()) >= 4, 150, "round 4")
        for i in (1, 2):
            c.clients[i].wait(timeout=10)
            c.start_client(i, faults=seam)  # the same clients, restarted without the fault
        wait_for(lambda: c.coordinator.poll() is not None, 120, "the coordinator to finish")
        assert c.coordinator.returncode == 0, c.log()[-3000:]
    finally:
        c.stop()
    rows = c.rounds()
    log = c.log()
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5], log[-3000:]
    for i in faults:  # each faulty client really died of SIGKILL at its stage
        assert "injected fault: SIGKILL" in c.log(f"client-{i}")
    survivors = {r: survivors_sum_matches(dump, r) for r in (1, 2, 3, 5)}
    assert survivors[1]["survivors"] == ["0", "1", "2", "3", "4"] and survivors[1]["dropped"] == []
    assert survivors[2]["survivors"] == ["0", "1", "2", "3"] and survivors[2]["dropped"] == ["4"]
    assert survivors[3]["survivors"] == ["0", "1", "2", "3"]  # 3 sent its masked input, then died: still counted
    assert survivors[5]["survivors"] == ["0", "1", "2"]
    assert [r["clients"] for r in rows] == [5, 4, 4, 0, 3]
    aborted = rows[3]
    assert aborted["aborted"] and "threshold" in aborted["aborted"] and not (dump / "sum-4.npy").exists()
    assert aborted["loss"] == rows[2]["loss"]  # the global model did not move in the aborted round
    assert len(re.findall(r"ERROR .*round 4 aborted", log)) == 1, log[-3000:]
    assert all(r["aborted"] is None for r in rows if r["round"] != 4)
