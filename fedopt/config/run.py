"""RunConfig: the run's identity and its sections; flat names in (flags, TOML keys), TOML out and in."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from .robust import RobustConfig
from .sections import (Bounds, BufferedConfig, BusConfig, CompressionConfig, FederationConfig, PrivacyConfig,
                       SecAggConfig, SimConfig, TrainingConfig, choice)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["RunConfig", "FIELDS", "SECTIONS", "load_toml", "load_command_toml", "build_config", "read_toml",
           "normalise_keys"]


#: section attribute -> its class; flat names are the sections' field names, plus these aliases
SECTIONS: dict[str, type] = {"train": TrainingConfig, "federation": FederationConfig, "secagg": SecAggConfig,
                             "bus": BusConfig, "bounds": Bounds, "sim": SimConfig, "buffered": BufferedConfig,
                             "privacy": PrivacyConfig, "compression": CompressionConfig, "robust": RobustConfig}
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
    buffered: BufferedConfig = field(default_factory=BufferedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

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
        if self.compression.compress is not None or self.compression.compress_down is not None:
            self._check_compression()
        if self.buffered.buffer_size is not None:
            self._check_buffered()
        elif self.buffered != BufferedConfig():
            raise ConfigError("--concurrency, --dispatch-threshold, --max-staleness and --staleness apply to buffered "
                              "asynchronous rounds: give --buffer-size K")
        if self.privacy.dp is not None:
            self._check_privacy()
        if self.robust.active:
            self._check_robust()

    def _check_privacy(self) -> None:
        """What ``--dp central`` does not combine with (yet), and a PLD accountant only for Poisson sampling."""
        fed = self.federation
        if self.privacy.dp == "distributed":
            return self._check_distributed()
        refused = [why for cond, why in (
            (self.sim.mode == "gossip", "--mode gossip (no coordinator to add the noise)"),
            (self.train.algorithm == "scaffold", "--algorithm scaffold (its control variates are not privatised)"),
            (fed.aggregator == "secagg", "--aggregator secagg (the noise is central; distributed DP is not "
                                         "implemented)")) if cond]
        if refused:
            raise ConfigError(f"--dp central does not combine with {refused[0]}")
        if fed.aggregator not in ("fedavg", "mean"):
            raise ConfigError(f"--dp central clips and sums the updates: use --aggregator fedavg or mean, not "
                              f"{fed.aggregator!r} (not a linear mean)")
        # buffered rounds are accounted without sampling (q = 1: fedopt.privacy.central_for_run), which PLD supports
        if self.privacy.accountant == "pld" and fed.client_sampling != "poisson" and self.buffered.buffer_size is None:
            raise ConfigError("--accountant pld supports --client-sampling poisson only (dp_accounting has no PLD of "
                              "sampling without replacement): use --accountant rdp or --client-sampling poisson")

    def _check_distributed(self) -> None:
        """``--dp distributed``: inside SecAgg+, Poisson sampling (what its accountant assumes), the clip is
        ``--dp-clip-norm``."""
        fed = self.federation
        refused = [why for cond, why in (
            (fed.aggregator != "secagg", f"--aggregator {fed.aggregator} (the clients' noise is summed by secagg: "
                                         f"use --aggregator secagg)"),
            (fed.client_sampling != "poisson", "--client-sampling fixed (its accountant assumes Poisson sampling: "
                                               "give --client-sampling poisson)"),
            (self.secagg.clip is not None, "--clip (the clip is --dp-clip-norm)"),
            (self.sim.mode == "gossip", "--mode gossip"),
            (self.buffered.buffer_size is not None, "--buffer-size (buffered asynchronous rounds)"),
            (self.train.algorithm == "scaffold", "--algorithm scaffold (its control variates are not privatised)"))
            if cond]
        if refused:
            raise ConfigError(f"--dp distributed does not combine with {refused[0]}")

    def _check_buffered(self) -> None:
        """FedBuff's knobs against the run: C within the clients, K and O within C; what it does not combine with."""
        b, fed = self.buffered, self.federation
        c = self.concurrency
        if c > fed.clients:
            raise ConfigError(f"--concurrency ({c}) exceeds --clients ({fed.clients})")
        if b.buffer_size > c or b.dispatch_threshold > c:
            raise ConfigError(f"--buffer-size ({b.buffer_size}) and --dispatch-threshold ({b.dispatch_threshold}) "
                              f"must not exceed --concurrency ({c}): a buffer larger than the clients in flight "
                              f"would never fill")
        refused = [why for cond, why in (
            (self.sim.mode == "gossip", "--mode gossip"),
            (self.train.algorithm == "scaffold", "--algorithm scaffold"), (fed.stragglers > 0, "--stragglers"),
            (fed.client_sampling == "poisson", "--client-sampling poisson"),
            (self.bus.fed_eval_every > 0, "--fed-eval-every")) if cond]
        if refused:
            raise ConfigError(f"--buffer-size (buffered asynchronous rounds) does not combine with {refused[0]} yet")

    def _check_compression(self) -> None:
        """What --compress does not combine with yet: one line naming the first."""
        spec = self.compression.compress
        if self.federation.aggregator == "secagg" and spec is not None:
            if spec.split(":")[0] in ("topk", "randk"):
                raise ConfigError(f"--compress {spec} does not combine with --aggregator secagg: clients keep different "
                                  f"coordinates, and a masked sum needs the same ones from every client (a shared "
                                  f"random mask, not implemented)")
            raise ConfigError(f"--compress {spec} does not combine with --aggregator secagg: secure aggregation "
                              f"already quantises every coordinate with one shared scale (--bits), into 32-bit masked "
                              f"words, so a second codec would add error and save no bytes")
        refused = [why for cond, why in (
            (self.federation.aggregator == "secagg", "--aggregator secagg"),
            (self.buffered.buffer_size is not None, "--buffer-size"),
            (self.sim.mode == "gossip" and (self.sim.topology is None or self.compression.compress_down is not None),
             "--mode gossip without --topology (CHOCO-Gossip runs on D-PSGD's fixed graph)"
             if self.compression.compress_down is None else "--mode gossip"),
            (self.sim.backend == "vmap", "--backend vmap")) if cond]
        if refused:
            flag = "--compress" if self.compression.compress is not None else "--compress-down"
            raise ConfigError(f"{flag} does not combine with {refused[0]} yet")

    def _check_robust(self) -> None:
        """Byzantine clients and client momentum run in the in-process simulation's synchronous rounds."""
        from ..attacks import byzantine_clients

        flag = "--attack" if self.robust.attack is not None else "--client-momentum"
        refused = [why for cond, why in (
            (self.sim.transport != "inproc", f"--transport {self.sim.transport} (over the bus give {flag} to each "
                                             f"`fedopt client`)"),
            (self.sim.mode == "gossip", "--mode gossip"), (self.buffered.buffer_size is not None, "--buffer-size"),
            (self.sim.nproc > 1, "--nproc (an omniscient attacker sees the whole round in one process)"),
            (self.train.algorithm == "scaffold", "--algorithm scaffold")) if cond]
        if refused:
            raise ConfigError(f"{flag} runs in the in-process simulation's synchronous rounds; it does not combine "
                              f"with {refused[0]}")
        if self.robust.attack is not None:
            byzantine_clients(self.federation.clients, self.robust.attackers, self.seed)

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
    def concurrency(self) -> int:
        """Clients training at once in buffered asynchronous rounds: --concurrency, else the clients per round."""
        return self.buffered.concurrency or self.federation.per_round

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
_TABLES = {"task_options", "aggregator_options", "server_options", "attack_options"}


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
