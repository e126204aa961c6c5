"""
A fast fake VNC server for the benchmarks: one process, one mode, one listening port.

Every connection gets ``RFB 003.008\\n`` at once, then a minimal RFB 3.8 handshake
(security type None, ClientInit, ServerInit) so that a proxy that watches the RFB stream
sees a well-formed session. With ``--vencrypt`` the only security type offered is VeNCrypt
(0.2, sub-type TLSNone): the connection goes over anonymous TLS 1.2, as a VNC server's
does for vncmux's RFB security proxy, so its TLS leg can be measured. After the handshake
the mode decides:

- ``echo``: every byte from the client is written back unchanged;
- ``sink``: client messages are parsed by length and discarded; each KeyEvent is answered
  with one Bell byte, which the client uses as an end-of-upload acknowledgement;
- ``blast``: ``--blast-bytes`` bytes are sent in 64 KiB chunks (flow-controlled), then
  input is discarded until the client leaves.

It serves on a listening socket it inherits (``--listen-fd``, how ``run.py`` starts it), or
listens itself on ``--port`` (0, the default: a free one); either way the port is printed as
``PORT <n>`` on stdout once it serves. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
import struct
import sys

from tests.processes import raise_nofile

GREETING = b"RFB 003.008\n"
SECURITY_TYPES = b"\x01\x01"  # one type offered: None
SECURITY_OK = b"\x00\x00\x00\x00"
VENCRYPT_TYPES = b"\x01\x13"  # one type offered: VeNCrypt (19)
VENCRYPT_VERSION = b"\x00\x02"
TLS_NONE = 257
# VeNCrypt 0.2 accepted, then one sub-type offered: TLSNone
VENCRYPT_SUBTYPES = b"\x00\x01" + struct.pack(">I", TLS_NONE)
VENCRYPT_SUBTYPE_OK = b"\x01"  # the U8 that QEMU, TigerVNC and gtk-vnc send (and vncmux reads)
NAME = b"vncmux-bench"
# width, height, pixel format (32 bpp, depth 24, little endian, true colour), name
SERVER_INIT = (
    struct.pack(">HH", 1024, 768)
    + struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    + struct.pack(">I", len(NAME))
    + NAME
)
BELL = b"\x02"
CHUNK = 64 * 1024
BLAST_CHUNK = bytes(range(256)) * (CHUNK // 256)

# Bytes needed to learn a client message's length, by message type (RFB 3.8 §7.5).
_HEADER_NEED = {0: 20, 2: 4, 3: 10, 4: 8, 5: 6, 6: 8}

# One receive buffer shared by every connection: buffer_updated() consumes it synchronously
# before the loop asks for a buffer again, so thousands of idle sessions cost no buffer each.
_SHARED = bytearray(256 * 1024)
_SHARED_VIEW = memoryview(_SHARED)

_V_VERSION, _V_SECTYPE, _V_CLIENTINIT, _V_RUNNING = range(4)
_V_VENCRYPT_VERSION, _V_SUBTYPE, _V_TLS = range(4, 7)
# Bytes the client sends in each handshake state.
_STATE_NEED = {
    _V_VERSION: 12,
    _V_SECTYPE: 1,
    _V_CLIENTINIT: 1,
    _V_VENCRYPT_VERSION: 2,
    _V_SUBTYPE: 4,
}


def anonymous_tls_context(dh_params: str | None = None) -> ssl.SSLContext:
    """
    Server side of VeNCrypt's TLSNone: no certificate, anonymous (EC)DH suites, which need
    TLS 1.2 (1.3 has none) and OpenSSL's security level 0, as vncmux's client side wants.
    Without ``dh_params`` only anonymous ECDH is possible: AECDH-AES256-SHA, which TigerVNC's
    Xvnc picks too against vncmux's offer. With them anonymous DH with AES-GCM, likely what
    QEMU's VeNCrypt server (anonymous DH only) negotiates; not checked against QEMU.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
    if dh_params is not None:
        context.load_dh_params(dh_params)
    return context


class Counters:
    """Totals for one backend process (printed on exit)."""

    __slots__ = ("accepted", "bytes_in", "bytes_out", "protocol_errors", "tls_cipher")

    def __init__(self) -> None:
        self.accepted = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.protocol_errors = 0
        #: The cipher suite of the latest VeNCrypt TLS handshake, to report which was measured.
        self.tls_cipher = ""


class RfbBackend(asyncio.BufferedProtocol):
    """One fake-VNC connection; see the module docstring for the modes."""

    __slots__ = (
        "_mode",
        "_blast_left",
        "_counters",
        "_hdr",
        "_paused",
        "_skip",
        "_state",
        "_tls",
        "_tls_task",
        "_transport",
    )

    def __init__(
        self, mode: str, blast_bytes: int, counters: Counters, tls: ssl.SSLContext | None = None
    ) -> None:
        self._mode = mode
        self._blast_left = blast_bytes
        self._counters = counters
        self._hdr = bytearray()
        self._paused = False
        self._skip = 0
        self._state = _V_VERSION
        self._tls = tls
        self._tls_task: asyncio.Task[None] | None = None  # held: the loop keeps only weak refs
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the RFB greeting at once."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._counters.accepted += 1
        transport.write(GREETING)

    def get_buffer(self, sizehint: int) -> memoryview:
        """The shared receive buffer."""
        return _SHARED_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        """Handle ``nbytes`` fresh bytes at the start of the shared buffer."""
        self._counters.bytes_in += nbytes
        if self._state == _V_RUNNING:
            self._running(_SHARED_VIEW[:nbytes])
        else:
            self._handshake(_SHARED_VIEW[:nbytes])

    def _handshake(self, data: memoryview) -> None:
        hdr = self._hdr
        i, n = 0, len(data)
        transport = self._transport
        assert transport is not None
        while i < n and self._state != _V_RUNNING:
            if self._state == _V_TLS:  # vncmux waits for our U8 before its ClientHello
                self._protocol_error()
                return
            need = _STATE_NEED[self._state]
            take = min(need - len(hdr), n - i)
            hdr += data[i : i + take]
            i += take
            if len(hdr) < need:
                return
            if self._state == _V_VERSION:
                if not hdr.startswith(b"RFB 003."):
                    self._protocol_error()
                    return
                transport.write(SECURITY_TYPES if self._tls is None else VENCRYPT_TYPES)
                self._state = _V_SECTYPE
            elif self._state == _V_SECTYPE:
                if hdr[0] != (1 if self._tls is None else 19):
                    self._protocol_error()
                    return
                if self._tls is None:
                    transport.write(SECURITY_OK)
                    self._state = _V_CLIENTINIT
                else:
                    transport.write(VENCRYPT_VERSION)
                    self._state = _V_VENCRYPT_VERSION
            elif self._state == _V_VENCRYPT_VERSION:
                if hdr != VENCRYPT_VERSION:
                    self._protocol_error()
                    return
                transport.write(VENCRYPT_SUBTYPES)
                self._state = _V_SUBTYPE
            elif self._state == _V_SUBTYPE:
                if struct.unpack(">I", hdr)[0] != TLS_NONE:
                    self._protocol_error()
                    return
                transport.write(VENCRYPT_SUBTYPE_OK)
                # The ClientHello must reach the TLS layer, not this parser.
                transport.pause_reading()
                self._state = _V_TLS
                self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            else:
                transport.write(SERVER_INIT)
                self._state = _V_RUNNING
                if self._mode == "blast":
                    self._pump()
            hdr.clear()
        if i < n:
            self._running(data[i:])

    async def _start_tls(self) -> None:
        """Upgrade to TLS as the server; inside it the SecurityResult and the rest go on."""
        transport, tls = self._transport, self._tls
        assert transport is not None and tls is not None
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport, self, tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError):
            self._protocol_error()
            return
        if secure is None:  # the client left during the handshake
            return
        assert isinstance(secure, asyncio.Transport)
        tls_object = secure.get_extra_info("ssl_object")
        self._counters.tls_cipher = f"{tls_object.version()} {tls_object.cipher()[0]}"
        self._transport = secure
        secure.write(SECURITY_OK)
        self._state = _V_CLIENTINIT

    def _running(self, data: memoryview) -> None:
        mode = self._mode
        if mode == "echo":
            assert self._transport is not None
            self._counters.bytes_out += len(data)
            self._transport.write(bytes(data))
        elif mode == "sink":
            self._sink(data)
        # blast: input after the handshake is ignored

    def _sink(self, data: memoryview) -> None:
        """Skip client messages by their declared lengths; answer KeyEvent with Bell."""
        n = len(data)
        skip = self._skip
        if skip >= n:  # the fast path: the middle of a large ClientCutText
            self._skip = skip - n
            return
        i = skip
        self._skip = 0
        hdr = self._hdr
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            mtype = data[i] if not hdr else hdr[0]
            need = _HEADER_NEED.get(mtype)
            if need is None:
                self._protocol_error()
                return
            take = min(need - len(hdr), n - i)
            hdr += data[i : i + take]
            i += take
            if len(hdr) < need:
                return
            if mtype == 6:
                self._skip = struct.unpack_from(">I", hdr, 4)[0]
            elif mtype == 2:
                self._skip = 4 * struct.unpack_from(">H", hdr, 2)[0]
            elif mtype == 4:
                assert self._transport is not None
                self._transport.write(BELL)
            hdr.clear()

    def _pump(self) -> None:
        transport = self._transport
        assert transport is not None
        counters = self._counters
        while self._blast_left > 0 and not self._paused:
            chunk = BLAST_CHUNK if self._blast_left >= CHUNK else BLAST_CHUNK[: self._blast_left]
            transport.write(chunk)
            self._blast_left -= len(chunk)
            counters.bytes_out += len(chunk)

    def pause_writing(self) -> None:
        """The transport buffer is full: stop blasting."""
        self._paused = True

    def resume_writing(self) -> None:
        """The transport buffer drained: blast on."""
        self._paused = False
        if self._state == _V_RUNNING and self._mode == "blast":
            self._pump()

    def _protocol_error(self) -> None:
        self._counters.protocol_errors += 1
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the transport reference."""
        self._transport = None


async def serve(
    listener: socket.socket | tuple[str, int],
    mode: str,
    blast_bytes: int,
    tls: ssl.SSLContext | None = None,
) -> Counters:
    """
    Serve on ``listener`` (a listening socket, or the host and port to listen on) until
    SIGTERM or SIGINT (``tls``: offer VeNCrypt TLSNone); return the counters.
    """
    loop = asyncio.get_running_loop()
    counters = Counters()
    factory = lambda: RfbBackend(mode, blast_bytes, counters, tls)  # noqa: E731
    if isinstance(listener, socket.socket):
        server = await loop.create_server(factory, sock=listener)
    else:
        host, port = listener
        server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)
    sock: socket.socket = server.sockets[0]
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    return counters


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--listen-fd",
        type=int,
        metavar="FD",
        help="serve on this inherited listening socket instead of --host/--port (how"
        " run.py starts it: connections wait in the socket's backlog until it serves)",
    )
    parser.add_argument("--mode", choices=("echo", "sink", "blast"), required=True)
    parser.add_argument("--blast-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument(
        "--vencrypt",
        action="store_true",
        help="offer only VeNCrypt TLSNone: the session runs over anonymous TLS 1.2",
    )
    parser.add_argument(
        "--vencrypt-dh-params",
        metavar="PEM",
        help="DH parameters for --vencrypt (e.g. from `openssl genpkey -genparam -algorithm DH"
        " -pkeyopt group:ffdhe2048`): anonymous DH with AES-GCM instead of ECDH with AES-CBC",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the benchmark backend only listens on loopback")
    if args.vencrypt_dh_params and not args.vencrypt:
        parser.error("--vencrypt-dh-params needs --vencrypt")
    raise_nofile()
    tls = anonymous_tls_context(args.vencrypt_dh_params) if args.vencrypt else None
    listener: socket.socket | tuple[str, int] = (args.host, args.port)
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    counters = asyncio.run(serve(listener, args.mode, args.blast_bytes, tls))
    tls_note = f" tls={counters.tls_cipher!r}" if args.vencrypt else ""
    print(
        f"accepted={counters.accepted} in={counters.bytes_in} out={counters.bytes_out} "
        f"protocol_errors={counters.protocol_errors}{tls_note}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
