"""fedopt.bus: keys, the transport/key rules, CurveZMQ admission, Endpoint deadlines; and a >= 1 GB update end to end."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from _bus import Cluster, free_port, wait_for
from _leaks import owned_context
from fedopt import bus, wire
from fedopt.cli import main
from fedopt.errors import AuthError, ConfigError
from fedopt.keys import generate_keys

ROOT = Path(__file__).resolve().parents[1]


def test_keys_generate_cli_writes_the_layout(tmp_path, capsys):
    assert main(["keys", "generate", str(tmp_path / "k"), "--clients", "2"]) == 0
    k = tmp_path / "k"
    assert (k / "coordinator.key").exists() and (k / "coordinator.key_secret").exists()
    assert sorted(p.name for p in (k / "allowed").iterdir()) == ["client-000.key", "client-001.key"]
    assert (k / "clients" / "client-001.key_secret").stat().st_mode & 0o077 == 0
    assert "allow-list" in capsys.readouterr().out


def test_transport_and_key_rules(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--insecure"):
        bus.security_for("tcp://127.0.0.1:5555", None, False, "coordinator")
    assert not bus.security_for("tcp://127.0.0.1:5555", None, True, "client").curve
    assert "WITHOUT authentication" in capsys.readouterr().err
    assert not bus.security_for("ipc:///tmp/x", None, False, "client").curve
    with pytest.raises(ConfigError, match="must start with"):
        bus.security_for("http://x", None, True, "client")
    with pytest.raises(AuthError, match="does not exist"):
        bus.security_for("tcp://127.0.0.1:1", str(tmp_path / "none"), False, "client")
    keys = generate_keys(tmp_path / "k", 2)
    with pytest.raises(AuthError, match="--key-name"):
        bus.security_for("tcp://127.0.0.1:1", str(keys), False, "client")
    assert bus.security_for("tcp://127.0.0.1:1", str(keys), False, "client", "client-001").server_key
    assert bus.security_for("tcp://127.0.0.1:1", str(keys), False, "coordinator").allowed_dir == keys / "allowed"
    assert main(["coordinator", "--bind", "tcp://127.0.0.1:1", "--task", "digits"]) == 2


def _curve_exchange(tmp_path, client_keys: Path, caplog, msg: wire.Message = wire.Hello(client="0")):
    keys = generate_keys(tmp_path / "k", 1) if not (tmp_path / "k").exists() else tmp_path / "k"
    url = f"tcp://127.0.0.1:{free_port()}"
    server_sec = bus.security_for(url, str(keys), False, "coordinator")
    with owned_context() as ctx:  # raises if a socket is left open (called twice per test: not the fixture)
        auth = bus.start_authenticator(ctx, server_sec)
        try:
            srv = bus.Endpoint(bus.router(ctx, url, server_sec))
            cli = bus.Endpoint(bus.dealer(ctx, url, bus.security_for(url, str(client_keys), False, "client",
                                                                     "client-000")))
            assert cli.chunk_bytes == srv.chunk_bytes == bus.CURVE_CHUNK_BYTES  # encrypted: tensors go in chunks
            cli.send(msg)
            got = srv.recv(timeout=3)
            srv.close(), cli.close()
            return None if got is None else got[1]
        finally:
            auth.stop()


def test_curve_admits_listed_keys_and_refuses_others(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fedopt.bus")
    keys = generate_keys(tmp_path / "k", 1)
    assert isinstance(_curve_exchange(tmp_path, keys, caplog), wire.Hello)
    rogue = generate_keys(tmp_path / "rogue", 1)
    (rogue / "coordinator.key").write_bytes((keys / "coordinator.key").read_bytes())
    assert _curve_exchange(tmp_path, rogue, caplog) is None
    assert "refused a client" in caplog.text


def test_curve_sends_a_large_tensor_in_chunks_and_it_arrives_whole(tmp_path, caplog):
    keys = generate_keys(tmp_path / "k", 1)
    delta = torch.randn(bus.CURVE_CHUNK_BYTES // 4 * 3 + 5)  # 3 chunks and a ragged tail
    assert len(wire.encode(wire.UpdateMsg(delta=delta), chunk_bytes=bus.CURVE_CHUNK_BYTES)) == 1 + 4
    got = _curve_exchange(tmp_path, keys, caplog, wire.UpdateMsg(round=2, num_samples=7, delta=delta))
    assert isinstance(got, wire.UpdateMsg) and got.num_samples == 7 and torch.equal(got.delta, delta)


def test_endpoint_recv_honours_its_timeout_and_reports_the_peer_of_bad_input(zmq_context):
    url = "inproc://ep-test"
    r = bus.Endpoint(bus.router(zmq_context, url, bus.Security()))
    d = bus.Endpoint(bus.dealer(zmq_context, url, bus.Security()))
    assert r.chunk_bytes is None and d.chunk_bytes is None  # plain sockets send every tensor zero-copy, whole
    try:
        assert r.recv(timeout=0.05) is None
        d.sock.send(b"\xc1")
        with pytest.raises(bus.BadMessage, match="not msgpack") as e:
            r.recv(timeout=1)
        assert e.value.peer
        assert not r.send(wire.Heartbeat(), to=b"nobody")  # ROUTER_MANDATORY: a vanished peer is reported
        d.send(wire.UpdateMsg(round=1, delta=torch.ones(10)))
        peer, msg = r.recv(timeout=1)
        assert torch.equal(msg.delta, torch.ones(10)) and r.bytes_in == d.bytes_out + 1  # + the bad byte
    finally:
        r.close(), d.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("FEDOPT_BIG_TESTS") != "1", reason="needs ~12 GB RAM: set FEDOPT_BIG_TESTS=1")
@pytest.mark.parametrize("curve", [False, True], ids=["tcp", "curve"])
def test_a_one_gigabyte_update_end_to_end_over_tcp(tmp_path, monkeypatch, curve):
    params = 270_000_000  # 1.08 GB in float32; over CurveZMQ about 1,030 frames of 1 MiB each way
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'benchmarks'}{os.pathsep}{ROOT}")
    c = Cluster(tmp_path, str(generate_keys(tmp_path / "keys", 1)) if curve else None)
    opts = ["--task", "bus:BigTask", "--task-option", f"params={params}", "--clients", "1", "--rounds", "2",
            "--heartbeat", "10", "--deadline", "600", "--partition", "iid"]
    try:
        c.start_coordinator(*opts)
        c.start_client(0)
        wait_for(lambda: c.coordinator.poll() is not None, 850, "the 1 GB run", step=1)
        assert c.coordinator.returncode == 0, c.log()[-2000:]
    finally:
        c.stop()
    rows = c.rounds()
    assert [r["clients"] for r in rows] == [1, 1] and all(r["bytes_up"] >= params * 4 for r in rows)
    from safetensors import safe_open

    with safe_open(str(c.out / "model.safetensors"), "pt") as f:
        w = f.get_slice("w")[:1000]
    assert torch.allclose(w, torch.full((1000,), 0.002))  # two rounds of +0.001 travelled both ways
    print("1 GB rounds:", [round(r["seconds"], 1) for r in rows])
