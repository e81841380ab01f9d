"""Secure aggregation (SecAgg and SecAgg+), pure and I/O-free (transports and clocks are passed in).

Implements the double-masking protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), over the sparse O(log n)-degree neighbour graphs of
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020).

Modules: :mod:`~fedopt.secagg.keys` (X25519 + HKDF, Ed25519 identities, AES-GCM share bundles),
:mod:`~fedopt.secagg.prg` (AES-256-CTR mask expansion), :mod:`~fedopt.secagg.shamir` (t-of-n over
GF(2^521 - 1)), :mod:`~fedopt.secagg.quantize` (L2 clip, stochastic quantisation mod 2^k),
:mod:`~fedopt.secagg.masking`, :mod:`~fedopt.secagg.graph`, :mod:`~fedopt.secagg.skellam` (distributed DP noise), and the protocol state machines
:class:`ClientSession` / :class:`ServerSession` exchanging the frozen dataclasses of
:mod:`~fedopt.secagg.messages`. Every failure raises :class:`fedopt.errors.SecAggError`.

Driving a round: :class:`SecAggDriver` (:mod:`~fedopt.secagg.driver`) is the one server-side driver of the stages,
event by event, over any transport (:func:`run_round` is its blocking loop); :class:`SecAggClient`
(:mod:`~fedopt.secagg.participant`) is a client's side; :class:`MemoryTransport` (:mod:`~fedopt.secagg.memory`)
carries a round between them inside one process (the in-process aggregator, tests, benchmarks), the coordinator's
bus between processes.
"""

from fedopt.secagg.client import ClientSession
from fedopt.secagg.driver import SecAggDriver, SecAggOutcome, run_round
from fedopt.secagg.graph import default_neighbours, default_threshold, neighbour_graph
from fedopt.secagg.keys import generate_identity, identity_public_bytes
from fedopt.secagg.masking import mask_input, unmask_sum
from fedopt.secagg.memory import MemoryTransport
from fedopt.secagg.messages import (AggregateResult, EncryptedShare, KeyAdvertisement, MaskedInput, NeighbourKeys,
                                    RoundConfig, ShareDelivery, ShareKeys, UnmaskRequest, UnmaskResponse)
from fedopt.secagg.participant import SecAggClient
from fedopt.secagg.quantize import Encoded, QuantConfig, check_capacity, clip_fraction, decode_sum, encode_update
from fedopt.secagg.server import ServerSession
from fedopt.secagg.skellam import DistributedNoise

__all__ = [
    "AggregateResult", "ClientSession", "DistributedNoise", "Encoded", "EncryptedShare", "KeyAdvertisement", "MaskedInput",
    "MemoryTransport", "NeighbourKeys", "QuantConfig", "RoundConfig", "SecAggClient", "SecAggDriver",
    "SecAggOutcome", "ServerSession", "ShareDelivery", "ShareKeys", "UnmaskRequest", "UnmaskResponse",
    "check_capacity", "clip_fraction", "decode_sum", "default_neighbours", "default_threshold", "encode_update",
    "generate_identity", "identity_public_bytes", "mask_input", "neighbour_graph", "run_round", "unmask_sum",
]
