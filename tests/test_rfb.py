"""Tests for vncmux.rfb: the refusing RFB server and the client activity scanner."""

from __future__ import annotations

import struct
import time

from hypothesis import given
from hypothesis import strategies as st

from vncmux.rfb import SECURITY_VNC_AUTH, ClientActivityScanner, RefusingServer

V38 = b"RFB 003.008\n"
V37 = b"RFB 003.007\n"
V33 = b"RFB 003.003\n"


def refusal(reason: bytes, three_three: bool = False) -> bytes:
    """The failure message rfbproto prescribes, built by hand."""
    head = b"\x00\x00\x00\x00" if three_three else b"\x00"
    return head + struct.pack(">I", len(reason)) + reason


# RefusingServer


def test_greeting_is_rfb_3_8() -> None:
    """The refusing server greets as a 3.8 server."""
    assert RefusingServer("x").greeting() == b"RFB 003.008\n"


def test_refuses_3_8_with_zero_security_types() -> None:
    """A 3.8 client gets zero security types, then the reason."""
    server = RefusingServer("token expired")
    assert not server.done
    assert server.receive(V38) == refusal(b"token expired")
    assert server.done


def test_refuses_3_7_with_zero_security_types() -> None:
    """A 3.7 client gets the same form as 3.8."""
    assert RefusingServer("invalid token").receive(V37) == refusal(b"invalid token")


def test_refuses_apple_3_889_like_3_8() -> None:
    """Any minor version from 7 up (Apple's 3.889) gets the 3.7+ form."""
    assert RefusingServer("r").receive(b"RFB 003.889\n") == refusal(b"r")


def test_refuses_3_3_with_invalid_security_type() -> None:
    """A 3.3 client gets U32 security type 0 (invalid), then the reason."""
    assert RefusingServer("bad request").receive(V33) == refusal(b"bad request", True)


def test_refuses_unknown_3_x_below_7_like_3_3() -> None:
    """rfbproto: an unknown 3.x below 3.7 is treated as 3.3."""
    assert RefusingServer("r").receive(b"RFB 003.005\n") == refusal(b"r", True)


def test_refuses_malformed_version_like_3_8() -> None:
    """A version that does not parse gets the 3.8 form anyway."""
    assert RefusingServer("r").receive(b"GET / HTTP/1") == refusal(b"r")
    assert RefusingServer("r").receive(b"RFB 00x.003\n") == refusal(b"r")


def test_version_split_across_chunks() -> None:
    """The answer waits for the 12th byte, however the version is split."""
    server = RefusingServer("too many sessions")
    for byte in V33[:-1]:
        assert server.receive(bytes((byte,))) is None
        assert not server.done
    assert server.receive(b"") is None
    assert server.receive(b"\n") == refusal(b"too many sessions", True)


def test_bytes_after_version_ignored() -> None:
    """Bytes after the version, in the same chunk or later, change nothing."""
    server = RefusingServer("r")
    assert server.receive(V33 + b"\x01" * 1000) == refusal(b"r", True)
    assert server.receive(b"more") is None


def test_answer_given_exactly_once() -> None:
    """Once answered, the server returns None for every later chunk."""
    server = RefusingServer("r")
    assert server.receive(V38) is not None
    assert server.receive(V38) is None
    assert server.receive(b"") is None
    assert server.done


def test_reason_is_utf8() -> None:
    """The reason is UTF-8 and its length is counted in bytes, not characters."""
    encoded = "Konsole nicht erreichbar: Zeitüberschreitung ⏱".encode()
    assert RefusingServer(encoded.decode()).receive(V38) == refusal(encoded)


# Messages, built by hand from rfbproto.


def set_pixel_format() -> bytes:
    """SetPixelFormat for 32-bit true colour, as noVNC sends it."""
    return b"\x00\x00\x00\x00" + bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16]) + bytes(3)


def set_encodings(encodings: list[int]) -> bytes:
    """SetEncodings with the given S32 encodings."""
    return struct.pack(">BxH", 2, len(encodings)) + struct.pack(f">{len(encodings)}i", *encodings)


def update_request(incremental: int = 1) -> bytes:
    """FramebufferUpdateRequest for a 1024x768 screen."""
    return struct.pack(">BBHHHH", 3, incremental, 0, 0, 1024, 768)


def key_event(down: int = 1, keysym: int = 0x61) -> bytes:
    """KeyEvent."""
    return struct.pack(">BBxxI", 4, down, keysym)


def pointer_event(mask: int = 0, x: int = 10, y: int = 20) -> bytes:
    """PointerEvent."""
    return struct.pack(">BBHH", 5, mask, x, y)


def cut_text(payload: bytes, extended: bool = False) -> bytes:
    """ClientCutText; the extended form carries a negative length."""
    length = -len(payload) if extended else len(payload)
    return struct.pack(">Bxxxi", 6, length) + payload


def qemu_key(down: int = 1, keysym: int = 0x61, keycode: int = 0x1E) -> bytes:
    """QEMU Extended Key Event."""
    return struct.pack(">BBHII", 255, 0, down, keysym, keycode)


def qemu_audio(operation: int, sample_format: int = 3, channels: int = 2) -> bytes:
    """QEMU Audio Client Message: enable (0), disable (1) or set format (2)."""
    head = struct.pack(">BBH", 255, 1, operation)
    if operation == 2:
        return head + struct.pack(">BBI", sample_format, channels, 44100)
    return head


def continuous_updates(enable: int = 1) -> bytes:
    """EnableContinuousUpdates."""
    return struct.pack(">BBHHHH", 150, enable, 0, 0, 1024, 768)


def fence(payload: bytes = b"") -> bytes:
    """ClientFence."""
    return struct.pack(">BxxxIB", 248, 1 << 31, len(payload)) + payload


def xvp(code: int = 3) -> bytes:
    """xvp Client Message (reboot)."""
    return bytes([250, 0, 1, code])


def set_desktop_size(screens: int = 1) -> bytes:
    """SetDesktopSize with the given number of screens."""
    head = struct.pack(">BxHHBx", 251, 1280, 800, screens)
    return head + struct.pack(">IHHHHI", 1, 0, 0, 1280, 800, 0) * screens


NOVNC_ENCODINGS = [7, 16, 5, 6, 1, 0, -256, -223, -224, -239, -307, -308, -309, -312, -313, -258]
NOVNC_SETUP = (
    V38
    + b"\x01"  # security type None
    + b"\x01"  # ClientInit, shared
    + set_pixel_format()
    + set_encodings(NOVNC_ENCODINGS)
)


def test_novnc_session_framebuffer_traffic_is_not_activity() -> None:
    """Handshake, pixel format, encodings and update requests are no input."""
    scanner = ClientActivityScanner()
    assert scanner.feed(V38) is False
    assert scanner.feed(b"\x01") is False
    assert scanner.feed(b"\x01") is False
    assert scanner.feed(set_pixel_format()) is False
    assert scanner.feed(set_encodings(NOVNC_ENCODINGS)) is False
    assert scanner.feed(update_request(0)) is False
    for _ in range(200):
        assert scanner.feed(update_request()) is False
    assert scanner.feed(update_request() * 300) is False
    assert scanner.feed(continuous_updates() + fence(b"abc") + set_desktop_size(2)) is False
    assert scanner.feed(xvp() + qemu_audio(2) + qemu_audio(0) + qemu_audio(1)) is False
    assert not scanner.fallback


def test_novnc_session_input_is_activity() -> None:
    """Each kind of input message, alone or among update requests, is activity."""
    scanner = ClientActivityScanner()
    assert scanner.feed(NOVNC_SETUP + update_request(0)) is False
    for message in (
        key_event(),
        pointer_event(),
        cut_text(b"hello"),
        cut_text(b""),
        qemu_key(),
        update_request() + pointer_event(1) * 40 + update_request(),
    ):
        assert scanner.feed(message) is True
        assert scanner.feed(update_request()) is False
    assert not scanner.fallback


def test_whole_session_in_one_chunk() -> None:
    """Handshake and input in one chunk: the input is still found."""
    assert ClientActivityScanner().feed(NOVNC_SETUP + key_event()) is True
    assert ClientActivityScanner().feed(NOVNC_SETUP + update_request()) is False


def test_input_split_counts_in_completing_chunk() -> None:
    """A split input message counts in the chunk that holds its last byte, only there."""
    scanner = ClientActivityScanner()
    scanner.feed(NOVNC_SETUP)
    message = qemu_key()
    assert scanner.feed(message[:1]) is False
    assert scanner.feed(message[1:5]) is False
    assert scanner.feed(message[5:] + update_request()) is True
    assert scanner.feed(update_request()) is False


def test_vnc_auth_response_is_skipped() -> None:
    """With VNC auth (type 2) the 16-byte DES response is skipped, not parsed."""
    scanner = ClientActivityScanner()
    # A response made of KeyEvent type bytes would read as input if it were parsed.
    assert scanner.feed(V38 + b"\x02" + b"\x04" * 10) is False
    assert scanner.feed(b"\x04" * 6 + b"\x01" + update_request()) is False
    assert scanner.feed(key_event()) is True
    assert not scanner.fallback


def test_rfb_3_3_handshake_assumes_security_none() -> None:
    """Under 3.3 the client sends no security type: ClientInit follows the version."""
    scanner = ClientActivityScanner()
    assert scanner.feed(V33 + b"\x01" + set_pixel_format() + update_request()) is False
    assert scanner.feed(pointer_event()) is True
    assert not scanner.fallback


def test_rfb_3_3_with_vnc_auth_when_told() -> None:
    """Under 3.3 the caller can say that the server chose VNC auth."""
    scanner = ClientActivityScanner(security_type_3_3=SECURITY_VNC_AUTH)
    assert scanner.feed(V33 + b"\x05" * 16 + b"\x01" + update_request()) is False
    assert scanner.feed(pointer_event()) is True
    assert not scanner.fallback


def test_unknown_3_x_below_7_follows_3_3() -> None:
    """3.5 (unknown, below 3.7) is followed as 3.3."""
    scanner = ClientActivityScanner()
    assert scanner.feed(b"RFB 003.005\n\x01" + update_request()) is False
    assert scanner.feed(key_event()) is True


def test_version_split_byte_by_byte() -> None:
    """The version and security type may arrive one byte at a time."""
    scanner = ClientActivityScanner()
    for byte in NOVNC_SETUP:
        assert scanner.feed(bytes((byte,))) is False
    assert scanner.feed(b"") is False
    assert scanner.feed(key_event()) is True
    assert not scanner.fallback


def test_other_security_type_falls_back() -> None:
    """VeNCrypt (19) cannot be followed: every non-empty chunk is activity from then on."""
    scanner = ClientActivityScanner()
    assert scanner.feed(V38) is False
    assert scanner.feed(b"\x13") is True
    assert scanner.fallback
    assert scanner.feed(update_request()) is True
    assert scanner.feed(b"") is False


def test_malformed_version_falls_back() -> None:
    """A client that is not speaking RFB puts the scanner in fallback."""
    scanner = ClientActivityScanner()
    assert scanner.feed(b"GET / HTTP/1.1\r\n") is True
    assert scanner.fallback


def test_unknown_message_type_falls_back() -> None:
    """An unknown message type switches to fallback for good."""
    scanner = ClientActivityScanner()
    assert scanner.feed(NOVNC_SETUP) is False
    assert scanner.feed(update_request() + b"\x07" + bytes(20)) is True
    assert scanner.fallback
    assert scanner.feed(update_request()) is True
    assert scanner.feed(b"") is False


def test_unknown_qemu_submessage_falls_back() -> None:
    """QEMU submessages other than key (0) and audio (1), and unknown audio ops, fall back."""
    for message in (b"\xff\x02" + bytes(10), qemu_audio(3)):
        scanner = ClientActivityScanner()
        scanner.feed(NOVNC_SETUP)
        assert scanner.feed(message) is True
        assert scanner.fallback


def test_negative_cut_text_length_is_extended_clipboard() -> None:
    """A negative ClientCutText length means abs(length) bytes follow (extended clipboard)."""
    scanner = ClientActivityScanner()
    scanner.feed(NOVNC_SETUP)
    # Payload of PointerEvent type bytes: if it were parsed, it would be misread as input.
    message = cut_text(b"\x05" * 300, extended=True)
    assert scanner.feed(message[:100]) is False
    assert scanner.feed(message[100:] + update_request()) is True
    assert scanner.feed(update_request()) is False
    assert not scanner.fallback


def test_huge_cut_text_split_across_chunks() -> None:
    """A 10 MiB paste is skipped by counting; it is activity once, where it ends."""
    scanner = ClientActivityScanner()
    scanner.feed(NOVNC_SETUP)
    size = 10 * 1024 * 1024
    assert scanner.feed(struct.pack(">Bxxxi", 6, size)[:5]) is False
    assert scanner.feed(struct.pack(">Bxxxi", 6, size)[5:]) is False
    chunk = b"\x05" * 65536
    for _ in range(size // len(chunk) - 1):
        assert scanner.feed(chunk) is False
    assert scanner.feed(chunk + update_request()) is True
    assert scanner.feed(update_request()) is False
    assert not scanner.fallback


def test_header_split_in_every_place() -> None:
    """Variable-length headers split at any byte are carried over correctly."""
    messages = [
        (set_encodings([0, 1, -239] * 7), False),
        (fence(b"xyz"), False),
        (set_desktop_size(3), False),
        (qemu_audio(2), False),
        (qemu_audio(0), False),
        (cut_text(b"abc", extended=True), True),
        (qemu_key(), True),
    ]
    for message, is_input in messages:
        for cut in range(1, len(message)):
            scanner = ClientActivityScanner()
            scanner.feed(NOVNC_SETUP)
            assert scanner.feed(message[:cut]) is False
            assert scanner.feed(message[cut:] + update_request()) is is_input
            assert scanner.feed(pointer_event()) is True
            assert not scanner.fallback


def test_64k_burst_of_pointer_events() -> None:
    """A 64 KiB chunk of PointerEvents is input, and the scanner stays in step after it."""
    scanner = ClientActivityScanner()
    scanner.feed(NOVNC_SETUP)
    burst = pointer_event(1) * (65536 // 6 + 1)
    chunk, rest = burst[:65536], burst[65536:]
    start = time.perf_counter()
    assert scanner.feed(chunk) is True
    elapsed = time.perf_counter() - start
    print(f"64 KiB of PointerEvents scanned in {elapsed * 1e6:.0f} us")
    assert scanner.feed(rest) is True  # completes the split last event
    assert scanner.feed(update_request() * 6000) is False
    assert scanner.feed(key_event()) is True
    assert not scanner.fallback


# Hypothesis: random valid sessions, random chunking, against a reference model.

_u8 = st.integers(0, 255)
_u16 = st.integers(0, 0xFFFF)
_s32 = st.integers(-(2**31), 2**31 - 1)


def _noise(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


_non_input = st.one_of(
    st.builds(lambda rest: b"\x00" + rest, _noise(19)),
    st.builds(set_encodings, st.lists(_s32, max_size=40)),
    st.builds(lambda rest: b"\x03" + rest, _noise(9)),
    st.builds(lambda rest: b"\x96" + rest, _noise(9)),
    st.builds(fence, st.binary(max_size=255)),
    st.builds(lambda rest: b"\xfa" + rest, _noise(3)),
    st.builds(set_desktop_size, st.integers(0, 8)),
    st.builds(qemu_audio, st.integers(0, 2), _u8, _u8),
)
_input = st.one_of(
    st.builds(lambda rest: b"\x04" + rest, _noise(7)),
    st.builds(lambda rest: b"\x05" + rest, _noise(5)),
    st.builds(cut_text, st.binary(max_size=600), st.booleans()),
    st.builds(qemu_key, _u16, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
_message = st.one_of(
    st.tuples(_non_input, st.just(False)),
    st.tuples(_input, st.just(True)),
)
# Bursts long enough to cross the scanner's run window (256 messages).
_burst = st.builds(
    lambda message, count: [message] * count,
    st.sampled_from([(pointer_event(1), True), (key_event(), True), (update_request(), False)]),
    st.integers(1, 700),
)
_messages = st.lists(st.one_of(_message.map(lambda m: [m]), _burst), max_size=40).map(
    lambda groups: [m for group in groups for m in group]
)
_handshakes = st.sampled_from(
    [
        (V38 + b"\x01\x01", 1),
        (V38 + b"\x02" + bytes(range(16)) + b"\x00", 1),
        (V37 + b"\x01\x00", 1),
        (b"RFB 003.889\n\x01\x01", 1),
        (V33 + b"\x01", 1),
        (V33 + b"\x04" * 16 + b"\x01", SECURITY_VNC_AUTH),
    ]
)


@st.composite
def _chunked(draw: st.DrawFn, stream: bytes) -> list[tuple[int, int]]:
    """Random cut points over a stream, as (start, stop) ranges; empty chunks allowed."""
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=60))
    bounds = [0, *sorted(cuts), len(stream)]
    return list(zip(bounds, bounds[1:], strict=False))


@st.composite
def _sessions(draw: st.DrawFn) -> tuple[bytes, int, list[int], list[tuple[int, int]]]:
    handshake, security_3_3 = draw(_handshakes)
    messages = draw(_messages)
    stream = bytearray(handshake)
    input_ends = []
    for message, is_input in messages:
        stream += message
        if is_input:
            input_ends.append(len(stream))
    stream = bytes(stream)
    return stream, security_3_3, input_ends, draw(_chunked(stream))


@given(_sessions())
def test_activity_matches_reference_model(
    session: tuple[bytes, int, list[int], list[tuple[int, int]]],
) -> None:
    """
    For valid sessions chunked at random, a chunk is active exactly when it holds the last
    byte of some input message, and the scanner never falls back.
    """
    stream, security_3_3, input_ends, chunks = session
    scanner = ClientActivityScanner(security_type_3_3=security_3_3)
    got = [scanner.feed(stream[start:stop]) for start, stop in chunks]
    expected = [any(start < end <= stop for end in input_ends) for start, stop in chunks]
    assert got == expected
    assert not scanner.fallback


@given(st.lists(st.binary(max_size=64)), st.sampled_from([b"", NOVNC_SETUP]))
def test_garbage_never_raises(chunks: list[bytes], prefix: bytes) -> None:
    """Random bytes, after a valid handshake or instead of one, never raise."""
    scanner = ClientActivityScanner()
    scanner.feed(prefix)
    for chunk in chunks:
        was_fallback = scanner.fallback
        result = scanner.feed(chunk)
        assert result is True or result is False
        if was_fallback:
            assert result is bool(chunk)


@given(st.binary(max_size=40), st.lists(st.integers(0, 40), max_size=5))
def test_refusing_server_answers_once_for_any_chunking(data: bytes, cuts: list[int]) -> None:
    """However the client's bytes are chunked, exactly one answer comes, after 12 bytes."""
    server = RefusingServer("r")
    bounds = [0, *sorted(cuts), len(data)]
    answers = [server.receive(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    given_answers = [a for a in answers if a is not None]
    assert len(given_answers) == (1 if len(data) >= 12 else 0)
    assert server.done is (len(data) >= 12)
