"""fedopt.keys: the key folder, and the client id each enrolled key stands for."""

from __future__ import annotations

import shutil

import pytest
import zmq.auth

from fedopt.errors import AuthError, ConfigError
from fedopt.keys import enrolled_id, enrolled_keys, existing_keys, generate_keys


def test_enrolled_id_is_the_shard_number_or_the_name():
    assert enrolled_id("allowed/client-007.key") == "7"
    assert enrolled_id("client-000.key") == "0"
    assert enrolled_id("site-a.key") == "site-a"
    assert enrolled_id("client-x.key") == "client-x"  # not a number: the whole name


def test_enrolled_keys_map_every_admitted_key_to_its_client(tmp_path):
    d = generate_keys(tmp_path / "k", 3)
    ids = enrolled_keys(d / "allowed")
    expected = {zmq.auth.load_certificate(d / "allowed" / f"client-{i:03d}.key")[0]: str(i) for i in range(3)}
    assert ids == expected
    assert len(existing_keys(d)) == 2 + 3 * 4  # the coordinator pair; per client: key, secret, identity pair


def test_two_files_enrolling_one_id_are_refused(tmp_path):
    d = generate_keys(tmp_path / "k", 2)
    shutil.copy(d / "allowed" / "client-001.key", d / "allowed" / "client-1.key")
    with pytest.raises(AuthError, match="both enrol client '1'"):
        enrolled_keys(d / "allowed")


def test_an_unreadable_key_names_its_file(tmp_path):
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "site-a.key").write_text("not a certificate")
    with pytest.raises(AuthError, match="site-a.key"):
        enrolled_keys(tmp_path / "allowed")


def test_a_folder_holding_keys_is_refused_without_force(tmp_path):
    d = generate_keys(tmp_path / "k", 1)
    with pytest.raises(ConfigError, match="already holds keys"):
        generate_keys(d, 1)
    old = (d / "coordinator.key").read_bytes()
    generate_keys(d, 1, force=True)
    assert (d / "coordinator.key").read_bytes() != old
