"""Helpers for tests that run real coordinator and client processes on loopback (not a test module)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from fedopt.launch import fedopt_command, free_port, one_thread_env, spawn, stop_processes
from fedopt.testing import Fault, fault_env

__all__ = ["Cluster", "free_port", "wait_for", "read_rounds", "finished", "survivors_sum_matches", "BASE"]

#: the options every real-process coordinator test starts from: small, fast, iid digits
BASE = ["--task", "digits", "--local-epochs", "1", "--partition", "iid", "--heartbeat", "0.5"]


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def survivors_sum_matches(dump: Path, r: int) -> dict:
    """The coordinator's secure round ``r`` sum equals the wrapping sum of the survivors' own encoded (unmasked)
    vectors, bit for bit (``Fault.SECAGG_DUMP``); returns the round's {"survivors", "dropped", "modulus_bits"}."""
    meta = json.loads((dump / f"sum-{r}.json").read_text())
    total = np.load(dump / f"sum-{r}.npy")
    own = [np.load(dump / f"encoded-{r}-{u}.npy") for u in meta["survivors"]]
    expected = np.sum(np.stack(own), axis=0, dtype=total.dtype)  # uint arithmetic: the sum mod 2^32 or 2^64
    if meta["modulus_bits"] < 8 * total.dtype.itemsize:  # a narrower modulus: the sum mod 2^k
        expected &= total.dtype.type((1 << meta["modulus_bits"]) - 1)
    assert total.dtype == own[0].dtype and np.array_equal(total, expected), f"round {r}: the sum is not exact"
    return meta


def signed_sum(total: np.ndarray, bits: int) -> np.ndarray:
    """A secure round's sum (residues mod 2^bits in uint32/uint64 words) as signed integers (int64 or wider)."""
    if bits == 64:
        return total.view(np.int64)
    half = 1 << (bits - 1)
    return ((total.astype(np.int64) & ((1 << bits) - 1)) ^ half) - half


def read_rounds(out: Path) -> list[dict]:
    p = Path(out) / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class Cluster:
    """A coordinator and clients as real processes, each in its own process group, all killed on ``stop()``."""

    def __init__(self, tmp: Path, keys: str | None = None, transport: str = "tcp") -> None:
        self.tmp = Path(tmp)
        self.keys = keys
        self.url = f"tcp://127.0.0.1:{free_port()}" if transport == "tcp" else f"ipc://{self.tmp}/c.sock"
        self.out = self.tmp / "out"
        self.procs: list[subprocess.Popen] = []
        self.coordinator: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self.edges: dict[str, subprocess.Popen] = {}

    def _spawn(self, args: list[str], log: str, faults: dict[Fault, object] | None = None) -> subprocess.Popen:
        p = spawn(fedopt_command(*args), self.tmp / log,
                  one_thread_env(PYTHONUNBUFFERED="1", **fault_env(faults or {})))
        self.procs.append(p)
        return p

    def security(self, role_keys: str | None) -> list[str]:
        return ["--keys", role_keys] if role_keys else ["--insecure"]

    def start_coordinator(self, *options: str, resume: bool = False,
                          faults: dict[Fault, object] | None = None) -> subprocess.Popen:
        args = ["coordinator", "--bind", self.url, *self.security(self.keys), "--out", str(self.out),
                "--progress", "lines", *options, *(["--resume"] if resume else [])]
        self.coordinator = self._spawn(args, "coordinator.log", faults)
        return self.coordinator

    def start_client(self, shard: int, *options: str, keys: str | None = "same",
                     faults: dict[Fault, object] | None = None, connect: str | None = None) -> subprocess.Popen:
        """Client ``shard`` of the coordinator (or of ``connect``: edges); ``faults`` are injected through its
        environment (``fedopt.testing.fault_env``)."""
        keys = self.keys if keys == "same" else keys
        args = ["client", "--connect", connect or self.url, *self.security(keys), "--shard", str(shard),
                "--give-up", "60", *options]
        self.clients[shard] = self._spawn(args, f"client-{shard}.log", faults)
        return self.clients[shard]

    def start_edge(self, name: str, *options: str, faults: dict[Fault, object] | None = None) -> str:
        """An edge aggregator ``name`` (``fedopt aggregator``, insecure) joined to the coordinator, over the
        coordinator's transport; its URL."""
        ipc = self.url.startswith("ipc://")
        url = f"ipc://{self.tmp}/edge-{name}.sock" if ipc else f"tcp://127.0.0.1:{free_port()}"
        self.edges[name] = self._spawn(["aggregator", "--bind", url, "--upstream", self.url, "--id", name,
                                        "--insecure", "--give-up", "60", *options], f"edge-{name}.log", faults)
        return url

    def log(self, name: str = "coordinator") -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def rounds(self) -> list[dict]:
        return read_rounds(self.out)

    def stop(self) -> None:
        stop_processes(self.procs, grace=2.0)
        assert all(p.poll() is not None for p in self.procs)


def finished(c: "Cluster", timeout: float = 150) -> list[dict]:
    """Wait for the cluster's coordinator to exit 0 (its log otherwise); its metrics rows."""
    wait_for(lambda: c.coordinator.poll() is not None, timeout, "the coordinator to finish")
    assert c.coordinator.returncode == 0, c.log()[-3000:]
    return c.rounds()
