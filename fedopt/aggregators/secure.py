"""``secagg``: weighted FedAvg under secure masking (SecAgg / SecAgg+), as an :class:`Aggregator`.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), over
the O(log n)-degree neighbour graphs of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020). The protocol itself lives in :mod:`fedopt.secagg`; this module
runs it inside one process for the in-process simulation: the protocol's one driver
(:class:`~fedopt.secagg.SecAggDriver`, which only ever receives masked vectors) over a
:class:`~fedopt.secagg.MemoryTransport` holding one real :class:`~fedopt.secagg.SecAggClient` per
participating client. Over the bus the same driver and clients run in separate processes.

Life of a round::

    agg.begin(round, size, participants={client id: announced num_samples})
        # AdvertiseKeys + ShareKeys for every planned participant (fresh keys every round)
    agg.add(update)      # that client clips, quantises, weights and masks its delta; the server adds y_u
    agg.result()         # MaskedInput closes: clients that never called add() dropped (U2 minus U3);
                         # Unmask with the survivors; decode the exact modular sum -> weighted mean

The rounding noise of each client's encoding is derived from (run seed, round, client), so a simulation is
reproducible; it only makes the quantisation unbiased and is no mask, so public values may key it.

Weighting: with ``weighting="samples"`` (FedAvg) each client folds w = min(num_samples, W) into its masked
vector (w times its quantised update, plus one word holding w), so the server learns only sum(w x) and
sum(w). W = ``max_weight`` is the run's public cap (``--max-samples``); announced counts play no part in the
encoding: its width (32 or 64-bit words) is chosen so that n * W * (2^(bits-1) - 1) cannot wrap, whatever
anyone claims. ``weighting="uniform"`` is the plain mean. ``inner`` names the weighting by the
aggregator it stands for: an aggregator object (:func:`fedopt.aggregators.make_aggregator` turns a
registered name into one), or the name ``"fedavg"`` or ``"mean"``; a ``norm_bound`` object stands for
``"fedavg"`` with its bound as ``clip`` (the clip each client applies before masking is norm bounding).
Aggregators that need plaintext updates (median, trimmed mean, Krum, Bulyan, geomed, centered clipping:
``needs_plaintext``) cannot be combined with masking; asking for that raises :class:`ConfigError`.

Failure contract: if the protocol cannot complete (fewer than t live neighbours for some client at any
stage, fewer than t honest shares of a secret, or a decoded sum outside the bounds honest inputs keep), the
round aborts: :meth:`result` logs one error line and returns ``None`` (the global model does
not move) and the next :meth:`begin` starts a fresh round. ``last_round`` describes the last round.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, SecAggError
from ..secagg import (DistributedNoise, MemoryTransport, QuantConfig, RoundConfig, SecAggClient, SecAggDriver,
                      check_capacity, default_neighbours, default_threshold, generate_identity, identity_public_bytes)
from ..secagg.participant import random_noise
from ..secagg.quantize import MODULUS_BITS
from .base import Aggregate, Update

__all__ = ["SecureAggregator", "secagg", "round_encoding", "round_parameters", "seeded_noise"]

log = logging.getLogger("fedopt.secagg")

_WEIGHTINGS = {"fedavg": "samples", "mean": "uniform", "samples": "samples", "uniform": "uniform"}


def round_parameters(n: int, neighbours: int | None, threshold: int | None) -> tuple[int, int]:
    """(k, t) for a round of ``n`` clients: k capped at n - 1 and made even when n is odd (a k-regular
    graph needs n*k even), t defaulting to floor(k/2) + 1 and capped at k. Raises SecAggError."""
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients in a round, got {n}")
    k = default_neighbours(n) if neighbours is None else min(neighbours, n - 1)
    if k % 2 and n % 2 and k < n - 1:
        k += 1
    t = default_threshold(k) if threshold is None else min(threshold, k)
    if 2 * t <= k:
        raise SecAggError(f"threshold t={t} must exceed k/2 for k={k} neighbours (privacy needs 2t > k)")
    return k, t


def round_encoding(agg: "SecureAggregator", n: int, announced: Mapping[str, int] | None = None,
                   size: int | None = None) -> QuantConfig:
    """The encoding of a round of ``n`` participants: the narrowest modulus 2^k (k in ``MODULUS_BITS``: a multiple of
    4 up to 32, or 64) that n * W * (2^(bits-1) - 1) cannot wrap (SecAggError when none can); a round's masked
    vectors travel packed at k bits a value. W is the public cap, lowered to the largest capped count the round's
    participants announced (``announced``): every client clamps the weight it folds in to W, so no claim can wrap
    the sum; a large claim can only make its round use 64-bit words. Shared by the in-process aggregator and the
    coordinator's bus driver, so both encode a round identically.

    Under distributed DP (``agg.dp_noise``, unweighted) the words also reserve a tail bound on the n clients' summed
    Skellam noise, and a round of fewer than the planned minimum of clients is refused (SecAggError) before any
    protocol message: its noise would fall short. ``size`` is then the model's length (the noise is per word)."""
    max_weight = agg.max_weight if agg.weighting == "samples" else None
    if max_weight is not None and announced:
        max_weight = max(1, min(max_weight, max(int(v) for v in announced.values())))
    noise, extra = getattr(agg, "dp_noise", None), {}
    if noise is not None:
        if n < noise.min_clients:
            raise SecAggError(f"{n} participants, fewer than the {noise.min_clients} whose noise distributed DP plans "
                              f"for (--dp-min-clients)")
        extra = dict(noise_bound=noise.tail_bound(n, agg.bits, int(size)), min_inputs=noise.min_clients)
    for k in MODULUS_BITS:
        if k <= agg.bits:
            continue
        quant = QuantConfig(agg.clip, agg.bits, k, max_weight, **extra)
        try:
            check_capacity(quant, n)
            return quant
        except SecAggError:
            if k == MODULUS_BITS[-1]:
                raise
    raise SecAggError(f"no modulus holds {agg.bits}-bit values")  # unreachable: bits <= 53 < 64


def seeded_noise(seed: int, client: str) -> Callable[[int], bytes]:
    """The rounding-noise source of ``client`` in a run seeded ``seed``: ``noise(round) -> 32 bytes``, reproducible
    per (seed, round, client). It is no mask, so public values may key it."""

    def noise(round: int) -> bytes:
        return hashlib.blake2b(f"{seed}/{round}/{client}".encode(), digest_size=32, person=b"fedopt-sa-noise").digest()

    return noise


class SecureAggregator:
    """Weighted mean of client deltas computed under SecAgg+ masking (see the module docstring)."""

    name = "secagg"
    linear = False  # per-client masked inputs: never merge pre-aggregated partials
    needs_all_updates = False  # O(P) server memory: a running modular sum
    needs_plaintext = False
    needs_participants = True  # begin() must be told who will take part, before keys are shared

    def __init__(
        self,
        clip: float = 10.0,
        bits: int = 16,
        neighbours: int | None = None,
        threshold: int | None = None,
        weighting: str = "samples",
        inner: Any = None,
        seed: int = 0,
        max_weight: int = 1_000_000,
        dp_noise: DistributedNoise | None = None,
        noise_source: str = "seeded",
    ) -> None:
        if inner is not None:
            weighting = _inner_weighting(inner)
            if getattr(inner, "name", None) == "norm_bound":
                clip = inner.bound  # norm bounding under masking is the clip every client applies before it masks
        if weighting not in _WEIGHTINGS:
            raise ConfigError(f"secagg weighting must be samples or uniform, not {weighting!r}")
        if neighbours is not None and (not isinstance(neighbours, int) or neighbours < 1):
            raise ConfigError(f"secagg-neighbours must be an integer >= 1, not {neighbours!r}")
        if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
            raise ConfigError(f"secagg-threshold must be an integer >= 1, not {threshold!r}")
        if neighbours is not None and threshold is not None and 2 * threshold <= neighbours:
            raise ConfigError(f"secagg-threshold {threshold} must exceed half of secagg-neighbours {neighbours}")
        if not isinstance(max_weight, int) or isinstance(max_weight, bool) or max_weight < 1:
            raise ConfigError(f"secagg max_weight (--max-samples) must be an integer >= 1, not {max_weight!r}")
        try:
            check_capacity(QuantConfig(clip=float(clip), bits=int(bits), modulus_bits=64,
                                       max_weight=max_weight if _WEIGHTINGS.get(weighting) == "samples" else None), 2)
        except (SecAggError, TypeError, ValueError) as e:
            raise ConfigError(f"secagg: {e}") from None
        self.clip, self.bits = float(clip), int(bits)
        self.neighbours, self.threshold = neighbours, threshold
        self.weighting = _WEIGHTINGS[weighting]
        self.max_weight = max_weight  # W: the public cap on one client's weight (RunConfig.max_samples)
        if dp_noise is not None and self.weighting != "uniform":
            raise ConfigError("distributed DP sums unweighted updates: secagg with dp_noise needs weighting 'uniform'")
        self.seed = seed
        #: distributed DP (fedopt.privacy.distributed): every client adds its Skellam share before masking
        self.dp_noise = dp_noise
        self.noise_source = noise_source  # seeded: the clients' noise keyed by (seed, round, client); secure: urandom
        self._identities: dict[str, Any] = {}  # client id -> long-term Ed25519 key (enrolment)
        self._pinned: dict[str, bytes] = {}
        self.last_round: dict = {}
        self._reset()

    def _reset(self) -> None:
        self._driver: SecAggDriver | None = None
        self._transport: MemoryTransport | None = None
        self._size = 0
        self._round = 0
        self._clipped = self._added = 0
        self._error: str | None = None

    def _enrol(self, client: str) -> None:
        if client not in self._identities:
            self._identities[client] = generate_identity()
            self._pinned[client] = identity_public_bytes(self._identities[client])

    # ---- the Aggregator protocol ------------------------------------------------------------------------------------
    def begin(self, round: int, size: int, participants: Mapping[str, int] | None = None) -> None:
        """Set up the round and run AdvertiseKeys and ShareKeys for every participant.

        ``participants`` maps each planned client id to its announced num_samples (the encoding's W is the public
        cap ``max_weight``, lowered to the largest of these; see :func:`round_encoding`). Raises ConfigError when it is missing; a protocol
        failure aborts the round (logged, and :meth:`result` returns None).
        """
        self._reset()
        self._size, self._round = size, round
        if participants is None:
            raise ConfigError("the secagg aggregator needs the round's participants: begin(round, size, participants=...)")
        ids = sorted(str(c) for c in participants)
        self.last_round = {"round": round, "participants": len(ids)}
        if not ids:  # e.g. a Poisson draw of no client: no protocol to run, the model stays
            self._fail("no participants")
            log.warning("secure aggregation round %s: no participants, global model unchanged", round)
            return
        try:
            k, t = round_parameters(len(ids), self.neighbours, self.threshold)
            quant = round_encoding(self, len(ids), participants, size)
            cfg = RoundConfig.create(round, ids, quant.vector_length(size), modulus_bits=quant.modulus_bits, k=k, t=t)
        except SecAggError as e:  # no protocol message went out
            self._fail(str(e))
            log.error("secure aggregation round %s aborted, global model unchanged: %s", round, e)
            return
        for c in ids:
            self._enrol(c)
        clients = {c: SecAggClient(c, self._identities[c], self._pinned, self.max_weight,
                                   noise=random_noise if self.noise_source == "secure" else seeded_noise(self.seed, c))
                   for c in ids}
        for client in clients.values():
            client.dp_noise = self.dp_noise
        self._transport = MemoryTransport(clients)
        self._driver = SecAggDriver(cfg, quant, self._transport.send, identities=self._pinned)
        try:
            self._driver.start()
            self._transport.pump(self._driver)  # AdvertiseKeys and ShareKeys: the driver now waits for masked inputs
        except SecAggError as e:  # the driver sent Abort to every participant and logged one error line
            self._fail(str(e))
            return
        self.last_round.update(k=k, t=t, modulus_bits=quant.modulus_bits)

    def add(self, update: Update) -> None:
        """The client of ``update`` encodes and masks its delta; only the masked vector reaches the server.

        Its weight is min(num_samples, max_weight). Raises ConfigError for a wrong length, an unknown client or
        a second update from one client, and SecAggError when that client's protocol state refuses (both mean:
        this update is not used).
        """
        d = update.delta
        if d.dim() != 1 or d.numel() != self._size:
            raise ConfigError(f"update has {d.numel()} elements, the model has {self._size}")
        if self._error is not None:
            return  # the round already aborted; result() reports it
        driver, transport = self._driver, self._transport
        if driver is None or driver.stage != "mask" or update.client not in driver.waiting:
            raise ConfigError(f"client {update.client!r} is not a key-sharing participant of secagg round {self._round}")
        d = d.detach()
        if d.dtype not in (torch.float32, torch.float64):
            d = d.float()
        # read in place (float32 CPU tensors share memory with numpy); encode and mask reuse one buffer
        transport.provide_update(update.client, d.cpu().numpy(), int(update.num_samples), self._round)
        transport.deliver(driver)
        if update.client not in driver.answered:  # the client or the driver logged why
            raise SecAggError(f"client {update.client!r} could not mask its update for secagg round {self._round}")
        self._clipped += transport.participants[update.client].clip_rate  # public metadata; the encoding is gone
        self._added += 1

    def result(self) -> Aggregate | None:
        """Unmask with the survivors and return the weighted mean; None (logged) when the round aborted."""
        if self._error is not None or self._driver is None:
            return None
        driver, transport = self._driver, self._transport
        try:
            if driver.stage == "mask":
                driver.close_stage()  # every client that never called add() has dropped
            transport.pump(driver)
        except SecAggError as e:  # the driver sent Abort to every participant and logged one error line
            self._fail(str(e))
            return None
        out = driver.outcome
        n = len(out.survivors)
        self.last_round.update(survivors=n, dropped=len(out.dropped), aborted=None,
                               clip_rate=self._clipped / max(self._added, 1),
                               bytes_up=transport.bytes_up, bytes_down=transport.bytes_down)
        log.info("secagg round %s: %d survivors, %d dropped, clip rate %.2f", self._round, n, len(out.dropped),
                 self.last_round["clip_rate"])
        self._driver = self._transport = None
        if out.quant.weighted and out.weight == 0:
            return None
        return Aggregate(torch.from_numpy(out.mean.astype(np.float32)), out.weight, n)

    def _fail(self, reason: str) -> None:
        self._error = reason
        self.last_round["aborted"] = reason
        self._driver = self._transport = None


def _inner_weighting(inner: Any) -> str:
    """The weighting an inner aggregator asks for; ConfigError for one that needs plaintext updates."""
    name = inner if isinstance(inner, str) else getattr(inner, "name", repr(inner))
    if getattr(inner, "needs_plaintext", False):
        raise ConfigError(f"aggregator {name!r} needs every client's update in the clear and cannot run under secure "
                          f"aggregation (secagg reveals only the sum); use fedavg, mean or norm_bound with secagg")
    if name == "norm_bound":
        return "samples"  # its clip is secagg's own client-side clip
    if name not in ("fedavg", "mean"):
        raise ConfigError(f"secagg computes a (sample-)weighted mean; it can wrap fedavg or mean, not {name!r} "
                          f"(or norm_bound, whose bound becomes the clip)")
    return name


def secagg(**options: Any) -> SecureAggregator:
    """Factory registered as ``"secagg"``: see :class:`SecureAggregator` for the options."""
    return SecureAggregator(**options)
