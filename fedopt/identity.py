"""Long-term Ed25519 identity keys for secure aggregation, on disk: written at enrolment, pinned by every client.

Trust model. Secure aggregation (Bonawitz et al., CCS 2017, Section 4; Bell et al., CCS 2020) assumes each client
knows every other client's long-term public key from a source the coordinator does not control: if the coordinator
handed out the keys, it could replace an honest client's keys with its own, play every other client in that client's
neighbourhood, and unmask the one real input. So identities are distributed like the CurveZMQ keys of
:mod:`fedopt.keys`, by whoever enrols clients, out of band::

    DIR/identities/client-NNN.pub             every client's public identity: give the whole folder to every client
                                              (and to the coordinator, which then rejects forged advertisements early)
    DIR/clients/client-NNN.identity_secret    client NNN's secret identity: give it only to client NNN

Each file holds one line ``<magic> <client id> <32-byte key as hex>``; the id is the one the client registers with
(its shard index by default), so a key cannot be moved to another client by renaming its file. A client signs its
per-round key advertisement with its secret and checks its neighbours' advertisements against the pinned folder;
the coordinator relays messages and can drop them (a dropout), but cannot make a client accept a key it invented.
What the pinning does not give: protection from a coordinator colluding with clients (at most t - 1 of a client's
neighbours may collude, Bell et al.), and from whoever writes the pinned folder.

``fedopt keys generate DIR`` writes these beside the CurveZMQ keys; ``fedopt simulate --transport ipc`` writes a
fresh set for its run in a temporary folder. Every failure raises :class:`~fedopt.errors.AuthError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import AuthError
from .secagg import generate_identity, identity_public_bytes

__all__ = ["PUBLIC_DIR", "SECRET_DIR", "write_identities", "load_pinned", "load_identity", "find_identity_dir"]

PUBLIC_DIR = "identities"
SECRET_DIR = "clients"
_PUB_MAGIC = "fedopt-identity-v1"
_SECRET_MAGIC = "fedopt-identity-secret-v1"
_SECRET_SUFFIX = ".identity_secret"


def write_identities(directory: str | os.PathLike, ids: Sequence[str], names: Sequence[str]) -> Path:
    """Generate one identity per client: client ``ids[i]`` gets files named ``names[i]`` (module docstring)."""
    if len(ids) != len(names) or len(set(ids)) != len(ids):
        raise AuthError("identities need one distinct client id per file name")
    d = Path(directory)
    (d / PUBLIC_DIR).mkdir(parents=True, exist_ok=True)
    (d / SECRET_DIR).mkdir(parents=True, exist_ok=True)
    for cid, name in zip(ids, names):
        if not cid or any(c.isspace() for c in cid):
            raise AuthError(f"client id {cid!r} cannot be written to an identity file")
        key = generate_identity()
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        secret = d / SECRET_DIR / f"{name}{_SECRET_SUFFIX}"
        secret.write_text(f"{_SECRET_MAGIC} {cid} {raw.hex()}\n")
        os.chmod(secret, 0o600)
        (d / PUBLIC_DIR / f"{name}.pub").write_text(f"{_PUB_MAGIC} {cid} {identity_public_bytes(key).hex()}\n")
    return d


def _read(path: Path, magic: str) -> tuple[str, bytes]:
    try:
        fields = path.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"cannot read identity file {path}: {e}") from None
    try:
        if len(fields) != 3 or fields[0] != magic:
            raise ValueError
        raw = bytes.fromhex(fields[2])
        if len(raw) != 32:
            raise ValueError
    except ValueError:
        raise AuthError(f"{path} is not a fedopt identity file (expected '{magic} <id> <64 hex digits>')") from None
    return fields[1], raw


def load_pinned(directory: str | os.PathLike) -> dict[str, bytes]:
    """Every client's pinned public identity from ``DIR/identities/*.pub``: {client id: 32-byte Ed25519 key}."""
    d = Path(directory) / PUBLIC_DIR
    files = sorted(d.glob("*.pub")) if d.is_dir() else []
    if not files:
        raise AuthError(f"{d} holds no identity keys (make them with: fedopt keys generate DIR)")
    pinned: dict[str, bytes] = {}
    for path in files:
        cid, raw = _read(path, _PUB_MAGIC)
        if cid in pinned:
            raise AuthError(f"{path}: client id {cid!r} has two identity keys in {d}")
        pinned[cid] = raw
    return pinned


def load_identity(directory: str | os.PathLike, name: str, client_id: str, pinned: dict[str, bytes]
                  ) -> Ed25519PrivateKey:
    """Client ``client_id``'s secret identity (file ``name``), checked against its own pinned public key."""
    d = Path(directory)
    candidates = [d / SECRET_DIR / f"{name}{_SECRET_SUFFIX}", d / f"{name}{_SECRET_SUFFIX}"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise AuthError(f"no identity key {name}{_SECRET_SUFFIX} in {d / SECRET_DIR} or {d}")
    cid, raw = _read(path, _SECRET_MAGIC)
    if cid != client_id:
        raise AuthError(f"{path} is the identity of client {cid!r}, not of this client {client_id!r} (use --id {cid})")
    key = Ed25519PrivateKey.from_private_bytes(raw)
    if pinned.get(client_id) != identity_public_bytes(key):
        raise AuthError(f"the identity in {path} does not match client {client_id!r}'s pinned public key in "
                        f"{Path(directory) / PUBLIC_DIR}")
    return key


def find_identity_dir(identities: str | None, keys: str | None) -> str | None:
    """``--identities DIR`` when given, else ``--keys DIR`` when it holds an identities folder, else None."""
    if identities is not None:
        if not Path(identities).is_dir():
            raise AuthError(f"identity directory {identities} does not exist (make one with: fedopt keys generate DIR)")
        return identities
    if keys is not None and (Path(keys) / PUBLIC_DIR).is_dir():
        return keys
    return None
