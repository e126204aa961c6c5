"""
Blocking socket helpers for tests that drive a proxy running in another process (``make
demo``, an installed ``twistd vncmux``) without a reactor of their own. Every read is bounded
by the socket's timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from tests.conformance.wsframes import parse_server_frames

LOOPBACK = "127.0.0.1"
TIMEOUT = 10.0


def upgrade_request(port: int, path: str) -> bytes:
    """A WebSocket upgrade for C{path} (subprotocol ``binary``), without an Origin."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
    ).encode()


def read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """Everything C{sock} sends until C{done} says so or the peer closes."""
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def exchange(port: int, request: bytes) -> bytes:
    """Send C{request} to C{port} and return the whole answer (the peer closes after it)."""
    with socket.create_connection((LOOPBACK, port), timeout=TIMEOUT) as conn:
        conn.sendall(request)
        return read_until(conn, lambda _: False)


def split_upgrade(data: bytes) -> tuple[bytes, bytes]:
    """The upgrade's answer head (checked to be a 101) and the binary payload after it."""
    head, _, frames = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return head, b"".join(frame.payload for frame in parse_server_frames(frames))


def has_payload(size: int) -> Callable[[bytes], bool]:
    """A C{read_until} condition: the upgrade's answer and C{size} bytes of payload arrived
    (whole frames only: a frame cut in two is read on)."""

    def done(data: bytes) -> bool:
        head, sep, frames = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        try:
            payload = b"".join(frame.payload for frame in parse_server_frames(frames))
        except AssertionError:  # a frame not complete yet
            return False
        return len(payload) >= size

    return done
