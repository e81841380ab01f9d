"""fedopt.testing's fault seam: FEDOPT_FAULTS parsed into typed faults, refused when malformed, absent when unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedopt.errors import ConfigError
from fedopt.testing import FAULTS_ENV, Fault, SecAggExit, fault_env, faults


def test_unset_or_empty_means_no_fault():
    assert faults({}) == {}
    assert faults({FAULTS_ENV: ""}) == {}
    assert faults({FAULTS_ENV: "  "}) == {}


def test_every_fault_round_trips_through_the_environment_as_its_typed_argument(tmp_path):
    injected = {Fault.SLOW_TRAIN: 2.5, Fault.EXIT_AT_SECAGG_STAGE: SecAggExit("mask", 4), Fault.SECAGG_DUMP: tmp_path}
    env = fault_env(injected)
    assert list(env) == [FAULTS_ENV]
    assert json.loads(env[FAULTS_ENV]) == {"slow_train": 2.5, "exit_at_secagg_stage": {"stage": "mask", "round": 4},
                                           "secagg_dump": str(tmp_path)}
    got = faults(env)
    assert got == injected
    assert type(got[Fault.SLOW_TRAIN]) is float and isinstance(got[Fault.SECAGG_DUMP], Path)


def test_whole_seconds_become_floats_and_a_stage_without_a_round_means_any_round():
    got = faults({FAULTS_ENV: '{"slow_train": 5, "exit_at_secagg_stage": {"stage": "share"}}'})
    assert got == {Fault.SLOW_TRAIN: 5.0, Fault.EXIT_AT_SECAGG_STAGE: SecAggExit("share", None)}


@pytest.mark.parametrize("text, match", [
    ("slow_train=5", "is not JSON"),
    ('["slow_train"]', "must be a JSON object"),
    ('{"slow": 5}', "unknown fault 'slow'"),
    ('{"slow_train": "5"}', r"slow_train takes seconds in \[0, 3600\], not '5'"),
    ('{"slow_train": -1}', "not -1"),
    ('{"slow_train": true}', "not True"),
    ('{"slow_train": NaN}', "not nan"),
    ('{"exit_at_secagg_stage": "share"}', "exit_at_secagg_stage takes"),
    ('{"exit_at_secagg_stage": {"stage": "sum"}}', "stage 'sum' is not one of advertise, share, mask, unmask"),
    ('{"exit_at_secagg_stage": {"stage": "mask", "round": 0}}', "round must be an integer >= 1, not 0"),
    ('{"exit_at_secagg_stage": {"stage": "mask", "when": 1}}', "exit_at_secagg_stage takes"),
    ('{"secagg_dump": ""}', "takes a folder path"),
])
def test_a_malformed_variable_is_refused_naming_it(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        faults({FAULTS_ENV: text})
    assert FAULTS_ENV in str(e.value)


def test_fault_env_checks_what_it_writes():
    with pytest.raises(ConfigError, match="slow_train"):
        fault_env({Fault.SLOW_TRAIN: -3})


def test_the_command_line_has_no_fault_flags_and_a_bad_variable_stops_a_process_with_one_line(capsys):
    """Faults travel only by the environment: the hidden flags are gone, and a client started with a malformed
    FEDOPT_FAULTS exits 2 with one line naming the variable before it dials anyone."""
    from fedopt.cli import main

    for argv, flag in ((["client", "--connect", "tcp://127.0.0.1:1", "--insecure", "--shard", "0"], "--fault-slow"),
                       (["client", "--connect", "tcp://127.0.0.1:1", "--insecure", "--shard", "0"],
                        "--fault-exit-at-stage"),
                       (["coordinator", "--bind", "tcp://127.0.0.1:1", "--insecure"], "--debug-secagg-dump"),
                       (["gossip", "--bind", "ipc:///tmp/x.sock", "--shard", "0", "--num-shards", "2"],
                        "--fault-slow")):
        with pytest.raises(SystemExit) as e:
            main([*argv, flag, "1"])
        assert e.value.code == 2 and f"unrecognized arguments: {flag} 1" in capsys.readouterr().err
    p = subprocess.run([sys.executable, "-m", "fedopt", "client", "--connect", "tcp://127.0.0.1:1", "--insecure",
                        "--shard", "0", "--give-up", "1"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, FAULTS_ENV: '{"slow_train": "fast"}'})
    assert p.returncode == 2, p.stderr
    assert f"{FAULTS_ENV}: slow_train takes seconds" in p.stderr
