"""clients.gossip.config: GossipConfig validates every field, and `fedopt gossip`'s flags rebuild it exactly."""

from __future__ import annotations

import dataclasses

import pytest

from clients.gossip.config import GossipConfig
from fedopt.cli import Parser, main
from fedopt.cli.gossip import configure, gossip_config
from fedopt.errors import ConfigError
from fedopt.launch import config_argv

BASE = dict(bind="ipc:///tmp/me.sock", shard=0, num_shards=2)


@pytest.fixture
def parser(monkeypatch):
    monkeypatch.delenv("FEDOPT_INTERFACE", raising=False)  # read when the flags are declared
    monkeypatch.delenv("FEDOPT_SWARM_SECRET", raising=False)
    p = Parser(prog="fedopt gossip")
    configure(p)
    return p


@pytest.mark.parametrize("changes, field", [
    (dict(shard=2), "--shard"), (dict(shard=-1), "--shard"), (dict(num_shards=0), "--num-shards"),
    (dict(bind="me"), "--bind"), (dict(advertise="me"), "--advertise"),
    (dict(rounds=0), "--rounds"), (dict(rounds=True), "--rounds"), (dict(local_epochs=0), "--local-epochs"),
    (dict(batch_size=0), "--batch-size"), (dict(max_accept=0), "--max-accept"), (dict(exchanges=0), "--exchanges"),
    (dict(lr_step=0), "--lr-step"), (dict(lr=0), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(exchange_timeout=0), "--exchange-timeout"), (dict(peer_timeout=-1), "--peer-timeout"),
    (dict(join_wait=0), "--join-wait"), (dict(alpha=0), "--alpha"), (dict(lr_gamma=0), "--lr-gamma"),
    (dict(final_mixes=-1), "--final-mixes"), (dict(max_lag=-1), "--max-lag"), (dict(linger=-0.5), "--linger"),
    (dict(momentum=-0.1), "--momentum"), (dict(weight_decay=-1), "--weight-decay"), (dict(lr_min=-1), "--lr-min"),
    (dict(clip_norm=0), "--clip-norm"), (dict(partition="random"), "--partition"), (dict(optimizer="lbfgs"), "--optimizer"),
    (dict(lr_schedule="linear"), "--lr-schedule"), (dict(progress="loud"), "--progress"),
    (dict(topology="star"), "--topology"), (dict(task=""), "--task"), (dict(task_options=[("a", 1)]), "--task-option"),
    (dict(seed=1.5), "--seed"), (dict(discovery_port=0), "--discovery-port"), (dict(device="tpu"), "--device"),
    (dict(peers=["http://x"]), "--peers"),
    (dict(topology="ring", peers=["ipc:///tmp/me.sock"]), "--topology"),  # a graph needs two members
    (dict(topology="ring", peers=["ipc:///tmp/a.sock", "ipc:///tmp/b.sock"]), "--peers must list every member"),
    (dict(discover=True), "--interface"),
    (dict(discover=True, interface="lo"), "--swarm-secret"),
    (dict(compress="q4"), "--compress needs --topology"), (dict(compress="q3"), "--compress"),
    (dict(choco_gamma=0), "--choco-gamma"), (dict(choco_gamma=1.5), "--choco-gamma"),
])
def test_each_invalid_field_is_a_config_error_naming_it(changes, field):
    with pytest.raises(ConfigError, match=field):
        GossipConfig(**{**BASE, **changes})


def test_a_valid_config_is_frozen_and_keeps_its_secret_out_of_its_repr():
    cfg = GossipConfig(**BASE, peers=["ipc:///tmp/a.sock"], discover=True, interface="lo", swarm_secret="s3cret")
    assert cfg.peers == ("ipc:///tmp/a.sock",) and cfg.address == BASE["bind"]
    assert "s3cret" not in repr(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]


def test_a_wildcard_bind_that_discovers_advertises_its_interface_address_later():
    cfg = GossipConfig(**{**BASE, "bind": "tcp://0.0.0.0:5000"}, discover=True, interface="lo", keys="k",
                       topology="ring", peers=["tcp://10.0.0.1:5000", "tcp://10.0.0.2:5000"])
    assert cfg.advertise_on_interface  # the membership check waits for the looked-up address
    assert not GossipConfig(**{**BASE, "bind": "tcp://0.0.0.0:5000"}, advertise="tcp://10.0.0.1:5000",
                            discover=True, interface="lo", keys="k").advertise_on_interface


def test_rounds_slots_and_training():
    cfg = GossipConfig(**BASE, rounds=3, exchanges=2, final_mixes=4, lr=0.2, lr_schedule="step", lr_step=2,
                       lr_gamma=0.5, seed=7)
    assert [cfg.slots(r) for r in (1, 2, 3)] == [2, 2, 6]
    assert [cfg.train_config(r).lr for r in (1, 2, 3)] == pytest.approx([0.2, 0.2, 0.1])
    assert cfg.train_config(1).seed != GossipConfig(**{**BASE, "shard": 1}, seed=7).train_config(1).seed
    assert GossipConfig(**BASE, topology="ring", peers=[BASE["bind"], "ipc:///tmp/b.sock"]).slots(30) == 1


def test_the_flags_defaults_are_the_configs(parser):
    args = parser.parse_args(["--bind", BASE["bind"], "--shard", "0", "--num-shards", "2"])
    assert gossip_config(args) == GossipConfig(**BASE)


def test_config_argv_round_trips_through_the_flags(parser):
    cfg = GossipConfig(bind="tcp://127.0.0.1:5000", shard=3, num_shards=4, advertise="tcp://10.0.0.3:5000",
                       peers=("tcp://127.0.0.1:5001", "tcp://10.0.0.3:5000"), keys="/k", key_name="peer-3",
                       insecure=True, task="synthetic", task_options={"alpha": 1.5, "hidden": 8}, partition="iid",
                       alpha=0.3, seed=5, rounds=4, local_epochs=2, batch_size=8, lr=0.25, momentum=0.5,
                       weight_decay=0.01, clip_norm=1.5, lr_schedule="cosine", lr_min=0.001, lr_step=3,
                       lr_gamma=0.5, topology="ring", compress="topk:0.1+q8", choco_gamma=0.5, exchange_timeout=1.5, peer_timeout=9.0, exchanges=3,
                       max_accept=2, join_wait=2.5, final_mixes=0, linger=0.0, max_lag=4, resume=True, out="/o",
                       progress="off", plot=False, exit_with_parent=True, discovery_port=6000)
    assert gossip_config(parser.parse_args(config_argv(cfg))) == cfg


def test_the_swarm_secret_comes_from_the_environment_unless_given(parser, monkeypatch):
    argv = ["--bind", BASE["bind"], "--shard", "0", "--num-shards", "2", "--discover", "--interface", "lo"]
    monkeypatch.setenv("FEDOPT_SWARM_SECRET", "from-env")
    assert gossip_config(parser.parse_args(argv)).swarm_secret == "from-env"
    assert gossip_config(parser.parse_args([*argv, "--swarm-secret", "flag"])).swarm_secret == "flag"


def test_a_bad_value_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["gossip", "--bind", f"ipc://{tmp_path}/g.sock", "--shard", "0", "--num-shards", "2", "--linger", "-1",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["fedopt gossip: error: --linger must be a number >= 0, not -1.0"]
