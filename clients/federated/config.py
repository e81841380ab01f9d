"""ClientConfig: what one federated client is asked to do; frozen, validated field by field.

Field names are the ``fedopt client`` flags with dashes as underscores, and errors name the flag. The run's task,
rounds and training settings are not here: the coordinator sends them in WELCOME and TRAIN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedopt.config import number
from fedopt.errors import ConfigError
from fedopt.trainer import check_device

__all__ = ["ClientConfig"]


@dataclass(frozen=True)
class ClientConfig:
    connect: str  # the coordinator: tcp://HOST:PORT or ipc://PATH; or several, comma-separated (failover, see urls)
    keys: str | None = None  # key folder holding coordinator.key and this client's secret (CurveZMQ)
    key_name: str | None = None  # this client's key name (None: client-NNN for shard NNN)
    insecure: bool = False  # allow plain TCP without authentication
    task: str | None = None  # must match the coordinator's task (None: whatever the coordinator runs)
    task_options: dict = field(default_factory=dict)  # used when the coordinator sends none
    data: str | None = None  # this site's own data, given to the task as data_path; alone, shard 0 of 1
    shard: int | None = None  # this client's data shard; None only with data
    num_shards: int | None = None  # None: the run's number of clients
    id: str | None = None  # stable client id (None: the shard index)
    device: str = "auto"  # auto | cpu | cuda
    heartbeat: float = 1.0  # seconds between heartbeats until the coordinator's interval is known
    give_up: float = 300.0  # seconds without a coordinator before the client exits
    identities: str | None = None  # secagg: folder of pinned identities and this client's secret (None: keys)
    exit_with_parent: bool = False  # stop when the process that started this one exits (local runs)
    # a malicious client (clients.federated.attacker): what it does to the update it sends
    attack: str | None = None  # sign_flip | scaling | gaussian | label_flip | alie | ipm (None: honest)
    attack_options: dict = field(default_factory=dict)  # factor, sigma, z, epsilon (fedopt.attacks)
    collude: str | None = None  # alie/ipm: a folder the colluding attackers share their honest-trained updates in
    colluders: int = 1  # attackers sharing ``collude`` (this one included)
    client_momentum: float = 0.0  # beta: send m = beta m + (1 - beta) delta (fedopt.client_momentum)

    def __post_init__(self):
        if not isinstance(self.connect, str) or not all(u.startswith(("tcp://", "ipc://", "inproc://"))
                                                         for u in self.connect.split(",")):
            raise ConfigError(f"--connect {self.connect!r} must be addresses that start with tcp://, ipc:// or "
                              f"inproc://, separated by commas")
        if self.data is not None:
            if not Path(self.data).exists():
                raise ConfigError(f"--data {self.data}: no such file or directory")
            if self.shard is None and not self.id:
                raise ConfigError("--data without --shard needs --id NAME (this client's id, unique in the run)")
            if self.shard is None and self.keys and not self.key_name:
                raise ConfigError("--data without --shard needs --key-name NAME with --keys (e.g. client-003)")
        elif self.shard is None:
            raise ConfigError("--shard is required unless --data gives this site's own data")
        if self.shard is None:  # data alone: the site's whole data set is this client's, shard 0 of 1
            object.__setattr__(self, "shard", 0)
            object.__setattr__(self, "num_shards", 1)
        n = self.num_shards
        if not (_count(self.shard) and self.shard >= 0 and (n is None or _count(n) and self.shard < n)):
            raise ConfigError(f"--shard {self.shard} is out of range for --num-shards {n}")
        number("heartbeat", self.heartbeat, low_open=True, what="a number of seconds")
        number("give_up", self.give_up, low_open=True, what="a number of seconds")
        check_device(self.device, "--device")
        if not isinstance(self.task_options, dict):
            raise ConfigError("--task-option must be KEY=VALUE pairs")
        from clients.federated.attacker import check_attacker

        check_attacker(self)

    @property
    def urls(self) -> list[str]:
        """The endpoints of ``connect`` in order: a session that goes silent moves on to the next (edge failover)."""
        return self.connect.split(",")

    @property
    def client_id(self) -> str:
        """The id this client registers with: ``id``, else its shard index."""
        return self.id or str(self.shard)

    @property
    def own_key_name(self) -> str:
        """This client's name in the key folder: ``key_name``, else ``client-NNN`` for shard NNN."""
        return self.key_name or f"client-{self.shard:03d}"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
