"""A virtual clock for simulated federations: how long each client takes, so sync and async runs report wall time.

Each client gets a compute speed (seconds for one full local job: every epoch over its whole shard) and a
communication time (the model down and the update up) from a :class:`ClientSpeeds` spec, seeded by the run::

    lognormal:SIGMA[:MEDIAN]   full-job seconds MEDIAN * exp(SIGMA * Z), Z ~ N(0, 1) per client (MEDIAN default 100)
    classes:S1,S2,...          each client drawn uniformly into a device class whose full job takes S1, S2, ... seconds
                               (NVIDIA FLARE's edge example: classes:100,200,400 with 5 s of communication)
    trace:FILE                 a JSON object {client id: full-job seconds} or a CSV of ``client,seconds`` lines; a
                               client the trace does not name is an error

A job of ``steps`` local steps by a client whose full job is ``full_steps`` steps takes
``comm + seconds * steps / full_steps``: partial work (a straggler's budget) costs its share. Durations are a pure
function of (spec, seed, client, steps), so a run's virtual times are reproducible.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ConfigError

__all__ = ["ClientSpeeds", "parse_speeds"]


@dataclass(frozen=True)
class ClientSpeeds:
    """Full-job seconds per client (see the module docstring) and the per-job communication time."""

    kind: str  # lognormal | classes | trace
    params: tuple = ()  # lognormal: (sigma, median); classes: the class seconds
    trace: Mapping[str, float] = field(default_factory=dict)
    comm: float = 0.0  # seconds a job spends on the network (model down, update up)
    seed: int = 0

    def full_job(self, client: str) -> float:
        """Seconds ``client`` needs for its full local job (without communication)."""
        if self.kind == "trace":
            if client not in self.trace:
                raise ConfigError(f"client-speed trace has no entry for client {client!r}")
            return float(self.trace[client])
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, _stable(client), 7])
        if self.kind == "lognormal":
            sigma, median = self.params
            return float(median * math.exp(sigma * rng.standard_normal()))
        return float(self.params[int(rng.integers(len(self.params)))])

    def duration(self, client: str, steps: int, full_steps: int) -> float:
        """Virtual seconds of one job of ``steps`` local steps (``full_steps`` = the client's full job)."""
        return self.comm + self.full_job(client) * steps / max(full_steps, 1)


def _stable(client: str) -> int:
    """A client id as a stable integer (Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(client.encode(), digest_size=4).digest(), "little")


def parse_speeds(spec: str, comm: float = 0.0, seed: int = 0) -> ClientSpeeds:
    """``--client-speed SPEC`` (module docstring) as a :class:`ClientSpeeds`; ConfigError naming the problem."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "lognormal":
            parts = [float(x) for x in rest.split(":")] if rest else []
            if not 1 <= len(parts) <= 2 or parts[0] < 0 or (len(parts) == 2 and parts[1] <= 0):
                raise ValueError
            return ClientSpeeds("lognormal", (parts[0], parts[1] if len(parts) == 2 else 100.0), comm=comm, seed=seed)
        if kind == "classes":
            classes = tuple(float(x) for x in rest.split(","))
            if not classes or min(classes) <= 0 or not all(map(math.isfinite, classes)):
                raise ValueError
            return ClientSpeeds("classes", classes, comm=comm, seed=seed)
        if kind == "trace":
            return ClientSpeeds("trace", trace=_read_trace(Path(rest)), comm=comm, seed=seed)
    except ValueError:
        pass
    raise ConfigError(f"--client-speed {spec!r}: expected lognormal:SIGMA[:MEDIAN], classes:S1,S2,... (seconds > 0) "
                      f"or trace:FILE")


def _read_trace(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise ConfigError(f"--client-speed trace file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else {row[0].strip(): row[1] for row in csv.reader(
            line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))}
        trace = {str(k): float(v) for k, v in dict(raw).items()}
    except (ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"--client-speed trace {path}: expected client,seconds per line (or a JSON object): "
                          f"{e}") from None
    bad = [k for k, v in trace.items() if not (math.isfinite(v) and v > 0)]
    if bad or not trace:
        raise ConfigError(f"--client-speed trace {path}: every client needs seconds > 0 ({bad[:3] or 'empty'})")
    return trace
