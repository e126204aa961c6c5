"""
A lean WebSocket load client for the benchmarks (asyncio, raw sockets, minimal RFC 6455).

It is built to cost less than the proxy it measures:

- received frames land in one shared ``recv_into`` buffer; in counting mode a payload byte
  is never copied or looked at, only frame headers are parsed;
- uploads write one prebuilt frame object over and over: the mask key is random per
  connection, so the masked payload is computed once per connection, not per frame;
- small messages are masked with one big-integer XOR.

With ``--raw`` every subcommand speaks plain TCP instead (the same RFB bytes, no WebSocket
and no token: one port per backend), for a byte relay such as socat.

Subcommands (each prints one JSON object per line on stdout):

``bulk-down``  RFB handshake against a ``blast`` backend, time until all bytes arrived.
``bulk-many``  ``--streams`` such sessions opened first (``ready``), started together on
               ``go`` from stdin, timed until each has exactly its bytes or until ``stop``
               (``done``), closed on ``close``.
``bulk-up``    RFB handshake against a ``sink`` backend, send ClientCutText frames, then a
               KeyEvent, and time until the backend's Bell comes back.
``latency``    RFB handshake against an ``echo`` backend, then 6-byte PointerEvent round
               trips: back to back, or ``--rate`` per second on each of ``--streams``.
``setup``      repeated connect + upgrade + token lookup + backend connect + RFB greeting,
               then close; ``--concurrency`` workers; every latency is reported.
``idle``       open ``--sessions`` sessions (full RFB handshake) and hold them; commands on
               stdin: ``check`` (one round trip on every session), ``closes`` (wait until
               every session was closed, say when each was), ``close``.

Every loop is bounded by a count and by ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import resource
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tests.processes import raise_nofile

GREETING = b"RFB 003.008\n"
SERVER_INIT_LEN = 24 + len(b"vncmux-bench")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
UPLOAD_FRAME_PAYLOAD = 64 * 1024
POINTER_EVENT = b"\x05\x00\x01\x00\x01\x00"
KEY_EVENT = b"\x04\x01\x00\x00\x00\x00\xff\x0d"

_SHARED = bytearray(256 * 1024)
_SHARED_VIEW = memoryview(_SHARED)

_HTTP, _OPEN, _CLOSED = range(3)


class WsError(Exception):
    """The proxy refused or broke the WebSocket."""


def mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 masking with one big-integer XOR."""
    n = len(payload)
    if not n:
        return b""
    keystream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")).to_bytes(
        n, "little"
    )


def client_frame(payload: bytes, opcode: int = 0x2, key: bytes | None = None) -> bytes:
    """A complete masked client frame."""
    if key is None:
        key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + mask(payload, key)


class Conn(asyncio.BufferedProtocol):
    """
    One client connection: payload is collected in ``inbox`` or only counted; subclasses
    decide how payload is carried (WebSocket frames or raw TCP).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.state = _HTTP
        self.collect = True
        self.inbox = bytearray()
        self.rx = 0  # data payload bytes received
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        #: time.monotonic() when the close began (close frame or lost connection): every
        #: process reads the same CLOCK_MONOTONIC, so the harness compares it with its own.
        self.closed_at: float | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._cond: Callable[[], bool] | None = None
        self._can_write: asyncio.Event | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        """The shared receive buffer."""
        return _SHARED_VIEW

    def encode(self, payload: bytes) -> bytes:
        """The bytes that carry ``payload`` as one message on this connection."""
        raise NotImplementedError

    def send(self, payload: bytes) -> None:
        """One message."""
        assert self.transport is not None
        self.transport.write(self.encode(payload))

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    def _payload(self, data: memoryview) -> None:
        self.rx += len(data)
        if self.collect:
            self.inbox += data

    def _mark_closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    def pause_writing(self) -> None:
        """The kernel send buffer is full."""
        if self._can_write is None:
            self._can_write = asyncio.Event()
        self._can_write.clear()

    def resume_writing(self) -> None:
        """The kernel send buffer drained."""
        if self._can_write is not None:
            self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake every waiter."""
        self.state = _CLOSED
        self._mark_closed()
        if not self.opened.done():
            self.opened.set_exception(WsError(f"connection lost before upgrade: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)
        if self._can_write is not None:
            self._can_write.set()
        self._check()

    def _fail(self, exc: Exception) -> None:
        self.state = _CLOSED
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _check(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._cond is not None and self._cond():
            waiter.set_result(None)
        elif self.state == _CLOSED:
            waiter.set_exception(WsError(f"closed (code {self.close_code})"))

    async def _wait(self, cond: Callable[[], bool]) -> None:
        if cond():
            return
        if self.state == _CLOSED:
            raise WsError(f"closed (code {self.close_code})")
        self._cond = cond
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._cond = None

    async def read_exactly(self, n: int) -> bytes:
        """The next ``n`` payload bytes, whatever the framing."""
        inbox = self.inbox
        await self._wait(lambda: len(inbox) >= n)
        out = bytes(inbox[:n])
        del inbox[:n]
        return out

    async def wait_rx(self, total: int) -> None:
        """Until ``total`` payload bytes were received since the connection opened."""
        await self._wait(lambda: self.rx >= total)

    async def drain(self) -> None:
        """Wait while the kernel send buffer is full."""
        ev = self._can_write
        if ev is not None and not ev.is_set():
            await ev.wait()


class RawConn(Conn):
    """
    A plain TCP connection straight to a byte relay (socat): the RFB stream without
    WebSocket, for comparing vncmux with a relay that does no framing at all.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Open at once: there is no upgrade."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state = _OPEN
        self.opened.set_result(None)

    def buffer_updated(self, nbytes: int) -> None:
        """Fresh payload at the start of the shared buffer."""
        self._payload(_SHARED_VIEW[:nbytes])
        self._check()

    def encode(self, payload: bytes) -> bytes:
        """Raw TCP carries the payload as it is."""
        return payload

    def close(self) -> None:
        """Close the socket."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.state = _CLOSED


class WsConn(Conn):
    """One client WebSocket (binary messages, minimal RFC 6455)."""

    def __init__(self, request: bytes, accept: bytes) -> None:
        super().__init__()
        self._request = request
        self._accept = accept
        self._http = bytearray()
        self._hdr = bytearray()
        self._remaining = 0
        self._opcode = 0
        self._ctrl = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def buffer_updated(self, nbytes: int) -> None:
        """Parse fresh bytes at the start of the shared buffer."""
        data = _SHARED_VIEW[:nbytes]
        if self.state == _HTTP:
            self._http += data
            end = self._http.find(b"\r\n\r\n")
            if end < 0:
                if len(self._http) > 65536:
                    self._fail(WsError("oversized HTTP response"))
                return
            head = bytes(self._http[:end])
            rest = bytes(self._http[end + 4 :])
            self._http = bytearray()
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self._fail(WsError(status.decode("latin-1", "replace")))
                return
            if self._accept not in head:
                self._fail(WsError("bad Sec-WebSocket-Accept"))
                return
            self.state = _OPEN
            if not self.opened.done():
                self.opened.set_result(None)
            if rest:
                self._frames(memoryview(rest))
        elif self.state == _OPEN:
            self._frames(data)
        self._check()

    def _frames(self, data: memoryview) -> None:
        i, n = 0, len(data)
        hdr = self._hdr
        while i < n:
            rem = self._remaining
            if rem:
                take = rem if rem < n - i else n - i
                if self._opcode < 0x8:
                    self._payload(data[i : i + take])
                else:
                    self._ctrl += data[i : i + take]
                self._remaining = rem - take
                i += take
                if not self._remaining:
                    self._frame_done()
                continue
            have = len(hdr)
            take = 14 - have if 14 - have < n - i else n - i
            hdr += data[i : i + take]
            if len(hdr) < 2:
                i += take
                continue
            b1 = hdr[1]
            l7 = b1 & 0x7F
            hl = 2 + (2 if l7 == 126 else 8 if l7 == 127 else 0) + (4 if b1 & 0x80 else 0)
            if len(hdr) < hl:
                i += take
                continue
            i += hl - have
            if l7 == 126:
                length = struct.unpack_from("!H", hdr, 2)[0]
            elif l7 == 127:
                length = struct.unpack_from("!Q", hdr, 2)[0]
            else:
                length = l7
            if b1 & 0x80:
                self._fail(WsError("masked server frame"))
                return
            opcode = hdr[0] & 0x0F
            if opcode:  # 0 is a continuation: keep the data opcode
                self._opcode = opcode
            hdr.clear()
            self._remaining = length
            if not length:
                self._frame_done()

    def _frame_done(self) -> None:
        op = self._opcode
        if op == 0x8:
            ctrl = bytes(self._ctrl)
            self.close_code = struct.unpack("!H", ctrl[:2])[0] if len(ctrl) >= 2 else 1005
            self.state = _CLOSED
            self._mark_closed()
            if self.transport is not None:
                self.transport.close()
        elif op == 0x9 and self.transport is not None:
            self.transport.write(client_frame(bytes(self._ctrl), 0xA))
        if op >= 0x8:
            self._ctrl.clear()
            self._opcode = 0x2

    def encode(self, payload: bytes) -> bytes:
        """A masked binary frame (a fresh random key)."""
        return client_frame(payload)

    def close(self) -> None:
        """Send a close frame (1000) and close the socket."""
        if self.transport is not None and not self.transport.is_closing():
            if self.state == _OPEN:
                self.transport.write(client_frame(struct.pack("!H", 1000), 0x8))
            self.transport.close()
        self.state = _CLOSED


async def connect(
    host: str, port: int, token: str, subprotocol: bool = True, raw: bool = False
) -> Conn:
    """Open a WebSocket to ``/websockify?token=...`` and wait for the 101 (``raw``: plain
    TCP to a byte relay that has a port per backend, so ``token`` is only a label)."""
    loop = asyncio.get_running_loop()
    if raw:
        _, raw_conn = await loop.create_connection(RawConn, host, port)
        return raw_conn
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    request = (
        f"GET /websockify?token={token} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        + ("Sec-WebSocket-Protocol: binary\r\n" if subprotocol else "")
        + "\r\n"
    ).encode()
    _, conn = await loop.create_connection(lambda: WsConn(request, accept), host, port)
    await conn.opened
    return conn


async def rfb_handshake(conn: Conn, client_init: bool = True) -> None:
    """The client side of an RFB 3.8 handshake with security type None."""
    greeting = await conn.read_exactly(12)
    if greeting != GREETING:
        raise WsError(f"unexpected greeting {greeting!r}")
    conn.send(GREETING)
    sec = await conn.read_exactly(2)
    if sec != b"\x01\x01":
        raise WsError(f"unexpected security types {sec!r}")
    conn.send(b"\x01")
    result = await conn.read_exactly(4)
    if result != b"\x00\x00\x00\x00":
        raise WsError(f"security failed {result!r}")
    if client_init:
        conn.send(b"\x01")
        await conn.read_exactly(SERVER_INIT_LEN)


def cpu_seconds() -> float:
    """CPU time of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max of a sample (0 when empty)."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0, "n": 0}
    s = sorted(values)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "mean": statistics.fmean(s),
        "max": s[-1],
        "n": len(s),
    }


def targets(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(host, port, token) triples: every proxy port crossed with every token."""
    ports = [int(p) for p in args.ports.split(",")]
    tokens = args.tokens.split(",")
    n = max(len(ports), len(tokens))
    return [(args.host, ports[i % len(ports)], tokens[i % len(tokens)]) for i in range(n)]


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- scenarios --------------------------------------------------------------------------
async def bulk_down(args: argparse.Namespace) -> dict[str, Any]:
    """Backend→client: time from ClientInit until ServerInit + ``--bytes`` arrived."""
    tg = targets(args)

    async def one(i: int) -> float:
        host, port, token = tg[i % len(tg)]
        conn = await connect(host, port, token, raw=args.raw)
        try:
            await rfb_handshake(conn, client_init=False)
            conn.collect = False
            base = conn.rx
            t0 = time.perf_counter()
            conn.send(b"\x01")
            await conn.wait_rx(base + SERVER_INIT_LEN + args.bytes)
            return time.perf_counter() - t0
        finally:
            conn.close()

    return await _timed_streams(args, one, args.bytes * args.streams)


async def _timed_streams(
    args: argparse.Namespace, one: Callable[[int], Awaitable[float]], total: int
) -> dict[str, Any]:
    """Run C{one} on every stream at once; throughput from the slowest stream's time."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    secs = await asyncio.wait_for(
        asyncio.gather(*(one(i) for i in range(args.streams))), args.timeout
    )
    return {
        "bytes": total,
        "seconds": max(secs),
        "mib_s": total / max(secs) / 2**20,
        "client_cpu": cpu_seconds() - cpu0,
        "client_wall": time.perf_counter() - t0,
    }


async def bulk_up(args: argparse.Namespace) -> dict[str, Any]:
    """Client→backend: ClientCutText frames, then a KeyEvent; time until the Bell."""
    tg = targets(args)
    text_len = UPLOAD_FRAME_PAYLOAD - 8
    payload = struct.pack("!B3xI", 6, text_len) + b"x" * text_len
    frames = max(1, args.bytes // UPLOAD_FRAME_PAYLOAD)

    async def one(i: int) -> float:
        host, port, token = tg[i % len(tg)]
        conn = await connect(host, port, token, raw=args.raw)
        try:
            await rfb_handshake(conn)
            frame = conn.encode(payload)  # random key per connection, masked once
            transport = conn.transport
            assert transport is not None
            t0 = time.perf_counter()
            for _ in range(frames):
                transport.write(frame)
                await conn.drain()
                if conn.state != _OPEN:
                    raise WsError("closed during upload")
            conn.send(KEY_EVENT)
            bell = await conn.read_exactly(1)
            if bell != b"\x02":
                raise WsError(f"expected Bell, got {bell!r}")
            return time.perf_counter() - t0
        finally:
            conn.close()

    return await _timed_streams(args, one, frames * UPLOAD_FRAME_PAYLOAD * args.streams)


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    """
    6-byte round trips on ``--streams`` connections: back to back, or ``--rate`` per second
    on each connection (each with a random phase). Timing starts once every connection is
    open and warmed up, and lasts ``--duration`` seconds or ``--count`` round trips.
    """
    tg = targets(args)
    rtts: list[float] = []
    per_conn = max(1, args.count // args.streams)
    interval = 1.0 / args.rate if args.rate else 0.0
    warm = 0
    go = asyncio.Event()
    deadline = 0.0

    async def one(i: int) -> None:
        nonlocal warm, deadline
        host, port, token = tg[i % len(tg)]
        conn = await connect(host, port, token, raw=args.raw)
        try:
            await rfb_handshake(conn)
            for _ in range(args.warmup):
                conn.send(POINTER_EVENT)
                await conn.read_exactly(6)
            warm += 1
            if warm == args.streams:
                deadline = time.monotonic() + args.duration
                go.set()
            await go.wait()
            next_at = time.monotonic() + random.uniform(0, interval)
            for _ in range(per_conn):
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval
                if time.monotonic() > deadline:
                    break
                frame = conn.encode(POINTER_EVENT)
                t0 = time.perf_counter()
                conn.transport.write(frame)  # type: ignore[union-attr]
                echoed = await conn.read_exactly(6)
                rtts.append(time.perf_counter() - t0)
                if echoed != POINTER_EVENT:
                    raise WsError("echo mismatch")
        finally:
            conn.close()

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.streams))), args.timeout)
    wall = time.perf_counter() - t0
    pc = {k: (v * 1e6 if k != "n" else v) for k, v in percentiles(rtts).items()}
    return {
        "rtt_us": pc,
        "round_trips": len(rtts),
        "client_cpu": cpu_seconds() - cpu0,
        "client_wall": wall,
    }


async def stdin_reader() -> asyncio.StreamReader:
    """Commands from the harness on stdin, readable without a thread (so cancellable)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def count_error(errors: dict[str, int], e: BaseException) -> None:
    """Tally an error by its type and the start of its message."""
    key = type(e).__name__ + ": " + str(e)[:60]
    errors[key] = errors.get(key, 0) + 1


async def bulk_many(args: argparse.Namespace) -> dict[str, Any]:
    """
    ``--streams`` sessions against blast backends, all opened first (``ready``); on ``go``
    from stdin every one sends its ClientInit at once, and the time runs until each has its
    ServerInit plus exactly ``--bytes``, or until ``stop`` on stdin or ``--duration``
    seconds after ``go`` (a background load: then the bytes are only counted). The figures
    come as ``done``; the sessions are closed on ``close``.
    """
    raise_nofile(args.streams + 64)
    tg = targets(args)
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(args.concurrency)
    commands = await stdin_reader()

    async def open_one(i: int) -> Conn | None:
        host, port, token = tg[i % len(tg)]
        async with sem:
            conn: Conn | None = None
            try:
                conn = await connect(host, port, token, raw=args.raw)
                await rfb_handshake(conn, client_init=False)
            except (OSError, WsError) as e:
                count_error(errors, e)
                if conn is not None:
                    conn.close()
                return None
        conn.collect = False
        return conn

    t_open = time.perf_counter()
    opened = [
        c
        for c in await asyncio.wait_for(
            asyncio.gather(*(open_one(i) for i in range(args.streams))), args.open_timeout
        )
        if c is not None
    ]
    emit({"event": "ready", "opened": len(opened), "errors": errors,
          "open_seconds": time.perf_counter() - t_open})  # fmt: skip
    if (await commands.readline()).strip() != b"go":
        for c in opened:
            c.close()
        raise WsError("no 'go' from the harness")
    expected = SERVER_INIT_LEN + args.bytes
    base = {id(c): c.rx for c in opened}
    finished: list[float] = []

    async def finish(c: Conn) -> None:
        try:
            await c.wait_rx(base[id(c)] + expected)
        except WsError as e:
            count_error(errors, e)
            return
        finished.append(time.perf_counter())

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for c in opened:
        c.send(b"\x01")
    everyone = asyncio.ensure_future(asyncio.gather(*(finish(c) for c in opened)))
    stop = asyncio.ensure_future(commands.readline())
    await asyncio.wait({everyone, stop}, timeout=args.duration, return_when="FIRST_COMPLETED")
    t_end = time.perf_counter() if not everyone.done() else max(finished, default=t0)
    stopped_early = not everyone.done()
    for task in (everyone, stop):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    received = [c.rx - base[id(c)] for c in opened]
    complete = sum(1 for r in received if r == expected)
    if not stopped_early and complete != len(opened):
        errors["byte count mismatch"] = len(opened) - complete
    result = {
        "sessions": len(opened),
        "complete": complete,
        "stopped_early": stopped_early,
        "bytes": sum(max(0, r - SERVER_INIT_LEN) for r in received),
        "seconds": t_end - t0,
        "errors": errors,
        "client_cpu": cpu_seconds() - cpu0,
        "client_wall": t_end - t0,
    }
    # The sessions stay open until ``close``: the harness reads the proxy's CPU time of the
    # transfer first, without the cost of closing them.
    emit({"event": "done", **result})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(commands.readline(), 60)
    for c in opened:
        c.close()
    await asyncio.sleep(0)  # let the close frames go out
    return result


async def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, upgrade, read the RFB greeting, close; ``--concurrency`` workers."""
    tg = targets(args)
    lat: list[float] = []
    errors: dict[str, int] = {}
    started = 0
    deadline = time.monotonic() + args.duration

    async def worker(w: int) -> None:
        nonlocal started
        k = w
        while started < args.count and time.monotonic() < deadline:
            started += 1
            host, port, token = tg[k % len(tg)]
            k += args.concurrency
            t0 = time.perf_counter()
            conn: Conn | None = None
            try:
                conn = await connect(host, port, token, raw=args.raw)
                greeting = await conn.read_exactly(12)
                if greeting != GREETING:
                    raise WsError("bad greeting")
                lat.append(time.perf_counter() - t0)
            except (OSError, WsError) as e:
                key = type(e).__name__ + ": " + str(e)[:60]
                errors[key] = errors.get(key, 0) + 1
            finally:
                if conn is not None:
                    conn.close()

    cpu0 = cpu_seconds()
    m0 = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(worker(w) for w in range(args.concurrency))), args.timeout
    )
    m1 = time.monotonic()
    pc = {k: (v * 1e3 if k != "n" else v) for k, v in percentiles(lat).items()}
    return {
        "completed": len(lat),
        "errors": errors,
        "t_start": m0,
        "t_end": m1,
        "rate": len(lat) / (m1 - m0),
        "latency_ms": pc,
        "latencies_ms": [round(x * 1e3, 3) for x in lat],
        "client_cpu": cpu_seconds() - cpu0,
        "client_wall": m1 - m0,
    }


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    """Open and hold sessions; obey ``check``/``close`` lines on stdin."""
    raise_nofile(args.sessions + 64)
    tg = targets(args)
    conns: list[Conn] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(args.concurrency)
    hard_deadline = time.monotonic() + args.timeout

    async def open_one(i: int) -> None:
        host, port, token = tg[i % len(tg)]
        async with sem:
            try:
                conn = await connect(host, port, token, raw=args.raw)
                conns.append(conn)
                await rfb_handshake(conn)
            except (OSError, WsError) as e:
                key = type(e).__name__ + ": " + str(e)[:60]
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(open_one(i) for i in range(args.sessions))), args.open_timeout
        )
    except TimeoutError:
        errors["open timeout"] = errors.get("open timeout", 0) + 1
    alive = [c for c in conns if c.state == _OPEN]
    emit(
        {
            "event": "ready",
            "opened": len(alive),
            "errors": errors,
            "open_seconds": time.perf_counter() - t0,
        }
    )
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {"opened": len(alive)}
    while time.monotonic() < hard_deadline:
        remaining = hard_deadline - time.monotonic()
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), remaining)
        except TimeoutError:
            break
        cmd = line.strip()
        if cmd == "check":
            ok = 0

            async def ping(c: Conn) -> bool:
                async with sem:
                    try:
                        c.send(POINTER_EVENT)
                        return await asyncio.wait_for(c.read_exactly(6), 30) == POINTER_EVENT
                    except (OSError, WsError, TimeoutError):
                        return False

            oks = await asyncio.gather(*(ping(c) for c in alive))
            ok = sum(oks)
            emit({"event": "checked", "alive": ok, "of": len(alive)})
        elif cmd == "closes":
            # a revocation is under way: wait (bounded) until every session was closed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(c.lost for c in alive)), args.close_wait)
            codes: dict[str, int] = {}
            for c in alive:
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
            emit(
                {
                    "event": "closes",
                    "closed_at": [c.closed_at for c in alive if c.closed_at is not None],
                    "still_open": sum(1 for c in alive if c.closed_at is None),
                    "codes": codes,
                }
            )
        elif cmd in ("close", ""):
            break
    for c in conns:
        c.close()
    await asyncio.sleep(0)  # let the close frames go out
    return result


SCENARIOS = {
    "bulk-down": bulk_down,
    "bulk-up": bulk_up,
    "latency": latency,
    "setup": setup,
    "idle": idle,
    "bulk-many": bulk_many,
}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", required=True, help="comma-separated proxy ports")
    parser.add_argument("--tokens", required=True, help="comma-separated tokens")
    parser.add_argument("--bytes", type=int, default=64 * 2**20)
    parser.add_argument("--streams", type=int, default=1, help="parallel connections")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--open-timeout", type=float, default=120.0)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="round trips a second per connection (0: back to back)",
    )
    parser.add_argument(
        "--close-wait", type=float, default=10.0, help="idle: seconds `closes` waits at most"
    )
    parser.add_argument(
        "--raw", action="store_true", help="plain TCP to a byte relay (socat), no WebSocket"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit, seconds")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the benchmark client only talks to loopback")
    raise_nofile(4096)
    try:
        out = asyncio.run(SCENARIOS[args.scenario](args))
    except (OSError, WsError, TimeoutError) as e:
        emit({"event": "error", "error": f"{type(e).__name__}: {e}"})
        return 1
    emit({"event": "result", **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
