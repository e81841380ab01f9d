"""The ZeroMQ edge: context, CurveZMQ, and send/receive with deadlines over :mod:`fedopt.wire`. The one zmq importer
(:mod:`fedopt.keys` uses only ``zmq.auth``, to read and write key files).

Sockets: the coordinator binds a ROUTER, clients connect DEALERs. Every socket gets ``LINGER 0`` (closing never
blocks), ``MAXMSGSIZE`` (ZeroMQ drops a larger message and the connection before any of it reaches Python) and, on the
ROUTER, ``ROUTER_MANDATORY`` so a send to a vanished peer fails instead of vanishing silently. Sends never block
(``NOBLOCK``); receives wait at most their timeout. A socket belongs to the thread that made it.

Security (CurveZMQ, RFC 26) over the key folder ``fedopt keys generate DIR`` writes (:mod:`fedopt.keys`): the
coordinator (``--keys DIR``) runs a ZAP authenticator that admits exactly the public keys in ``DIR/allowed``; a
client (``--keys DIR``) pins ``DIR/coordinator.key`` and uses its own secret.

Identity is bound to keys at enrolment (:func:`fedopt.keys.enrolled_id`): the authenticator stamps a connection with
the client id its key was enrolled under as its ZAP User-Id, and :attr:`Endpoint.user_id` reports it with every
received message, so a receiver knows who sent a message from the key that authenticated it, never from a field the
sender wrote. Plain TCP needs ``--insecure`` and prints a warning; ``ipc://`` and ``inproc://`` are local to the
machine and need neither.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import wire
from .errors import AuthError, ConfigError, WireError
from .keys import enrolled_keys

__all__ = ["Security", "security_for", "handshake_monitor", "handshake_failures", "router", "dealer", "Endpoint",
           "start_authenticator"]

log = logging.getLogger("fedopt.bus")


# ---- socket security ------------------------------------------------------------------------------------------------
def _load_pair(path: Path, what: str) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise AuthError(f"the {what} secret key {path} is missing (make keys with: fedopt keys generate DIR)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read the {what} key {path}: {e}") from None
    if secret is None:
        raise AuthError(f"{path} holds no secret key (the {what} needs its .key_secret file)")
    return public, secret


@dataclass(frozen=True)
class Security:
    """How one socket is secured: CurveZMQ keys, or none (local transports, or ``--insecure`` TCP)."""

    public: bytes | None = None  # this side's public key
    secret: bytes | None = None  # this side's secret key
    server_key: bytes | None = None  # a client's pinned coordinator public key
    allowed_dir: Path | None = None  # a coordinator's allow-list directory

    @property
    def curve(self) -> bool:
        return self.secret is not None


def security_for(url: str, keys: str | None, insecure: bool, role: str, name: str | None = None) -> Security:
    """Check the transport/key combination and load the keys a ``role`` ("coordinator" or "client") needs.

    Raises ConfigError for plain TCP without ``--insecure`` and AuthError for missing or unreadable keys.
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("tcp", "ipc", "inproc"):
        raise ConfigError(f"endpoint {url!r} must start with tcp://, ipc:// or inproc://")
    if keys is None:
        if scheme == "tcp" and not insecure:
            raise ConfigError(f"{url} is plain TCP: give --keys DIR (CurveZMQ) or --insecure to run unencrypted")
        if scheme == "tcp":
            print(f"fedopt: warning: {url} runs WITHOUT authentication or encryption (--insecure)", file=sys.stderr)
        return Security()
    d = Path(keys)
    if not d.is_dir():
        raise AuthError(f"key directory {d} does not exist (make one with: fedopt keys generate DIR)")
    if role == "coordinator":
        public, secret = _load_pair(d / "coordinator.key_secret", "coordinator")
        allowed = d / "allowed"
        if not allowed.is_dir() or not any(allowed.glob("*.key")):
            raise AuthError(f"{allowed} holds no client public keys: no client could ever join")
        return Security(public, secret, allowed_dir=allowed)
    if not (d / "coordinator.key").is_file():
        raise AuthError(f"{d / 'coordinator.key'} is missing: copy coordinator.key from the coordinator's key folder "
                        f"(made by fedopt keys generate) into {d}")
    try:
        server_key, _ = zmq.auth.load_certificate(d / "coordinator.key")
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read the coordinator's public key {d / 'coordinator.key'}: {e}") from None
    candidates = [d / f"{name}.key_secret", d / "clients" / f"{name}.key_secret"] if name else []
    if not name:
        candidates = [p for p in [*d.glob("*.key_secret"), *(d / "clients").glob("*.key_secret")]
                      if p.name != "coordinator.key_secret"]
        if len(candidates) != 1:
            raise AuthError(f"{d} holds {len(candidates)} client secret keys: name yours with --key-name")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise AuthError(f"no secret key for client {name!r} in {d} or {d / 'clients'}")
    public, secret = _load_pair(path, "client")
    return Security(public, secret, server_key=server_key)


class _EnrolledAuthenticator(ThreadAuthenticator):
    """ZAP that admits the allow-list's keys and stamps each connection with its enrolled client id."""

    def __init__(self, ctx: zmq.Context, ids: dict[bytes, str], **kw) -> None:
        super().__init__(ctx, **kw)
        self._ids = ids

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        return self._ids.get(z85.encode(client_public_key), "")


class _DenialLog:
    """The authenticator's logger, with its accept/deny decisions raised from debug to warning/info level."""

    def __init__(self, target: logging.Logger) -> None:
        self._log = target

    def debug(self, msg, *args, **kw):
        text = msg % args if args else msg
        if text.startswith("DENIED") or "code=400" in text:
            self._log.warning("curve: refused a client: %s", text)
        elif text.startswith("ALLOWED"):
            self._log.info("curve: %s", text)

    def __getattr__(self, name):
        return getattr(self._log, name)


def start_authenticator(ctx: zmq.Context, security: Security) -> ThreadAuthenticator | None:
    """Run ZAP for ``ctx`` admitting only the keys in ``security.allowed_dir``; None when not using Curve."""
    if security.allowed_dir is None:
        return None
    ids = enrolled_keys(security.allowed_dir)
    auth = _EnrolledAuthenticator(ctx, ids, log=_DenialLog(log))  # type: ignore[arg-type]
    auth.start()
    auth.configure_curve(domain="*", location=str(security.allowed_dir))
    return auth


# ---- sockets --------------------------------------------------------------------------------------------------------
def _common(sock: zmq.Socket, limits: wire.Limits) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)


#: pending TCP connections a ROUTER's listen queue holds (ZeroMQ's default is 100: thousands of clients joining at
#: once would overflow it and wait out TCP's SYN retries); the kernel caps it at net.core.somaxconn
LISTEN_BACKLOG = 4096


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards its hard limit, to hold ``wanted`` descriptors (a
    coordinator needs one per connected client); returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def router(ctx: zmq.Context, url: str, security: Security, limits: wire.Limits = wire.Limits()) -> zmq.Socket:
    """A bound ROUTER (the coordinator side). Raises ConfigError when the address cannot be bound."""
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, limits)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
    if security.curve:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = security.public, security.secret
    return _attach(sock, "bind", url)


def dealer(ctx: zmq.Context, url: str, security: Security, limits: wire.Limits = wire.Limits(),
           rcvhwm: int | None = None) -> zmq.Socket:
    """A connected DEALER (the client side), pinned to the coordinator's key when using Curve. ``rcvhwm``: messages
    queued for the application before ZeroMQ stops reading the connection (default ZeroMQ's 1000)."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, limits)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVBUF, 4096)
    if security.curve:
        sock.curve_publickey, sock.curve_secretkey = security.public, security.secret
        sock.curve_serverkey = security.server_key
    return _attach(sock, "connect", url)


def _attach(sock: zmq.Socket, how: str, url: str) -> zmq.Socket:
    """``sock.bind(url)`` or ``sock.connect(url)``; on failure the socket is closed and ConfigError names the URL."""
    try:
        getattr(sock, how)(url)
    except zmq.ZMQError as e:
        sock.close(0)
        raise ConfigError(f"cannot {how} {url}: {e}") from None
    return sock


#: a CurveZMQ handshake that failed, as a socket monitor reports it: NO_DETAIL on a client whose pinned server key is
#: not the server's (measured: pyzmq 26 / libzmq 4.3), PROTOCOL (a cryptographic error) on that server, AUTH (ZAP
#: status 400) on a client whose key the server's allow-list does not hold
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def handshake_monitor(sock: zmq.Socket) -> zmq.Socket:
    """A monitor socket reporting ``sock``'s failed CurveZMQ handshakes; read it with :func:`handshake_failures` in
    the thread that owns ``sock``, and close it with ``sock.disable_monitor(); monitor.close(0)``."""
    return sock.get_monitor_socket(HANDSHAKE_FAILED)


def handshake_failures(monitor: zmq.Socket) -> list[int]:
    """The handshake-failure events queued on ``monitor`` (``zmq.EVENT_HANDSHAKE_FAILED_*``), without waiting."""
    from zmq.utils.monitor import parse_monitor_message

    events = []
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return events
        events.append(int(parse_monitor_message(frames)["event"]))


#: frame size for tensors sent over CurveZMQ (see :class:`Endpoint`)
CURVE_CHUNK_BYTES = 1 << 20


class Endpoint:
    """One socket plus the wire codec: ``send`` never blocks, ``recv`` waits at most its timeout.

    For a ROUTER, messages carry the peer's routing id (``send(msg, to=peer)``, ``recv() -> (peer, msg)``);
    for a DEALER the peer is ``None``. Counts the bytes it moves in ``bytes_in``/``bytes_out``.
    """

    def __init__(self, sock: zmq.Socket, limits: wire.Limits = wire.Limits(), wire_dtype: str | None = None) -> None:
        self.sock = sock
        self.limits = limits
        self.wire_dtype = wire_dtype
        # CurveZMQ encrypts each frame into a fresh buffer when its connection's turn comes to write it, so a model
        # sent as one frame to n peers is held n times over until every peer has read it. Measured, 8 slow peers and
        # one 40 MB model: +9.0 models of sender memory as one frame, +0.95 in 4 MiB frames, +0.23 in 1 MiB frames.
        # Plain TCP sends zero-copy either way.
        self.chunk_bytes = CURVE_CHUNK_BYTES if sock.getsockopt(zmq.MECHANISM) == zmq.CURVE else None
        self.routed = sock.type == zmq.ROUTER
        self.bytes_in = 0
        self.bytes_out = 0
        #: the enrolled client id of the connection the last received message came from (its ZAP User-Id), or
        #: None on a connection that no key authenticated (ipc, inproc, --insecure)
        self.user_id: str | None = None

    def send(self, msg: wire.Message, to: bytes | None = None) -> bool:
        """Queue ``msg`` for sending (zero-copy for tensors). False when the peer is gone or its queue is full."""
        frames = wire.encode(msg, self.wire_dtype, self.chunk_bytes)
        if self.routed:
            frames = [to, *frames]
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise
        self.bytes_out += sum(len(memoryview(f)) for f in frames[1 if self.routed else 0:])
        return True

    def poll(self, timeout: float) -> bool:
        """Whether a message is waiting, after at most ``timeout`` seconds."""
        return bool(self.sock.poll(max(0, int(timeout * 1000)), zmq.POLLIN))

    def recv(self, timeout: float = 0.0) -> tuple[bytes | None, wire.Message] | None:
        """The next message as ``(peer, message)``, or None when none came within ``timeout`` seconds.

        Raises :class:`BadMessage` (a WireError carrying the peer) for a message that fails validation; the socket
        stays usable.
        """
        if not self.poll(timeout):
            return None
        frames = self.sock.recv_multipart(copy=False)
        self.user_id = _user_id(frames[-1])
        peer = None
        if self.routed:
            peer, frames = frames[0].bytes, frames[1:]
        self.bytes_in += sum(len(f) for f in frames)
        try:
            return peer, wire.decode(frames, self.limits)
        except WireError as e:
            raise BadMessage(peer, str(e)) from None
        except Exception as e:  # decode raises only WireError; this keeps a receive loop alive if it ever did not
            raise BadMessage(peer, f"undecodable message ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        self.sock.close(0)


def _user_id(frame: Any) -> str | None:
    """The ZAP User-Id stamped on a received frame's connection, or None where no authenticator ran."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None
    return uid or None


class BadMessage(WireError):
    """A message that failed validation, with the routing id of the peer that sent it (None on a DEALER)."""

    def __init__(self, peer: bytes | None, reason: str) -> None:
        super().__init__(reason)
        self.peer = peer


def describe(peer: Any) -> str:
    """A routing id as a short printable string for logs."""
    return peer.hex() if isinstance(peer, (bytes, bytearray)) else str(peer)
