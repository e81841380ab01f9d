"""The server's side of a secure-aggregation round, driven in one place over any transport.

Drives :class:`~fedopt.secagg.server.ServerSession` (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) stage by
stage: Setup -> AdvertiseKeys -> ShareKeys -> MaskedInput -> Unmask. Each stage sends its messages, then takes
replies until every live client answered or the stage's deadline passed; whoever did not answer has dropped.

:class:`SecAggDriver` is event-driven: it never waits and never reads a socket. Its caller hands it what arrived
and asks it to move on::

    driver = SecAggDriver(config, quant, send, identities=pinned, clock=clock, stage_timeout=30.0)
    driver.start()                      # Setup to every participant
    driver.feed(client_id, parts)       # one message from a client: accepted, or logged and dropped
    driver.poll(gone=dead_clients)      # close the stage once everyone live answered or its deadline passed
    driver.close_stage()                # close it now: whoever has not answered has dropped
    driver.done, driver.outcome         # the SecAggOutcome once Unmask closed

``send(client_id, parts)`` carries one message to a client (``parts = codec.pack(message)``: ``[msgpack body, *raw
frames]``). :func:`run_round` is the blocking loop over a driver for a transport that also has
``recv(timeout_s) -> (client_id, parts) | None``: the ZeroMQ coordinator uses it; the in-process aggregator and the
benchmark pump a driver over :class:`~fedopt.secagg.memory.MemoryTransport` themselves.

``client_id`` in :meth:`~SecAggDriver.feed` is who the transport says sent the message (the socket identity); a
message whose ``sender`` field differs, for another round, of the wrong kind, from a client the stage does not wait
for, or malformed is logged and dropped: no input ever raises. When the protocol cannot complete (fewer than t live
neighbours for some client), every participant gets an ``abort`` message, one error line is logged and
:class:`~fedopt.errors.SecAggError` reaches the caller of :meth:`~SecAggDriver.poll` or
:meth:`~SecAggDriver.close_stage`: the caller leaves the global model unchanged and goes on to the next round. The
same happens when a secret cannot be rebuilt from t honest shares (each reconstruction is checked against its
owner's signed commitment; forged shares are set aside while t honest ones remain, and their holders are named in a
warning) or when the decoded sum breaks the bounds honest inputs keep.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fedopt.errors import ConfigError, SecAggError, WireError
from fedopt.secagg import codec
from fedopt.secagg.messages import KeyAdvertisement, MaskedInput, RoundConfig, ShareKeys, UnmaskResponse
from fedopt.secagg.quantize import QuantConfig, decode_sum
from fedopt.secagg.server import ServerSession

__all__ = ["STAGES", "SecAggDriver", "SecAggOutcome", "run_round"]

log = logging.getLogger("fedopt.secagg")

Send = Callable[[str, list], None]
Recv = Callable[[float], "tuple[str, list] | None"]

#: the stages that wait for replies, in order, with the message each one takes
STAGES: tuple[tuple[str, type], ...] = (
    ("advertise", KeyAdvertisement),
    ("share", ShareKeys),
    ("mask", MaskedInput),
    ("unmask", UnmaskResponse),
)


@dataclass
class SecAggOutcome:
    """What the server learns: the decoded (weighted) mean of the survivors' updates, and who they were."""

    mean: np.ndarray  # float64: sum(w x)/sum(w) when weighted, else the plain mean of the clipped updates
    weight: float  # sum of the survivors' weights (their count when unweighted)
    survivors: tuple[str, ...]  # U3: whose updates are in ``mean``
    dropped: tuple[str, ...]  # U2 minus U3: shared keys, never sent a masked input
    bytes_received: int  # every secagg message's size, as packed
    total: np.ndarray | None = None  # the exact modular sum of the survivors' encoded vectors (uint32/uint64)
    quant: QuantConfig | None = None  # the encoding that ``total`` is in


class SecAggDriver:
    """One SecAgg+ round on the server's side, one event at a time (see the module docstring).

    ``identities`` maps client ids to pinned Ed25519 public keys (forged advertisements are then refused on
    receipt); ``clock`` gives seconds (monotonic) for the stage deadlines, ``stage_timeout`` seconds after each
    stage's messages went out. Not thread-safe: one owner feeds and polls it.
    """

    def __init__(self, config: RoundConfig, quant: QuantConfig, send: Send, *,
                 identities: Mapping[str, bytes] | None = None, clock: Callable[[], float] = time.monotonic,
                 stage_timeout: float = math.inf) -> None:
        if not stage_timeout > 0:
            raise ConfigError(f"stage_timeout must be > 0 seconds, not {stage_timeout!r}")
        self.config, self.quant = config, quant
        self._send, self._clock, self._timeout = send, clock, stage_timeout
        self._server = ServerSession(config, identities)
        self._stage = -1  # index into STAGES; -1 before start(), len(STAGES) once done
        self._expected: frozenset[str] = frozenset()
        self._answered: set[str] = set()
        self._deadline = math.inf
        self.bytes_received = 0  # every message fed, as packed (refused ones too)
        self.bytes_sent = 0  # every message sent, as packed
        self.outcome: SecAggOutcome | None = None
        self.error: SecAggError | None = None  # why the round aborted

    # ---- where the round stands --------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        """``"new"``, one of the names in :data:`STAGES`, ``"done"`` or ``"aborted"``."""
        if self.error is not None:
            return "aborted"
        if self._stage < 0:
            return "new"
        return STAGES[self._stage][0] if self._stage < len(STAGES) else "done"

    @property
    def done(self) -> bool:
        """True once the round has an outcome."""
        return self.outcome is not None

    @property
    def expected(self) -> frozenset[str]:
        """The clients the open stage waits for (empty when no stage is open)."""
        return self._expected if self._open() else frozenset()

    @property
    def waiting(self) -> frozenset[str]:
        """The expected clients that have not answered yet."""
        return self.expected - self._answered

    @property
    def answered(self) -> frozenset[str]:
        """The clients whose message the open stage accepted."""
        return frozenset(self._answered) if self._open() else frozenset()

    def time_left(self) -> float:
        """Seconds until the open stage's deadline (0 when it passed or no stage is open)."""
        return max(0.0, self._deadline - self._clock()) if self._open() else 0.0

    def _open(self) -> bool:
        return self.error is None and 0 <= self._stage < len(STAGES)

    # ---- events ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Send Setup to every participant and open AdvertiseKeys. Raises SecAggError when called twice."""
        if self._stage >= 0 or self.error is not None:
            raise SecAggError(f"secagg round {self.config.round} was already started")
        everyone = self.config.participants
        self._broadcast({u: codec.Setup(self.config, self.quant) for u in sorted(everyone)})
        self._enter(0, everyone)

    def feed(self, client: str, parts) -> bool:
        """Take one message that the transport says ``client`` sent: True when the open stage accepted it.

        Anything that does not fit (no stage open, a client the stage does not wait for, a malformed message, the
        wrong kind, a ``sender`` that is not ``client``, another round, a message the protocol refuses) is logged
        and dropped; it never raises."""
        r = self.config.round
        try:
            self.bytes_received += sum(memoryview(p).nbytes for p in parts)
            if not self._open():
                raise WireError(f"no stage is open (the round is {self.stage})")
            name, kind = STAGES[self._stage]
            if client not in self._expected:
                raise WireError(f"is not expected in this stage ({kind.__name__})")
            if client in self._answered:
                raise WireError(f"already answered this stage ({kind.__name__})")
            msg = codec.unpack(parts)
            if not isinstance(msg, kind):
                raise WireError(f"expected a {kind.__name__}, got {type(msg).__name__}")
            if msg.sender != client:
                raise WireError(f"claims to be {msg.sender!r}")
            if msg.round != r:
                raise WireError(f"is for round {msg.round}, not {r}")
            self._accept(name, msg)
        except (WireError, SecAggError) as e:
            log.warning("secagg round %s: dropped a message from %r: %s", r, client, e)
            return False
        except Exception as e:  # zero trust: no message, however malformed, ends the round
            log.warning("secagg round %s: dropped a message from %r (%s: %s)", r, client, type(e).__name__, e)
            return False
        self._answered.add(client)
        return True

    def poll(self, gone: Collection[str] = ()) -> bool:
        """Close the open stage if every expected client not in ``gone`` answered or its deadline passed: True when
        it closed. Raises SecAggError when closing aborts the round (Abort went to every participant)."""
        if not self._open():
            return False
        if self.waiting - set(gone) and self._clock() < self._deadline:
            return False
        self._close()
        return True

    def close_stage(self) -> None:
        """Close the open stage now: every client that has not answered has dropped. Raises SecAggError when no
        stage is open or when closing aborts the round (Abort went to every participant)."""
        if not self._open():
            raise SecAggError(f"secagg round {self.config.round}: no stage is open (the round is {self.stage})")
        self._close()

    # ---- the protocol ------------------------------------------------------------------------------------------------
    def _accept(self, stage: str, msg) -> None:
        server = self._server
        {"advertise": server.receive_advertisement, "share": server.receive_shares,
         "mask": server.receive_masked_input, "unmask": server.receive_unmask}[stage](msg)

    def _close(self) -> None:
        stage, kind = STAGES[self._stage]
        missing = self._expected - self._answered
        if missing:
            log.info("secagg round %s: %d client(s) dropped in %s: %s", self.config.round, len(missing),
                     kind.__name__, ", ".join(sorted(missing)[:10]))
        server = self._server
        try:
            if stage == "unmask":
                self._finish()
                return
            if stage == "mask" and len(self._answered) < self.quant.min_inputs:
                # distributed DP: fewer inputs than planned carry less noise than planned; nothing is unmasked
                raise SecAggError(f"only {len(self._answered)} masked inputs, fewer than the {self.quant.min_inputs} "
                                  f"whose noise distributed DP plans for")
            messages = {"advertise": server.close_advertise, "share": server.close_share_keys,
                        "mask": server.close_masked_input}[stage]()
            self._broadcast(messages)
        except SecAggError as e:
            self._abort(e)
        self._enter(self._stage + 1, messages)

    def _finish(self) -> None:
        result = self._server.finish()
        if result.liars:
            log.warning("secagg round %s: forged Shamir shares from %s set aside; the sum is exact", self.config.round,
                        ", ".join(result.liars))
        mean, total_w = decode_sum(result.total, self.quant, count=len(result.survivors))
        n = len(result.survivors)
        if total_w is None:
            mean, weight = mean / n, float(n)
        else:
            weight = float(total_w)
        self._stage, self._expected, self._answered = len(STAGES), frozenset(), set()
        self.outcome = SecAggOutcome(mean, weight, result.survivors, result.dropped, self.bytes_received,
                                     result.total, self.quant)

    def _enter(self, index: int, expected: Collection[str]) -> None:
        self._stage, self._expected, self._answered = index, frozenset(expected), set()
        self._deadline = self._clock() + self._timeout  # from when the stage's messages went out

    def _broadcast(self, messages: Mapping[str, object]) -> None:
        for client, msg in messages.items():
            parts = codec.pack(msg)
            self.bytes_sent += sum(memoryview(p).nbytes for p in parts)
            self._send(client, parts)

    def _abort(self, e: SecAggError) -> None:
        """Tell every participant, log one error line, raise ``e``."""
        self.error = e
        for u in sorted(self.config.participants):
            self._send(u, codec.pack(codec.Abort(self.config.round, str(e))))
        log.error("secure aggregation round %s aborted, global model unchanged: %s", self.config.round, e)
        raise e


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
    """Run one round with the clients in ``config.participants``, blocking: recv -> feed -> poll until done.

    ``recv(timeout_s)`` returns the next secagg message from any client as ``(client_id, parts)``, or None when
    ``timeout_s`` passed. ``gone()`` (optional) returns the clients the transport knows to be dead (e.g. silent
    for 3 heartbeats): a stage stops waiting for them at once instead of at its deadline. Raises SecAggError when
    the round aborts (every participant got Abort and one error line was logged)."""
    driver = SecAggDriver(config, quant, send, identities=identities, clock=clock, stage_timeout=stage_timeout)
    driver.start()
    while not driver.done:
        if driver.poll(gone() if gone is not None else ()):
            continue
        got = recv(driver.time_left())
        if got is not None:
            driver.feed(*got)
    return driver.outcome
