"""
The RFB security proxy, sans-IO: vncmux authenticates to the VNC server itself and offers the
browser security type None, so a VNC password or client certificate never reaches the browser.

- L{ServerSecurity} is the client side of the handshake with the VNC server, from its
  ProtocolVersion to an accepted SecurityResult: None, VncAuth (DES challenge-response with
  the record's password) and VeNCrypt (X509None, X509Vnc, TLSNone, TLSVnc over TLS that the
  driver starts when asked).
- L{BrowserSecurity} is the server side of the handshake with the browser: version, security
  type None, SecurityResult OK (RFB 3.3, 3.7 and 3.8 clients each as their version wants),
  after which everything the browser sends (ClientInit on) is relayed untouched.

Both read through one incremental reader, so a message may arrive split anywhere. Nova's
C{nova/console/securityproxy/rfb.py} does the same with blocking reads; vncmux differs where
noted: it also speaks VncAuth (its records carry a password), accepts 3.7 servers and clients
(and 3.3 clients), uses VeNCrypt's anonymous TLS sub-types when it has no CA bundle to verify
a certificate with, and tells the browser only one of two reasons (no allowed security type,
authentication failed); the details go to the operator's log.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from vncmux.refusals import CONSOLE_AUTH_FAILED, CONSOLE_SECURITY, Refused
from vncmux.rfb import SECURITY_NONE as NONE
from vncmux.rfb import SECURITY_VNC_AUTH as VNC_AUTH
from vncmux.rfb import VERSION_3_8, VERSION_LENGTH, parse_version

__all__ = [
    "AUTH_SCHEMES",
    "BrowserSecurity",
    "RfbClientError",
    "SecurityPolicy",
    "ServerSecurity",
    "TlsMode",
    "decrypt_vncpasswd",
    "vnc_auth_response",
]

#: Security types (rfbproto "Security Types") besides None and VncAuth.
VENCRYPT = 19
_TYPE_NAMES = {
    0: "Invalid",
    NONE: "None",
    VNC_AUTH: "VncAuth",
    VENCRYPT: "VeNCrypt",
    16: "Tight",
    18: "TLS",
    20: "SASL",
    30: "ARD",
}

#: VeNCrypt sub-types vncmux speaks, in the order it prefers them: a verified certificate
#: before anonymous TLS (which a man in the middle can read), no password before one.
X509_NONE = 260
X509_VNC = 261
TLS_NONE = 257
TLS_VNC = 258
_SUBTYPE_NAMES = {
    256: "Plain",
    TLS_NONE: "TLSNone",
    TLS_VNC: "TLSVnc",
    259: "TLSPlain",
    X509_NONE: "X509None",
    X509_VNC: "X509Vnc",
    262: "X509Plain",
    263: "X509SASL",
    264: "TLSSASL",
}
_SUBTYPE_PREFERENCE = (X509_NONE, X509_VNC, TLS_NONE, TLS_VNC)

#: Values of ``--auth-schemes`` (nova's ``[vnc] auth_schemes`` has none and vencrypt).
AUTH_SCHEMES = ("none", "vncauth", "vencrypt")

_VERSION_3_7 = b"RFB 003.007\n"
#: Longest failure reason read from a VNC server; longer ones are not read (nova: 256).
_MAX_REASON = 1024
_U32 = struct.Struct(">I")


class TlsMode:
    """What TLS the driver starts when VeNCrypt asks for it."""

    X509 = "x509"  #: the server's certificate verified against the CA bundle
    ANONYMOUS = "anonymous"  #: anonymous Diffie-Hellman, as TLSNone/TLSVnc want


class RfbClientError(Exception):
    """The browser's RFB handshake cannot go on; C{answer} is the RFB failure to send it."""

    def __init__(self, detail: str, answer: bytes) -> None:
        super().__init__(detail)
        self.detail = detail
        self.answer = answer


def _type_name(security_type: int) -> str:
    return f"{security_type} ({_TYPE_NAMES.get(security_type, 'unknown')})"


def _subtype_name(subtype: int) -> str:
    return f"{subtype} ({_SUBTYPE_NAMES.get(subtype, 'unknown')})"


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def _des(key: bytes) -> Cipher[modes.ECB]:
    """
    Single DES in ECB mode, as VNC's d3des uses it: d3des reads each key byte from its least
    significant bit, standard DES from its most significant one, so every key byte is
    bit-reversed. TripleDES with K1 = K2 = K3 is single DES.
    """
    return Cipher(TripleDES(bytes(_reverse_bits(b) for b in key) * 3), modes.ECB())


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """
    VncAuth: the 16-byte challenge encrypted with the first 8 bytes of the password, in
    UTF-8 as TigerVNC's vncpasswd reads it from a terminal.
    """
    key = password.encode("utf-8")[:8].ljust(8, b"\0")
    encryptor = _des(key).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


#: The fixed key with which ``vncpasswd`` obfuscates the password it stores (d3des order).
_VNCPASSWD_KEY = bytes((23, 82, 107, 6, 35, 78, 88, 7))


def decrypt_vncpasswd(data: bytes) -> str:
    """The password in a file written by ``vncpasswd`` (its first 8 bytes)."""
    if len(data) < 8:
        raise ValueError("a vncpasswd file holds at least 8 bytes")
    decryptor = _des(_VNCPASSWD_KEY).decryptor()
    plain = decryptor.update(data[:8]).rstrip(b"\0")
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        # vncpasswd keeps 8 bytes, which may end inside a character; records hold text.
        raise ValueError(
            "the password in this vncpasswd file is not UTF-8 (its 8 bytes may end inside a"
            " character): give the password itself instead"
        ) from None


class _Reader:
    """
    Runs a handshake written as a generator that yields how many bytes it wants next and
    receives them: any split of the input gives the same result.
    """

    def __init__(self, steps: Generator[int, bytes, None]) -> None:
        self._steps = steps
        self._buffer = b""
        self._wanted: int | None = next(steps)

    @property
    def done(self) -> bool:
        return self._wanted is None

    def feed(self, data: bytes) -> bytes:
        """Take bytes; once the handshake is over, return what came after it."""
        self._buffer += data
        while self._wanted is not None and len(self._buffer) >= self._wanted:
            chunk, self._buffer = self._buffer[: self._wanted], self._buffer[self._wanted :]
            try:
                self._wanted = self._steps.send(chunk)
            except StopIteration:
                self._wanted = None
        if self._wanted is None:
            rest, self._buffer = self._buffer, b""
            return rest
        return b""


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """
    Which security vncmux negotiates with VNC servers (``--auth-schemes``) and whether it
    can do TLS with them (``--vencrypt-ca-certs``; client certificate and key optional).

    The proxy steps in for a record that carries a password, or when schemes other than
    ``none`` are allowed; otherwise RFB passes through untouched.
    """

    schemes: frozenset[str] = frozenset({"none"})
    x509: bool = False
    anonymous_tls: bool = True

    def engaged(self, password: str | None) -> bool:
        """Whether vncmux negotiates security itself for a record with this password."""
        return password is not None or self.schemes != {"none"}

    def allowed_types(self, password: str | None) -> list[int]:
        """The security types vncmux may choose towards the server."""
        allowed = []
        if "none" in self.schemes:
            allowed.append(NONE)
        if password is not None or "vncauth" in self.schemes:
            allowed.append(VNC_AUTH)
        if "vencrypt" in self.schemes:
            allowed.append(VENCRYPT)
        return allowed

    def allowed_subtypes(self, password: str | None) -> list[int]:
        """The VeNCrypt sub-types vncmux may choose, in its order of preference."""
        usable = []
        for subtype in _SUBTYPE_PREFERENCE:
            x509 = subtype in (X509_NONE, X509_VNC)
            if (x509 and not self.x509) or (not x509 and not self.anonymous_tls):
                continue
            if subtype in (X509_VNC, TLS_VNC) and password is None:
                continue
            usable.append(subtype)
        return usable


class ServerSecurity:
    """
    The client side of the security handshake with a VNC server.

    Feed it the server's bytes with L{receive} and send what it returns. When L{tls_wanted}
    is set, start TLS of that kind on the connection and call L{tls_started}; what the server
    sends afterwards is the decrypted stream. When L{done}, the server waits for ClientInit,
    and L{leftover} holds what it sent after its SecurityResult (normally nothing).
    Failures raise L{Refused} (4502) whose detail is for the operator's log only.
    """

    def __init__(self, policy: SecurityPolicy, password: str | None) -> None:
        self._policy = policy
        self._password = password
        self._out: list[bytes] = []
        self.tls_wanted: str | None = None
        self.leftover = b""
        #: What was negotiated, for the operator's log ("VncAuth", "VeNCrypt X509None").
        self.negotiated = ""
        self._reader = _Reader(self._handshake())

    @property
    def done(self) -> bool:
        return self._reader.done

    def receive(self, data: bytes) -> bytes:
        """Take the server's bytes; return what to send it."""
        rest = self._reader.feed(data)
        if self._reader.done:
            self.leftover += rest
        out, self._out = b"".join(self._out), []
        return out

    def tls_started(self) -> None:
        """The driver has started the TLS that L{tls_wanted} asked for."""
        self.tls_wanted = None

    def _handshake(self) -> Generator[int, bytes, None]:
        version = parse_version((yield VERSION_LENGTH))
        if version is None or version[0] != 3 or version[1] < 7:
            raise Refused(
                CONSOLE_SECURITY,
                f"security proxying needs RFB 3.7 or later, the VNC server speaks {version}",
            )
        speaks_3_8 = version[1] >= 8
        self._out.append(VERSION_3_8 if speaks_3_8 else _VERSION_3_7)
        count = (yield 1)[0]
        if count == 0:
            reason = yield from self._reason()
            raise Refused(CONSOLE_AUTH_FAILED, f"the VNC server refused at once: {reason}")
        offered = list((yield count))
        allowed = self._policy.allowed_types(self._password)
        chosen = next((t for t in offered if t in allowed), None)
        if chosen is None:
            raise Refused(
                CONSOLE_SECURITY,
                "the VNC server offers security types "
                f"{', '.join(map(_type_name, offered))}; allowed (--auth-schemes): "
                f"{', '.join(map(_type_name, allowed))}",
            )
        self._out.append(bytes((chosen,)))
        final = chosen
        if chosen == VNC_AUTH:
            self.negotiated = "VncAuth"
            yield from self._vnc_auth()
        elif chosen == VENCRYPT:
            final = yield from self._vencrypt()
        else:
            self.negotiated = "None"
        if final == NONE and not speaks_3_8:
            return  # RFB 3.7 sends no SecurityResult after None
        (result,) = _U32.unpack((yield 4))
        if result != 0:
            reason = (yield from self._reason()) if speaks_3_8 else "no reason given"
            raise Refused(
                CONSOLE_AUTH_FAILED, f"the VNC server refused {self.negotiated}: {reason}"
            )

    def _reason(self) -> Generator[int, bytes, str]:
        (length,) = _U32.unpack((yield 4))
        if length > _MAX_REASON:
            return f"a reason of {length} bytes (not read)"
        return (yield length).decode("utf-8", "replace") if length else "no reason given"

    def _vnc_auth(self) -> Generator[int, bytes, None]:
        if self._password is None:
            raise Refused(CONSOLE_AUTH_FAILED, "the VNC server wants a password; none given")
        challenge = yield 16
        self._out.append(vnc_auth_response(self._password, challenge))

    def _vencrypt(self) -> Generator[int, bytes, int]:
        """VeNCrypt 0.2: choose a sub-type, go TLS; returns the security type inside it."""
        major, minor = yield 2
        if (major, minor) != (0, 2):
            raise Refused(CONSOLE_SECURITY, f"VeNCrypt {major}.{minor} offered, vncmux speaks 0.2")
        self._out.append(b"\x00\x02")
        if (yield 1)[0] != 0:
            raise Refused(CONSOLE_SECURITY, "the VNC server did not accept VeNCrypt 0.2")
        count = (yield 1)[0]
        raw = yield 4 * count
        offered = [_U32.unpack_from(raw, 4 * i)[0] for i in range(count)]
        allowed = self._policy.allowed_subtypes(self._password)
        chosen = next((s for s in allowed if s in offered), None)
        if chosen is None:
            raise Refused(
                CONSOLE_SECURITY,
                "the VNC server offers VeNCrypt sub-types "
                f"{', '.join(map(_subtype_name, offered)) or 'none'}; usable: "
                f"{', '.join(map(_subtype_name, allowed)) or 'none'}",
            )
        self._out.append(_U32.pack(chosen))
        self.negotiated = f"VeNCrypt {_SUBTYPE_NAMES[chosen]}"
        # A U8 the specification leaves out but QEMU, TigerVNC and gtk-vnc send: 1 accepts.
        if (yield 1)[0] != 1:
            raise Refused(CONSOLE_SECURITY, f"the VNC server did not accept {self.negotiated}")
        self.tls_wanted = TlsMode.X509 if chosen in (X509_NONE, X509_VNC) else TlsMode.ANONYMOUS
        if chosen in (X509_VNC, TLS_VNC):
            yield from self._vnc_auth()
            return VNC_AUTH
        return VENCRYPT


class BrowserSecurity:
    """
    The server side of the RFB handshake towards the browser, offering only security type
    None: send L{greeting}, feed the browser's bytes to L{receive} and send what it returns
    until L{done}. Then L{handshake} holds the browser's handshake bytes (for the activity
    scanner) and L{leftover} what it sent after them (its ClientInit, perhaps more).
    A handshake that cannot go on raises L{RfbClientError} with the RFB failure to send.
    """

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self.handshake = b""
        self.leftover = b""
        self._reader = _Reader(self._steps())

    @property
    def done(self) -> bool:
        return self._reader.done

    def greeting(self) -> bytes:
        return VERSION_3_8

    def receive(self, data: bytes) -> bytes:
        try:
            rest = self._reader.feed(data)
        except RfbClientError as error:
            # What was due before the failure (the list of types) goes out first.
            error.answer = b"".join(self._out) + error.answer
            self._out = []
            raise
        if self._reader.done:
            self.leftover += rest
        out, self._out = b"".join(self._out), []
        return out

    def _steps(self) -> Generator[int, bytes, None]:
        raw = yield VERSION_LENGTH
        self.handshake = raw
        version = parse_version(raw)
        if version is None or version[0] != 3:
            reason = b"unsupported RFB version"
            raise RfbClientError(
                f"browser sent RFB version {raw!r}",
                b"\x00" + _U32.pack(len(reason)) + reason,
            )
        if version[1] < 7:
            # RFB 3.3: the server names the security type; None skips SecurityResult.
            self._out.append(_U32.pack(NONE))
            return
        self._out.append(bytes((1, NONE)))
        chosen = (yield 1)[0]
        self.handshake += bytes((chosen,))
        speaks_3_8 = version[1] >= 8
        if chosen != NONE:
            reason = b"only security type 1 (None) is offered"
            failure = _U32.pack(1) + (_U32.pack(len(reason)) + reason if speaks_3_8 else b"")
            raise RfbClientError(
                f"browser chose security type {_type_name(chosen)} instead of None", failure
            )
        if speaks_3_8:
            self._out.append(_U32.pack(0))
