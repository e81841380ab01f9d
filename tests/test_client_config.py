"""clients.federated.config: ClientConfig validates every field; `fedopt client` builds it from its flags."""

from __future__ import annotations

import dataclasses

import pytest

from clients.federated.config import ClientConfig
from fedopt.cli import Parser, main
from fedopt.cli.client import client_config, configure
from fedopt.errors import ConfigError

URL = "ipc:///tmp/coordinator.sock"


@pytest.mark.parametrize("changes, field", [
    (dict(connect="coordinator:5555"), "--connect"),
    (dict(shard=None), "--shard is required"),
    (dict(shard=-1), "--shard"), (dict(shard=3, num_shards=2), "--shard 3 is out of range for --num-shards 2"),
    (dict(shard=True), "--shard"), (dict(num_shards=0), "--num-shards"),
    (dict(heartbeat=0), "--heartbeat"), (dict(heartbeat="1"), "--heartbeat"),
    (dict(give_up=float("nan")), "--give-up"), (dict(give_up=-1), "--give-up"),
    (dict(device="tpu"), "--device"), (dict(task_options=[("a", 1)]), "--task-option"),
])
def test_each_invalid_field_is_a_config_error_naming_it(changes, field):
    with pytest.raises(ConfigError, match=field):
        ClientConfig(**{"connect": URL, "shard": 0, **changes})


def test_data_needs_a_path_that_exists_and_an_id_without_a_shard(tmp_path):
    with pytest.raises(ConfigError, match="--data .*missing"):
        ClientConfig(URL, data=str(tmp_path / "missing"), id="a")
    with pytest.raises(ConfigError, match="--id"):
        ClientConfig(URL, data=str(tmp_path))
    with pytest.raises(ConfigError, match="--key-name"):
        ClientConfig(URL, data=str(tmp_path), id="a", keys=str(tmp_path))
    cfg = ClientConfig(URL, data=str(tmp_path), id="site-a", keys=str(tmp_path), key_name="client-007")
    assert (cfg.shard, cfg.num_shards, cfg.client_id, cfg.own_key_name) == (0, 1, "site-a", "client-007")


def test_ids_and_key_names_default_to_the_shard():
    cfg = ClientConfig(URL, shard=4, num_shards=8)
    assert (cfg.client_id, cfg.own_key_name) == ("4", "client-004")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shard = 5  # type: ignore[misc]


def test_the_flags_build_the_config_with_its_defaults():
    p = Parser(prog="fedopt client")
    configure(p)
    assert client_config(p.parse_args(["--connect", URL, "--shard", "0"])) == ClientConfig(URL, shard=0)
    got = client_config(p.parse_args(["--connect", URL, "--shard", "1", "--task-option", "alpha=2", "--id", "x"]))
    assert (got.task_options, got.client_id) == ({"alpha": 2}, "x")


def test_a_bad_value_is_one_line_and_exit_2(capsys):
    rc = main(["client", "--connect", URL, "--shard", "0", "--device", "tpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["fedopt client: error: --device must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"]
