"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _data_cache_in_a_temporary_folder(tmp_path_factory):
    """The per-machine data cache (fedopt.data.cache) of this test session lives in a temporary folder, not in the
    user's ~/.cache; child processes inherit it through the environment."""
    before = os.environ.get("FEDOPT_CACHE_DIR")
    os.environ["FEDOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedopt-cache"))
    yield
    if before is None:
        os.environ.pop("FEDOPT_CACHE_DIR", None)
    else:
        os.environ["FEDOPT_CACHE_DIR"] = before
