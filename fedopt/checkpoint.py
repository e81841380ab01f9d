"""Atomic checkpoints: the global model, the server optimizer's state and the round state in one safetensors file.

One file, written to a temporary name, fsynced, then renamed over the old one (and the directory fsynced), so a crash
or ``kill -9`` at any instant leaves either the previous checkpoint or the new one, never a torn mix. The round state
(JSON) rides in the safetensors metadata. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import ConfigError
from .params import ParamSpec

__all__ = ["BufferJournal", "Checkpoint", "atomic_write", "save_checkpoint", "load_checkpoint", "save_model"]

CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
JOURNAL = "buffer"


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class Checkpoint:
    round: int  # the last completed round
    global_vec: torch.Tensor  # the flat global model after that round
    optimizer_state: dict[str, torch.Tensor]  # the server optimizer's buffers
    spec: ParamSpec
    state: dict  # anything else the run needs to continue (config, rng positions, history)


def save_checkpoint(out_dir: str | os.PathLike, ckpt: Checkpoint) -> Path:
    tensors = {"global": ckpt.global_vec.detach().contiguous()}
    tensors.update({f"opt.{k}": v.detach().contiguous() for k, v in ckpt.optimizer_state.items()})
    meta = {"round": str(ckpt.round), "spec": json.dumps(ckpt.spec.to_dict()), "state": json.dumps(ckpt.state)}
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, save(tensors, metadata=meta))
    return path


def load_checkpoint(out_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None when there is none. A corrupt file is a ConfigError naming it."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return Checkpoint(
            round=int(meta["round"]),
            global_vec=tensors.pop("global"),
            optimizer_state={k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
            spec=ParamSpec.from_dict(json.loads(meta["spec"])),
            state=json.loads(meta.get("state", "{}")),
        )
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable: {e}") from None


def save_model(path: str | os.PathLike, spec: ParamSpec, vec: torch.Tensor, metadata: dict | None = None) -> Path:
    """Write a flat vector as an ordinary state_dict in safetensors (loadable with ``safetensors.torch.load_file``)."""
    state = {k: v.contiguous().clone() for k, v in spec.unflatten(vec.detach().cpu()).items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, save(state, metadata=meta or None))
    return Path(path)


class BufferJournal:
    """The updates a buffered run has accepted into the buffer of the version it is building, one atomic file each
    (``<out>/buffer/<version>-<n>.safetensors``), so a coordinator killed between server steps resumes with its
    buffer as it was: :meth:`load` gives them back in order of arrival, and :meth:`clear` removes them once the
    step's checkpoint is written. A crash between the checkpoint and the clear leaves files of an applied version,
    which :meth:`load` ignores and removes. Each entry is one model-sized write per accepted update."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir) / JOURNAL
        self._count = 0

    def add(self, version: int, delta: torch.Tensor, info: dict) -> None:
        """Record one accepted update of the buffer building ``version`` (``info``: JSON, e.g. client and weight)."""
        self._count += 1
        atomic_write(self.dir / f"{version}-{self._count}.safetensors",
                     save({"delta": delta.detach().contiguous()}, metadata={"info": json.dumps(info)}))

    def load(self, version: int) -> list[tuple[torch.Tensor, dict]]:
        """The updates recorded for ``version``, in order; files of other versions are removed, unreadable ones
        (a write a crash cut short never gets its final name, so these are foreign) are skipped."""
        found = []
        for path in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else ():
            v, _, n = path.stem.partition("-")
            if not (v.isdigit() and n.isdigit()):
                continue
            if int(v) != version:
                path.unlink(missing_ok=True)
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    found.append((int(n), f.get_tensor("delta"), json.loads((f.metadata() or {})["info"])))
            except (OSError, KeyError, ValueError, SafetensorError):
                continue
        found.sort(key=lambda e: e[0])
        self._count = max((e[0] for e in found), default=self._count)
        return [(delta, info) for _, delta, info in found]

    def clear(self, version: int | None = None) -> None:
        """Forget the updates of ``version`` (applied, and its checkpoint written); None: every version (a run that
        starts afresh)."""
        for path in self.dir.glob(f"{'*' if version is None else version}-*.safetensors") if self.dir.is_dir() else ():
            path.unlink(missing_ok=True)
