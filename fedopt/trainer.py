"""LocalTrainer: one model object that trains any number of clients one after another.

Every client runtime uses it: the bus client (one client), simulation workers (thousands of virtual clients), the
in-process engine and gossip peers; the coordinator evaluates the global model with one. For each job it loads the global vector into the model, calls the task's own ``train``, and returns
``delta = local - global`` as an :class:`Update`. The delta buffer is reused from call to call (aggregators do not keep
it), so a worker's memory does not grow with the number of clients it trains.

Entries the spec does not hold (local BatchNorm statistics with ``buffers="local"``, integer counters) are per-client
state: they are saved after a client trains and restored before it trains again.
"""

from __future__ import annotations

import re

import torch

from .aggregators import Update
from .params import ParamSpec
from .task import ClientData, Task, TrainConfig

#: Below this many parameters a client's training is dominated by Python overhead, not arithmetic: a worker pool's
#: messaging and start-up cost more than a second core saves, and so does a second intra-op thread (hand-off and
#: spinning: 30x slower per step on a loaded 2-core machine). Measured on 2 cores; see benchmarks/.
SMALL_MODEL = 1_000_000

__all__ = ["LocalTrainer", "check_device", "pick_device"]

_DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:[0-9]+)?")


def check_device(name: str, field: str = "device") -> None:
    """ConfigError naming ``field`` unless ``name`` is a device :func:`pick_device` takes."""
    from .errors import ConfigError

    if not (isinstance(name, str) and _DEVICE.fullmatch(name)):
        raise ConfigError(f"{field} must be auto, cpu, cuda, cuda:N or mps, not {name!r}")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error naming the problem."""
    from .errors import ConfigError

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


class LocalTrainer:
    def __init__(self, task: Task, spec: ParamSpec | None = None, device: torch.device | str = "cpu",
                 buffers: str = "average") -> None:
        self.task = task
        self.device = torch.device(device)
        self.model = task.build_model().to(self.device)
        self.spec = spec or ParamSpec.from_module(self.model, buffers)
        self._delta = torch.empty(self.spec.size, dtype=self.spec.torch_dtype, device=self.device)
        self.binding = self.spec.bind(self.model)  # load/read the model as one copy each
        held = set(self.spec.names)
        self._local_names = [k for k in self.model.state_dict() if k not in held]
        self._initial_local = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                               if k in self._local_names}
        self._local: dict[str, dict[str, torch.Tensor]] = {}
        self.dp_sgd = None  # --dp-sgd: fedopt.dpsgd.DPSGD, the clients' Opacus ledgers (made on first use)

    def train(self, client: str, global_vec: torch.Tensor, data: ClientData, config: TrainConfig) -> Update:
        """Train ``client`` from ``global_vec``; the returned delta is a view of a reused buffer."""
        if global_vec.device != self.device:
            global_vec = global_vec.to(self.device)
        self.binding.load(global_vec)
        if self._local_names:
            self._restore_local(client)
        # Dropout and other stochastic layers: reproducible per (round, client). Seed only the generator this
        # device uses: torch.manual_seed also seeds every accelerator backend, which costs ~0.3 ms per call.
        if self.device.type == "cuda":
            torch.cuda.manual_seed(config.seed)
        else:
            torch.default_generator.manual_seed(config.seed)
        if config.dp_sgd_noise is not None:  # --dp-sgd: the standard loop's steps through Opacus (fedopt.dpsgd)
            if self.dp_sgd is None:
                from .dpsgd import DPSGD

                self.dp_sgd = DPSGD()
            metrics = self.dp_sgd.train(self.task, self.model, data, config, client)
        else:
            metrics = self.task.train(self.model, data, config)
        if self._local_names:
            self._save_local(client)
        delta = torch.sub(self.binding.read(), global_vec, out=self._delta)
        metrics = dict(metrics or {})
        return Update(client, delta, data.num_samples, metrics, bool(metrics.get("partial", False)))

    def evaluate(self, global_vec: torch.Tensor, data) -> dict:
        self.binding.load(global_vec.to(self.device))
        return self.task.evaluate(self.model, data)

    def _restore_local(self, client: str) -> None:
        state = self._local.get(client, self._initial_local)
        sd = self.model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                sd[k].copy_(v)

    def _save_local(self, client: str) -> None:
        sd = self.model.state_dict()
        self._local[client] = {k: sd[k].detach().clone() for k in self._local_names}
