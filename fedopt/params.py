"""ParamSpec: a model's state_dict as one flat contiguous vector, and back.

Every mode moves models as one vector: the bus sends it as one raw frame, aggregators sum it, server optimizers
step it, secure aggregation masks it. The spec (names, shapes, dtypes, offsets) is exchanged once when a client
joins; after that only vectors travel.

What the vector holds:

* every floating-point parameter, always;
* floating-point buffers (e.g. BatchNorm ``running_mean``/``running_var``) when ``buffers="average"``;
  with ``buffers="local"`` they stay on each client and are never averaged;
* never integer buffers (e.g. ``num_batches_tracked``): a counter has no meaningful average, so it stays local.

The vector's dtype is the widest floating dtype among the entries (float32 for ordinary models, float64 when any entry
is float64), so flattening and unflattening are bit-exact for every entry the spec holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["ParamEntry", "ParamSpec", "FlatBinding"]

BufferPolicy = Literal["average", "local"]
_FLOAT_RANK = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


@dataclass(frozen=True)
class ParamEntry:
    name: str  # state_dict key
    shape: tuple[int, ...]  # the tensor's shape
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    offset: int  # first element in the flat vector
    numel: int  # number of elements


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes, dtypes and offsets of the entries one flat vector holds."""

    entries: tuple[ParamEntry, ...]
    dtype: str = "float32"  # the flat vector's dtype

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, model: nn.Module, buffers: BufferPolicy = "average") -> "ParamSpec":
        if buffers not in ("average", "local"):
            raise ConfigError(f"buffers must be 'average' or 'local', not {buffers!r}")
        params = dict(model.named_parameters())
        state = model.state_dict(keep_vars=True)
        chosen = []
        for name, t in state.items():
            if not t.is_floating_point():
                continue  # integer buffers are counters: kept local
            if name not in params and buffers == "local":
                continue
            chosen.append((name, t))
        return cls._build(chosen)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "ParamSpec":
        return cls._build([(k, v) for k, v in state.items() if v.is_floating_point()])

    @classmethod
    def _build(cls, named: list[tuple[str, torch.Tensor]]) -> "ParamSpec":
        entries, offset, rank = [], 0, 1
        for name, t in named:
            n = t.numel()
            entries.append(ParamEntry(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset, n))
            offset += n
            rank = max(rank, _FLOAT_RANK.get(t.dtype, 1))
        return cls(tuple(entries), "float64" if rank == 2 else "float32")

    # ---- facts ----------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of elements in the flat vector."""
        return self.entries[-1].offset + self.entries[-1].numel if self.entries else 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    # ---- conversion -----------------------------------------------------------------------------------------------
    def flatten(self, source: nn.Module | Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the spec's entries of a module or state_dict into one contiguous vector (``out`` when given)."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        vec = out if out is not None else torch.empty(self.size, dtype=self.torch_dtype)
        if vec.numel() != self.size:
            raise ConfigError(f"flat vector has {vec.numel()} elements, the spec needs {self.size}")
        with torch.no_grad():
            for e in self.entries:
                try:
                    t = state[e.name]
                except KeyError:
                    raise ConfigError(f"state_dict has no entry {e.name!r} that the spec names") from None
                if tuple(t.shape) != e.shape:
                    raise ConfigError(f"entry {e.name!r} has shape {tuple(t.shape)}, the spec says {e.shape}")
                vec[e.offset : e.offset + e.numel].copy_(t.detach().reshape(-1))
        return vec

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into a state_dict of views (or casts back to each entry's own dtype)."""
        self.check_vector(vec)
        out = {}
        for e in self.entries:
            piece = vec[e.offset : e.offset + e.numel].view(e.shape)
            want = getattr(torch, e.dtype)
            out[e.name] = piece if piece.dtype == want else piece.to(want)
        return out

    def load_into(self, model: nn.Module, vec: torch.Tensor) -> None:
        """Write a flat vector into a module's parameters and buffers in place (no new tensors on the module)."""
        self.check_vector(vec)
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for e in self.entries:
                dst = state[e.name]
                dst.copy_(vec[e.offset : e.offset + e.numel].view(e.shape))

    def bind(self, model: nn.Module) -> "FlatBinding":
        """Re-home the module's entries as views into one flat tensor, so loading a vector into the model and
        reading it back are one copy each (no per-tensor Python loop, no state_dict walk). See :class:`FlatBinding`."""
        return FlatBinding(self, model)

    def check_vector(self, vec: torch.Tensor) -> None:
        if vec.dim() != 1 or vec.numel() != self.size:
            raise ConfigError(f"flat vector has shape {tuple(vec.shape)}, the spec needs ({self.size},)")

    # ---- wire form ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "entries": [[e.name, list(e.shape), e.dtype] for e in self.entries]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ParamSpec":
        """Rebuild a spec from :meth:`to_dict` output, validating every field (it may come from a socket)."""
        try:
            dtype = d["dtype"]
            raw = d["entries"]
            if dtype not in ("float32", "float64") or not isinstance(raw, (list, tuple)):
                raise ValueError
            entries, offset = [], 0
            for name, shape, edtype in raw:
                if not isinstance(name, str) or edtype not in ("float16", "bfloat16", "float32", "float64"):
                    raise ValueError
                shape = tuple(int(s) for s in shape)
                if any(s < 0 for s in shape):
                    raise ValueError
                n = math.prod(shape)
                entries.append(ParamEntry(name, shape, edtype, offset, n))
                offset += n
        except (KeyError, TypeError, ValueError):
            raise ConfigError("malformed parameter spec") from None
        return cls(tuple(entries), dtype)


class FlatBinding:
    """A module whose spec'd parameters and buffers live as views of one contiguous vector, ``flat``.

    ``load(vec)`` and ``read()`` are single copies. The module keeps working as usual (optimizers update the views in
    place). This only holds while nothing replaces the module's tensors: do not call ``model.to(...)`` after binding.
    Entries whose dtype differs from the vector's (e.g. bf16 weights in a float32 vector) cannot be views; for such a
    module the binding falls back to per-entry copies, with the same results.
    """

    def __init__(self, spec: ParamSpec, model: nn.Module) -> None:
        self.spec, self.model = spec, model
        state = model.state_dict(keep_vars=True)
        tensors = [state[e.name] for e in spec.entries]
        devices = {t.device for t in tensors}
        self.viewed = all(t.dtype == spec.torch_dtype for t in tensors) and len(devices) <= 1
        device = devices.pop() if devices else torch.device("cpu")
        self.flat = spec.flatten(model).to(device)
        if self.viewed:
            with torch.no_grad():
                for e, t in zip(spec.entries, tensors):
                    t.data = self.flat[e.offset : e.offset + e.numel].view(e.shape)
        self._tensors = tensors

    def load(self, vec: torch.Tensor) -> None:
        """Write a flat vector into the module."""
        self.spec.check_vector(vec)
        with torch.no_grad():
            if self.viewed:
                self.flat.copy_(vec)
            else:
                for e, t in zip(self.spec.entries, self._tensors):
                    t.copy_(vec[e.offset : e.offset + e.numel].view(e.shape))

    def read(self) -> torch.Tensor:
        """The module's current entries as a flat vector (the live ``flat`` tensor itself when viewed: copy it if
        you keep it past the next training step)."""
        if self.viewed:
            return self.flat
        with torch.no_grad():
            for e, t in zip(self.spec.entries, self._tensors):
                self.flat[e.offset : e.offset + e.numel].copy_(t.reshape(-1))
        return self.flat
