"""``secagg``: weighted FedAvg under secure masking (SecAgg / SecAgg+), as an :class:`Aggregator`.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), over
the O(log n)-degree neighbour graphs of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020). The protocol itself lives in :mod:`fedopt.secagg`; this module
runs it inside one process for the in-process simulation: one real :class:`~fedopt.secagg.ClientSession`
per participating client and one :class:`~fedopt.secagg.ServerSession` that only ever receives masked
vectors (over the bus the same sessions are driven by :mod:`coordinator.secagg` and :mod:`clients.secagg`).

Life of a round::

    agg.begin(round, size, participants={client id: announced num_samples})
        # AdvertiseKeys + ShareKeys for every planned participant (fresh keys every round)
    agg.add(update)      # that client clips, quantises, weights and masks its delta; the server adds y_u
    agg.result()         # MaskedInput closes: clients that never called add() dropped (U2 minus U3);
                         # Unmask with the survivors; decode the exact modular sum -> weighted mean

Weighting: with ``weighting="samples"`` (FedAvg) each client folds w = min(num_samples, W) into its masked
vector (w times its quantised update, plus one word holding w), so the server learns only sum(w x) and
sum(w). W = ``max_weight`` is the run's public cap (``--max-samples``); announced counts play no part in the
encoding: its width (32 or 64-bit words) is chosen so that n * W * (2^(bits-1) - 1) cannot wrap, whatever
anyone claims. ``weighting="uniform"`` is the plain mean. Aggregators that need plaintext
updates (median, trimmed mean: ``needs_plaintext``) cannot be combined with masking; asking for that
raises :class:`ConfigError`.

Failure contract: if the protocol cannot complete (fewer than t live neighbours for some client at any
stage, fewer than t honest shares of a secret, or a decoded sum outside the bounds honest inputs keep), the
round aborts: :meth:`result` logs one error line and returns ``None`` (the global model does
not move) and the next :meth:`begin` starts a fresh round. ``last_round`` describes the last round.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, SecAggError
from ..secagg import (
    ClientSession,
    QuantConfig,
    RoundConfig,
    ServerSession,
    check_capacity,
    decode_sum,
    default_neighbours,
    default_threshold,
    encode_update,
    generate_identity,
    identity_public_bytes,
)
from .base import Aggregate, Update

__all__ = ["SecureAggregator", "secagg", "round_parameters"]

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



def round_encoding(agg: "SecureAggregator", n: int, announced: Mapping[str, int] | None = None) -> QuantConfig:
    """The encoding of a round of ``n`` participants: 32-bit words when n * W * (2^(bits-1) - 1) cannot wrap them,
    else 64-bit (SecAggError when neither can). W is the public cap, lowered to the largest capped count the round's
    participants announced (``announced``): every client clamps the weight it folds in to W, so no claim can wrap
    the sum; a large claim can only make its round use 64-bit words. Shared by the in-process aggregator and the
    coordinator's bus driver, so both encode a round identically."""
    max_weight = agg.max_weight if agg.weighting == "samples" else None
    if max_weight is not None and announced:
        max_weight = max(1, min(max_weight, max(int(v) for v in announced.values())))
    quant = QuantConfig(agg.clip, agg.bits, 32, max_weight)
    try:
        check_capacity(quant, n)
    except SecAggError:
        quant = QuantConfig(agg.clip, agg.bits, 64, max_weight)
        check_capacity(quant, n)
    return quant


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
    ) -> None:
        if inner is not None:
            weighting = _inner_weighting(inner)
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
        self.seed = seed
        self._identities: dict[str, Any] = {}  # client id -> long-term Ed25519 key (enrolment)
        self._pinned: dict[str, bytes] = {}
        self.last_round: dict = {}
        self._reset()

    def _reset(self) -> None:
        self._server: ServerSession | None = None
        self._clients: dict[str, ClientSession] = {}
        self._deliveries: dict = {}
        self._quant: QuantConfig | None = None
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
        if not participants:
            raise ConfigError("the secagg aggregator needs the round's participants: begin(round, size, participants=...)")
        ids = sorted(str(c) for c in participants)
        self.last_round = {"round": round, "participants": len(ids)}
        try:
            k, t = round_parameters(len(ids), self.neighbours, self.threshold)
            quant = self._quant = round_encoding(self, len(ids), participants)
            cfg = RoundConfig.create(round, ids, quant.vector_length(size), modulus_bits=quant.modulus_bits, k=k, t=t)
            for c in ids:
                self._enrol(c)
            self._server = ServerSession(cfg, self._pinned)
            self._clients = {c: ClientSession(c, self._identities[c], self._pinned, cfg) for c in ids}
            for c in ids:
                self._server.receive_advertisement(self._clients[c].advertise())
            keys = self._server.close_advertise()
            for c, msg in keys.items():
                self._server.receive_shares(self._clients[c].share_keys(msg))
            self._deliveries = self._server.close_share_keys()
            self.last_round.update(k=k, t=t, modulus_bits=quant.modulus_bits)
        except SecAggError as e:
            self._fail(str(e))

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
        client = self._clients.get(update.client)
        if client is None or update.client not in self._deliveries:
            raise ConfigError(f"client {update.client!r} is not a key-sharing participant of secagg round {self._round}")
        quant = self._quant
        weight = None
        if quant.weighted:
            weight = min(int(update.num_samples), quant.max_weight)
        # rounding noise, reproducible per (run seed, round, client); not a mask, so public values may key it
        noise = hashlib.blake2b(f"{self.seed}/{self._round}/{update.client}".encode(), digest_size=32,
                                person=b"fedopt-sa-noise").digest()
        d = d.detach()
        if d.dtype not in (torch.float32, torch.float64):
            d = d.float()
        # read in place (float32 CPU tensors share memory with numpy); encode and mask reuse one buffer
        enc = encode_update(d.cpu().numpy(), quant, noise, weight)
        masked = client.masked_input(self._deliveries.pop(update.client), enc.vector, consume=True)
        self._clipped += enc.clipped  # the clip rate is public metadata, the encoding itself is not kept
        del enc
        self._server.receive_masked_input(masked)
        self._added += 1

    def result(self) -> Aggregate | None:
        """Unmask with the survivors and return the weighted mean; None (logged) when the round aborted."""
        if self._error is not None or self._server is None:
            return None
        try:
            requests = self._server.close_masked_input()
            for c, req in requests.items():
                self._server.receive_unmask(self._clients[c].unmask(req))
            out = self._server.finish()
            if out.liars:
                log.warning("secagg round %s: forged Shamir shares from %s set aside; the sum is exact",
                            self._round, ", ".join(out.liars))
            vec, total_w = decode_sum(out.total, self._quant, count=len(out.survivors))
        except SecAggError as e:
            self._fail(str(e))
            return None
        n = len(out.survivors)
        if self._quant.weighted:
            weight = float(total_w)
        else:
            vec, weight = vec / n, float(n)
        self.last_round.update(survivors=n, dropped=len(out.dropped), aborted=None,
                               clip_rate=self._clipped / max(self._added, 1))
        log.info("secagg round %s: %d survivors, %d dropped, clip rate %.2f", self._round, n, len(out.dropped),
                 self.last_round["clip_rate"])
        self._clients.clear()
        if self._quant.weighted and total_w == 0:
            return None
        return Aggregate(torch.from_numpy(vec.astype(np.float32)), weight, n)

    def _fail(self, reason: str) -> None:
        self._error = reason
        self.last_round["aborted"] = reason
        self._clients.clear()
        log.error("secure aggregation round %s aborted, global model unchanged: %s", self._round, reason)


def _inner_weighting(inner: Any) -> str:
    """The weighting an inner aggregator asks for; ConfigError for one that needs plaintext updates."""
    from . import AGGREGATORS

    name = inner if isinstance(inner, str) else getattr(inner, "name", repr(inner))
    obj = AGGREGATORS[inner]() if isinstance(inner, str) and inner in AGGREGATORS and inner != "secagg" else inner
    if getattr(obj, "needs_plaintext", False):
        raise ConfigError(f"aggregator {name!r} needs every client's update in the clear and cannot run under secure "
                          f"aggregation (secagg reveals only the sum); use fedavg or mean with secagg")
    if name not in ("fedavg", "mean"):
        raise ConfigError(f"secagg computes a (sample-)weighted mean; it can wrap fedavg or mean, not {name!r}")
    return name


def secagg(**options: Any) -> SecureAggregator:
    """Factory registered as ``"secagg"``: see :class:`SecureAggregator` for the options."""
    return SecureAggregator(**options)
