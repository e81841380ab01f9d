"""The per-machine data cache: one build per key, identical data, safe against a torn file, off when asked."""

from __future__ import annotations

import torch

from fedopt.data import PartitionSpec
from fedopt.data.cache import cache_dir
from fedopt.data.digits import DigitsTask


class CountingDigits(DigitsTask):
    built = 0

    def arrays(self, seed):
        CountingDigits.built += 1
        return super().arrays(seed)


def _load(shard=2):
    return CountingDigits().load_data(shard, 6, 4, PartitionSpec("dirichlet", 0.3))


def test_one_build_per_machine_and_identical_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDOPT_CACHE_DIR", str(tmp_path))
    CountingDigits.built = 0
    first, again, other = _load(), _load(), _load(shard=5)  # fresh task objects, as separate processes have
    assert CountingDigits.built == 1 and len(list(tmp_path.glob("*.safetensors"))) == 2  # arrays + partition
    monkeypatch.setenv("FEDOPT_CACHE", "off")
    plain = _load()
    assert CountingDigits.built == 2 and cache_dir() is None
    for a, b, c in zip(first.train + first.test, again.train + again.test, plain.train + plain.test):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert other.num_samples != first.num_samples


def test_an_unreadable_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDOPT_CACHE_DIR", str(tmp_path))
    CountingDigits.built = 0
    ref = _load()
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"torn")
    again = _load()
    assert CountingDigits.built == 2
    assert all(torch.equal(a, b) for a, b in zip(ref.train, again.train))
    assert all(f.stat().st_size > 100 for f in tmp_path.glob("*.safetensors"))
