"""The coordinator's side of a secure-aggregation round, over any transport.

Drives :class:`fedopt.secagg.ServerSession` (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) stage by stage:
Setup -> AdvertiseKeys -> ShareKeys -> MaskedInput -> Unmask. Each stage sends its messages, then takes replies
until every live client answered or the stage's deadline passed; whoever did not answer has dropped. The transport
is two callables, so the ZeroMQ coordinator, a test's in-memory queues or anything else can carry it::

    send(client_id, parts)            # parts = fedopt.secagg.codec.pack(message): [msgpack body, *raw frames]
    recv(timeout_s) -> (client_id, parts) | None   # the next secagg message from any client, or None on timeout

``gone()`` (optional) returns the clients the transport knows to be dead (e.g. silent for 3 heartbeats): a stage
stops waiting for them at once instead of at its deadline.

``client_id`` in ``recv`` is who the transport says sent it (the socket identity); a message whose ``sender``
field differs, or from a client the stage does not wait for, is dropped. Malformed messages and messages the protocol refuses are logged and dropped; the round
goes on. When the protocol cannot complete (fewer than t live neighbours for some client), every participant gets
an ``abort`` message and :func:`run_round` raises :class:`~fedopt.errors.SecAggError`: the caller logs it, leaves
the global model unchanged and goes on to the next round. The same happens when a secret cannot be rebuilt
from t honest shares (each reconstruction is checked against its owner's signed commitment; forged shares are
set aside while t honest ones remain) or when the decoded sum breaks the bounds honest inputs keep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fedopt.errors import SecAggError, WireError
from fedopt.secagg import QuantConfig, RoundConfig, ServerSession, decode_sum
from fedopt.secagg import codec
from fedopt.secagg.messages import KeyAdvertisement, MaskedInput, ShareKeys, UnmaskResponse

__all__ = ["SecAggOutcome", "run_round"]

log = logging.getLogger("fedopt.secagg")

Send = Callable[[str, list], None]
Recv = Callable[[float], "tuple[str, list] | None"]


@dataclass
class SecAggOutcome:
    """What the coordinator learns: the decoded (weighted) mean of the survivors' updates, and who they were."""

    mean: np.ndarray  # float64: sum(w x)/sum(w) when weighted, else the plain mean of the clipped updates
    weight: float  # sum of the survivors' weights (their count when unweighted)
    survivors: tuple[str, ...]  # U3: whose updates are in ``mean``
    dropped: tuple[str, ...]  # U2 minus U3: shared keys, never sent a masked input
    bytes_received: int  # every secagg message's size, as packed
    total: np.ndarray | None = None  # the exact modular sum of the survivors' encoded vectors (uint32/uint64)
    quant: QuantConfig | None = None  # the encoding that ``total`` is in


def run_round(
    config: RoundConfig,
    quant: QuantConfig,
    send: Send,
    recv: Recv,
    *,
    stage_timeout: float,
    identities: Mapping[str, bytes] | None = None,
    clock: Callable[[], float] = time.monotonic,
    gone: Callable[[], Collection[str]] | None = None,
) -> SecAggOutcome:
    """Run one round with the clients in ``config.participants``; raises SecAggError when it aborts."""
    server = ServerSession(config, identities)
    received = [0]

    def broadcast(messages: Mapping[str, object]) -> None:
        for client, msg in messages.items():
            send(client, codec.pack(msg))

    def gather(kind: type, expected: set[str], accept: Callable) -> None:
        deadline = clock() + stage_timeout
        waiting, answered = set(expected), set()
        while waiting:
            if gone is not None:
                waiting -= set(gone())
                if not waiting:
                    break
            left = deadline - clock()
            if left <= 0:
                break
            got = recv(left)
            if got is None:
                continue
            client, parts = got
            try:
                received[0] += sum(memoryview(p).nbytes for p in parts)
                if client not in expected:
                    raise WireError(f"is not expected in this stage ({kind.__name__})")
                msg = codec.unpack(parts)
                if not isinstance(msg, kind):
                    raise WireError(f"expected a {kind.__name__}, got {type(msg).__name__}")
                if msg.sender != client:
                    raise WireError(f"claims to be {msg.sender!r}")
                if msg.round != config.round:
                    raise WireError(f"is for round {msg.round}, not {config.round}")
                accept(msg)
            except (WireError, SecAggError) as e:
                log.warning("secagg round %s: dropped a message from %r: %s", config.round, client, e)
                continue
            except Exception as e:  # zero trust: no message, however malformed, ends the round loop
                log.warning("secagg round %s: dropped a message from %r (%s: %s)", config.round, client,
                            type(e).__name__, e)
                continue
            waiting.discard(client)
            answered.add(client)
        missing = set(expected) - answered
        if missing:
            log.info("secagg round %s: %d client(s) dropped in %s: %s", config.round, len(missing), kind.__name__,
                     ", ".join(sorted(missing)[:10]))

    everyone = set(config.participants)
    try:
        broadcast({u: codec.Setup(config, quant) for u in sorted(everyone)})
        gather(KeyAdvertisement, everyone, server.receive_advertisement)
        keys = server.close_advertise()
        broadcast(keys)
        gather(ShareKeys, set(keys), server.receive_shares)
        deliveries = server.close_share_keys()
        broadcast(deliveries)
        gather(MaskedInput, set(deliveries), server.receive_masked_input)
        requests = server.close_masked_input()
        broadcast(requests)
        gather(UnmaskResponse, set(requests), server.receive_unmask)
        result = server.finish()
        if result.liars:
            log.warning("secagg round %s: forged Shamir shares from %s set aside; the sum is exact", config.round,
                        ", ".join(result.liars))
        mean, total_w = decode_sum(result.total, quant, count=len(result.survivors))
    except SecAggError as e:
        for u in sorted(everyone):
            send(u, codec.pack(codec.Abort(config.round, str(e))))
        log.error("secure aggregation round %s aborted, global model unchanged: %s", config.round, e)
        raise
    n = len(result.survivors)
    if total_w is None:
        mean, weight = mean / n, float(n)
    else:
        weight = float(total_w)
    return SecAggOutcome(mean, weight, result.survivors, result.dropped, received[0], result.total, quant)
