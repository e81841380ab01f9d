"""Key material for secure aggregation: agreement, identity signatures, share encryption.

The protocol follows Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (CCS 2017) with the sparse neighbourhoods of Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead" (CCS 2020). Primitives, all from the ``cryptography`` package:

- key agreement: X25519, two fresh key pairs per client per round (``c`` encrypts shares, ``s`` derives
  pairwise masks), so a dropped client's reconstructed mask key never unlocks another round;
- key derivation: HKDF-SHA256 whose ``info`` binds the purpose, the round and both client ids in a
  canonical (sorted) order, so keys differ per round, per pair and per purpose and are symmetric;
- identity: a long-term Ed25519 key per client, pinned at enrolment, signs every key advertisement
  ``(round, client id, c_pk, s_pk, b_commit)`` so a coordinator cannot substitute its own keys;
- commitments: the advertisement binds the client to both secrets it Shamir-shares, so the server can check
  every reconstruction: ``s_pk`` is the public key of the shared ``s_sk``, and ``b_commit`` is SHA-256 of
  the self-mask seed ``b_u`` (32 uniformly random bytes, so the hash hides it) bound to the round and id;
- share encryption: AES-256-GCM with associated data ``(round, sender, receiver)``.

Every failure (bad key, bad signature, failed decryption) raises :class:`fedopt.errors.SecAggError`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedopt.errors import SecAggError

__all__ = [
    "KEY_BYTES",
    "PURPOSE_ENCRYPT",
    "PURPOSE_MASK",
    "RoundKeys",
    "agree",
    "advertisement_bytes",
    "commit_seed",
    "decrypt_bundle",
    "encrypt_bundle",
    "generate_identity",
    "identity_public_bytes",
    "private_bytes",
    "public_bytes",
    "public_from_private_bytes",
    "sign_advertisement",
    "verify_advertisement",
]

#: length of every X25519 key, derived key and seed, in bytes
KEY_BYTES = 32
#: HKDF purpose of the key that encrypts Shamir share bundles
PURPOSE_ENCRYPT = b"enc"
#: HKDF purpose of the pairwise mask seed
PURPOSE_MASK = b"mask"

_DOMAIN = b"fedopt/secagg/v1/"
_NONCE_BYTES = 12


def _field(data: bytes) -> bytes:
    """Length-prefix one field so concatenations are unambiguous."""
    return struct.pack(">I", len(data)) + data


def _id(client_id: str) -> bytes:
    return _field(client_id.encode("utf-8"))


@dataclass(frozen=True)
class RoundKeys:
    """One client's ephemeral key pairs for one round; never reused across rounds."""

    c_sk: X25519PrivateKey  # encrypts share bundles (c_pk advertised)
    s_sk: X25519PrivateKey  # derives pairwise mask seeds (s_pk advertised; Shamir-shared)

    @classmethod
    def generate(cls) -> RoundKeys:
        """Two fresh X25519 key pairs."""
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def c_pk(self) -> bytes:
        return public_bytes(self.c_sk)

    @property
    def s_pk(self) -> bytes:
        return public_bytes(self.s_sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``sk``."""
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what gets Shamir-shared for dropout recovery)."""
    return sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_from_private_bytes(raw: bytes) -> bytes:
    """The public key of a raw private key; raises SecAggError if ``raw`` is not a key."""
    return public_bytes(_load_private(raw))


def _load_private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(
    my_sk: X25519PrivateKey | bytes,
    peer_pk: bytes,
    *,
    purpose: bytes,
    round: int,
    me: str,
    peer: str,
) -> bytes:
    """A 32-byte key shared by ``me`` and ``peer``: X25519 then HKDF-SHA256.

    ``info`` binds (purpose, round, sorted ids), so agree(a, B, me=a, peer=b) == agree(b, A, me=b,
    peer=a) while any other round, pair or purpose gives an unrelated key. ``my_sk`` may be raw bytes
    (the server recomputing a dropped client's seeds from its reconstructed key).

    Raises SecAggError on a malformed public key or a low-order point (all-zero shared secret).
    """
    if me == peer:
        raise SecAggError(f"key agreement of client {me!r} with itself")
    sk = _load_private(my_sk) if isinstance(my_sk, bytes) else my_sk
    if len(peer_pk) != KEY_BYTES:
        raise SecAggError(f"public key of {peer!r} must be {KEY_BYTES} bytes, got {len(peer_pk)}")
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError as exc:  # all-zero output: a low-order point was offered
        raise SecAggError(f"key agreement with {peer!r} failed: {exc}") from exc
    lo, hi = sorted((me, peer))
    info = _DOMAIN + _field(purpose) + struct.pack(">Q", round) + _id(lo) + _id(hi)
    return hkdf_sha256(shared, info)


_NO_SALT = bytes(32)  # RFC 5869 2.2: an absent salt is HashLen zero bytes


def hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) with no salt and a 32-byte output: Extract, then one Expand block.

    Byte-identical to ``cryptography``'s ``HKDF(SHA256(), 32, salt=None, info)``, written with the
    standard library's one-shot HMAC because building an HKDF object per neighbour cost more than the
    X25519 exchange itself.
    """
    prk = hmac.digest(_NO_SALT, ikm, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


# -- long-term identity ---------------------------------------------------------------------------


def generate_identity() -> Ed25519PrivateKey:
    """A long-term Ed25519 identity key; its public half is pinned by every peer at enrolment."""
    return Ed25519PrivateKey.generate()


def identity_public_bytes(identity: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key to pin."""
    return identity.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def commit_seed(round: int, client_id: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a client's self-mask seed, bound to the round and the client id.

    Hiding because the seed is 32 uniformly random bytes; binding because SHA-256 is collision resistant. The
    server checks every reconstructed b_u against it, so a forged Shamir share cannot go unnoticed."""
    return hashlib.sha256(_DOMAIN + b"b-commit" + struct.pack(">Q", round) + _id(client_id) + _field(seed)).digest()


def advertisement_bytes(round: int, client_id: str, c_pk: bytes, s_pk: bytes, b_commit: bytes) -> bytes:
    """The exact byte string an advertisement signature covers."""
    return (
        _DOMAIN + b"advertise" + struct.pack(">Q", round) + _id(client_id) + _field(c_pk)
        + _field(s_pk) + _field(b_commit)
    )


def sign_advertisement(
    identity: Ed25519PrivateKey, round: int, client_id: str, c_pk: bytes, s_pk: bytes, b_commit: bytes
) -> bytes:
    """Ed25519 signature over ``(round, client_id, c_pk, s_pk, b_commit)``."""
    return identity.sign(advertisement_bytes(round, client_id, c_pk, s_pk, b_commit))


@functools.lru_cache(maxsize=8192)
def _verified(identity_pk: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification of exact bytes; only successes are cached (a failure raises).

    Verification is a deterministic function of (public key, signature, message), so remembering a
    success is sound. It matters when one process hosts many clients (the simulation): every
    neighbour of u checks u's advertisement, and the server checks it too, on the same bytes.
    """
    Ed25519PublicKey.from_public_bytes(identity_pk).verify(signature, message)
    return True


def verify_advertisement(
    identity_pk: bytes, signature: bytes, round: int, client_id: str, c_pk: bytes, s_pk: bytes, b_commit: bytes
) -> None:
    """Check an advertisement against the client's pinned identity key; raises SecAggError."""
    try:
        _verified(bytes(identity_pk), bytes(signature), advertisement_bytes(round, client_id, c_pk, s_pk, b_commit))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise SecAggError(
            f"key advertisement of client {client_id!r} for round {round} has a bad signature"
        ) from exc


# -- share bundles --------------------------------------------------------------------------------


def _aad(round: int, sender: str, receiver: str) -> bytes:
    return _DOMAIN + b"shares" + struct.pack(">Q", round) + _id(sender) + _id(receiver)


def encrypt_bundle(key: bytes, plaintext: bytes, *, round: int, sender: str, receiver: str) -> bytes:
    """AES-256-GCM: ``nonce(12) || ciphertext+tag``, bound to (round, sender, receiver)."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(round, sender, receiver))


def decrypt_bundle(key: bytes, blob: bytes, *, round: int, sender: str, receiver: str) -> bytes:
    """Inverse of :func:`encrypt_bundle`; raises SecAggError if anything was altered or misrouted."""
    if len(blob) < _NONCE_BYTES + 16:
        raise SecAggError(f"share bundle from {sender!r} to {receiver!r} is truncated")
    try:
        return AESGCM(key).decrypt(
            blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(round, sender, receiver)
        )
    except InvalidTag as exc:
        raise SecAggError(
            f"share bundle from {sender!r} to {receiver!r} for round {round} failed authentication"
        ) from exc
