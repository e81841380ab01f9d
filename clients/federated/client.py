"""``fedopt client``: one federated client, a DEALER that registers, trains when asked and survives restarts.

Two threads. The socket thread owns the DEALER and never blocks on anything but a poll with a timeout: it answers
the coordinator, sends heartbeats and notices silence. The training thread (:mod:`clients.federated.training`) runs
the jobs it is handed and wakes the socket thread through an inproc PAIR pipe when a result is ready, so heartbeats
keep flowing however long training takes. Its config is a :class:`~clients.federated.config.ClientConfig`.

Paranoid Pirate (the ZeroMQ guide, chapter 4; :mod:`fedopt.uplink`): when the coordinator is silent for 3 heartbeat
intervals, or says BYE for any reason but "done", the client closes its socket, waits a capped exponential backoff,
opens a fresh one and says HELLO again; so a coordinator restarted with ``--resume`` gets its clients back without
anyone touching them. With several endpoints (``--connect URL1,URL2``: edge aggregators) each new session goes to the
next one listed, so the clients of an edge that dies move to another.

Secure aggregation: when WELCOME says the run uses ``secagg``, the client answers SECAGG messages through a
:class:`~fedopt.secagg.SecAggClient` on the socket thread and, once trained and masked, OFFERs its masked update and
sends it (SECAGG instead of UPDATE) when the coordinator PULLs it, so masked uploads take upload credit too. In
buffered asynchronous rounds the finished update stays here (OFFER for its job) until COHORT names the secure round
that aggregates it and the staleness weight to scale it by; then it is masked for that round as above. Its
long-term identity key and every peer's pinned public identity come from ``--identities DIR`` (default:
``--keys DIR``), never from the coordinator (trust model: :mod:`fedopt.identity`). Under ``--dp distributed`` WELCOME
carries the run's public noise parameters (``dp_noise``) and the client adds its Skellam share to each update before
masking it, with noise from ``os.urandom`` (:mod:`fedopt.secagg.skellam`).

Compression: when WELCOME names a ``compress`` spec, the training thread compresses each update
(:mod:`fedopt.compress`) and this client keeps its error-feedback residual (for a biased compressor, unless the run
says ``error_feedback = false``); the UPDATE then carries the compressed encoding instead of the dense delta.
``Fault.SLOW_UPLINK`` passes UPDATE uploads through a token bucket: the send waits in the socket loop (heartbeats go
on) until the bucket allows it.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import time
from collections.abc import Mapping

import numpy as np
import torch
import zmq

from fedopt import bus, wire
from fedopt.compress import Memory, Packed, uplink
from fedopt.data import PartitionSpec
from fedopt.errors import ConfigError, FedoptError, SecAggError
from fedopt.identity import find_identity_dir, load_identity, load_pinned
from fedopt.params import ParamSpec
from fedopt.secagg import DistributedNoise, SecAggClient, codec
from fedopt.task import resolve_task
from fedopt.testing import SECAGG_STAGES, Fault, SecAggExit, TokenBucket
from fedopt.trainer import SMALL_MODEL, LocalTrainer, pick_device
from fedopt.uplink import Uplink

from clients.federated.attacker import arm
from clients.federated.config import ClientConfig
from clients.federated.training import TrainingThread

__all__ = ["FederatedClient", "run_client"]

log = logging.getLogger("fedopt.client")
#: Fault.EXIT_AT_SECAGG_STAGE: the incoming secagg message that begins each stage (the client dies on it)
STAGE_MESSAGES = dict(zip(SECAGG_STAGES, (codec.Setup, codec.NeighbourKeys, codec.ShareDelivery, codec.UnmaskRequest)))


def _plain_metrics(metrics: dict) -> dict:
    """The training metrics that go on the wire: finite numbers and flags only (the wire refuses anything else)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < 2 ** 53)}


class FederatedClient:
    """One client: ``serve()`` returns 0 when the coordinator says the run is done. ``security`` secures its
    connection, ``secure`` is its secure-aggregation side (None: no identity key), ``faults`` come from
    :func:`fedopt.testing.faults`."""

    def __init__(self, cfg: ClientConfig, security: bus.Security, secure: SecAggClient | None = None,
                 faults: Mapping[Fault, object] | None = None) -> None:
        self.cfg = cfg
        self.client = cfg.client_id
        self.device = pick_device(cfg.device)
        self.exit_with_parent = os.getppid() if cfg.exit_with_parent else None
        self.ctx = zmq.Context()
        # heartbeat: cfg's until WELCOME gives the coordinator's
        self.uplink = Uplink(self.ctx, cfg.urls, security, wire.Hello(client=self.client, device=self.device.type,
                                                                      sender=self.client),
                             cfg.heartbeat, cfg.give_up, f"client {self.client}", log)
        self.pipe = self.ctx.socket(zmq.PAIR)
        self.pipe.setsockopt(zmq.LINGER, 0)
        url = f"inproc://fedopt-client-{id(self)}"
        self.pipe.bind(url)
        faults = faults or {}
        self.worker = TrainingThread(self.ctx, url, faults.get(Fault.SLOW_TRAIN, 0.0))
        self._settings: dict | None = None
        self._pending: dict | None = None  # the finished update waiting for PULL: {"round", "delta", ...}
        self._offered: list | None = None  # the held masked input already offered
        self._secure_metrics: dict = {}  # training metrics of the update being masked (sent with its OFFER)
        self._held: dict | None = None  # secure buffered rounds: the finished update waiting for COHORT
        self.secure = secure  # this client's secure-aggregation side (None: no identity key)
        if secure is not None:
            secure.hold_masked = True  # the masked input is uploaded on credit: OFFER, then PULL
        self.exit_at: SecAggExit | None = faults.get(Fault.EXIT_AT_SECAGG_STAGE)
        self.dump = faults.get(Fault.SECAGG_DUMP)  # test seam: a secure cohort's scaled update is saved here too
        rate = faults.get(Fault.SLOW_UPLINK)
        self.uplink_bucket = TokenBucket(rate) if rate else None  # test seam: an emulated slow uplink
        self._deferred: list = []  # (when, message): UPDATEs the uplink bucket holds back

    # ---- set-up from WELCOME ------------------------------------------------------------------------------------
    def _setup(self, welcome: wire.Welcome) -> None:
        s = welcome.config
        if s == self._settings:
            return  # a reconnect to the same run: keep the loaded shard
        if self.secure is not None and isinstance(s.get("max_samples"), int):
            self.secure.max_weight = s["max_samples"]  # the run's cap on the weight folded into a masked vector
        if self.secure is not None:  # --dp distributed: add this share of Skellam noise to every masked update
            try:
                self.secure.dp_noise = DistributedNoise.from_dict(s["dp_noise"]) if "dp_noise" in s else None
            except SecAggError as e:
                raise ConfigError(f"the coordinator's distributed DP settings are not valid: {e}") from None
        if s.get("secagg") and self.secure is None:
            raise ConfigError("the coordinator runs secure aggregation and this client has no identity key: give "
                              "--identities DIR (or --keys DIR) made by `fedopt keys generate`")
        if self.cfg.task and s.get("task") != self.cfg.task:
            raise ConfigError(f"this client runs task {self.cfg.task!r}, the coordinator runs {s.get('task')!r}")
        options = dict(s.get("task_options") or self.cfg.task_options)
        if self.cfg.data is not None:
            options["data_path"] = self.cfg.data
        task = resolve_task(s["task"], options)
        spec = ParamSpec.from_dict(welcome.spec)
        trainer = LocalTrainer(task, spec, self.device, s.get("buffers", "average"))
        if ParamSpec.from_module(trainer.model, s.get("buffers", "average")).to_dict() != spec.to_dict():
            raise ConfigError(f"task {s['task']!r} builds a different model than the coordinator's")
        n = self.cfg.num_shards or int(s["clients"])
        data = task.load_data(self.cfg.shard, n, int(s["seed"]), PartitionSpec(s["partition"], s["alpha"]))
        data, self.worker.transform = arm(self.cfg, trainer.model, data.to(self.device), s)  # momentum, an attack
        self.worker.trainer, self.worker.data = trainer, data
        self.worker.uplink = uplink(s.get("compress"), s.get("error_feedback", True) is not False, Memory)
        if spec.size < SMALL_MODEL and self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # see SMALL_MODEL
        self._settings = s
        log.info("client %s: shard %d of %d, %d samples, on %s", self.client, self.cfg.shard, n, data.num_samples,
                 self.device)

    # ---- the socket thread --------------------------------------------------------------------------------------
    def serve(self) -> int:
        self.worker.start()
        log.info("client %s: connecting to the coordinator at %s (gives up after %.0fs without one: --give-up)",
                 self.client, ", ".join(self.uplink.urls), self.uplink.give_up)
        try:
            while self._session() != "done":
                time.sleep(self.uplink.lost())  # the next listed endpoint, after a backoff
            return 0
        finally:
            self.uplink.close()
            self.worker.stopping.set()
            self.worker.join(timeout=5)
            self.pipe.close(0)
            self.ctx.term()

    def _session(self) -> str:
        """One connection (:class:`~fedopt.uplink.Uplink`); returns "done", or "lost" when it ended otherwise."""
        up = self.uplink
        ep = up.open()
        poller = zmq.Poller()
        for s in (*up.sockets, self.pipe):
            poller.register(s, zmq.POLLIN)
        self._deferred = []
        while True:
            wait = min([up.timeout(), *(when - time.monotonic() for when, _ in self._deferred)])
            events = dict(poller.poll(int(max(0.01, wait) * 1000)))
            while self._deferred and self._deferred[0][0] <= time.monotonic():
                ep.send(self._deferred.pop(0)[1])  # an UPDATE the uplink bucket held back (Fault.SLOW_UPLINK)
            if self.pipe in events:
                self.pipe.recv()
                self._deliver(ep)
            if any(s in events for s in up.sockets):
                msg = up.recv()
                try:
                    status = None if msg is None else self._handle(ep, msg)
                except FedoptError:
                    raise
                except Exception as e:  # a message this client cannot handle must not end it
                    log.exception("client %s: handling %s failed: %s", self.client, msg.TYPE, e)
                    continue
                if status == "welcomed":
                    up.welcome(msg)
                elif status is not None:
                    return status
            if not up.keepalive():
                return "lost"
            if self.exit_with_parent is not None and os.getppid() != self.exit_with_parent:
                return "done"  # the process that started us is gone: no strays

    def _handle(self, ep: bus.Endpoint, msg: wire.Message) -> str | None:
        if isinstance(msg, wire.Welcome):
            self.worker.jobs.put(("setup", 0, lambda: self._setup(msg)))
            return "welcomed"
        if isinstance(msg, (wire.Train, wire.Evaluate)):
            self.uplink.models_read += 1
        if isinstance(msg, wire.Train):
            log.info("client %s: training round %d", self.client, msg.round)
            self._pending = self._held = None
            self._discard_queued_training()  # a newer TRAIN supersedes one not yet started
            model = Packed.from_encoding(msg.encoding, msg.values, msg.indices, msg.scales) if msg.encoding \
                else msg.model  # --compress-down: decoded in the training thread
            self.worker.jobs.put(("train", msg.round, {"model": model, "config": msg.config, "client": self.client}))
        elif isinstance(msg, wire.Evaluate):
            self.worker.jobs.put(("evaluate", msg.round, {"model": msg.model}))
        elif isinstance(msg, wire.Pull):
            p = self._pending
            if p is not None and p["round"] == msg.round:
                d = p["delta"]
                fields = dict(encoding=d.encoding(), values=d.values, indices=d.indices, scales=d.scales) \
                    if isinstance(d, Packed) else dict(delta=d)
                self._send_update(ep, wire.UpdateMsg(round=p["round"], num_samples=p["num_samples"],
                                                     metrics=p["metrics"], sender=self.client, **fields))
                self._pending = None
            elif self.secure is not None and self.secure.masked is not None and self.secure.masked[0] == msg.round:
                rnd, _, parts = self.secure.masked
                self.secure.masked = None
                ep.send(wire.SecAgg(round=rnd, parts=parts, sender=self.client))
        elif isinstance(msg, wire.Cohort):
            h, self._held = self._held, None
            if h is None or h["job"] != msg.round or self.secure is None:
                self._held = h
                log.warning("client %s: COHORT for job %d, which this client holds no update of", self.client,
                            msg.round)
                return None
            self._secure_metrics = h["metrics"]
            update = h["delta"] * msg.scale  # the staleness weight: the coordinator's public choice, in (0, 1]
            if self.dump is not None:
                np.save(self.dump / f"update-{msg.cohort}-{self.client}.npy", update)
            self._send_secure(ep, msg.cohort, self.secure.provide_update(update, h["n"], msg.cohort))
        elif isinstance(msg, wire.SecAgg):
            self._secure_message(ep, msg)
        elif isinstance(msg, wire.Bye):
            if msg.reason == "done":
                log.info("client %s: the run is done", self.client)
                return "done"
            log.info("client %s: coordinator said %r", self.client, msg.reason)
            return "lost"
        return None

    def _send_update(self, ep: bus.Endpoint, msg: wire.UpdateMsg) -> None:
        if self.uplink_bucket is None:
            ep.send(msg)
            return
        nbytes = sum(len(memoryview(f)) for f in wire.encode(msg, ep.wire_dtype))
        self._deferred.append((self.uplink_bucket.due(nbytes), msg))

    def _secure_message(self, ep: bus.Endpoint, msg: wire.SecAgg) -> None:
        if self.secure is None:
            log.warning("client %s: dropped a SECAGG message: this client has no identity key", self.client)
            return
        if self.exit_at is not None and self.exit_at.round in (None, msg.round):
            try:
                kind = type(codec.unpack(msg.parts))
            except FedoptError:
                kind = None
            if kind is STAGE_MESSAGES[self.exit_at.stage]:
                log.warning("client %s: injected fault: SIGKILL on %s of round %d", self.client, kind.__name__,
                            msg.round)
                for h in logging.getLogger().handlers:
                    h.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        self._send_secure(ep, msg.round, self.secure.handle(msg.parts))

    def _send_secure(self, ep: bus.Endpoint, rnd: int, replies: list) -> None:
        """Send secagg replies; a masked input that just became ready is offered (uploaded when PULLed)."""
        for parts in replies:
            ep.send(wire.SecAgg(round=rnd, parts=parts, sender=self.client))
        held = self.secure.masked
        if held is not None and held[2] is not self._offered:
            self._offered = held[2]
            ep.send(wire.Offer(round=held[0], num_samples=held[1], metrics=self._secure_metrics, sender=self.client))

    def _discard_queued_training(self) -> None:
        keep = []
        while True:
            try:
                job = self.worker.jobs.get_nowait()
            except queue.Empty:
                break
            if job[0] != "train":
                keep.append(job)
        for job in keep:
            self.worker.jobs.put(job)

    def _deliver(self, ep: bus.Endpoint) -> None:
        """Hand finished work from the training thread to the coordinator."""
        while True:
            try:
                kind, rnd, payload = self.worker.results.get_nowait()
            except queue.Empty:
                return
            if kind == "update" and self._settings and self._settings.get("secagg") and self._settings.get("buffered"):
                # buffered: kept until its cohort (COHORT); the OFFER says it is ready
                delta, n, metrics = payload
                self._held = {"job": rnd, "delta": delta.numpy(), "n": n, "metrics": _plain_metrics(metrics)}
                ep.send(wire.Offer(round=rnd, num_samples=n, metrics=self._held["metrics"], sender=self.client))
            elif kind == "update" and self._settings and self._settings.get("secagg"):
                # the masked update goes out as soon as this round's key shares are in (now, or on their arrival)
                self._secure_metrics = _plain_metrics(payload[2])
                self._send_secure(ep, rnd, self.secure.provide_update(payload[0].numpy(), payload[1], rnd))
            elif kind == "update":
                delta, n, metrics = payload
                metrics = _plain_metrics(metrics)
                self._pending = {"round": rnd, "delta": delta, "num_samples": n, "metrics": metrics}
                ep.send(wire.Offer(round=rnd, num_samples=n, sender=self.client))
            elif kind == "ready":
                ep.send(wire.Ready(num_samples=self.worker.data.num_samples, sender=self.client))
            elif kind == "fatal":
                raise payload
            elif kind == "result":
                metrics, n = payload
                ep.send(wire.Result(round=rnd, num_samples=n, metrics=metrics, sender=self.client))


def run_client(cfg: ClientConfig, faults: Mapping[Fault, object] | None = None) -> int:
    """``fedopt client``: load the keys and identity ``cfg`` names, then serve until the run is done; 0 then."""
    faults = faults or {}
    # every endpoint is checked (plain TCP needs --insecure); they share one set of keys (edges of one tier share a key)
    security = [bus.security_for(url, cfg.keys, cfg.insecure, "client", cfg.own_key_name if cfg.keys else None)
                for url in cfg.urls][0]
    secure = None
    ident = find_identity_dir(cfg.identities, cfg.keys)
    if ident is not None:
        pinned = load_pinned(ident)
        secure = SecAggClient(cfg.client_id, load_identity(ident, cfg.own_key_name, cfg.client_id, pinned), pinned)
        if Fault.SECAGG_DUMP in faults:
            dump = faults[Fault.SECAGG_DUMP]
            dump.mkdir(parents=True, exist_ok=True)
            secure.on_encoded = lambda r, vec: np.save(dump / f"encoded-{r}-{cfg.client_id}.npy", vec)
    return FederatedClient(cfg, security, secure, faults).serve()
