import numpy as np
import pytest
import torch

from fedopt.data import PartitionSpec, dirichlet_partition, iid_partition
from fedopt.data.digits import digits_arrays
from fedopt.data.synthetic import synthetic_users
from fedopt.errors import ConfigError, DataError
from fedopt.task import resolve_task
from fedopt.testing import check_task


def test_digits_are_scaled_and_split_80_20_stratified():
    x, y, xt, yt = digits_arrays()
    assert x.shape == (1437, 64) and xt.shape == (360, 64)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    train_frac = np.bincount(y.numpy(), minlength=10) / len(y)
    test_frac = np.bincount(yt.numpy(), minlength=10) / len(yt)
    assert np.abs(train_frac - test_frac).max() < 0.01


@pytest.mark.parametrize("name", ["digits", "synthetic", "synthetic-iid"])
def test_builtin_tasks_pass_the_conformance_check(name):
    check_task(resolve_task(name))


def test_every_client_gets_a_sample_even_with_skew():
    labels = np.repeat(np.arange(10), 20)
    for alpha in (0.01, 0.5, 100.0):
        parts = dirichlet_partition(labels, 150, alpha, seed=3)
        assert len(parts) == 150 and min(len(p) for p in parts) >= 1
        assert sorted(np.concatenate(parts).tolist()) == list(range(200))  # a partition: disjoint and complete


def test_dirichlet_small_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    skewed = dirichlet_partition(labels, 10, 0.1, seed=0)
    flat = dirichlet_partition(labels, 10, 1000.0, seed=0)
    n_classes = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])  # noqa: E731
    assert n_classes(skewed) < 6 < n_classes(flat)


def test_more_clients_than_samples_is_a_clear_error():
    with pytest.raises(DataError, match="cannot partition 10 samples among 11 clients"):
        iid_partition(10, 11, 0)
    task = resolve_task("digits")
    with pytest.raises(DataError, match="among 5000 clients"):
        task.load_data(0, 5000, 0, PartitionSpec("iid"))


def test_partition_spec_validates():
    with pytest.raises(ConfigError, match="alpha"):
        PartitionSpec("dirichlet", 0.0)
    with pytest.raises(ConfigError, match="partition must be one of"):
        PartitionSpec("nope")


def test_synthetic_follows_the_fedprox_recipe():
    users = synthetic_users(1.0, 1.0, 30, seed=0)
    assert len(users) == 30
    assert all(x.shape[1] == 60 and len(y) >= 50 and y.max() < 10 for x, y in users)
    task = resolve_task("synthetic", {"alpha": 1.0, "beta": 1.0})
    sizes = task.shard_sizes(30, 0, PartitionSpec("natural"))
    assert sizes == [int(0.9 * len(y)) for _, y in users]
    with pytest.raises(DataError, match="needs exactly 30 clients"):
        task.load_data(0, 10, 0, PartitionSpec("natural"))
    with pytest.raises(DataError, match="no natural users"):
        resolve_task("digits").load_data(0, 10, 0, PartitionSpec("natural"))


def test_synthetic_iid_users_share_one_model():
    users = synthetic_users(0.0, 0.0, 5, seed=1, iid=True)
    # one shared W, b and v = 0: label frequencies look alike across users
    fr = [np.bincount(y, minlength=10) / len(y) for _, y in users]
    assert max(np.abs(f - fr[0]).max() for f in fr) < 0.5


def test_shards_are_deterministic_and_cached():
    task = resolve_task("digits")
    spec = PartitionSpec("dirichlet", 0.5)
    a, b = task.load_data(3, 10, 7, spec), task.load_data(3, 10, 7, spec)
    assert torch.equal(a.train[0], b.train[0])
    assert len(task._parts) == 1
