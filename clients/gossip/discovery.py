"""LAN discovery for gossip peers: small keyed UDP broadcast beacons, in the spirit of ZeroMQ's ZRE (RFC 36).

Every ``interval`` seconds (1 s) a peer broadcasts one datagram on ``--interface``'s broadcast address::

    b"FOB" | version (1 byte) | msgpack [address, unix time in ms] | HMAC-SHA256(key, everything before)[:16]

``address`` is the peer's own bind address (``tcp://IP:PORT``). A receiver accepts a beacon only if its tag verifies
under the swarm key (so a stranger on the LAN cannot inject peers), its timestamp is within ``max_skew`` seconds of
ours (so an old beacon replayed later is ignored), and the address's host is the datagram's source IP. Beacons are
at most 255 bytes (ZRE's limit). What a beacon proves is only "a swarm member is listening there": the peer sockets
still authenticate every connection with CurveZMQ when keys are given. The caller (the peer's socket thread) owns
the UDP socket, polls :meth:`Beacon.fileno` alongside its ZeroMQ sockets and expires peers it stops hearing.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import socket
import struct
import time
from typing import Callable

import msgpack

from fedopt.errors import ConfigError

__all__ = ["Beacon", "beacon_key", "interface_address", "DEFAULT_PORT", "encode_beacon", "decode_beacon"]

log = logging.getLogger("fedopt.discovery")

DEFAULT_PORT = 5670  # ZRE's beacon port
MAGIC = b"FOB\x01"
TAG = 16
MAX_BEACON = 255
_SIOCGIFADDR, _SIOCGIFBRDADDR = 0x8915, 0x8919


def beacon_key(secret: bytes) -> bytes:
    """The HMAC key beacons are keyed with, derived from a secret every swarm member holds."""
    return hashlib.sha256(b"fedopt gossip beacon v1\x00" + secret).digest()


def interface_address(name: str) -> tuple[str, str]:
    """(IPv4 address, broadcast address) of network interface ``name``; ConfigError when it has none."""
    def ioctl(req: int) -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = struct.pack("256s", name.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), req, packed)[20:24])

    try:
        ip = ioctl(_SIOCGIFADDR)
    except OSError as e:
        raise ConfigError(f"--interface {name}: no such interface or it has no IPv4 address ({e.strerror})") from None
    try:
        bcast = ioctl(_SIOCGIFBRDADDR)
    except OSError:
        bcast = "0.0.0.0"
    if ip.startswith("127."):
        bcast = "127.255.255.255"  # loopback has no broadcast flag, but Linux routes this address to every lo socket
    if bcast == "0.0.0.0":
        raise ConfigError(f"--interface {name} ({ip}) has no broadcast address: LAN discovery needs one")
    return ip, bcast


def encode_beacon(key: bytes, address: str, now: float) -> bytes:
    body = MAGIC + msgpack.packb([address, int(now * 1000)])
    data = body + hmac.new(key, body, hashlib.sha256).digest()[:TAG]
    if len(data) > MAX_BEACON:
        raise ConfigError(f"address {address!r} is too long for a beacon")
    return data


def decode_beacon(key: bytes, data: bytes, source_ip: str, now: float, max_skew: float = 30.0) -> str:
    """The address a beacon announces; ValueError naming why it is refused."""
    if len(data) > MAX_BEACON or len(data) < len(MAGIC) + TAG or not data.startswith(MAGIC):
        raise ValueError("not a fedopt beacon")
    body, tag = data[:-TAG], data[-TAG:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()[:TAG]):
        raise ValueError("bad tag (another swarm's key, or forged)")
    try:
        address, ms = msgpack.unpackb(body[len(MAGIC):])
    except Exception:
        raise ValueError("malformed body") from None
    if not isinstance(address, str) or not isinstance(ms, int):
        raise ValueError("malformed body")
    if abs(now - ms / 1000) > max_skew:
        raise ValueError(f"timestamp {abs(now - ms / 1000):.0f}s off (replayed or clock skew)")
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if host != source_ip:
        raise ValueError(f"announces {address} but came from {source_ip}")
    return address


class Beacon:
    """Sends our beacon each ``interval`` and returns the verified addresses of others. Owned by one thread."""

    def __init__(self, address: str, key: bytes, interface: str, port: int = DEFAULT_PORT, interval: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.address, self.key, self.port, self.interval, self.clock = address, key, port, interval, clock
        self.ip, self.broadcast = interface_address(interface)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # several peers on one host share the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:  # only this interface's traffic (needs CAP_NET_RAW; without it we still filter by tag and source)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        except (OSError, AttributeError):
            pass
        try:
            s.bind(("", port))
        except OSError as e:
            s.close()
            raise ConfigError(f"cannot bind the discovery port {port}: {e.strerror}") from None
        s.setblocking(False)
        self.sock = s
        self._next = 0.0
        self.sent = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def remaining(self) -> float:
        return max(0.0, self._next - time.monotonic())

    def tick(self) -> None:
        """Broadcast our beacon when one is due."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        try:
            self.sock.sendto(encode_beacon(self.key, self.address, self.clock()), (self.broadcast, self.port))
            self.sent += 1
        except OSError as e:
            log.warning("beacon not sent on %s: %s", self.broadcast, e.strerror)

    def receive(self) -> list[str]:
        """Every verified address waiting on the socket (not our own); refused beacons are logged."""
        found = []
        while True:
            try:
                data, (ip, _) = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return found
            try:
                addr = decode_beacon(self.key, data, ip, self.clock())
            except ValueError as e:
                log.warning("ignored a beacon from %s: %s", ip, e)
                continue
            if addr != self.address:
                found.append(addr)

    def close(self) -> None:
        self.sock.close()
