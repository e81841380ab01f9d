"""LAN discovery: keyed beacons, on loopback and across network namespaces joined by veth and a bridge."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from clients.gossip.discovery import Beacon, beacon_key, decode_beacon, encode_beacon, interface_address
from fedopt.errors import ConfigError
from fedopt.launch import free_port, one_thread_env, spawn, stop_processes
from fedopt.metrics import read_metrics

KEY = beacon_key(b"swarm secret")


def test_beacon_round_trip_and_refusals():
    data = encode_beacon(KEY, "tcp://10.0.0.2:5555", now=1000.0)
    assert len(data) <= 255
    assert decode_beacon(KEY, data, "10.0.0.2", now=1001.0) == "tcp://10.0.0.2:5555"
    with pytest.raises(ValueError, match="bad tag"):
        decode_beacon(beacon_key(b"another swarm"), data, "10.0.0.2", now=1001.0)
    with pytest.raises(ValueError, match="bad tag"):
        decode_beacon(KEY, data[:-1] + bytes([data[-1] ^ 1]), "10.0.0.2", now=1001.0)
    with pytest.raises(ValueError, match="replayed"):
        decode_beacon(KEY, data, "10.0.0.2", now=1100.0)
    with pytest.raises(ValueError, match="came from"):
        decode_beacon(KEY, data, "10.0.0.9", now=1001.0)
    with pytest.raises(ValueError, match="not a fedopt beacon"):
        decode_beacon(KEY, b"ZRE\x01" + b"x" * 30, "10.0.0.2", now=1001.0)


def test_unknown_interface_is_a_config_error():
    with pytest.raises(ConfigError, match="no-such-if0"):
        interface_address("no-such-if0")


def test_two_beacons_on_loopback_find_each_other_and_ignore_a_stranger():
    port = free_port()
    a = Beacon("tcp://127.0.0.1:7001", KEY, "lo", port, interval=0.1)
    b = Beacon("tcp://127.0.0.1:7002", KEY, "lo", port, interval=0.1)
    stranger = Beacon("tcp://127.0.0.1:7003", beacon_key(b"wrong"), "lo", port, interval=0.1)
    seen = {a: set(), b: set()}
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end and not all(len(s) for s in seen.values()):
            for x in (a, b, stranger):
                x.tick()
            time.sleep(0.05)
            for x in (a, b):
                seen[x] |= set(x.receive())
    finally:
        for x in (a, b, stranger):
            x.close()
    assert seen[a] == {"tcp://127.0.0.1:7002"} and seen[b] == {"tcp://127.0.0.1:7001"}


# ---- network namespaces -------------------------------------------------------------------------------------------------
def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


class Lan:
    """``n`` namespaces with one veth each, joined by a bridge in a namespace of its own; removed on ``close``."""

    def __init__(self, n: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.hub = f"fo{tag}h"
        self.spaces = [f"fo{tag}{i}" for i in range(n)]
        self.ips = [f"10.77.{int(tag[:2], 16)}.{i + 10}" for i in range(n)]
        self.created: list[str] = []

    def open(self) -> None:
        def must(*args):
            r = _ip(*args)
            if r.returncode:
                raise PermissionError(f"ip {' '.join(args)}: {r.stderr.strip()}")

        for ns in [self.hub, *self.spaces]:
            must("netns", "add", ns)
            self.created.append(ns)
        must("-n", self.hub, "link", "add", "br0", "type", "bridge")
        must("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.spaces):
            must("-n", self.hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            must("-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
            must("-n", ns, "addr", "add", f"{self.ips[i]}/24", "broadcast", "+", "dev", "eth0")
            must("-n", ns, "link", "set", "eth0", "up")
            must("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        for ns in self.created:
            _ip("netns", "del", ns)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_peers_in_separate_namespaces_discover_each_other_and_train(tmp_path):
    if shutil.which("ip") is None:
        pytest.skip("LAN discovery test skipped: the `ip` command (iproute2) is not installed")
    lan = Lan(3)
    try:
        lan.open()
    except (PermissionError, OSError) as e:
        lan.close()
        pytest.skip(f"LAN discovery test skipped: cannot create network namespaces here ({e})")
    procs = []
    try:
        port = 7000 + free_port() % 2000
        for i, ns in enumerate(lan.spaces):
            out = tmp_path / f"peer-{i}"
            out.mkdir()
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "fedopt", "gossip", "--bind",
                   f"tcp://{lan.ips[i]}:{port}", "--discover", "--interface", "eth0", "--insecure",
                   "--swarm-secret", "lan-test", "--shard", str(i), "--num-shards", "3", "--rounds", "6", "--final-mixes", "2",
                   "--join-wait", "3", "--out", str(out), "--progress", "off", "--log-level", "INFO",
                   "--exit-with-parent"]
            procs.append(spawn(cmd, out / "peer.log", one_thread_env()))
        end = time.monotonic() + 100
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.3)
    finally:
        stop_processes(procs)
        lan.close()
    logs = [(tmp_path / f"peer-{i}" / "peer.log").read_text(errors="replace") for i in range(3)]
    assert all(p.returncode == 0 for p in procs), logs
    for i in range(3):
        rows = read_metrics(tmp_path / f"peer-{i}" / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(1, 7))
        assert max(r["clients"] for r in rows) == 3, rows  # it knew both others, learned only from beacons
        assert sum(r["exchange"] == "ok" for r in rows) >= 2  # and trained with them
    assert not any(Path(f"/var/run/netns/{ns}").exists() for ns in lan.spaces)
