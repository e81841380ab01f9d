"""CurveZMQ keys, identities and enrolment: the key folder ``fedopt keys generate DIR`` writes, and id <-> key.

``fedopt keys generate DIR`` writes::

    DIR/coordinator.key, DIR/coordinator.key_secret    the coordinator's pair (give clients coordinator.key)
    DIR/allowed/client-NNN.key                         the client public keys the coordinator admits
    DIR/clients/client-NNN.key_secret                  each client's pair (give client NNN only its own)
    DIR/identities/client-NNN.pub                      secure aggregation: every client's public identity (give
                                                       the folder to every client: see fedopt.identity)
    DIR/clients/client-NNN.identity_secret             client NNN's secret identity (give client NNN only its own)

Identity is bound to keys at enrolment: the file a public key sits in names its client (``client-NNN.key`` is client
``NNN`` as a number, any other ``NAME.key`` is client ``NAME``; see :func:`enrolled_id`). :mod:`fedopt.bus` stamps
that id on every connection the key authenticates (its ZAP User-Id).

This module reads and writes key files with ``zmq.auth`` (ZeroMQ's certificate files) and nothing else of zmq:
sockets, contexts and the authenticator stay in :mod:`fedopt.bus`.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq.auth

from .errors import AuthError, ConfigError

__all__ = ["existing_keys", "generate_keys", "describe_keys", "enrolled_id", "enrolled_keys"]


def existing_keys(directory: str | os.PathLike) -> list[Path]:
    """The key files of a ``fedopt keys generate`` layout already in ``directory`` (public and secret)."""
    d = Path(directory)
    found = [d / n for n in ("coordinator.key", "coordinator.key_secret") if (d / n).is_file()]
    for sub, pattern in (("allowed", "*.key"), ("clients", "*.key_secret"), ("clients", "*.identity_secret"),
                         ("identities", "*.pub")):
        found += sorted((d / sub).glob(pattern))
    return found


def generate_keys(directory: str | os.PathLike, clients: int, force: bool = False) -> Path:
    """Write a coordinator key pair and ``clients`` client key pairs laid out as the module docstring shows.

    A folder that already holds keys is refused (ConfigError): new keys lock out every client holding the old
    coordinator key. With ``force`` the old key files are deleted first, so no stale client key stays admitted."""
    if clients < 1:
        raise ConfigError(f"--clients must be >= 1, not {clients}")
    d = Path(directory)
    old = existing_keys(d)
    if old and not force:
        raise ConfigError(f"the key folder {d} already holds keys ({describe_keys(old)}): new keys would lock out "
                          f"every client holding the old ones; give --force to replace them, or choose another folder")
    for path in old:
        path.unlink()
    for sub in (d, d / "allowed", d / "clients"):
        sub.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(d, "coordinator")
    for i in range(clients):
        public, secret = zmq.auth.create_certificates(d / "clients", f"client-{i:03d}")
        Path(public).replace(d / "allowed" / Path(public).name)
        os.chmod(secret, 0o600)
    os.chmod(d / "coordinator.key_secret", 0o600)
    from .identity import write_identities  # secure aggregation's Ed25519 identities, same naming

    write_identities(d, [str(i) for i in range(clients)], [f"client-{i:03d}" for i in range(clients)])
    return d


def describe_keys(paths: list[Path]) -> str:
    """A short count of key files: "the coordinator key pair, 8 client keys, 8 client secrets, ..."."""
    counts: dict[str, int] = {}
    for p in paths:
        kind = ("the coordinator key pair" if p.name.startswith("coordinator.") else
                "client public keys" if p.parent.name == "allowed" else
                "client identity secrets" if p.name.endswith(".identity_secret") else
                "client secret keys" if p.name.endswith(".key_secret") else "identity public keys")
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(k if k.startswith("the ") else f"{n} {k}" for k, n in counts.items())


def enrolled_id(key_file: str | os.PathLike) -> str:
    """The client id a public key file names: ``client-007.key`` -> ``"7"`` (the shard index ``fedopt client``
    uses by default), any other ``NAME.key`` -> ``"NAME"``."""
    stem = Path(key_file).name.removesuffix(".key")
    number = stem.removeprefix("client-")
    return str(int(number)) if stem.startswith("client-") and number.isdigit() else stem


def enrolled_keys(allowed_dir: str | os.PathLike) -> dict[bytes, str]:
    """``public key (Z85) -> client id`` for every key in an allow-list folder. Raises AuthError when a key file
    cannot be read or two files give one id."""
    out: dict[bytes, str] = {}
    ids: dict[str, Path] = {}
    for path in sorted(Path(allowed_dir).glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise AuthError(f"cannot read the client key {path}: {e}") from None
        cid = enrolled_id(path)
        if cid in ids:
            raise AuthError(f"{path} and {ids[cid]} both enrol client {cid!r}: rename one")
        ids[cid] = path
        out[public] = cid
    return out
