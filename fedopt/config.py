"""Run configuration: one frozen dataclass, validated field by field, loadable from TOML.

Precedence: built-in defaults < the TOML file (``--config``) < command-line flags. A TOML file holds the same names as
the flags (``local-epochs`` or ``local_epochs``), at top level or under a ``[simulate]`` table, plus optional tables
``[task-options]``, ``[aggregator-options]`` and ``[server-options]``. An unknown key is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .task import TrainConfig

from .errors import ConfigError
from .schedules import OPTIMIZERS, SCHEDULES, scheduled_lr

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["RunConfig", "load_toml", "build_config"]


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def _at_least(name: str, value: Any, low: float, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value < low:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name.replace('_', '-')} must be {what} >= {low}, not {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs to know. Field names are the CLI flags with dashes as underscores."""

    task: str = "digits"  # built-in name or package.module:attr
    task_options: dict = field(default_factory=dict)  # keyword arguments for the task's factory
    clients: int = 10  # total number of clients (data shards)
    clients_per_round: int | None = None  # clients selected each round (default: all, or --fraction)
    fraction: float | None = None  # alternative to clients_per_round: a fraction in (0, 1]
    rounds: int = 50
    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1  # client learning rate (local SGD)
    momentum: float = 0.0  # client SGD momentum
    optimizer: str = "sgd"  # client optimizer: sgd | adam | adamw (a fresh one each round)
    weight_decay: float = 0.0  # client weight decay (L2 for sgd/adam, decoupled for adamw)
    clip_norm: float | None = None  # clip each local step's gradient to this global L2 norm
    lr_schedule: str = "constant"  # the client lr over rounds: constant | cosine | step
    lr_min: float = 0.0  # cosine: the rate it decays towards
    lr_step: int = 10  # step: rounds between decays
    lr_gamma: float = 0.1  # step: the factor of each decay
    mu: float = 0.0  # FedProx proximal coefficient (0 = FedAvg's plain local SGD)
    partition: str = "dirichlet"  # iid | dirichlet | natural
    alpha: float = 0.5  # Dirichlet concentration
    aggregator: str = "fedavg"
    aggregator_options: dict = field(default_factory=dict)
    server_opt: str = "fedavg"
    server_lr: float | None = None  # default: 1.0 for fedavg/fedavgm, 0.01 for the adaptive ones
    server_options: dict = field(default_factory=dict)  # momentum, beta1, beta2, tau
    stragglers: float = 0.0  # fraction of selected clients that do only part of their local work
    straggler_policy: str = "auto"  # auto (keep when mu > 0, else drop) | keep | drop
    buffers: str = "average"  # float buffers (BatchNorm statistics): average | local
    eval_every: int = 1  # evaluate the global model every k rounds (and always after the last)
    seed: int = 0
    device: str = "auto"  # auto = cuda when present
    out: str = "runs/latest"
    mode: str = "federated"  # federated | gossip
    transport: str = "inproc"  # inproc (one process) | ipc | tcp (real processes over the bus)
    processes: int | None = None  # client processes for ipc/tcp runs
    backend: str = "sequential"  # sequential | vmap
    workers: int | None = None  # simulation worker processes (default: cores)
    algorithm: str = "fedavg"  # fedavg (plain local SGD, FedProx with mu) | scaffold (control variates)
    state_budget_mb: float = 256.0  # per-client state (SCAFFOLD's c_i) held in memory; the rest spills to disk
    plot: bool = True  # write OUT/accuracy.png (when matplotlib is installed)
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | off
    tracker: str | None = None  # also log every round to tensorboard | mlflow (an optional extra each)
    eval_clients: bool = False  # also record per-class accuracy and each client's accuracy on its own data
    # secure aggregation (--aggregator secagg); folded into aggregator_options
    secagg_neighbours: int | None = None  # k: neighbours per client (default 2*ceil(log2 n); n-1 = plain SecAgg)
    secagg_threshold: int | None = None  # t: Shamir threshold, k/2 < t <= k (default floor(k/2)+1)
    clip: float | None = None  # L2 clip norm of each update before quantisation (secagg default 10)
    bits: int | None = None  # quantisation bits per coordinate (secagg default 16)
    # the ZeroMQ bus (fedopt coordinator, and simulate --transport ipc|tcp)
    deadline: float = 60.0  # seconds a round waits for updates before closing with the quorum it has
    min_clients: int = 1  # quorum: a round closes with at least this many updates, else it is retried
    heartbeat: float = 1.0  # seconds between heartbeats; a peer silent for 3 of them is dead
    join_timeout: float = 30.0  # seconds a round waits for every client to be connected before starting with fewer
    wire_dtype: str = "float32"  # float32 | bfloat16 | float16: precision of models and deltas on the wire
    upload_slots: int = 2  # updates the coordinator pulls at once (bounds its memory to this many updates)
    fed_eval_every: int = 0  # federated evaluation on the clients' local test splits every k rounds (0 = never)
    # bounded influence and resources (zero trust: no client's claim sets its influence unchecked)
    max_samples: int = 1_000_000  # cap on one client's aggregation weight (its READY sample count)
    max_share: float = 0.25  # cap on one client's share of a round's total weight (at least 1.5/selected)
    norm_factor: float = 4.0  # reject an update whose L2 norm exceeds this x the last round's median (0 = off)
    max_update_norm: float | None = None  # absolute L2 bound on one update (None = only the relative bound)
    max_clients: int | None = None  # registrations the coordinator holds at once (default 2 x clients + 16)
    # gossip (simulate --mode gossip)
    peers: int | None = None  # number of gossip peer processes (default: --clients)
    topology: str | None = None  # None = random pairwise gossip; ring | exponential | complete = synchronous D-PSGD

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError("task must be a non-empty name")
        _at_least("clients", self.clients, 1)
        if self.clients_per_round is not None:
            _at_least("clients_per_round", self.clients_per_round, 1)
            if self.clients_per_round > self.clients:
                raise ConfigError(f"clients-per-round ({self.clients_per_round}) exceeds clients ({self.clients})")
        if self.fraction is not None:
            if self.clients_per_round is not None:
                raise ConfigError("give clients-per-round or fraction, not both")
            if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
                raise ConfigError(f"fraction must be in (0, 1], not {self.fraction!r}")
        _at_least("rounds", self.rounds, 1)
        _at_least("local_epochs", self.local_epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("eval_every", self.eval_every, 1)
        for name in ("lr", "alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise ConfigError(f"{name} must be a number > 0, not {v!r}")
        for name in ("momentum", "mu", "weight_decay", "lr_min"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf:
                raise ConfigError(f"{name.replace('_', '-')} must be a number >= 0, not {v!r}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"momentum applies to optimizer sgd only (optimizer is {self.optimizer!r})")
        if self.clip_norm is not None and (not isinstance(self.clip_norm, (int, float))
                                           or isinstance(self.clip_norm, bool) or not 0 < self.clip_norm < math.inf):
            raise ConfigError(f"clip-norm must be a number > 0, not {self.clip_norm!r}")
        _at_least("lr_step", self.lr_step, 1)
        if not isinstance(self.lr_gamma, (int, float)) or isinstance(self.lr_gamma, bool) \
                or not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"lr-gamma must be in (0, 1], not {self.lr_gamma!r}")
        if self.lr_min >= self.lr:
            raise ConfigError(f"lr-min ({self.lr_min}) must be below lr ({self.lr})")
        if self.server_lr is not None and not (isinstance(self.server_lr, (int, float)) and self.server_lr > 0):
            raise ConfigError(f"server-lr must be a number > 0, not {self.server_lr!r}")
        if not isinstance(self.stragglers, (int, float)) or not 0 <= self.stragglers <= 1:
            raise ConfigError(f"stragglers must be a fraction in [0, 1], not {self.stragglers!r}")
        _choice("partition", self.partition, ("iid", "dirichlet", "natural"))
        _choice("straggler_policy", self.straggler_policy, ("auto", "keep", "drop"))
        _choice("buffers", self.buffers, ("average", "local"))
        _choice("device", self.device.split(":")[0] if isinstance(self.device, str) else self.device,
                ("auto", "cpu", "cuda"))
        _choice("mode", self.mode, ("federated", "gossip"))
        _choice("transport", self.transport, ("inproc", "ipc", "tcp"))
        _choice("backend", self.backend, ("sequential", "vmap"))
        _choice("progress", self.progress, ("auto", "bar", "lines", "off"))
        if self.tracker is not None:
            _choice("tracker", self.tracker, ("tensorboard", "mlflow"))
        if not isinstance(self.eval_clients, bool):
            raise ConfigError(f"eval-clients must be true or false, not {self.eval_clients!r}")
        _choice("algorithm", self.algorithm, ("fedavg", "scaffold"))
        if not isinstance(self.state_budget_mb, (int, float)) or isinstance(self.state_budget_mb, bool) \
                or not 0 <= self.state_budget_mb < math.inf:
            raise ConfigError(f"state-budget-mb must be a number >= 0, not {self.state_budget_mb!r}")
        if self.processes is not None:
            _at_least("processes", self.processes, 1)
        for name in ("deadline", "heartbeat", "join_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                raise ConfigError(f"{name.replace('_', '-')} must be a number of seconds > 0, not {v!r}")
        _at_least("min_clients", self.min_clients, 1)
        _at_least("upload_slots", self.upload_slots, 1)
        _at_least("fed_eval_every", self.fed_eval_every, 0)
        _at_least("max_samples", self.max_samples, 1)
        if not isinstance(self.max_share, (int, float)) or isinstance(self.max_share, bool) \
                or not 0 < self.max_share <= 1:
            raise ConfigError(f"max-share must be a fraction in (0, 1], not {self.max_share!r}")
        if not isinstance(self.norm_factor, (int, float)) or isinstance(self.norm_factor, bool) \
                or not (self.norm_factor == 0 or 1 <= self.norm_factor < math.inf):
            raise ConfigError(f"norm-factor must be 0 (off) or a number >= 1, not {self.norm_factor!r}")
        if self.max_update_norm is not None and (not isinstance(self.max_update_norm, (int, float))
                                                 or isinstance(self.max_update_norm, bool)
                                                 or not 0 < self.max_update_norm < math.inf):
            raise ConfigError(f"max-update-norm must be a number > 0, not {self.max_update_norm!r}")
        if self.max_clients is not None:
            _at_least("max_clients", self.max_clients, self.clients)
        _choice("wire_dtype", self.wire_dtype, ("float32", "bfloat16", "float16"))
        if self.workers is not None:
            _at_least("workers", self.workers, 1)
        if self.peers is not None:
            _at_least("peers", self.peers, 2)
        if self.topology is not None:
            _choice("topology", self.topology, ("ring", "exponential", "complete"))
        if (self.peers is not None or self.topology is not None) and self.mode != "gossip":
            raise ConfigError("peers and topology apply only to --mode gossip")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")
        for name in ("task_options", "aggregator_options", "server_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name.replace('_', '-')} must be a table of key = value")
        self._fold_secagg()
        if self.aggregator == "secagg" and "max_weight" not in self.aggregator_options:  # the cap secagg encodes for
            object.__setattr__(self, "aggregator_options", {**self.aggregator_options, "max_weight": self.max_samples})

    def _fold_secagg(self) -> None:
        """--secagg-neighbours/--secagg-threshold/--clip/--bits become secagg's aggregator options."""
        given = {k: v for k, v in (("neighbours", self.secagg_neighbours), ("threshold", self.secagg_threshold),
                                   ("clip", self.clip), ("bits", self.bits)) if v is not None}
        if not given:
            return
        if self.aggregator != "secagg":
            flags = ", ".join("--" + {"neighbours": "secagg-neighbours", "threshold": "secagg-threshold"}.get(k, k)
                              for k in given)
            raise ConfigError(f"{flags} only apply to --aggregator secagg (aggregator is {self.aggregator!r})")
        for name in ("secagg_neighbours", "secagg_threshold", "bits"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.clip is not None and (not isinstance(self.clip, (int, float)) or isinstance(self.clip, bool)
                                      or not 0 < self.clip < math.inf):
            raise ConfigError(f"clip must be a number > 0, not {self.clip!r}")
        object.__setattr__(self, "aggregator_options", {**self.aggregator_options, **given})

    # ---- derived facts ----------------------------------------------------------------------------------------------
    @property
    def per_round(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.fraction is not None:
            return max(1, round(self.fraction * self.clients))
        return self.clients

    @property
    def client_cap(self) -> int:
        """Registrations a coordinator holds at once: --max-clients, else room for every client twice over."""
        return self.max_clients if self.max_clients is not None else 2 * self.clients + 16

    @property
    def keep_stragglers(self) -> bool:
        """FedProx keeps a straggler's partial work; FedAvg drops the straggler (Li et al., MLSys 2020)."""
        return self.straggler_policy == "keep" or (self.straggler_policy == "auto" and self.mu > 0)

    def train_config(self) -> "TrainConfig":
        """The local training every selected client is asked to do (the round's lr comes from :meth:`lr_at`)."""
        from .task import TrainConfig

        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, clip_norm=self.clip_norm,
                           mu=self.mu)

    def lr_at(self, round: int) -> float:
        """The client learning rate of ``round`` under ``lr_schedule`` (the server sends it with each job)."""
        return scheduled_lr(self.lr, self.lr_schedule, round, self.rounds, lr_min=self.lr_min, step=self.lr_step,
                            gamma=self.lr_gamma)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Every field as TOML that :func:`load_toml` reads back into an equal RunConfig (None fields are left out:
        None is each one's default). Secagg's flags are already folded into ``aggregator-options``."""
        folded = {"secagg_neighbours", "secagg_threshold", "clip", "bits"}
        lines, tables = ["# the full resolved configuration of this run: fedopt simulate --config config.toml"], []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in folded:
                continue
            if f.name in _TABLES:
                tables.append((f.name, value))
            else:
                lines.append(f"{f.name.replace('_', '-')} = {_toml_value(value)}")
        for name, table in tables:
            lines += ["", f"[{name.replace('_', '-')}]"]
            lines += [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    raise ConfigError(f"cannot write {value!r} to TOML")


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_TABLES = {"task_options", "aggregator_options", "server_options"}


def _normalise(raw: Mapping[str, Any], source: str) -> dict:
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            known = ", ".join(sorted(k.replace("_", "-") for k in FIELDS))
            raise ConfigError(f"unknown config key {key!r} in {source} (known keys: {known})")
        if isinstance(value, dict) and name not in _TABLES:
            raise ConfigError(f"config key {key!r} in {source} must be a value, not a table")
        out[name] = dict(value) if isinstance(value, dict) else value
    return out


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file as a dict; ConfigError naming the file when it is missing, a folder, or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def load_toml(path: str | os.PathLike) -> dict:
    """Read a config file into a dict of RunConfig fields; errors name the file and the key."""
    raw = read_toml(path)
    if "simulate" in raw and isinstance(raw["simulate"], dict):
        raw = {**{k: v for k, v in raw.items() if k != "simulate"}, **raw["simulate"]}
    return _normalise(raw, str(path))


def build_config(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults < TOML file < overrides (flags). Raises ConfigError naming the bad field."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(load_toml(config_file))
    for key, value in _normalise(overrides or {}, "the command line").items():
        if key in _TABLES and key in merged:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return RunConfig(**merged)
    except TypeError as e:
        raise ConfigError(str(e)) from None
