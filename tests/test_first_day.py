"""A user's first day: what a newcomer meets on the way in, and what must never cost them data or time.

Each test names the behaviour it guards. Sockets are loopback or ipc:// with bounded waits; processes are started with
timeouts and stopped in ``finally``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from pathlib import Path

import pytest
import torch
import zmq

from fedopt import bus
from fedopt.cli import Parser, main
import tomllib
from fedopt.errors import AuthError, FedoptError, TaskError
from fedopt.keys import generate_keys
from fedopt.launch import free_port
from fedopt.metrics import Reporter, read_metrics
from fedopt.task import resolve_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
QUICK = ["--clients", "2", "--rounds", "1", "--local-epochs", "1", "--progress", "off", "--no-plot"]


def _cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedopt", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=cwd)


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- a run folder holding results is never emptied by accident -------------------------------------------------------
def test_simulate_refuses_a_folder_holding_results_then_overwrites_on_request(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *QUICK, "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["simulate", *QUICK, "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out) in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    assert main(["simulate", *QUICK, "--out", str(out), "--overwrite"]) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 1


def test_coordinator_refuses_a_folder_holding_results_before_it_binds(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    url = f"ipc://{tmp_path}/c.sock"
    assert main(["coordinator", "--bind", url, "--out", str(out), "--rounds", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert not (tmp_path / "c.sock").exists()  # refused before anything started
    assert (out / "metrics.jsonl").read_text() == json.dumps({"round": 1}) + "\n"
    # --resume on results without a checkpoint cannot continue anything: refused too, the results kept
    assert main(["coordinator", "--bind", url, "--out", str(out), "--resume"]) == 2
    assert "no checkpoint" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [
    ["gossip", "--bind", "ipc://{tmp}/g.sock", "--shard", "0", "--num-shards", "2", "--rounds", "1"],
    ["allreduce", "--nproc", "1", "--epochs", "1", "--max-steps", "1"],
])
def test_gossip_and_allreduce_refuse_a_folder_holding_results(tmp_path, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier model")
    argv = [c.replace("{tmp}", str(tmp_path)) for c in command]
    r = _cli(*argv, "--out", str(out), "--progress", "off", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(out) in _one_line(r.stderr) and "--overwrite" in r.stderr
    assert (out / "model.safetensors").read_bytes() == b"an earlier model"


def test_overwrite_deletes_only_result_files(tmp_path):
    from fedopt.metrics import claim_run_dir

    out = tmp_path / "run"
    (out / "peer-000").mkdir(parents=True)
    for name in ("metrics.jsonl", "model.safetensors", "accuracy.png"):
        (out / name).write_text("x")
    (out / "peer-000" / "checkpoint.safetensors").write_text("x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FedoptError):
        claim_run_dir(out, resume=True, overwrite=True)
    claim_run_dir(out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["notes.txt", "peer-000"]
    claim_run_dir(out)  # nothing left to lose: accepted


# ---- keys ------------------------------------------------------------------------------------------------------------
def _key_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_keys_generate_refuses_a_key_folder_and_force_says_what_it_replaced(tmp_path, capsys):
    d = tmp_path / "keys"
    assert main(["keys", "generate", str(d), "--clients", "3"]) == 0
    old = _key_bytes(d)
    capsys.readouterr()
    assert main(["keys", "generate", str(d), "--clients", "3"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(d) in line and "--force" in line
    assert _key_bytes(d) == old  # secrets untouched
    assert main(["keys", "generate", str(d), "--clients", "2", "--force"]) == 0
    err = capsys.readouterr().err
    assert "replaced" in err and "3 client secret keys" in err
    assert (d / "coordinator.key_secret").read_bytes() != old["coordinator.key_secret"]
    assert sorted(p.name for p in (d / "allowed").glob("*.key")) == ["client-000.key", "client-001.key"]  # none stale


def test_gitignore_keeps_keys_and_runs_out_of_version_control():
    lines = {x.strip() for x in (ROOT / ".gitignore").read_text().splitlines()}
    assert {"keys/", "runs/"} <= lines


def test_a_missing_coordinator_key_is_named(tmp_path):
    d = generate_keys(tmp_path / "keys", 1)
    (d / "coordinator.key").unlink()
    with pytest.raises(AuthError, match=r"coordinator\.key is missing: copy coordinator\.key"):
        bus.security_for("tcp://127.0.0.1:5555", str(d), False, "client", "client-000")


def _serve_in_thread(client) -> dict:
    got: dict = {}

    def target():
        try:
            got["rc"] = client.serve()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the client did not stop within 60 s"
    return got


def test_a_client_holding_another_coordinators_key_says_so(zmq_context, tmp_path, caplog):
    from clients.federated.client import FederatedClient
    from clients.federated.config import ClientConfig

    ours, theirs = generate_keys(tmp_path / "a", 1), generate_keys(tmp_path / "b", 1)
    url = f"tcp://127.0.0.1:{free_port()}"
    security = bus.security_for(url, str(ours), False, "coordinator")
    router = bus.router(zmq_context, url, security)
    monitor = None
    try:
        monitor = bus.handshake_monitor(router)
        # the client's coordinator.key is from folder b, while the coordinator at url holds folder a's pair
        client = FederatedClient(ClientConfig(url, shard=0, num_shards=1, heartbeat=0.2, give_up=8.0),
                                 bus.security_for(url, str(theirs), False, "client", "client-000"))
        got = _serve_in_thread(client)
        assert isinstance(got.get("error"), AuthError), got
        assert "coordinator.key" in str(got["error"]) and url in str(got["error"])
        # and the coordinator's side sees it as a failed handshake, not as silence
        end = time.monotonic() + 10
        seen: list[int] = []
        while time.monotonic() < end and zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL not in seen:
            monitor.poll(100)
            seen += bus.handshake_failures(monitor)
        assert zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL in seen
    finally:
        if monitor is not None:
            router.disable_monitor()
            monitor.close(0)
        router.close(0)


def test_coordinator_logs_a_client_holding_another_coordinators_key(zmq_context, tmp_path, caplog):
    from coordinator.server import Coordinator
    from fedopt.config import RunConfig

    ours, theirs = generate_keys(tmp_path / "a", 1), generate_keys(tmp_path / "b", 1)
    url = f"tcp://127.0.0.1:{free_port()}"
    cfg = RunConfig.of(clients=1, rounds=1, out=str(tmp_path / "run"), progress="off", plot=False)
    coord = Coordinator(cfg, url, bus.security_for(url, str(ours), False, "coordinator"))
    sock = bus.dealer(zmq_context, url, bus.security_for(url, str(theirs), False, "client", "client-000"))
    try:
        with caplog.at_level(logging.WARNING, logger="fedopt.coordinator"):
            end = time.monotonic() + 10
            while time.monotonic() < end and "failed the handshake" not in caplog.text:
                coord._pump(0.05)
                coord._keepalive()
        assert "does not hold this coordinator's public key" in caplog.text
    finally:
        sock.close(0)
        coord.close()


def test_a_client_pointed_at_nothing_names_the_address_and_how_long_it_tries(tmp_path, caplog):
    from clients.federated.client import FederatedClient
    from clients.federated.config import ClientConfig

    url = f"ipc://{tmp_path}/nobody.sock"
    client = FederatedClient(ClientConfig(url, shard=0, num_shards=1, heartbeat=0.1, give_up=1.0), bus.Security())
    with caplog.at_level(logging.INFO, logger="fedopt.client"):
        got = _serve_in_thread(client)
    assert isinstance(got.get("error"), FedoptError) and url in str(got["error"])
    assert f"connecting to the coordinator at {url}" in caplog.text and "--give-up" in caplog.text
    assert f"no answer from the coordinator at {url}" in caplog.text
    p = Parser(prog="fedopt client")
    from fedopt.cli.client import configure

    configure(p)
    assert "default 300" in " ".join(p.format_help().split())


# ---- the join timeout is paid once -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_join_timeout_is_paid_by_the_first_round_only(tmp_path):
    """3 rounds, one of 3 clients missing: round 1 waits the join timeout (nothing else can start it), rounds 2 and 3
    start with the two ready clients without waiting for the third again."""
    url, out, join = f"ipc://{tmp_path}/c.sock", tmp_path / "run", 5.0
    coord = subprocess.Popen([sys.executable, "-m", "fedopt", "coordinator", "--bind", url, "--out", str(out),
                              "--clients", "3", "--rounds", "3", "--min-clients", "2", "--join-timeout", str(join),
                              "--local-epochs", "1", "--progress", "lines", "--no-plot"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    clients = [subprocess.Popen([sys.executable, "-m", "fedopt", "client", "--connect", url, "--shard", str(i),
                                 "--num-shards", "3", "--log-level", "WARNING", "--give-up", "60"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV) for i in range(2)]
    try:
        _, err = coord.communicate(timeout=180)
    finally:
        for p in [coord, *clients]:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    assert coord.returncode == 0, err[-3000:]
    assert f"listening on {url}" in err and "waiting for 3 clients (" in err and "--join-timeout" in err
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in recs] == [1, 2, 3] and all(r["clients"] == 2 for r in recs)
    assert recs[0]["waited"] >= join
    assert all(r["waited"] < join for r in recs[1:]), [r["waited"] for r in recs]


# ---- tasks load as the README shows ----------------------------------------------------------------------------------
TINY = """
import torch
from torch import nn
from fedopt.data import ArrayTask

class Tiny(ArrayTask):
    name = "tiny"
    def build_model(self):
        return nn.Linear(4, 2)
    def arrays(self, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 4, generator=g); y = (x[:, 0] > 0).long()
        return x[:30], y[:30], x[30:], y[30:]
"""


@pytest.fixture
def console_script_path(tmp_path, monkeypatch):
    """The current folder is tmp_path and, as under the ``fedopt`` console script, not on sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(("fd_first_", "fedopt_task_fd_first_"))]:
        del sys.modules[name]


def test_a_task_module_in_the_current_folder_and_a_task_file_path_load(console_script_path):
    (console_script_path / "fd_first_ok.py").write_text(TINY)
    assert resolve_task("fd_first_ok:Tiny").name == "tiny"
    assert resolve_task("./fd_first_ok.py:Tiny").build_model().in_features == 4


@pytest.mark.parametrize("body,line,error", [
    ("import torch\ndef f(:\n    pass\n", 2, "SyntaxError"),
    ("import torch\nimport fd_no_such_package\n", 2, "ModuleNotFoundError"),
    ("x = 1\ny = 2\nraise RuntimeError('broken at import')\n", 3, "RuntimeError"),
])
@pytest.mark.parametrize("how", ["module", "path"])
def test_a_broken_task_file_is_one_line_naming_file_line_and_error(console_script_path, capsys, body, line, error,
                                                                    how):
    (console_script_path / "fd_first_bad.py").write_text(body)
    task = "fd_first_bad:Tiny" if how == "module" else "./fd_first_bad.py:Tiny"
    assert main(["simulate", "--task", task, *QUICK, "--out", str(console_script_path / "run")]) == 2
    msg = _one_line(capsys.readouterr().err)
    assert "fd_first_bad.py" in msg and f"line {line}" in msg and error in msg


def test_a_task_module_that_does_not_exist_is_named(console_script_path):
    with pytest.raises(TaskError, match="cannot import task module 'fd_first_none': not on the Python path"):
        resolve_task("fd_first_none:Tiny")


# ---- allreduce: quiet start, clean Ctrl-C, one thread for small models, the same options -----------------------------
@pytest.mark.slow
def test_allreduce_ctrl_c_is_one_line_and_exit_130_with_a_quiet_start(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.Popen([sys.executable, "-m", "fedopt", "allreduce", "--nproc", "2", "--epochs", "100000",
                          "--max-steps", "1", "--out", str(out), "--progress", "off"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and p.poll() is None and len(read_metrics(out / "metrics.jsonl")) < 2:
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()[1][-3000:]
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C on a terminal does: the whole foreground group
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    assert p.returncode == 130, err[-3000:]
    assert _one_line(err) == "fedopt allreduce: interrupted"  # no OMP_NUM_THREADS notice at start, no traceback


def test_allreduce_one_cpu_worker_trains_a_small_model_on_one_thread(tmp_path, monkeypatch):
    import torch.distributed as dist

    from clients.allreduce.config import AllreduceConfig
    from clients.allreduce.worker import train_worker

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    for k in ("OMP_NUM_THREADS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_worker(AllreduceConfig(epochs=1, max_steps=1, device="cpu", out=str(tmp_path), progress="off"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_allreduce_takes_config_and_no_plot_like_simulate(tmp_path, capsys):
    from fedopt.cli.allreduce import allreduce_config, configure
    from fedopt.launch import config_argv

    cfg_file = tmp_path / "dc.toml"
    cfg_file.write_text("epochs = 3\nlr = 0.05\n[task-options]\nhidden = 16\n")
    p = Parser(prog="fedopt allreduce")
    configure(p)
    cfg = allreduce_config(p.parse_args(["--config", str(cfg_file), "--lr", "0.2", "--no-plot"]))
    assert (cfg.epochs, cfg.lr, cfg.task_options, cfg.plot) == (3, 0.2, {"hidden": 16}, False)
    assert "--no-plot" in config_argv(cfg)  # the workers, which write the plot, are told too
    assert "default 10" in " ".join(p.format_help().split())  # --epochs shows its default
    cfg_file.write_text("epocs = 3\n")
    assert main(["allreduce", "--config", str(cfg_file), "--out", str(tmp_path / "o")]) == 2
    assert "epocs" in _one_line(capsys.readouterr().err)


def test_simulate_processes_alone_sets_the_clients():
    from fedopt.cli.simulate import configure, simulate_config

    p = Parser(prog="fedopt simulate")
    configure(p)
    assert simulate_config(p.parse_args(["--transport", "ipc", "--processes", "4"])).federation.clients == 4
    assert simulate_config(p.parse_args(["--transport", "ipc", "--processes", "4", "--clients", "4"])).federation.clients == 4


# ---- on a terminal, log lines print above the progress bar -----------------------------------------------------------
def test_log_lines_go_through_the_progress_bar_console_while_it_runs(monkeypatch):
    import io

    root = logging.getLogger()
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("LOG %(message)s"))
    monkeypatch.setattr(root, "handlers", [terminal])
    monkeypatch.setattr(root, "level", logging.INFO)
    bar = io.StringIO()
    r = Reporter(3, mode="bar", stream=bar)
    try:
        assert terminal not in root.handlers
        logging.getLogger("fedopt.test").info("a line while the bar runs")
    finally:
        r.close()
    assert "LOG a line while the bar runs" in bar.getvalue()
    assert root.handlers == [terminal]  # given back when the bar stops


# ---- installing and starting -----------------------------------------------------------------------------------------
def test_pyproject_license_is_an_spdx_string_setuptools_understands():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in meta["build-system"]["requires"]


def test_readme_setup_ends_with_fedopt_on_the_path():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):readme.index("## Write your own Task")]
    after_demo = setup[setup.index("make demo"):setup.index("By hand")]
    assert ". .venv/bin/activate" in after_demo and "fedopt --help" in after_demo
    assert "fedopt keys generate" in readme and "keys/` and `runs/`" in readme


@pytest.mark.slow  # a swarm of peer processes
def test_a_local_swarm_shows_progress_round_by_round(tmp_path):
    r = _cli("simulate", "--mode", "gossip", "--peers", "2", "--clients", "2", "--rounds", "2", "--local-epochs", "1",
             "--progress", "lines", "--no-plot", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert any(line.startswith("round    1/2") for line in lines) and any(line.startswith("round    2/2") for line in lines)


def test_gossip_help_shows_defaults():
    r = _cli("gossip", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for default in ("(default 30)", "default 0.1", "(default 5)", "(default 10)"):
        assert default in text, default


def test_gossip_peers_get_the_runs_training_choices(tmp_path):
    """simulate --mode gossip hands the optimizer and schedule to every peer, and the peer's parser takes them."""
    from clients.gossip.sim import peer_command, peer_config
    from fedopt.cli.gossip import configure, gossip_config
    from fedopt.config import RunConfig

    cfg = RunConfig.of(mode="gossip", clients=2, optimizer="adamw", weight_decay=0.01, clip_norm=1.5,
                    lr_schedule="cosine", lr_min=0.001)
    cmd = peer_command("ipc:///tmp/x.sock", 0, 2, [], cfg, tmp_path)
    p = Parser(prog="fedopt gossip")
    configure(p)
    a = gossip_config(p.parse_args(cmd[cmd.index("gossip") + 1:]))
    assert (a.optimizer, a.weight_decay, a.clip_norm, a.lr_schedule, a.lr_min) == ("adamw", 0.01, 1.5, "cosine", 0.001)
    assert a == peer_config("ipc:///tmp/x.sock", 0, 2, [], cfg, tmp_path)  # the command line rebuilds the config
