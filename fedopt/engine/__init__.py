"""The round engine: the one loop every federated mode runs (:mod:`.loop`) and the round it drives (:mod:`.round`).

The executors that reach clients live with their runtimes, because they need what the core does not have: processes
and client training (``clients.simulation``: sequential, vmap, worker pool) and sockets (``coordinator.server``: the
ZeroMQ bus).
"""

from .loop import Engine, Executor, RoundHook
from .round import Bounds, Job, RoundOutcome, RoundServer, capped_weights, client_seed

__all__ = ["Engine", "Executor", "RoundHook", "Bounds", "Job", "RoundOutcome", "RoundServer", "capped_weights",
           "client_seed"]
