"""The client side of SecAgg / SecAgg+ as a pure state machine (no sockets, no clock).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017),
restricted to the neighbour graph of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020). One :class:`ClientSession` serves exactly one round:

1. :meth:`advertise` - two fresh X25519 key pairs and a commitment to b_u, signed with the long-term
   Ed25519 identity.
2. :meth:`share_keys` - verifies every neighbour's advertisement against its *pinned* identity key,
   Shamir-shares the self-mask seed b_u (drawn with the keys; the advertisement commits to it) b_u and s_u^SK among the advertising neighbours
   (threshold t) and encrypts each neighbour's pair of shares under the pairwise encryption key.
3. :meth:`masked_input` - decrypts the shares it holds, masks the encoded vector with PRG(b_u) and
   the pairwise masks of the neighbours that shared keys.
4. :meth:`unmask` - answers one consistent request: b-shares of survivors, sk-shares of dropped
   peers, never both kinds for one peer (:attr:`released` records every release).

Each method raises :class:`fedopt.errors.SecAggError` on a message it must refuse; the session is
then aborted and refuses everything after.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedopt.errors import SecAggError
from fedopt.secagg import keys, shamir
from fedopt.secagg.masking import mask_input
from fedopt.secagg.quantize import residue
from fedopt.secagg.messages import (EncryptedShare, KeyAdvertisement, MaskedInput, NeighbourKeys, RoundConfig,
                                    ShareDelivery, ShareKeys, UnmaskRequest, UnmaskResponse)

__all__ = ["ClientSession"]

_SB = shamir.SHARE_BYTES


class ClientSession:
    """One client's state for one round.

    ``identity`` is the client's long-term Ed25519 key; ``pinned`` maps every participant id to its
    raw Ed25519 public key, obtained at enrolment (not from the coordinator during the round).
    """

    def __init__(
        self,
        client_id: str,
        identity: Ed25519PrivateKey,
        pinned: Mapping[str, bytes],
        config: RoundConfig,
    ) -> None:
        self.id = client_id
        self.config = config
        self._neighbours = config.neighbours(client_id)
        self._identity = identity
        self._pinned = dict(pinned)
        self._keys = keys.RoundKeys.generate()  # fresh every round, never reused
        self._stage = "advertise"
        self._adverts: dict[str, KeyAdvertisement] = {}  # U1 within N(u)
        self._held: dict[str, tuple[int, int]] = {}  # U2 within N(u): (b-share, sk-share) I hold
        self._enc_keys: dict[str, bytes] = {}  # pairwise share-encryption keys
        # b_u is drawn now: the signed advertisement commits to it (the server checks its reconstruction)
        self._self_seed = os.urandom(keys.KEY_BYTES)
        self._released: dict[str, str] = {}  # peer -> "b" | "sk"

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def released(self) -> Mapping[str, str]:
        """Which share ("b" or "sk") this client released for each peer; never both for one."""
        return MappingProxyType(self._released)

    def _enter(self, stage: str, nxt: str, round: int, recipient: str) -> None:
        if self._stage == "aborted":
            raise SecAggError(f"client {self.id!r}: round {self.config.round} was aborted")
        if self._stage != stage:
            raise SecAggError(f"client {self.id!r}: got a {stage} message in stage {self._stage}")
        if round != self.config.round or recipient != self.id:
            self._stage = "aborted"
            raise SecAggError(
                f"client {self.id!r}: message for round {round}/{recipient!r} does not match "
                f"round {self.config.round}"
            )
        self._stage = nxt

    def _fail(self, msg: str) -> SecAggError:
        self._stage = "aborted"
        return SecAggError(f"client {self.id!r}, round {self.config.round}: {msg}")

    def _enc_key(self, peer: str) -> bytes:
        if peer not in self._enc_keys:  # computed once in ShareKeys, reused in MaskedInput
            self._enc_keys[peer] = keys.agree(
                self._keys.c_sk, self._adverts[peer].c_pk, purpose=keys.PURPOSE_ENCRYPT,
                round=self.config.round, me=self.id, peer=peer,
            )
        return self._enc_keys[peer]

    # -- stages -----------------------------------------------------------------------------------

    def advertise(self) -> KeyAdvertisement:
        """AdvertiseKeys: both fresh public keys, signed with the identity key."""
        self._enter("advertise", "share", self.config.round, self.id)
        r, c_pk, s_pk = self.config.round, self._keys.c_pk, self._keys.s_pk
        commit = keys.commit_seed(r, self.id, self._self_seed)
        sig = keys.sign_advertisement(self._identity, r, self.id, c_pk, s_pk, commit)
        return KeyAdvertisement(r, self.id, c_pk, s_pk, commit, sig)

    def share_keys(self, msg: NeighbourKeys) -> ShareKeys:
        """ShareKeys: verify neighbours' adverts, Shamir-share b_u and s_u^SK, encrypt per neighbour."""
        self._enter("share", "mask", msg.round, msg.recipient)
        seen_keys = {self._keys.c_pk, self._keys.s_pk}
        for adv in msg.advertisements:
            v = adv.sender
            if v not in self._neighbours or v in self._adverts:
                raise self._fail(f"advertisement from {v!r}, not a (new) neighbour")
            if v not in self._pinned:
                raise self._fail(f"no pinned identity key for {v!r}")
            if adv.round != self.config.round:
                raise self._fail(f"advertisement of {v!r} is for round {adv.round}")
            try:
                keys.verify_advertisement(
                    self._pinned[v], adv.signature, adv.round, v, adv.c_pk, adv.s_pk, adv.b_commit
                )
            except SecAggError as exc:
                raise self._fail(str(exc)) from exc
            if adv.c_pk in seen_keys or adv.s_pk in seen_keys or adv.c_pk == adv.s_pk:
                raise self._fail(f"advertisement of {v!r} repeats a public key")
            seen_keys |= {adv.c_pk, adv.s_pk}
            self._adverts[v] = adv
        t = self.config.t
        if len(self._adverts) < t:
            raise self._fail(f"only {len(self._adverts)} neighbours advertised keys; threshold is {t}")
        xs = {v: self.config.share_id(v) for v in self._adverts}
        b_sh = shamir.share(self._self_seed, t, xs.values())
        sk_sh = shamir.share(keys.private_bytes(self._keys.s_sk), t, xs.values())
        out = []
        for v, x in sorted(xs.items()):
            bundle = shamir.encode_share(b_sh[x]) + shamir.encode_share(sk_sh[x])
            ct = keys.encrypt_bundle(
                self._enc_key(v), bundle, round=self.config.round, sender=self.id, receiver=v
            )
            out.append(EncryptedShare(self.config.round, self.id, v, ct))
        return ShareKeys(self.config.round, self.id, tuple(out))

    def masked_input(
        self, msg: ShareDelivery, encoded: np.ndarray, consume: bool = False
    ) -> MaskedInput:
        """MaskedInput: decrypt held shares, return y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv).

        With ``consume`` the masks are added into ``encoded`` in place (it becomes y_u's vector), which
        saves a copy when the caller has no further use for the plaintext encoding.
        """
        self._enter("mask", "unmask", msg.round, msg.recipient)
        encoded = np.asarray(encoded)
        cfg = self.config
        if encoded.dtype != cfg.dtype or encoded.shape != (cfg.vector_length,):
            raise self._fail(
                f"encoded input must be {cfg.dtype}[{cfg.vector_length}], "
                f"got {encoded.dtype}{list(encoded.shape)}"
            )
        for es in msg.shares:
            v = es.sender
            if es.receiver != self.id or es.round != cfg.round:
                raise self._fail(f"share from {v!r} is addressed to {es.receiver!r}/round {es.round}")
            if v not in self._adverts or v in self._held:
                raise self._fail(f"share from {v!r}, which did not advertise keys to me (or repeated)")
            try:
                pt = keys.decrypt_bundle(
                    self._enc_key(v), es.ciphertext, round=cfg.round, sender=v, receiver=self.id
                )
            except SecAggError as exc:
                raise self._fail(str(exc)) from exc
            if len(pt) != 2 * _SB:
                raise self._fail(f"share bundle from {v!r} has length {len(pt)}")
            self._held[v] = (shamir.decode_share(pt[:_SB]), shamir.decode_share(pt[_SB:]))
        if len(self._held) < cfg.t:
            raise self._fail(f"only {len(self._held)} neighbours shared keys; threshold is {cfg.t}")
        seeds = {
            v: keys.agree(self._keys.s_sk, self._adverts[v].s_pk, purpose=keys.PURPOSE_MASK,
                          round=cfg.round, me=self.id, peer=v)
            for v in self._held
        }
        y = residue(mask_input(encoded, self.id, self._self_seed, seeds, in_place=consume), cfg.modulus_bits)
        return MaskedInput(cfg.round, self.id, y, cfg.modulus_bits if cfg.modulus_bits < 32 else 0)

    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Unmask: b-shares of survivors, sk-shares of the dropped; refuses inconsistent requests.

        Refused (SecAggError): a second request, an id listed twice or as both survived and
        dropped, an id whose shares this client does not hold, a held peer not accounted for, or
        fewer than t survivors among the neighbours.
        """
        if self._stage == "done":
            raise self._fail("second unmask request for this round refused")
        self._enter("unmask", "done", msg.round, msg.recipient)
        surv, drop = list(msg.survivors), list(msg.dropped)
        if len(set(surv)) != len(surv) or len(set(drop)) != len(drop):
            raise self._fail("unmask request lists a client twice")
        both = set(surv) & set(drop)
        if both:
            raise self._fail(f"unmask request lists {sorted(both)} as both survived and dropped")
        unknown = (set(surv) | set(drop)) - set(self._held)
        if unknown:
            raise self._fail(f"unmask request names {sorted(unknown)}, whose shares I do not hold")
        missing = set(self._held) - set(surv) - set(drop)
        if missing:
            raise self._fail(f"unmask request does not account for {sorted(missing)}")
        if len(surv) < self.config.t:
            raise self._fail(f"only {len(surv)} surviving neighbours; threshold is {self.config.t}")
        out: dict[str, list[tuple[str, bytes]]] = {"b": [], "sk": []}
        for v, kind in [(v, "b") for v in surv] + [(v, "sk") for v in drop]:
            if self._released.get(v, kind) != kind:  # the double-masking invariant
                raise self._fail(f"refusing to release both shares of {v!r}")
            self._released[v] = kind
            out[kind].append((v, shamir.encode_share(self._held[v][kind == "sk"])))
        return UnmaskResponse(self.config.round, self.id, tuple(out["b"]), tuple(out["sk"]))
