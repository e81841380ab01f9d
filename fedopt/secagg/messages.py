"""The messages of the secure-aggregation protocol: small frozen dataclasses, no I/O.

Protocol of Bonawitz et al. (CCS 2017) over the sparse graphs of Bell et al. (CCS 2020). One round:

=========================  =================  ==============================================
stage                      direction          message
=========================  =================  ==============================================
setup                      server -> client   :class:`RoundConfig` (public, same for all)
AdvertiseKeys              client -> server   :class:`KeyAdvertisement` (signed)
                           server -> client   :class:`NeighbourKeys` (neighbours' adverts)
ShareKeys                  client -> server   :class:`ShareKeys` (one ciphertext per neighbour)
                           server -> client   :class:`ShareDelivery` (ciphertexts addressed to it)
MaskedInput                client -> server   :class:`MaskedInput` (masked vector)
                           server -> client   :class:`UnmaskRequest` (survivors / dropped)
Unmask                     client -> server   :class:`UnmaskResponse` (b- or sk-share per peer)
=========================  =================  ==============================================

The wire layer encodes these; this package only builds and checks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from fedopt.errors import SecAggError
from fedopt.secagg.graph import default_neighbours, default_threshold, neighbour_graph
from fedopt.secagg.quantize import MODULUS_BITS

__all__ = [
    "AggregateResult",
    "EncryptedShare",
    "KeyAdvertisement",
    "MaskedInput",
    "NeighbourKeys",
    "RoundConfig",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
]


@dataclass(frozen=True)
class RoundConfig:
    """Public parameters of one secure-aggregation round; every party derives the graph from them."""

    round: int  # round number, bound into every key, signature and ciphertext
    participants: tuple[str, ...]  # sorted client ids; Shamir x-coordinate of id = index + 1
    k: int  # neighbours per client (n - 1: complete graph, plain SecAgg)
    t: int  # Shamir threshold, k/2 < t <= k
    graph_seed: bytes  # 32 public random bytes fixing the neighbour graph
    vector_length: int  # words per masked vector (update length, + 1 when weighted)
    modulus_bits: int = 32  # k of Z_{2^k}: one of quantize.MODULUS_BITS
    _graph: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        p = self.participants
        if not isinstance(p, tuple) or not all(isinstance(u, str) and u for u in p):
            raise SecAggError("RoundConfig.participants must be a tuple of non-empty str ids")
        if list(p) != sorted(set(p)):
            raise SecAggError("RoundConfig.participants must be sorted and free of duplicates")
        if not isinstance(self.round, int) or self.round < 0:
            raise SecAggError(f"RoundConfig.round must be an int >= 0, got {self.round!r}")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != 32:
            raise SecAggError("RoundConfig.graph_seed must be 32 bytes")
        if self.modulus_bits not in MODULUS_BITS:
            raise SecAggError(f"RoundConfig.modulus_bits must be one of {MODULUS_BITS}, got {self.modulus_bits!r}")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise SecAggError(f"RoundConfig.vector_length must be >= 1, got {self.vector_length!r}")
        if not isinstance(self.t, int) or not (self.k < 2 * self.t and self.t <= self.k):
            raise SecAggError(
                f"RoundConfig.t={self.t!r} must satisfy k/2 < t <= k (k={self.k}) so that no server "
                f"can gather t b-shares and t sk-shares of one client"
            )
        object.__setattr__(self, "_graph", neighbour_graph(p, self.k, self.graph_seed))
        object.__setattr__(self, "_position", {u: i + 1 for i, u in enumerate(p)})

    @classmethod
    def create(
        cls,
        round: int,
        participants,
        vector_length: int,
        *,
        modulus_bits: int = 32,
        k: int | None = None,
        t: int | None = None,
        graph_seed: bytes | None = None,
    ) -> RoundConfig:
        """A config with defaults: k = default_neighbours(n), t = default_threshold(k), random seed."""
        ids = tuple(sorted(participants))
        k = default_neighbours(len(ids)) if k is None else k
        t = default_threshold(k) if t is None else t
        seed = os.urandom(32) if graph_seed is None else graph_seed
        return cls(round, ids, k, t, seed, vector_length, modulus_bits)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.modulus_bits <= 32 else np.uint64)

    def neighbours(self, client: str) -> frozenset[str]:
        """N(client) in this round's graph."""
        try:
            return self._graph[client]
        except KeyError:
            raise SecAggError(f"client {client!r} is not a participant of round {self.round}") from None

    def share_id(self, client: str) -> int:
        """The Shamir x-coordinate of ``client`` (1-based position in ``participants``)."""
        self.neighbours(client)
        return self._position[client]


@dataclass(frozen=True)
class KeyAdvertisement:
    """A client's two fresh X25519 public keys, signed with its long-term Ed25519 identity."""

    round: int
    sender: str
    c_pk: bytes  # encryption key-agreement public key (32 bytes)
    s_pk: bytes  # mask key-agreement public key (32 bytes); also the commitment to the Shamir-shared s_sk
    b_commit: bytes  # SHA-256 commitment to the self-mask seed b_u (keys.commit_seed, 32 bytes)
    signature: bytes  # Ed25519 over (round, sender, c_pk, s_pk, b_commit)


@dataclass(frozen=True)
class NeighbourKeys:
    """The advertisements of a client's neighbours that advertised (U1 within N(u))."""

    round: int
    recipient: str
    advertisements: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of (b-share, sk-share) of ``sender``'s secrets for ``receiver``."""

    round: int
    sender: str
    receiver: str
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    """A client's encrypted shares, one per neighbour in U1."""

    round: int
    sender: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareDelivery:
    """The ciphertexts addressed to ``recipient`` from neighbours that shared keys (U2)."""

    round: int
    recipient: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, eq=False)  # holds an array: compare fields explicitly
class MaskedInput:
    """A client's masked vector y_u (uint32/uint64). ``bits`` k below the words' width: every value is a residue
    mod 2^k (the wire carries k bits of each)."""

    round: int
    sender: str
    vector: np.ndarray
    bits: int = 0  # 0: the words' full width


@dataclass(frozen=True)
class UnmaskRequest:
    """Which of the recipient's share-holding neighbours survived (U3) and which dropped (U2 minus U3)."""

    round: int
    recipient: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """b-shares of surviving neighbours and sk-shares of dropped ones, as (owner id, 66 bytes)."""

    round: int
    sender: str
    b_shares: tuple[tuple[str, bytes], ...]
    sk_shares: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, eq=False)  # holds an array: compare fields explicitly
class AggregateResult:
    """The exact sum modulo 2^k of the survivors' (unmasked) encoded vectors."""

    round: int
    total: np.ndarray
    survivors: tuple[str, ...]  # U3: whose inputs are in ``total``
    dropped: tuple[str, ...]  # U2 minus U3: shared keys, sent no input
    liars: tuple[str, ...] = ()  # holders caught sending a share off the committed polynomial (set aside)
