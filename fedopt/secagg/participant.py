"""A client's side of secure aggregation, over any transport: feed it messages, send what it returns.

Wraps one :class:`fedopt.secagg.ClientSession` per round (Bonawitz et al., CCS 2017; Bell et al., CCS 2020)::

    sa = SecAggClient(client_id, identity, pinned)   # long-term Ed25519 key; every peer's pinned public key
    replies = sa.handle(parts)                       # an incoming secagg message -> list of messages to send
    replies = sa.provide_update(delta, num_samples, round)  # once local training is done

Each reply is ``codec.pack(message)`` (``[msgpack body, *raw frames]``) for the coordinator. The masked input is
made as soon as both the share delivery and the update are there, in whichever order they arrive (and returned, or
with ``hold_masked`` kept in ``masked`` for an upload on credit); an update for a
round whose ``setup`` has not arrived yet is kept until it does (a transport may deliver TRAIN's result first). Malformed bytes
are logged and dropped. A message the protocol refuses (bad signature, inconsistent unmask request, a stage out of
order) is logged, the round's session is dropped (the client then sends nothing more for that round) and ``handle``
returns ``[]``: it never raises into the client's loop. The weight folded into the masked vector is the sample
count clamped to the run's public cap. A new ``setup`` starts a fresh session (fresh keys) for the new round.

The same class serves a client process on the bus (``clients.federated``) and every simulated client of the
in-process aggregator (over :class:`fedopt.secagg.memory.MemoryTransport`). The only difference is the source of
the rounding noise (``noise``): fresh random bytes by default, or bytes derived from a run seed so that a
simulation is reproducible. That noise only makes the quantisation unbiased; it is no mask, so public values may
key it. Under distributed DP (``dp_noise``) the same source keys the client's Skellam noise as well (through a hash:
the two streams are independent): on a real client it is fresh ``os.urandom`` bytes, which a differentially private
release needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedopt.errors import SecAggError, WireError
from fedopt.secagg import codec
from fedopt.secagg.client import ClientSession
from fedopt.secagg.messages import NeighbourKeys, ShareDelivery, UnmaskRequest
from fedopt.secagg.quantize import encode_update
from fedopt.secagg.skellam import DistributedNoise, add_skellam, noise_key

__all__ = ["Noise", "SecAggClient", "random_noise"]

log = logging.getLogger("fedopt.secagg")

#: the source of a round's rounding noise: ``noise(round) -> 32 bytes`` that seed it
Noise = Callable[[int], bytes]


def random_noise(round: int) -> bytes:
    """Fresh random bytes for every update: the default noise source."""
    return os.urandom(32)


class SecAggClient:
    """One client's side of secure aggregation (see the module docstring).

    ``noise(round)`` gives the 32 bytes that seed the rounding noise of the update for ``round`` (default:
    :func:`random_noise`). ``max_weight`` is the run's cap on one client's weight.
    """

    def __init__(self, client_id: str, identity, pinned: Mapping[str, bytes], max_weight: int | None = None,
                 noise: Noise = random_noise) -> None:
        self.id = client_id
        #: the run's cap on one client's weight (``max_samples`` from WELCOME); the weight folded into the masked
        #: vector is min(num_samples, this, the round's public max_weight)
        self.max_weight = max_weight
        self._noise = noise
        self._identity = identity
        self._pinned = dict(pinned)
        self._session: ClientSession | None = None
        self._setup: codec.Setup | None = None
        self._delivery: ShareDelivery | None = None
        self._update: tuple[np.ndarray, int, int | None] | None = None  # (delta, num_samples, round)
        self.clip_rate: float | None = None  # 1.0 if the last update was clipped, else 0.0
        #: test seam: called with (round, encoded vector) just before masking; the vector never leaves the client
        self.on_encoded = None
        #: keep the masked input in :attr:`masked` as ``(round, num_samples, parts)`` instead of returning it, for a
        #: transport that uploads on credit (OFFER, then the coordinator's PULL)
        self.hold_masked = False
        self.masked: tuple[int, int, list] | None = None
        #: distributed DP (:mod:`fedopt.secagg.skellam`): the run's public noise parameters, from WELCOME; this client
        #: then adds its Skellam share to its encoded update before masking it (keyed by its noise source)
        self.dp_noise: DistributedNoise | None = None

    @property
    def round(self) -> int | None:
        return None if self._setup is None else self._setup.round

    def handle(self, parts: Sequence) -> list[list]:
        """Process one incoming secagg message; returns the messages to send (possibly none)."""
        try:
            msg = codec.unpack(parts)
        except WireError as e:  # malformed bytes: dropped, the round's session (if any) goes on
            log.warning("client %s: malformed secagg message dropped: %s", self.id, e)
            return []
        try:
            return self._dispatch(msg)
        except SecAggError as e:
            log.warning("client %s: secagg message refused, leaving the round: %s", self.id, e)
            self._session = None
            return []
        except Exception as e:  # zero trust: a hostile message never ends the client's loop
            log.warning("client %s: secagg message refused (%s: %s), leaving the round", self.id, type(e).__name__, e)
            self._session = None
            return []

    def provide_update(self, delta, num_samples: int, round: int | None = None) -> list[list]:
        """Hand over the update for ``round`` (default: the current one) as a flat float vector; returns the masked
        input if it can go now. An update for a later round than the current setup waits for that round's setup.

        A float32 or float64 vector is read as it is (kept by reference until it is masked: the caller must not
        change it meanwhile); any other dtype is converted to float64."""
        if round is not None and self.round is not None and round < self.round:
            log.warning("client %s: dropped an update for round %s, secagg is at round %s", self.id, round, self.round)
            return []
        x = np.asarray(delta)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        self._update = (x.reshape(-1), int(num_samples), round)
        try:
            return self._maybe_mask()
        except (SecAggError, ValueError, TypeError) as e:
            log.warning("client %s: cannot mask its update, leaving the round: %s", self.id, e)
            self._session = None
            return []

    def _dispatch(self, msg) -> list[list]:
        if isinstance(msg, codec.Setup):
            if self.id not in msg.config.participants:
                raise SecAggError(f"setup for round {msg.round} does not list this client")
            keep = self._update is not None and self._update[2] == msg.round
            self._setup, self._delivery, self._update = msg, None, (self._update if keep else None)
            self.masked = None
            self._session = ClientSession(self.id, self._identity, self._pinned, msg.config)
            return [codec.pack(self._session.advertise())]
        if isinstance(msg, codec.Abort):
            if self._setup is not None and msg.round == self._setup.round:
                # info, not warning: nothing went wrong here, and the coordinator logs the abort as an error (in a
                # simulation that one line stands for the round, not one more per client)
                log.info("client %s: coordinator aborted secagg round %s: %s", self.id, msg.round, msg.reason)
                self._session = None
            return []
        if self._session is None or self._setup is None or msg.round != self._setup.round:
            raise SecAggError(f"{type(msg).__name__} for round {msg.round} without a live session for it")
        if isinstance(msg, NeighbourKeys):
            return [codec.pack(self._session.share_keys(msg))]
        if isinstance(msg, ShareDelivery):
            self._delivery = msg
            return self._maybe_mask()
        if isinstance(msg, UnmaskRequest):
            return [codec.pack(self._session.unmask(msg))]
        raise SecAggError(f"a client does not accept {type(msg).__name__}")

    def _maybe_mask(self) -> list[list]:
        if self._session is None or self._delivery is None or self._update is None:
            return []
        x, n, r = self._update
        if r is not None and r != self.round:
            return []  # an update for a round whose setup has not come yet
        quant = self._setup.quant
        if x.size + (1 if quant.weighted else 0) != self._setup.config.vector_length:
            raise SecAggError(f"update has {x.size} values; round {self.round} expects "
                              f"{self._setup.config.vector_length} words")
        weight = None
        if quant.weighted:  # clamp to the public caps: never fold in more weight than the run allows
            weight = max(0, min(n, quant.max_weight, self.max_weight or quant.max_weight))
        source = self._noise(self.round)
        enc = encode_update(x, quant, source, weight)
        self.clip_rate = float(enc.clipped)
        if self.on_encoded is not None:
            self.on_encoded(self.round, enc.vector)
        if self.dp_noise is not None:  # distributed DP: this client's Skellam share, before masking
            add_skellam(enc.vector[: x.size], self.dp_noise.client_lambda(quant.bits, x.size), noise_key(source))
        delivery, self._delivery, self._update = self._delivery, None, None
        parts = codec.pack(self._session.masked_input(delivery, enc.vector, consume=True))
        if self.hold_masked:
            self.masked = (self.round, n, parts)
            return []
        return [parts]
