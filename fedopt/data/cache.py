"""A per-machine cache of loaded and partitioned data, so N processes on one host pay for one load.

Every client process, gossip peer and pool worker builds its task and loads its shard by itself. A task that can name
what its data depend on (``cache_key()`` → a JSON-able dict, or None to opt out) has its arrays and partitions stored
once per machine as safetensors files under ``$FEDOPT_CACHE_DIR`` (default ``~/.cache/fedopt/data``), named by the
SHA-256 of that key; later processes read the file instead of rebuilding. ``FEDOPT_CACHE=off`` turns it off.

Safety: files are written to a temporary name and renamed (two processes building at once both write whole files,
and the last rename wins with identical contents); reading never unpickles (safetensors holds raw tensors only); a
file that cannot be read is rebuilt and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

__all__ = ["cache_dir", "cached_tensors", "CACHE_VERSION"]

log = logging.getLogger("fedopt.data")
CACHE_VERSION = 1  # bump when what a key's file holds changes


def cache_dir() -> Path | None:
    """Where cached data live, or None when ``FEDOPT_CACHE=off``."""
    if os.environ.get("FEDOPT_CACHE", "on").lower() in ("off", "0", "false", "no"):
        return None
    root = os.environ.get("FEDOPT_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fedopt" / "data"


def _digest(key: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_tensors(key: dict | None, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``build()``'s tensors, read from this machine's cache when ``key`` was built before (and written when not).

    ``key=None`` or a disabled cache just calls ``build()``."""
    root = cache_dir()
    if key is None or root is None:
        return build()
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    path = root / f"{_digest(key)}.safetensors"
    if path.exists():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            log.warning("data cache file %s is unreadable (%s): rebuilding it", path, e)
    tensors = build()
    try:
        from ..checkpoint import atomic_write

        atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()},
                                metadata={"key": json.dumps(key, sort_keys=True, default=str)[:4000]}))
    except OSError as e:  # a read-only or full disk costs speed, never the run
        log.warning("could not write the data cache file %s: %s", path, e)
    return tensors
