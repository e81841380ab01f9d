"""The sections of a run's configuration, each a frozen dataclass validated once in ``__post_init__``, and the
validators every command's config uses (errors name the flag: ``--lr must be a number > 0, not 0``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..task import TrainConfig

from ..errors import ConfigError
from ..schedules import OPTIMIZERS, SCHEDULES, parse_staleness, scheduled_lr

__all__ = ["OptimizerConfig", "TrainingConfig", "FederationConfig", "SecAggConfig", "BusConfig", "Bounds", "SimConfig",
           "BufferedConfig", "PrivacyConfig", "CompressionConfig", "choice", "at_least", "number", "optional"]


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
    dp_sgd: bool = False  # sample-level DP-SGD in each client, through Opacus (fedopt.dpsgd)
    dp_sgd_noise: float = 1.0  # DP-SGD: Gaussian noise std over the per-example clip
    dp_sgd_clip: float = 1.0  # DP-SGD: each example's gradient L2 bound

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.dp_sgd, bool):
            raise ConfigError(f"--dp-sgd must be true or false, not {self.dp_sgd!r}")
        number("dp_sgd_noise", self.dp_sgd_noise, low_open=True)
        number("dp_sgd_clip", self.dp_sgd_clip, low_open=True)
        if not self.dp_sgd and (self.dp_sgd_noise, self.dp_sgd_clip) != (1.0, 1.0):
            raise ConfigError("--dp-sgd-noise and --dp-sgd-clip apply to --dp-sgd")
        if self.dp_sgd and (self.mu or self.algorithm != "fedavg" or self.clip_norm is not None):
            raise ConfigError("--dp-sgd does not combine with --mu, --algorithm scaffold or --clip-norm (Opacus clips "
                              "each example's gradient to --dp-sgd-clip)")
        at_least("local_epochs", self.local_epochs, 1)
        at_least("batch_size", self.batch_size, 1)
        number("mu", self.mu)
        choice("algorithm", self.algorithm, ("fedavg", "scaffold"))
        choice("buffers", self.buffers, ("average", "local"))

    def train_config(self) -> "TrainConfig":
        """The local training every selected client is asked to do (the round's lr: :meth:`RunConfig.lr_at`)."""
        from ..task import TrainConfig

        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, clip_norm=self.clip_norm,
                           mu=self.mu, dp_sgd_noise=self.dp_sgd_noise if self.dp_sgd else None,
                           dp_sgd_clip=self.dp_sgd_clip)


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
    client_sampling: str = "fixed"  # fixed: exactly per_round clients | poisson: each with chance per_round/clients

    def __post_init__(self) -> None:
        at_least("clients", self.clients, 1)
        choice("client_sampling", self.client_sampling, ("fixed", "poisson"))
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
    client_speed: str | None = None  # virtual clock: lognormal:SIGMA[:MEDIAN] | classes:S1,S2,... | trace:FILE
    comm_seconds: float = 0.0  # virtual clock: seconds a job spends on the network (model down, update up)
    nproc: int = 1  # processes on torch.distributed sharing each round's clients (launched with torchrun)
    checkpoint_every: int = 10  # rounds between checkpoints (and the last round); --resume continues from one

    def __post_init__(self) -> None:
        number("comm_seconds", self.comm_seconds)
        at_least("nproc", self.nproc, 1)
        at_least("checkpoint_every", self.checkpoint_every, 1)
        if self.client_speed is not None and not isinstance(self.client_speed, str):
            raise ConfigError(f"--client-speed must be a spec such as lognormal:1.0, not {self.client_speed!r}")
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


@dataclass(frozen=True)
class BufferedConfig:
    """Buffered asynchronous aggregation (FedBuff; FedAsync is ``buffer_size`` 1): off while it is None."""

    buffer_size: int | None = None  # K: updates per server step
    concurrency: int | None = None  # C: clients training at once (default: clients per round)
    dispatch_threshold: int = 1  # O: start clients once this many slots are free (C = K = O: synchronous rounds)
    max_staleness: int | None = None  # H: drop updates more than this many versions old (None: never)
    staleness: str = "polynomial:0.5"  # polynomial[:A] | sqrt | hinge[:A,B] | constant

    def __post_init__(self) -> None:
        optional(at_least, "buffer_size", self.buffer_size, 1)
        optional(at_least, "concurrency", self.concurrency, 1)
        at_least("dispatch_threshold", self.dispatch_threshold, 1)
        optional(at_least, "max_staleness", self.max_staleness, 0)
        parse_staleness(self.staleness)


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (``--dp central|distributed``: DP-FedAvg, :mod:`fedopt.privacy`); off while
    ``dp`` is None."""

    # central: clip each update, add Gaussian noise to the round's sum on the coordinator; distributed: each client
    # adds its share of Skellam noise to its quantised update inside SecAgg+
    dp: str | None = None
    noise_multiplier: float | None = None  # z: noise std over the clip (default: calibrated to target_epsilon)
    dp_clip_norm: float | None = None  # C: each update's L2 bound (with adaptive_clip: the initial clip, default 0.1)
    adaptive_clip: float | None = None  # γ: the clip tracks this quantile of the update norms (Andrew et al. 2021)
    target_epsilon: float | None = None  # the budget: calibrates z when it is not given, else stops the run at it
    delta: float | None = None  # δ of the (ε, δ) guarantee (default 1/clients^1.1)
    accountant: str = "rdp"  # rdp | pld (dp_accounting)
    noise_source: str = "seeded"  # seeded: torch generator keyed by (seed, round) | secure: os.urandom
    dp_min_clients: int | None = None  # distributed: each client adds the noise share of this many survivors

    def __post_init__(self) -> None:
        optional(choice, "dp", self.dp, ("central", "distributed"))
        optional(at_least, "dp_min_clients", self.dp_min_clients, 1)
        optional(number, "noise_multiplier", self.noise_multiplier, low_open=True)
        optional(number, "dp_clip_norm", self.dp_clip_norm, low_open=True)
        optional(number, "adaptive_clip", self.adaptive_clip, 0, 1, low_open=True, what="a quantile")
        optional(number, "target_epsilon", self.target_epsilon, low_open=True)
        optional(number, "delta", self.delta, 0, 1, low_open=True)
        choice("accountant", self.accountant, ("rdp", "pld"))
        choice("noise_source", self.noise_source, ("seeded", "secure"))
        if self.dp is None:
            given = [_flag(f.name) for f in dataclasses.fields(self)
                     if f.name != "dp" and getattr(self, f.name) != f.default]
            if given:
                raise ConfigError(f"{', '.join(given)} apply to differentially private runs: give --dp central "
                                  f"or --dp distributed")
            return
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError(f"--dp {self.dp} needs --noise-multiplier Z or --target-epsilon EPS (to calibrate Z)")
        if self.dp == "distributed":
            if self.dp_clip_norm is None:
                raise ConfigError("--dp distributed needs --dp-clip-norm C (adaptive clipping is central only)")
            if self.adaptive_clip is not None or self.accountant != "rdp":
                raise ConfigError("--dp distributed does not combine with --adaptive-clip or --accountant pld "
                                  "(its accountant is the Skellam RDP bound)")
            return
        if self.dp_min_clients is not None:
            raise ConfigError("--dp-min-clients applies to --dp distributed")
        if self.dp_clip_norm is None and self.adaptive_clip is None:
            raise ConfigError("--dp central needs --dp-clip-norm C (a fixed clip) or --adaptive-clip QUANTILE")


@dataclass(frozen=True)
class CompressionConfig:
    """Update compression (:mod:`fedopt.compress`): off while ``compress`` is None."""

    compress: str | None = None  # uplink: a spec such as topk:0.01+q8 (the clients encode, the coordinator decodes)
    error_feedback: bool = True  # keep each client's residual when the compressor is biased (a sparsifier)
    compress_down: str | None = None  # downlink: a value codec such as q8 for the model in TRAIN
    choco_gamma: float = 1.0  # --mode gossip --topology with --compress: CHOCO-Gossip's consensus step in (0, 1]

    def __post_init__(self) -> None:
        if self.compress is not None:
            from ..compress import parse_compressor

            parse_compressor(self.compress, "--compress")
        if self.compress_down is not None:
            from ..compress import downlink

            downlink(self.compress_down)
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"--error-feedback must be true or false, not {self.error_feedback!r}")
        if not (isinstance(self.choco_gamma, (int, float)) and 0 < self.choco_gamma <= 1):
            raise ConfigError(f"--choco-gamma must be in (0, 1], not {self.choco_gamma!r}")
