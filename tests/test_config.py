import pytest

from fedopt.config import RunConfig, build_config
from fedopt.errors import ConfigError


def test_precedence_defaults_then_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nlocal-epochs = 2\n[task-options]\nhidden = 32\n')
    cfg = build_config(str(f), {"rounds": 9, "task_options": {"replicate": 2}})
    assert cfg.federation.rounds == 9 and cfg.train.local_epochs == 2 and cfg.train.batch_size == RunConfig().train.batch_size
    assert cfg.task_options == {"hidden": 32, "replicate": 2}


def test_simulate_table_is_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[simulate]\nclients = 4\n')
    assert build_config(str(f)).federation.clients == 4


@pytest.mark.parametrize("text, match", [
    ("foo = 1", "unknown config key 'foo'"),
    ("rounds = 'x'", "rounds must be an integer"),
    ("rounds = [", "not valid TOML"),
    ("[lr]\na = 1", "must be a value, not a table"),
])
def test_bad_files_name_the_problem(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        build_config(str(f))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.toml"):
        build_config("/no/such.toml")


@pytest.mark.parametrize("field, value, match", [
    ("clients", 0, "clients must be an integer >= 1"),
    ("fraction", 0.0, r"fraction must be in \(0, 1\]"),
    ("fraction", 1.5, r"fraction must be in \(0, 1\]"),
    ("alpha", 0.0, "alpha must be a number > 0"),
    ("alpha", -1.0, "alpha must be a number > 0"),
    ("clients_per_round", 99, "exceeds clients"),
    ("partition", "shards", "partition must be one of"),
    ("stragglers", 2.0, "stragglers must be a fraction"),
    ("device", "tpu", "device must be one of"),
])
def test_invalid_values_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.of(**{field: value})


def test_per_round_and_straggler_policy():
    assert RunConfig.of(clients=10, fraction=0.25).federation.per_round == 2
    assert RunConfig.of(clients=10).federation.per_round == 10
    assert RunConfig.of(mu=1.0).keep_stragglers and not RunConfig().keep_stragglers
    assert RunConfig.of(straggler_policy="keep").keep_stragglers
