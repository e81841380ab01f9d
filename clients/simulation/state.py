"""Per-client state kept between rounds: compact in memory, spilled to disk past a budget.

A stateful algorithm (SCAFFOLD's control variates, a client's local optimizer state) needs one flat vector per client
that survives from one round to the next. A simulation hosts thousands of clients, so the store keeps

* rows in memory as ``dtype`` (float16 by default: half the bytes, and control variates tolerate it), most recently
  used last, up to ``budget_bytes``;
* every row past the budget in one file of fixed-size slots on disk (``pread``/``pwrite`` at ``slot * row_bytes``),
  read back on demand. A client that was never stored has no row: :meth:`get` returns ``None`` and the algorithm uses
  its initial state (zeros for SCAFFOLD).

Memory is therefore ``min(clients, budget / row_bytes)`` rows, whatever the number of clients. One store belongs to one
process (each simulation worker owns the state of the clients it hosts); it is not shared between processes.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import numpy as np
import torch

from fedopt.errors import ConfigError

__all__ = ["ClientStateStore"]

_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: None}


class ClientStateStore:
    """``get(client) -> Tensor | None`` and ``put(client, vec)`` for flat vectors of ``size`` elements.

    ``budget_bytes`` caps the rows held in memory (0 keeps every row on disk). ``directory`` holds the spill file
    (a private temporary directory when None, removed by :meth:`close`). Vectors come back as float32 on CPU.
    """

    def __init__(self, size: int, budget_bytes: int, dtype: torch.dtype = torch.float16,
                 directory: str | None = None) -> None:
        if size < 1:
            raise ConfigError(f"state vectors need at least one element, not {size}")
        if budget_bytes < 0:
            raise ConfigError(f"state budget must be >= 0 bytes, not {budget_bytes}")
        if _NP.get(dtype) is None:
            raise ConfigError(f"state dtype must be float16 or float32, not {dtype}")
        self.size = size
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.row_bytes = size * torch.empty((), dtype=dtype).element_size()
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._slots: dict[str, int] = {}  # client -> slot in the spill file
        self._own_dir = directory is None
        self._dir = directory
        self._fd: int | None = None
        self.spills = 0  # rows written to disk so far (a measure of how much the budget binds)

    # ---- facts ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._mem) + sum(1 for c in self._slots if c not in self._mem)

    def __contains__(self, client: str) -> bool:
        return client in self._mem or client in self._slots

    @property
    def memory_bytes(self) -> int:
        return len(self._mem) * self.row_bytes

    @property
    def disk_rows(self) -> int:
        return len(self._slots)

    @property
    def path(self) -> str | None:
        return None if self._fd is None else os.path.join(self._dir, "client-state.bin")

    # ---- access -----------------------------------------------------------------------------------------------------
    def get(self, client: str) -> torch.Tensor | None:
        """The client's stored vector as float32 (a fresh tensor), or None when it has none yet."""
        row = self._mem.get(client)
        if row is not None:
            self._mem.move_to_end(client)
            return row.float()
        slot = self._slots.get(client)
        if slot is None:
            return None
        raw = os.pread(self._fd, self.row_bytes, slot * self.row_bytes)
        if len(raw) != self.row_bytes:
            raise ConfigError(f"client state file {self.path} is truncated at slot {slot}")
        return torch.from_numpy(np.frombuffer(raw, dtype=_NP[self.dtype]).astype(np.float32))

    def put(self, client: str, vec: torch.Tensor) -> None:
        """Store ``vec`` (any float dtype, any device) as the client's state, evicting old rows past the budget."""
        if vec.dim() != 1 or vec.numel() != self.size:
            raise ConfigError(f"client state has {vec.numel()} elements, the store holds {self.size}")
        row = vec.detach().to("cpu", self.dtype, copy=True)
        self._mem[client] = row
        self._mem.move_to_end(client)
        while self._mem and self.memory_bytes > self.budget_bytes:
            old, data = self._mem.popitem(last=False)
            self._spill(old, data)

    def _spill(self, client: str, row: torch.Tensor) -> None:
        if self._fd is None:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="fedopt-state-")
            self._fd = os.open(os.path.join(self._dir, "client-state.bin"), os.O_RDWR | os.O_CREAT, 0o600)
        slot = self._slots.setdefault(client, len(self._slots))
        os.pwrite(self._fd, row.numpy().tobytes(), slot * self.row_bytes)
        self.spills += 1

    def close(self) -> None:
        """Drop every row and remove the spill file (and the directory when the store made it)."""
        self._mem.clear()
        if self._fd is not None:
            path = self.path
            os.close(self._fd)
            self._fd = None
            os.unlink(path)
            if self._own_dir:
                os.rmdir(self._dir)
        self._slots.clear()
