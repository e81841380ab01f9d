"""The training thread of a federated client (:class:`~clients.federated.client.FederatedClient`).

It runs :class:`~fedopt.trainer.LocalTrainer` on the jobs the socket thread hands it through a queue, puts each result
on another queue and pokes the socket thread through an inproc PAIR pipe, so heartbeats keep flowing however long
training takes (sockets stay with one thread, as ZeroMQ requires).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

import zmq

from fedopt.compress import Packed, decompress
from fedopt.errors import FedoptError
from fedopt.local_sgd import num_samples
from fedopt.task import TrainConfig
from fedopt.trainer import LocalTrainer

__all__ = ["TrainingThread"]

log = logging.getLogger("fedopt.client")
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"sampler"}


class TrainingThread(threading.Thread):
    """The training thread: takes (kind, round, payload) jobs, puts results on ``results``, pokes the pipe."""

    def __init__(self, ctx: zmq.Context, pipe_url: str, slow: float = 0.0) -> None:
        super().__init__(name="fedopt-trainer", daemon=True)
        self.ctx, self.pipe_url, self.slow = ctx, pipe_url, slow
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.trainer: LocalTrainer | None = None
        self.data = None
        self.uplink = None  # fedopt.compress.ErrorFeedback when the run compresses updates
        #: (round, delta, training seed) -> what is sent instead of the delta: client momentum or an attack
        #: (clients.federated.attacker); None sends the delta
        self.transform = None

    def run(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)  # made in this thread: this thread's end of the pipe
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.connect(self.pipe_url)
        try:
            while not self.stopping.is_set():
                try:
                    kind, rnd, payload = self.jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    if kind == "setup":
                        payload()  # loading the task and the shard can take a while: heartbeats go on meanwhile
                        self.results.put(("ready", rnd, None))
                    else:
                        self.results.put(self._do(kind, rnd, payload))
                except FedoptError as e:  # a set-up that cannot work (wrong task, bad shard): the client stops
                    self.results.put(("fatal", rnd, e))
                except Exception as e:  # a task that fails must not take the client down
                    log.exception("round %d: %s failed", rnd, kind)
                    self.results.put(("error", rnd, f"{type(e).__name__}: {e}"))
                pipe.send(b"", zmq.NOBLOCK)
        finally:
            pipe.close(0)

    def _do(self, kind: str, rnd: int, payload):
        vec = payload["model"]
        if isinstance(vec, Packed):  # a compressed TRAIN; one of another size is refused (WireError)
            vec = decompress(vec, self.trainer.spec.size)
        vec = vec.to(self.trainer.spec.torch_dtype)
        if kind == "train":
            if self.slow:
                time.sleep(self.slow)  # Fault.SLOW_TRAIN: a straggler slower than the deadline
            cfg = TrainConfig(**{k: v for k, v in payload["config"].items() if k in _TRAIN_FIELDS})
            update = self.trainer.train(payload["client"], vec, self.data, cfg)
            delta = update.delta.detach().cpu()
            if self.uplink is None or self.transform is not None:
                # the trainer reuses its delta buffer; the copy keeps a queued zero-copy send intact (compression
                # only reads it, and its residual is a copy of its own: no 4-byte-a-parameter copy then)
                delta = delta.clone()
            if self.transform is not None:  # client momentum, or an attack: what is sent instead of the delta
                delta = self.transform(rnd, delta, cfg.seed)
            if self.uplink is not None:  # compressed here, off the socket thread; the residual stays with us
                packed = self.uplink.compress(payload["client"], delta, cfg.seed)
                return ("update", rnd, (packed, update.num_samples, update.metrics))
            return ("update", rnd, (delta, update.num_samples, update.metrics))
        split = self.data.test if self.data.test is not None else self.data.train
        metrics = self.trainer.evaluate(vec, split)
        return ("result", rnd, (metrics, num_samples(split)))
