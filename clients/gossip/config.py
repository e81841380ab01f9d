"""GossipConfig: what one gossip peer is asked to do; frozen, validated field by field.

Field names are the ``fedopt gossip`` flags with dashes as underscores, and errors name the flag. The peers that
``fedopt simulate --mode gossip`` starts get their config as those flags (:func:`fedopt.launch.config_argv`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedopt.data.partition import KINDS
from fedopt.compress import parse_compressor
from fedopt.errors import ConfigError
from fedopt.config import OptimizerConfig, at_least, choice, number
from fedopt.task import TrainConfig
from fedopt.trainer import check_device

from clients.gossip.topology import TOPOLOGIES

__all__ = ["GossipConfig"]

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class GossipConfig(OptimizerConfig):
    """Beside the optimizer and its schedule (:class:`~fedopt.config.OptimizerConfig`, validated there):"""

    # network
    bind: str  # this peer's socket: tcp://IP:PORT or ipc://PATH
    shard: int  # this peer's data shard, in [0, num_shards)
    num_shards: int  # number of shards the data set is cut into
    advertise: str | None = None  # the address others reach this peer at (None: bind)
    peers: tuple[str, ...] = ()  # seed peers; with topology, every member in rank order, this peer included
    discover: bool = False  # find peers on the LAN by keyed UDP beacons on `interface`
    interface: str | None = None  # the network interface discover beacons on
    discovery_port: int = 5670  # UDP port of the beacons
    swarm_secret: str | None = field(default=None, repr=False)  # the beacons' key without `keys`
    keys: str | None = None  # key folder from `fedopt keys generate` (CurveZMQ)
    key_name: str | None = None  # this peer's key name (None: client-NNN for shard NNN)
    insecure: bool = False  # allow plain TCP without authentication
    # task and training
    task: str = "digits"  # built-in name or package.module:attr
    task_options: dict = field(default_factory=dict)  # keyword arguments for the task's factory
    partition: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration
    seed: int = 0  # the same on every peer: they start from the same model and cut the data alike
    rounds: int = 30  # local rounds, each: local epochs, then `exchanges` exchanges
    local_epochs: int = 1
    batch_size: int = 16
    device: str = "cpu"
    # gossip
    topology: str | None = None  # synchronous D-PSGD on this graph (None: random pairwise gossip)
    compress: str | None = None  # with topology: CHOCO-Gossip with this compressor (clients.gossip.choco)
    choco_gamma: float = 1.0  # CHOCO's consensus step size gamma in (0, 1]
    exchange_timeout: float = 3.0  # seconds one neighbour has to answer (a slot tries for up to 3x this)
    peer_timeout: float = 15.0  # seconds of silence before a peer expires
    exchanges: int = 5  # pairwise exchanges (slots) after each round's local training
    max_accept: int = 1  # exchanges accepted per slot: a node moves at most 2 (1 + this) models per slot
    join_wait: float = 5.0  # seconds a newcomer tries to fetch the swarm's model
    final_mixes: int = 6  # exchanges that end the last round, only among peers whose training is over
    linger: float = 4.0  # after training, serve until quiet this long, for peers still finishing
    max_lag: int = 10  # rounds of training behind at which a model counts as stale
    # output
    resume: bool = False  # continue from OUT/checkpoint.safetensors
    out: str = "runs/gossip"
    progress: str = "auto"  # auto | bar | lines | off
    plot: bool = True  # write OUT/accuracy.png
    exit_with_parent: bool = False  # stop when the process that started this one exits (simulated swarms)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "peers", tuple(self.peers))  # a list is taken as one; frozen from here on
        for name in ("bind", "advertise"):
            value = getattr(self, name)
            if not (value is None and name == "advertise" or isinstance(value, str) and "://" in value):
                raise ConfigError(f"{_flag(name)} {value!r} must be an address: tcp://IP:PORT or ipc://PATH")
        at_least("num_shards", self.num_shards, 1)
        if not (isinstance(self.shard, int) and not isinstance(self.shard, bool) and 0 <= self.shard < self.num_shards):
            raise ConfigError(f"--shard {self.shard} is out of range for --num-shards {self.num_shards}")
        for name in ("rounds", "local_epochs", "batch_size", "max_accept", "exchanges"):
            at_least(name, getattr(self, name), 1)
        for name in ("exchange_timeout", "peer_timeout", "join_wait", "alpha"):
            number(name, getattr(self, name), low_open=True)
        at_least("final_mixes", self.final_mixes, 0)
        at_least("max_lag", self.max_lag, 0)
        number("linger", self.linger)
        choice("partition", self.partition, KINDS)
        choice("progress", self.progress, ("auto", "bar", "lines", "off"))
        choice("topology", self.topology, (None, *TOPOLOGIES))
        if not (isinstance(self.task, str) and self.task):
            raise ConfigError("--task must be a non-empty name")
        if not isinstance(self.task_options, dict):
            raise ConfigError("--task-option must be KEY=VALUE pairs")
        at_least("seed", self.seed, -(1 << 63))
        at_least("discovery_port", self.discovery_port, 1)
        if self.discovery_port > 65535:
            raise ConfigError(f"--discovery-port must be a UDP port in 1-65535, not {self.discovery_port!r}")
        check_device(self.device, "--device")
        for u in self.peers:
            if not (isinstance(u, str) and u.startswith(("tcp://", "ipc://"))):
                raise ConfigError(f"--peers entry {u!r} must start with tcp:// or ipc://")
        if self.topology and len(self.peers) < 2:
            raise ConfigError("--topology needs --peers listing every member (at least 2) in rank order")
        if self.topology and not self.advertise_on_interface and self.address not in self.peers:
            raise ConfigError(f"--topology {self.topology}: --peers must list every member in rank order, this peer "
                              f"({self.address}) included")
        if self.compress is not None:
            parse_compressor(self.compress, "--compress")
            if not self.topology:
                raise ConfigError("--compress needs --topology: CHOCO-Gossip keeps a public copy of every neighbour, "
                                  "which D-PSGD's fixed graph gives and random pairwise exchanges do not")
        number("choco_gamma", self.choco_gamma, low_open=True)
        if self.choco_gamma > 1:
            raise ConfigError(f"--choco-gamma must be in (0, 1], not {self.choco_gamma!r}")
        if self.discover and not self.interface:
            raise ConfigError("--discover needs --interface NAME (or $FEDOPT_INTERFACE): the LAN to beacon on")
        if self.discover and not (self.keys or self.swarm_secret):
            raise ConfigError("--discover needs a shared secret to key beacons: give --keys DIR or --swarm-secret TEXT")

    @property
    def address(self) -> str:
        """The address this peer gives others: advertise, else bind."""
        return self.advertise or self.bind

    @property
    def advertise_on_interface(self) -> bool:
        """Discover with a wildcard bind (tcp://0.0.0.0:PORT) and no advertise: the peer advertises its address on
        ``interface``, looked up when it starts."""
        return self.discover and not self.advertise and self.bind.startswith("tcp://0.0.0.0:")

    def slots(self, r: int) -> int:
        """Exchange slots of round ``r``: ``exchanges`` (one D-PSGD mix with a topology), plus the final mixes in the
        last round."""
        return 1 if self.topology else self.exchanges + (self.final_mixes if r == self.rounds else 0)

    def train_config(self, r: int) -> TrainConfig:
        """Local training of round ``r``: its scheduled learning rate, and a seed of its own for every peer."""
        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.scheduled_lr(r, self.rounds), momentum=self.momentum,
                           weight_decay=self.weight_decay, optimizer=self.optimizer, clip_norm=self.clip_norm,
                           seed=self.seed * 100_003 + self.shard * 1009 + r)
