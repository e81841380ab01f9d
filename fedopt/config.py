"""Run configuration: cohesive frozen sections, each validated once in ``__post_init__``, loadable from TOML.

A :class:`RunConfig` is the run's identity (task, seed, device, outputs) plus six sections::

    train       TrainingConfig    how each selected client trains (local SGD, its optimizer, schedule, FedProx)
    federation  FederationConfig  clients, rounds, sampling, stragglers, aggregation and the server step
    secagg      SecAggConfig      secure aggregation's graph, threshold and quantisation (--aggregator secagg)
    bus         BusConfig         deadlines, quorum, heartbeats, upload credit: runs over the ZeroMQ bus
    bounds      Bounds            how far one client's claims may move a round (fedopt.engine)
    sim         SimConfig         how ``fedopt simulate`` runs: in-process backend, workers, processes, gossip

Users see one flat namespace: each flag and TOML key (``local-epochs`` or ``local_epochs``) names exactly one field of
one section, so :meth:`RunConfig.of`, :func:`build_config` and :meth:`RunConfig.replace` take flat names and route
them. Precedence: built-in defaults < the TOML file (``--config``) < command-line flags. A TOML file holds the flat
names at top level or under a ``[simulate]`` table, plus optional tables ``[task-options]``,
``[aggregator-options]`` and ``[server-options]``. An unknown key is an error naming the key; an invalid value is an
error naming the flag.
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

__all__ = ["RunConfig", "OptimizerConfig", "TrainingConfig", "FederationConfig", "SecAggConfig", "BusConfig", "Bounds",
           "SimConfig", "load_toml", "load_command_toml", "build_config", "read_toml", "normalise_keys", "choice",
           "at_least", "number", "optional"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{_flag(name)} must be an integer >= {low}, not {value!r}")


def number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = True, what: str = "") -> None:
    """A finite real in the interval from ``low`` to ``high`` (each end open or closed); ConfigError naming the flag."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            bound = f"{what or 'a number'} {'>' if low_open else '>='} {low:g}"
        else:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            bound = f"{what + ' ' if what else ''}in {interval}"
        raise ConfigError(f"{_flag(name)} must be {bound}, not {value!r}")


def optional(check, name: str, value: Any, *args, **kwargs) -> None:
    if value is not None:
        check(name, value, *args, **kwargs)


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """A client's (or worker's) optimizer and its learning rate over rounds: validated here for every mode's config
    (:class:`TrainingConfig`, the gossip peer's, the allreduce worker's)."""

    lr: float = 0.1  # learning rate
    momentum: float = 0.0  # SGD momentum
    optimizer: str = "sgd"  # sgd | adam | adamw (a fresh one each round)
    weight_decay: float = 0.0  # L2 for sgd/adam, decoupled for adamw
    clip_norm: float | None = None  # clip each step's gradient to this global L2 norm
    lr_schedule: str = "constant"  # the lr over rounds: constant | cosine | step
    lr_min: float = 0.0  # cosine: the rate it decays towards
    lr_step: int = 10  # step: rounds between decays
    lr_gamma: float = 0.1  # step: the factor of each decay

    def __post_init__(self) -> None:
        number("lr", self.lr, low_open=True)
        for name in ("momentum", "weight_decay", "lr_min"):
            number(name, getattr(self, name))
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("lr_schedule", self.lr_schedule, SCHEDULES)
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"--momentum applies to optimizer sgd only (optimizer is {self.optimizer!r})")
        optional(number, "clip_norm", self.clip_norm, low_open=True)
        at_least("lr_step", self.lr_step, 1)
        number("lr_gamma", self.lr_gamma, 0, 1, low_open=True, high_open=False)
        if self.lr_min >= self.lr:
            raise ConfigError(f"--lr-min ({self.lr_min}) must be below --lr ({self.lr})")

    def scheduled_lr(self, round: int, rounds: int) -> float:
        """The learning rate of ``round`` (1-based) of ``rounds`` under ``lr_schedule``."""
        return scheduled_lr(self.lr, self.lr_schedule, round, rounds, lr_min=self.lr_min, step=self.lr_step,
                            gamma=self.lr_gamma)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig(OptimizerConfig):
    """How each selected client trains: the task's standard local loop, asked for by the round's TrainConfig."""

    local_epochs: int = 5
    batch_size: int = 16
    mu: float = 0.0  # FedProx proximal coefficient (0 = FedAvg's plain local SGD)
    algorithm: str = "fedavg"  # fedavg (plain local SGD, FedProx with mu) | scaffold (control variates)
    buffers: str = "average"  # float buffers (BatchNorm statistics): average | local

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("local_epochs", self.local_epochs, 1)
        at_least("batch_size", self.batch_size, 1)
        number("mu", self.mu)
        choice("algorithm", self.algorithm, ("fedavg", "scaffold"))
        choice("buffers", self.buffers, ("average", "local"))

    def train_config(self) -> "TrainConfig":
        """The local training every selected client is asked to do (the round's lr: :meth:`RunConfig.lr_at`)."""
        from .task import TrainConfig

        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, clip_norm=self.clip_norm,
                           mu=self.mu)


@dataclass(frozen=True)
class FederationConfig:
    """Who takes part and how rounds combine their work: clients, sampling, stragglers, aggregator, server step."""

    clients: int = 10  # total number of clients (data shards)
    clients_per_round: int | None = None  # clients selected each round (default: all, or --fraction)
    fraction: float | None = None  # alternative to clients_per_round: a fraction in (0, 1]
    rounds: int = 50
    partition: str = "dirichlet"  # iid | dirichlet | natural
    alpha: float = 0.5  # Dirichlet concentration
    aggregator: str = "fedavg"
    aggregator_options: dict = field(default_factory=dict)
    server_opt: str = "fedavg"
    server_lr: float | None = None  # default: 1.0 for fedavg/fedavgm, 0.01 for the adaptive ones
    server_options: dict = field(default_factory=dict)  # momentum, beta1, beta2, tau
    stragglers: float = 0.0  # fraction of selected clients that do only part of their local work
    straggler_policy: str = "auto"  # auto (keep when mu > 0, else drop) | keep | drop
    eval_every: int = 1  # evaluate the global model every k rounds (and always after the last)
    eval_clients: bool = False  # also record per-class accuracy and each client's accuracy on its own data

    def __post_init__(self) -> None:
        at_least("clients", self.clients, 1)
        if self.clients_per_round is not None:
            at_least("clients_per_round", self.clients_per_round, 1)
            if self.clients_per_round > self.clients:
                raise ConfigError(f"clients-per-round ({self.clients_per_round}) exceeds clients ({self.clients})")
        if self.fraction is not None:
            if self.clients_per_round is not None:
                raise ConfigError("give clients-per-round or fraction, not both")
            number("fraction", self.fraction, 0, 1, low_open=True, high_open=False)
        at_least("rounds", self.rounds, 1)
        at_least("eval_every", self.eval_every, 1)
        choice("partition", self.partition, ("iid", "dirichlet", "natural"))
        number("alpha", self.alpha, low_open=True)
        optional(number, "server_lr", self.server_lr, low_open=True)
        number("stragglers", self.stragglers, 0, 1, high_open=False, what="a fraction")
        choice("straggler_policy", self.straggler_policy, ("auto", "keep", "drop"))
        if not isinstance(self.eval_clients, bool):
            raise ConfigError(f"eval-clients must be true or false, not {self.eval_clients!r}")
        for name in ("aggregator_options", "server_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{_flag(name)} must be a table of key = value")

    @property
    def per_round(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.fraction is not None:
            return max(1, round(self.fraction * self.clients))
        return self.clients


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (``--aggregator secagg``); unset fields take the protocol's defaults for the round's size."""

    neighbours: int | None = None  # k: neighbours per client (default 2*ceil(log2 n); n-1 = plain SecAgg)
    threshold: int | None = None  # t: Shamir threshold, k/2 < t <= k (default floor(k/2)+1)
    clip: float | None = None  # L2 clip norm of each update before quantisation (default 10)
    bits: int | None = None  # quantisation bits per coordinate (default 16)

    def __post_init__(self) -> None:
        optional(at_least, "secagg_neighbours", self.neighbours, 1)
        optional(at_least, "secagg_threshold", self.threshold, 1)
        optional(at_least, "bits", self.bits, 1)
        optional(number, "clip", self.clip, low_open=True)

    def options(self) -> dict:
        """The given fields as secagg aggregator options."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BusConfig:
    """Runs over the ZeroMQ bus (``fedopt coordinator``, ``simulate --transport ipc|tcp``)."""

    deadline: float = 60.0  # seconds a round waits for updates before closing with the quorum it has
    min_clients: int = 1  # quorum: a round closes with at least this many updates, else it is retried
    heartbeat: float = 1.0  # seconds between heartbeats; a peer silent for 3 of them is dead
    join_timeout: float = 30.0  # seconds a round waits for every client to be connected before starting with fewer
    wire_dtype: str = "float32"  # float32 | bfloat16 | float16: precision of models and deltas on the wire
    upload_slots: int = 2  # updates the coordinator pulls at once (bounds its memory to this many updates)
    fed_eval_every: int = 0  # federated evaluation on the clients' local test splits every k rounds (0 = never)
    max_clients: int | None = None  # registrations the coordinator holds at once (default 2 x clients + 16)

    def __post_init__(self) -> None:
        for name in ("deadline", "heartbeat", "join_timeout"):
            number(name, getattr(self, name), low_open=True, what="a number of seconds")
        at_least("min_clients", self.min_clients, 1)
        at_least("upload_slots", self.upload_slots, 1)
        at_least("fed_eval_every", self.fed_eval_every, 0)
        optional(at_least, "max_clients", self.max_clients, 1)
        choice("wire_dtype", self.wire_dtype, ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class Bounds:
    """How far one client's claims may move a round (zero trust; see :mod:`fedopt.engine.round`)."""

    max_samples: int = 1_000_000  # cap on one client's aggregation weight (its announced sample count)
    max_share: float = 0.25  # cap on one client's share of a round's total weight (at least 1.5/selected)
    norm_factor: float = 4.0  # reject an update over this x the last round's median L2 norm (0 = off)
    max_update_norm: float | None = None  # absolute L2 bound on one update (None = only the relative bound)

    def __post_init__(self) -> None:
        at_least("max_samples", self.max_samples, 1)
        number("max_share", self.max_share, 0, 1, low_open=True, high_open=False, what="a fraction")
        if self.norm_factor != 0:
            number("norm_factor", self.norm_factor, 1, what="0 (off) or a number")
        optional(number, "max_update_norm", self.max_update_norm, low_open=True)


@dataclass(frozen=True)
class SimConfig:
    """How ``fedopt simulate`` runs its clients."""

    mode: str = "federated"  # federated | gossip
    transport: str = "inproc"  # inproc (one process) | ipc | tcp (real processes over the bus)
    processes: int | None = None  # client processes for ipc/tcp runs
    backend: str = "sequential"  # sequential | vmap
    workers: int | None = None  # simulation worker processes (default: 1 for small models, else the cores)
    state_budget_mb: float = 256.0  # per-client state (SCAFFOLD's c_i) held in memory; the rest spills to disk
    peers: int | None = None  # number of gossip peer processes (default: --clients)
    topology: str | None = None  # None = random pairwise gossip; ring | exponential | complete = synchronous D-PSGD

    def __post_init__(self) -> None:
        choice("mode", self.mode, ("federated", "gossip"))
        choice("transport", self.transport, ("inproc", "ipc", "tcp"))
        choice("backend", self.backend, ("sequential", "vmap"))
        optional(at_least, "processes", self.processes, 1)
        optional(at_least, "workers", self.workers, 1)
        number("state_budget_mb", self.state_budget_mb)
        optional(at_least, "peers", self.peers, 2)
        if self.topology is not None:
            choice("topology", self.topology, ("ring", "exponential", "complete"))
        if (self.peers is not None or self.topology is not None) and self.mode != "gossip":
            raise ConfigError("peers and topology apply only to --mode gossip")


#: section attribute -> its class; flat names are the sections' field names, plus these aliases
SECTIONS: dict[str, type] = {"train": TrainingConfig, "federation": FederationConfig, "secagg": SecAggConfig,
                             "bus": BusConfig, "bounds": Bounds, "sim": SimConfig}
_ALIASES = {"secagg_neighbours": "neighbours", "secagg_threshold": "threshold"}


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs to know (see the module docstring)."""

    task: str = "digits"  # built-in name or package.module:attr
    task_options: dict = field(default_factory=dict)  # keyword arguments for the task's factory
    seed: int = 0
    device: str = "auto"  # auto = cuda when present
    out: str = "runs/latest"
    plot: bool = True  # write OUT/accuracy.png (when matplotlib is installed)
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | off
    tracker: str | None = None  # also log every round to tensorboard | mlflow (an optional extra each)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    bounds: Bounds = field(default_factory=Bounds)
    sim: SimConfig = field(default_factory=SimConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError("task must be a non-empty name")
        if not isinstance(self.task_options, dict):
            raise ConfigError("task-options must be a table of key = value")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")
        choice("device", self.device.split(":")[0] if isinstance(self.device, str) else self.device,
                ("auto", "cpu", "cuda"))
        choice("progress", self.progress, ("auto", "bar", "lines", "off"))
        if self.tracker is not None:
            choice("tracker", self.tracker, ("tensorboard", "mlflow"))
        # what spans sections
        if self.bus.max_clients is not None and self.bus.max_clients < self.federation.clients:
            raise ConfigError(f"max-clients must be an integer >= {self.federation.clients} (clients), "
                              f"not {self.bus.max_clients!r}")
        given = self.secagg.options()
        if given and self.federation.aggregator != "secagg":
            flags = ", ".join("--" + {"neighbours": "secagg-neighbours", "threshold": "secagg-threshold"}.get(k, k)
                              for k in given)
            raise ConfigError(f"{flags} only apply to --aggregator secagg (aggregator is "
                              f"{self.federation.aggregator!r})")

    # ---- flat names (flags and TOML keys) --------------------------------------------------------------------------
    @classmethod
    def of(cls, **flat: Any) -> "RunConfig":
        """A RunConfig from flat names (``lr=0.05, clients=20, deadline=5``); ConfigError for an unknown name."""
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in flat.items():
            where = FIELDS.get(name)
            if where is None:
                raise ConfigError(f"unknown config key {name.replace('_', '-')!r}")
            if where == "":
                top[name] = value
            else:
                parts[where][_ALIASES.get(name, name)] = value
        return cls(**top, **{s: SECTIONS[s](**kw) for s, kw in parts.items()})

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (the inverse of :meth:`of`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SECTIONS}
        back = {v: k for k, v in _ALIASES.items()}
        for s in SECTIONS:
            for name, value in dataclasses.asdict(getattr(self, s)).items():
                out[back.get(name, name) if s == "secagg" else name] = value
        return out

    def replace(self, **flat: Any) -> "RunConfig":
        return RunConfig.of(**{**self.flat(), **flat})

    def to_dict(self) -> dict:
        return self.flat()

    # ---- what spans sections -----------------------------------------------------------------------------------------
    @property
    def aggregator_options(self) -> dict:
        """The aggregator's options: ``--aggregator-option`` pairs, with secagg's section and the weight cap folded
        in for ``secagg`` (which encodes ``--max-samples`` as its public bound)."""
        opts = dict(self.federation.aggregator_options)
        if self.federation.aggregator == "secagg":
            opts = {**opts, **self.secagg.options()}
            opts.setdefault("max_weight", self.bounds.max_samples)
        return opts

    @property
    def client_cap(self) -> int:
        """Registrations a coordinator holds at once: --max-clients, else room for every client twice over."""
        return self.bus.max_clients if self.bus.max_clients is not None else 2 * self.federation.clients + 16

    @property
    def keep_stragglers(self) -> bool:
        """FedProx keeps a straggler's partial work; FedAvg drops the straggler (Li et al., MLSys 2020)."""
        policy = self.federation.straggler_policy
        return policy == "keep" or (policy == "auto" and self.train.mu > 0)

    def lr_at(self, round: int) -> float:
        """The client learning rate of ``round`` of this run."""
        return self.train.scheduled_lr(round, self.federation.rounds)

    def to_toml(self) -> str:
        """Every field as flat TOML that :func:`load_toml` reads back into an equal RunConfig (None fields are left
        out: None is each one's default)."""
        lines, tables = ["# the full resolved configuration of this run: fedopt simulate --config config.toml"], []
        for name, value in self.flat().items():
            if value is None:
                continue
            if name in _TABLES:
                tables.append((name, value))
            else:
                lines.append(f"{name.replace('_', '-')} = {_toml_value(value)}")
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


#: flat name -> the section that holds it ("" = RunConfig itself)
FIELDS: dict[str, str] = {
    **{f.name: "" for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS},
    **{({v: k for k, v in _ALIASES.items()}.get(f.name, f.name) if s == "secagg" else f.name): s
       for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)},
}
_TABLES = {"task_options", "aggregator_options", "server_options"}


def normalise_keys(raw: Mapping[str, Any], names, tables, source: str) -> dict:
    """A config file's (or the command line's) keys as field names: ``local-epochs`` -> ``local_epochs``; a table only
    where one is expected (``tables``). ConfigError naming the key and ``source`` for anything else."""
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            known = ", ".join(sorted(k.replace("_", "-") for k in names))
            raise ConfigError(f"unknown config key {key!r} in {source} (known keys: {known})")
        if isinstance(value, dict) != (name in tables):
            raise ConfigError(f"config key {key!r} in {source} must be "
                              f"{'a table, not a value' if name in tables else 'a value, not a table'}")
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


def load_command_toml(path: str | os.PathLike, command: str, names, tables) -> dict:
    """A command's ``--config`` file as field names: its keys at top level or under a ``[COMMAND]`` table (which wins),
    ``tables`` as TOML tables. ConfigError naming the file and the key."""
    raw = read_toml(path)
    if isinstance(raw.get(command), dict):
        raw = {**{k: v for k, v in raw.items() if k != command}, **raw[command]}
    return normalise_keys(raw, names, tables, str(path))


def load_toml(path: str | os.PathLike) -> dict:
    """Read a ``fedopt simulate``/``coordinator`` config file into a dict of flat RunConfig names."""
    return load_command_toml(path, "simulate", FIELDS, _TABLES)


def build_config(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults < TOML file < overrides (flags). Raises ConfigError naming the bad field."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(load_toml(config_file))
    for key, value in normalise_keys(overrides or {}, FIELDS, _TABLES, "the command line").items():
        if key in _TABLES and key in merged:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return RunConfig.of(**merged)
    except TypeError as e:
        raise ConfigError(str(e)) from None
