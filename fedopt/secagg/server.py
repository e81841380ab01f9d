"""The server side of SecAgg / SecAgg+ as a pure state machine (no sockets, no clock).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017),
over the neighbour graph of Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead" (CCS 2020). The caller feeds each stage's messages with ``receive_*`` and closes the
stage with ``close_*`` when everyone answered or its deadline passed; whoever did not answer has
dropped. Sets, as in the paper: U1 advertised keys, U2 shared keys, U3 sent a masked input.

The server only relays ciphertexts and keeps a running modular sum of masked vectors: it never holds
an unmasked individual vector. :meth:`finish` removes the masks and returns the exact sum mod 2^k of
the survivors' encoded inputs.

Errors: a ``receive_*`` that raises SecAggError rejects that one message and changes nothing. A
``close_*`` or :meth:`finish` that raises aborts the round (every later call raises): this happens
when some client needed for reconstruction has fewer than t live neighbours, or fewer than t honest
shares of a secret (every reconstruction is checked against the owner's signed commitment).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedopt.errors import SecAggError
from fedopt.secagg import keys, shamir
from fedopt.secagg.masking import unmask_sum
from fedopt.secagg.quantize import residue
from fedopt.secagg.messages import (AggregateResult, KeyAdvertisement, MaskedInput, NeighbourKeys, RoundConfig,
                                    ShareDelivery, ShareKeys, UnmaskRequest, UnmaskResponse)

__all__ = ["ServerSession"]


class ServerSession:
    """The coordinator's state for one secure-aggregation round.

    ``identities`` (optional) maps client ids to pinned Ed25519 public keys; when given, forged
    advertisements are rejected on receipt instead of by the clients.
    """

    def __init__(self, config: RoundConfig, identities: Mapping[str, bytes] | None = None) -> None:
        self.config = config
        self._identities = dict(identities) if identities is not None else None
        self._stage = "advertise"
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._u2: frozenset[str] = frozenset()
        self._u3: set[str] = set()
        self._sum = np.zeros(config.vector_length, dtype=config.dtype)
        self._requests: dict[str, UnmaskRequest] = {}
        self._responses: dict[str, UnmaskResponse] = {}

    # -- helpers ----------------------------------------------------------------------------------

    def _expect(self, stage: str) -> None:
        if self._stage == "aborted":
            raise SecAggError(f"secure aggregation round {self.config.round} was aborted")
        if self._stage != stage:
            raise SecAggError(f"round {self.config.round}: expected stage {stage}, in {self._stage}")

    def _check_sender(self, round: int, sender: str, alive) -> None:
        if round != self.config.round:
            raise SecAggError(f"message from {sender!r} for round {round}, expected {self.config.round}")
        if sender not in alive:
            raise SecAggError(f"message from {sender!r}, which is not live in this stage")

    def _abort(self, msg: str) -> SecAggError:
        self._stage = "aborted"
        return SecAggError(f"round {self.config.round} aborted: {msg}")

    def _require(self, live: set[str] | frozenset[str], who, what: str) -> None:
        """Abort unless each client in ``who`` has >= t neighbours in ``live``."""
        t = self.config.t
        if len(live) < t:
            raise self._abort(f"only {len(live)} {what} clients, threshold t={t}")
        for u in sorted(who):
            have = len(self.config.neighbours(u) & live)
            if have < t:
                raise self._abort(f"client {u!r} has {have} {what} neighbours, threshold t={t}")

    # -- AdvertiseKeys ----------------------------------------------------------------------------

    def receive_advertisement(self, adv: KeyAdvertisement) -> None:
        self._expect("advertise")
        self._check_sender(adv.round, adv.sender, self.config.participants)
        if adv.sender in self._adverts:
            raise SecAggError(f"second advertisement from {adv.sender!r}")
        if self._identities is not None:
            pk = self._identities.get(adv.sender)
            if pk is None:
                raise SecAggError(f"no pinned identity key for {adv.sender!r}")
            keys.verify_advertisement(pk, adv.signature, adv.round, adv.sender, adv.c_pk, adv.s_pk, adv.b_commit)
        self._adverts[adv.sender] = adv

    def close_advertise(self) -> dict[str, NeighbourKeys]:
        """End AdvertiseKeys: U1 = advertisers; each gets its advertising neighbours' keys."""
        self._expect("advertise")
        u1 = set(self._adverts)
        self._require(u1, u1, "advertising")
        self._stage = "share"
        return {
            u: NeighbourKeys(self.config.round, u, tuple(
                self._adverts[v] for v in sorted(self.config.neighbours(u) & u1)))
            for u in sorted(u1)
        }

    # -- ShareKeys --------------------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect("share")
        self._check_sender(msg.round, msg.sender, self._adverts)
        if msg.sender in self._shares:
            raise SecAggError(f"second share message from {msg.sender!r}")
        expected = self.config.neighbours(msg.sender) & set(self._adverts)
        receivers = [s.receiver for s in msg.shares]
        if sorted(receivers) != sorted(expected) or any(
            s.sender != msg.sender or s.round != msg.round for s in msg.shares
        ):
            raise SecAggError(f"shares from {msg.sender!r} are not one per advertising neighbour")
        self._shares[msg.sender] = msg

    def close_share_keys(self) -> dict[str, ShareDelivery]:
        """End ShareKeys: U2 = senders; each gets the ciphertexts its U2 neighbours sent it."""
        self._expect("share")
        u2 = frozenset(self._shares)
        self._require(u2, u2, "key-sharing")
        self._u2 = u2
        inbox: dict[str, list] = {u: [] for u in u2}
        for u in sorted(u2):
            for s in self._shares[u].shares:
                if s.receiver in u2:
                    inbox[s.receiver].append(s)
        self._shares.clear()
        self._stage = "mask"
        return {u: ShareDelivery(self.config.round, u, tuple(inbox[u])) for u in sorted(u2)}

    # -- MaskedInput ------------------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Add y_u to the running modular sum (the vector itself is not kept)."""
        self._expect("mask")
        self._check_sender(msg.round, msg.sender, self._u2)
        if msg.sender in self._u3:
            raise SecAggError(f"second masked input from {msg.sender!r}")
        v = msg.vector
        if not isinstance(v, np.ndarray) or v.dtype != self.config.dtype or v.shape != self._sum.shape:
            raise SecAggError(
                f"masked input from {msg.sender!r} must be {self.config.dtype}[{self._sum.size}]"
            )
        k = self.config.modulus_bits
        if msg.bits != (k if k < 32 else 0):
            raise SecAggError(f"masked input from {msg.sender!r} carries {msg.bits or 'full'}-bit values, the round's "
                              f"modulus is 2^{k}")
        np.add(self._sum, v, out=self._sum)
        self._u3.add(msg.sender)

    def close_masked_input(self) -> dict[str, UnmaskRequest]:
        """End MaskedInput: U3 = senders; each survivor is told which neighbours survived/dropped."""
        self._expect("mask")
        u3 = frozenset(self._u3)
        self._require(u3, u3, "surviving")  # every b_w must be reconstructible
        self._require(u3, self._u2 - u3, "surviving")  # every dropped s_v^SK too
        self._stage = "unmask"
        for w in sorted(u3):
            nb = self.config.neighbours(w) & self._u2
            self._requests[w] = UnmaskRequest(
                self.config.round, w, tuple(sorted(nb & u3)), tuple(sorted(nb - u3)))
        return dict(self._requests)

    # -- Unmask -----------------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._expect("unmask")
        self._check_sender(msg.round, msg.sender, self._requests)
        if msg.sender in self._responses:
            raise SecAggError(f"second unmask response from {msg.sender!r}")
        req = self._requests[msg.sender]
        if [v for v, _ in msg.b_shares] != list(req.survivors) or [
            v for v, _ in msg.sk_shares
        ] != list(req.dropped):
            raise SecAggError(f"unmask response from {msg.sender!r} does not answer its request")
        for _, data in msg.b_shares + msg.sk_shares:
            shamir.decode_share(data)
        self._responses[msg.sender] = msg

    def _index_shares(self) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
        """``(b-shares, sk-shares)``, each ``{owner: {holder's share id: value}}``, in one pass over the responses."""
        index: tuple[dict, dict] = ({}, {})
        for holder, resp in self._responses.items():
            x = self.config.share_id(holder)
            for kind, shares in enumerate((resp.b_shares, resp.sk_shares)):
                for owner, data in shares:
                    index[kind].setdefault(owner, {})[x] = shamir.decode_share(data)
        return index

    def _reconstruct(self, index, owner: str, kind: int, liars: set[int]) -> bytes:
        """The owner's b_u (kind 0) or s_u^SK (kind 1), checked against its signed advertisement.

        A share off the polynomial of the secret that matches the commitment is a forgery: its holder's share id
        joins ``liars`` (tried last for later secrets). Aborts when no ``t`` honest shares are left."""
        what = ("self-mask seed", "mask key")[kind]
        shares = index[kind].get(owner, {})
        if len(shares) < self.config.t:
            raise self._abort(f"{len(shares)} shares of the {what} of {owner!r}, threshold t={self.config.t}")
        adv = self._adverts[owner]
        if kind == 0:
            commit, r = adv.b_commit, self.config.round
            check = lambda secret: keys.commit_seed(r, owner, secret) == commit  # noqa: E731
        else:
            check = lambda secret: keys.public_from_private_bytes(secret) == adv.s_pk  # noqa: E731
        try:
            secret, bad = shamir.reconstruct_verified(shares, self.config.t, check, suspects=liars)
        except SecAggError as exc:
            raise self._abort(f"the {what} of {owner!r} cannot be reconstructed from honest shares: {exc}") from None
        liars |= bad
        return secret

    def finish(self) -> AggregateResult:
        """End Unmask: reconstruct masks, remove them, return the survivors' exact modular sum.

        Every reconstructed secret is checked against the owner's signed commitment (b_commit for b_u, s_pk for
        s_u^SK). Forged shares are set aside when t honest ones remain (their holders are named in
        :attr:`AggregateResult.liars`); otherwise the round aborts (SecAggError)."""
        self._expect("unmask")
        cfg, u3 = self.config, frozenset(self._u3)
        dropped = self._u2 - u3
        liars: set[int] = set()
        try:
            index = self._index_shares()
            self_seeds = [self._reconstruct(index, w, 0, liars) for w in sorted(u3)]
            pair_seeds = []
            for v in sorted(dropped):
                sk = self._reconstruct(index, v, 1, liars)
                for w in sorted(cfg.neighbours(v) & u3):
                    seed = keys.agree(sk, self._adverts[w].s_pk, purpose=keys.PURPOSE_MASK,
                                      round=cfg.round, me=v, peer=w)
                    pair_seeds.append((w, v, seed))
        except SecAggError as exc:
            self._stage = "aborted"
            raise exc
        total = residue(unmask_sum(self._sum, self_seeds, pair_seeds), cfg.modulus_bits)
        self._stage = "done"
        named = tuple(u for u in cfg.participants if cfg.share_id(u) in liars)
        return AggregateResult(cfg.round, total, tuple(sorted(u3)), tuple(sorted(dropped)), named)
