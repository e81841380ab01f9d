"""fedopt.launch: ports, the per-process thread environment, and process groups that stop completely."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field

import psutil

from fedopt.launch import (config_argv, fedopt_command, free_port, free_ports, one_thread_env, shared_cores_env,
                           spawn, stop_processes)


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(20000 <= p <= 32000 for p in ports)
    for port in [*ports[:3], free_port()]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_client_processes_share_the_cores(monkeypatch):
    """``simulate --processes K`` gives each client process its share of the cores for torch and secagg threads
    (oversubscribed, 6 small-model clients on 2 cores took 5-7 s a round instead of 0.11 s); a user's setting wins."""
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("FEDOPT_SECAGG_THREADS", raising=False)
    env = shared_cores_env(10 * cpus)
    assert env["OMP_NUM_THREADS"] == env["FEDOPT_SECAGG_THREADS"] == "1"
    assert shared_cores_env(1)["OMP_NUM_THREADS"] == str(cpus)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert shared_cores_env(10 * cpus)["OMP_NUM_THREADS"] == "3"


def test_one_thread_env_overrides_the_users_setting(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    env = one_thread_env(PYTHONPATH="/somewhere")
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONPATH"] == "/somewhere" and env["PATH"] == os.environ["PATH"]
    assert os.environ["OMP_NUM_THREADS"] == "8"  # this process's environment is left alone


def test_spawn_logs_with_the_given_environment(tmp_path):
    log = tmp_path / "child.log"
    code = ("import os, sys; print(os.environ['OMP_NUM_THREADS'], os.getpgid(0) == os.getpid()); "
            "sys.stderr.write('to stderr\\n')")
    p = spawn([sys.executable, "-c", code], log, one_thread_env())
    assert p.wait(timeout=30) == 0
    assert log.read_text().split() == ["1", "True", "to", "stderr"]  # True: it leads a process group of its own


def test_stop_processes_ends_the_whole_group_even_when_sigterm_is_ignored(tmp_path):
    """A child that ignores SIGTERM and has started a grandchild: both are gone after the grace period."""
    ready = tmp_path / "ready"
    code = ("import signal, subprocess, sys, time, pathlib\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
            f"pathlib.Path({str(ready)!r}).write_text(str(g.pid))\n"
            "time.sleep(600)\n")
    p = spawn([sys.executable, "-c", code])
    done = spawn([sys.executable, "-c", "pass"])
    end = time.monotonic() + 30
    while not ready.exists() or not ready.read_text():
        assert time.monotonic() < end, "the child never started its grandchild"
        time.sleep(0.05)
    grandchild = psutil.Process(int(ready.read_text()))
    assert done.wait(timeout=60) == 0  # a process that already ended is left as it is
    t0 = time.monotonic()
    stop_processes([p, done], grace=0.5)
    assert 0.4 < time.monotonic() - t0 < 10
    assert p.returncode == -9 and done.returncode == 0
    grandchild.wait(timeout=10)  # SIGKILL reached the grandchild through the group (reaped by init)
    assert not grandchild.is_running()


def test_fedopt_command_runs_this_interpreters_fedopt():
    assert fedopt_command("keys", "generate", "k") == [sys.executable, "-m", "fedopt", "keys", "generate", "k"]


@dataclass(frozen=True)
class _Config:
    bind: str
    batch_size: int = 16
    peers: tuple = ()
    resume: bool = False
    plot: bool = True
    clip_norm: float | None = None
    task_options: dict = field(default_factory=dict)


def test_config_argv_writes_only_what_differs_from_the_defaults():
    assert config_argv(_Config("ipc://a")) == ["--bind", "ipc://a"]  # no default: always given
    got = config_argv(_Config("ipc://a", batch_size=8, peers=("ipc://b", "ipc://c"), resume=True, plot=False,
                              clip_norm=0.5, task_options={"alpha": 1.5, "name": "x"}))
    assert got == ["--bind", "ipc://a", "--batch-size", "8", "--peers", "ipc://b,ipc://c", "--resume", "--no-plot",
                   "--clip-norm", "0.5", "--task-option", "alpha=1.5", "--task-option", "name=x"]
