"""ClientStateStore: compact rows in memory up to a budget, the rest in one spill file, read back exactly."""

from __future__ import annotations

import os

import pytest
import torch

from clients.simulation.state import ClientStateStore
from fedopt.errors import ConfigError


def test_rows_survive_spilling_and_come_back():
    store = ClientStateStore(100, budget_bytes=3 * 200, dtype=torch.float16)  # room for 3 rows of 100 halves
    rows = {str(i): torch.randn(100) for i in range(10)}
    for k, v in rows.items():
        store.put(k, v)
    assert store.memory_bytes <= 600 and store.disk_rows >= 7 and len(store) == 10
    path = store.path
    assert os.path.getsize(path) >= 7 * 200
    for k, v in rows.items():
        assert torch.allclose(store.get(k), v.half().float())
    store.put("3", torch.ones(100))  # an update of a spilled row wins over its stale slot
    assert torch.equal(store.get("3"), torch.ones(100))
    assert store.get("nobody") is None
    store.close()
    assert not os.path.exists(path)


def test_zero_budget_keeps_everything_on_disk_in_float32():
    store = ClientStateStore(5, budget_bytes=0, dtype=torch.float32)
    store.put("a", torch.arange(5.0))
    assert store.memory_bytes == 0 and store.disk_rows == 1
    assert torch.equal(store.get("a"), torch.arange(5.0))
    store.close()


def test_bad_shapes_and_settings_are_refused():
    store = ClientStateStore(4, budget_bytes=100)
    with pytest.raises(ConfigError, match="4"):
        store.put("a", torch.zeros(5))
    with pytest.raises(ConfigError):
        ClientStateStore(0, 10)
    with pytest.raises(ConfigError):
        ClientStateStore(4, -1)
    with pytest.raises(ConfigError):
        ClientStateStore(4, 10, dtype=torch.int32)
    store.close()
