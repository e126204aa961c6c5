"""Tests for vncmux.rfbsecurity (the RFB security proxy, sans-IO) and vncmux.tunnel."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import given
from hypothesis import strategies as st

from vncmux.cli import UsageError, read_password_file
from vncmux.refusals import CONSOLE_AUTH_FAILED, CONSOLE_SECURITY, CONSOLE_UNREACHABLE, Refused
from vncmux.rfb import ClientActivityScanner
from vncmux.rfbsecurity import (
    BrowserSecurity,
    RfbClientError,
    SecurityPolicy,
    ServerSecurity,
    TlsMode,
    decrypt_vncpasswd,
    vnc_auth_response,
)
from vncmux.tunnel import MAX_ANSWER_HEAD, ConnectTunnel

V38 = b"RFB 003.008\n"
V37 = b"RFB 003.007\n"
V33 = b"RFB 003.003\n"
CHALLENGE = bytes(range(16))
OK = b"\x00\x00\x00\x00"


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def failure(reason: bytes) -> bytes:
    return u32(1) + u32(len(reason)) + reason


def des_reference(password: str, challenge: bytes) -> bytes:
    """VncAuth written out from rfbproto, bit by bit: each key byte mirrored, then DES."""
    key = password.encode("utf-8")[:8].ljust(8, b"\0")
    mirrored = bytes(sum(((b >> i) & 1) << (7 - i) for i in range(8)) for b in key)
    encryptor = Cipher(TripleDES(mirrored + mirrored + mirrored), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (any order, repeats allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def feed(machine: ServerSecurity | BrowserSecurity, chunks: list[bytes]) -> bytes:
    return b"".join(machine.receive(chunk) for chunk in chunks)


cuts = st.lists(st.integers(min_value=0, max_value=200), max_size=12)


# -- DES, as TigerVNC does it --------------------------------------------------------------------


def test_vncpasswd_file_from_tigervnc_decrypts() -> None:
    """A file written by TigerVNC's own vncpasswd gives back the password (the obfuscation is
    the DES variant VncAuth uses, so this checks the bit order against the real tool)."""
    if shutil.which("vncpasswd") is None:
        if os.environ.get("CI"):
            pytest.fail("vncpasswd (tigervnc-tools) is required under CI")
        pytest.skip("vncpasswd not installed")
    for password in ("hunter2", "s3cr3t!!", "longer than eight"):
        written = subprocess.run(
            ["vncpasswd", "-f"], input=password.encode() + b"\n", capture_output=True, check=True
        ).stdout
        assert decrypt_vncpasswd(written) == password[:8]
        assert read_password_file(written) == password[:8]


@given(
    st.text(max_size=12),
    st.binary(min_size=16, max_size=16),
)
def test_vnc_auth_response_matches_rfbproto(password: str, challenge: bytes) -> None:
    """The response is DES of the challenge under the mirrored, NUL-padded 8-byte key."""
    assert vnc_auth_response(password, challenge) == des_reference(password, challenge)


def test_vncpasswd_round_trip() -> None:
    """A vncpasswd file (the password DES-encrypted with the fixed key) decrypts; one whose
    8 bytes end inside a character is refused with a hint, never guessed."""
    fixed = bytes((23, 82, 107, 6, 35, 78, 88, 7))

    def vncpasswd(password: bytes) -> bytes:
        mirrored = bytes(sum(((b >> i) & 1) << (7 - i) for i in range(8)) for b in fixed)
        encryptor = Cipher(TripleDES(mirrored * 3), modes.ECB()).encryptor()
        return encryptor.update(password[:8].ljust(8, b"\0")) + encryptor.finalize()

    assert decrypt_vncpasswd(vncpasswd("grün".encode())) == "grün"
    with pytest.raises(ValueError, match="give the password itself"):
        decrypt_vncpasswd(vncpasswd("abcdefgü".encode()))  # ü cut after its first byte
    with pytest.raises(UsageError):
        read_password_file(vncpasswd("abcdefgü".encode()))


def test_password_file_text() -> None:
    """A text file gives its first line; bytes that are neither text nor vncpasswd's fail."""
    assert read_password_file(b"pass word\nignored\n") == "pass word"
    assert read_password_file(b"12345678") == "12345678"  # 8 printable bytes: a password
    with pytest.raises(UsageError):
        read_password_file(b"\xff\xfe\x00 not text at all")


# -- the VNC server's side: ServerSecurity ---------------------------------------------------------


def vnc_auth_server(result: bytes = OK) -> bytes:
    return V38 + b"\x01\x02" + CHALLENGE + result


@given(cuts)
def test_vnc_auth_any_split(at: list[int]) -> None:
    """VncAuth: the same answers, and done, however the server's bytes are split."""
    machine = ServerSecurity(SecurityPolicy(), "hunter2")
    sent = feed(machine, split(vnc_auth_server(), at))
    assert sent == V38 + b"\x02" + des_reference("hunter2", CHALLENGE)
    assert machine.done and machine.leftover == b"" and machine.negotiated == "VncAuth"


def test_vnc_auth_keeps_what_follows_the_result() -> None:
    """Bytes after SecurityResult (a server that does not wait for ClientInit) are kept."""
    machine = ServerSecurity(SecurityPolicy(), "pw")
    machine.receive(vnc_auth_server() + b"\x00\x10extra")
    assert machine.leftover == b"\x00\x10extra"


def test_server_order_decides() -> None:
    """Among allowed types the server's first wins (as nova's find_scheme)."""
    machine = ServerSecurity(SecurityPolicy(), "pw")
    assert machine.receive(V38 + b"\x02\x01\x02") == V38 + b"\x01"
    assert machine.receive(OK) == b"" and machine.done and machine.negotiated == "None"


def test_none_on_3_7_has_no_security_result() -> None:
    """A 3.7 server sends no SecurityResult after None: done at once, answered in 3.7."""
    machine = ServerSecurity(SecurityPolicy(frozenset({"none", "vencrypt"})), None)
    assert machine.receive(V37 + b"\x01\x01") == V37 + b"\x01"
    assert machine.done


def test_no_allowed_type_is_refused_with_the_offer() -> None:
    """A server offering only VeNCrypt to a proxy allowing none/VncAuth: 4502, saying so."""
    machine = ServerSecurity(SecurityPolicy(), "pw")
    with pytest.raises(Refused) as caught:
        machine.receive(V38 + b"\x01\x13")
    assert caught.value.refusal is CONSOLE_SECURITY
    assert caught.value.refusal.code == 4502
    assert "19 (VeNCrypt)" in caught.value.detail and "2 (VncAuth)" in caught.value.detail
    assert "pw" not in caught.value.detail


def test_wrong_password_is_an_auth_failure() -> None:
    """SecurityResult 1 with the server's reason: 'console authentication failed'."""
    machine = ServerSecurity(SecurityPolicy(), "wrong")
    with pytest.raises(Refused) as caught:
        machine.receive(vnc_auth_server(failure(b"Authentication failure")))
    assert caught.value.refusal is CONSOLE_AUTH_FAILED
    assert "Authentication failure" in caught.value.detail
    assert "wrong" not in caught.value.detail


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        (V33 + u32(1), "3.7 or later"),
        (b"SSH-2.0-Open", "3.7 or later"),
        (V38 + b"\x00" + u32(9) + b"Too many!", "Too many!"),
        (V38 + b"\x00" + u32(1 << 20), "not read"),
    ],
)
def test_servers_that_cannot_be_proxied(server: bytes, needle: str) -> None:
    """Old versions, non-RFB greetings and servers that refuse at once are 4502 refusals."""
    with pytest.raises(Refused) as caught:
        ServerSecurity(SecurityPolicy(), "pw").receive(server)
    assert caught.value.refusal.code == 4502
    assert needle in caught.value.detail


def test_vncauth_scheme_without_password_fails() -> None:
    """'vncauth' allowed but the token has no password: refused, never a guessed password."""
    machine = ServerSecurity(SecurityPolicy(frozenset({"vncauth"})), None)
    with pytest.raises(Refused) as caught:
        machine.receive(V38 + b"\x01\x02")
    assert caught.value.refusal is CONSOLE_AUTH_FAILED


def vencrypt_offer(*subtypes: int) -> bytes:
    return (
        V38
        + b"\x01\x13"
        + b"\x00\x02"
        + b"\x00"
        + bytes((len(subtypes),))
        + b"".join(u32(s) for s in subtypes)
    )


X509 = SecurityPolicy(frozenset({"vencrypt"}), x509=True, anonymous_tls=False)
ANON = SecurityPolicy(frozenset({"vencrypt"}), x509=False, anonymous_tls=True)


@given(cuts, cuts)
def test_vencrypt_x509none_any_split(before: list[int], after: list[int]) -> None:
    """VeNCrypt X509None: version 0.2, the sub-type, TLS asked for after the server's
    acceptance, then SecurityResult over TLS; any split on either side of the TLS start."""
    machine = ServerSecurity(X509, None)
    sent = feed(machine, split(vencrypt_offer(257, 260) + b"\x01", before))
    assert sent == V38 + b"\x13" + b"\x00\x02" + u32(260)
    assert machine.tls_wanted == TlsMode.X509 and not machine.done
    machine.tls_started()
    assert feed(machine, split(OK, after)) == b""
    assert machine.done and machine.negotiated == "VeNCrypt X509None"


def test_vencrypt_tlsvnc_does_vnc_auth_inside_tls() -> None:
    """TLSVnc with a password: anonymous TLS, then VncAuth over it."""
    machine = ServerSecurity(ANON, "pw")
    machine.receive(vencrypt_offer(258) + b"\x01")
    assert machine.tls_wanted == TlsMode.ANONYMOUS
    machine.tls_started()
    assert machine.receive(CHALLENGE) == des_reference("pw", CHALLENGE)
    machine.receive(OK)
    assert machine.done


def test_vencrypt_prefers_verified_tls() -> None:
    """X509None before TLSNone whatever the server's order, when both are usable."""
    both = SecurityPolicy(frozenset({"vencrypt"}), x509=True, anonymous_tls=True)
    machine = ServerSecurity(both, None)
    assert machine.receive(vencrypt_offer(257, 260)).endswith(u32(260))


def test_vencrypt_with_ca_bundle_refuses_anonymous_tls() -> None:
    """With a CA bundle (X509 only), a server offering only TLSNone is refused, naming both."""
    with pytest.raises(Refused) as caught:
        ServerSecurity(X509, None).receive(vencrypt_offer(257))
    assert caught.value.refusal is CONSOLE_SECURITY
    assert "257 (TLSNone)" in caught.value.detail and "260 (X509None)" in caught.value.detail


def test_vencrypt_rejected_subtype() -> None:
    """A server that answers 0 to the chosen sub-type refuses it."""
    with pytest.raises(Refused):
        ServerSecurity(X509, None).receive(vencrypt_offer(260) + b"\x00")


def test_policy_engaged() -> None:
    """Default 'none': untouched without a password, VncAuth with one; any other scheme
    always engages the proxy."""
    assert not SecurityPolicy().engaged(None)
    assert SecurityPolicy().engaged("pw")
    assert SecurityPolicy(frozenset({"none", "vencrypt"})).engaged(None)


# -- the browser's side: BrowserSecurity -----------------------------------------------------------


@given(cuts)
def test_browser_3_8_any_split(at: list[int]) -> None:
    """A 3.8 browser: offered [None], answered SecurityResult OK; ClientInit and what
    follows are left over for the relay, the handshake kept for the scanner."""
    browser = BrowserSecurity()
    assert browser.greeting() == V38
    client = V38 + b"\x01" + b"\x01" + b"\x04\x01\x00\x00\x00\x00\xff\xbe"
    sent = b""
    for chunk in split(client, at):
        sent += browser.receive(chunk)
    assert sent == b"\x01\x01" + OK
    assert browser.done
    assert browser.handshake == V38 + b"\x01"
    assert browser.leftover == client[13:]


def test_browser_3_7_gets_no_security_result() -> None:
    """rfbproto: a 3.7 client that chose None goes straight to ClientInit."""
    browser = BrowserSecurity()
    assert browser.receive(V37) == b"\x01\x01"
    assert browser.receive(b"\x01") == b""
    assert browser.done


def test_browser_3_3_is_told_none() -> None:
    """A 3.3 client is told security type None (U32) and sends ClientInit next."""
    browser = BrowserSecurity()
    assert browser.receive(V33 + b"\x01") == u32(1)
    assert browser.done and browser.leftover == b"\x01"


@pytest.mark.parametrize("version", [V38, V37, V33])
def test_scanner_follows_the_proxied_handshake(version: bytes) -> None:
    """Fed the browser's handshake, the activity scanner reads ClientInit and then input."""
    browser = BrowserSecurity()
    browser.receive(version + (b"" if version == V33 else b"\x01"))
    scanner = ClientActivityScanner()
    assert not scanner.feed(browser.handshake)
    assert not scanner.feed(b"\x01")  # ClientInit
    assert scanner.feed(b"\x05\x00\x00\x10\x00\x10")  # PointerEvent
    assert not scanner.fallback


def test_browser_choosing_vnc_auth_fails() -> None:
    """A browser that picks another type gets a 3.8 failure with the reason."""
    with pytest.raises(RfbClientError) as caught:
        BrowserSecurity().receive(V38 + b"\x02")
    reason = b"only security type 1 (None) is offered"
    assert caught.value.answer == b"\x01\x01" + failure(reason)


def test_browser_malformed_version_fails() -> None:
    """A malformed version gets zero security types and a reason."""
    with pytest.raises(RfbClientError) as caught:
        BrowserSecurity().receive(b"GET / HTTP/1.")
    assert caught.value.answer.startswith(b"\x00" + u32(len(b"unsupported RFB version")))


# -- the CONNECT tunnel --------------------------------------------------------------------------


def test_tunnel_request() -> None:
    """CONNECT with the path and a Host header, as HTTP/1.1 wants."""
    tunnel = ConnectTunnel("/console?ref=42", "compute1:5900")
    assert tunnel.request() == b"CONNECT /console?ref=42 HTTP/1.1\r\nHost: compute1:5900\r\n\r\n"
    with pytest.raises(ValueError):
        ConnectTunnel("/a b", "h:1")


@given(cuts)
def test_tunnel_200_any_split(at: list[int]) -> None:
    """The answer's head is consumed whatever the split; what follows is the console's."""
    tunnel = ConnectTunnel("/p", "h:1")
    answer = b"HTTP/1.1 200 OK\r\nX-Thing: 1\r\n\r\n" + V38
    chunks = split(answer, at)
    for i, chunk in enumerate(chunks):
        rest = tunnel.receive(chunk)
        if rest is not None:
            assert rest + b"".join(chunks[i + 1 :]) == V38
            return
    raise AssertionError("the 200 answer was never complete")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 404 Not Found\r\n\r\n",
        b"HTTP/1.1 403 200 is not the code\r\n\r\n",
        b"RFB 003.008\n\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
def test_tunnel_refusals(answer: bytes) -> None:
    """Anything but status 200 is 'console unreachable', quoting the status line only."""
    with pytest.raises(Refused) as caught:
        ConnectTunnel("/secret-path", "h:1").receive(answer)
    assert caught.value.refusal is CONSOLE_UNREACHABLE
    assert repr(answer.split(b"\r\n")[0].decode()) in caught.value.detail
    assert "secret-path" not in caught.value.detail


def test_tunnel_head_is_bounded() -> None:
    """An endpoint that never ends its head is refused once it passes the bound."""
    tunnel = ConnectTunnel("/p", "h:1")
    assert tunnel.receive(b"HTTP/1.1 200 OK\r\n") is None
    with pytest.raises(Refused):
        tunnel.receive(b"X" * MAX_ANSWER_HEAD)
