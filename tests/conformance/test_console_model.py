"""
Hypothesis drives the real ConsoleProtocol (through the in-memory harness) with random client
frame sequences and random read splits, and compares what happens with a small reference model
of RFC 6455 for a binary relay.

A sequence is binary frames (whole messages and fragments, empty ones included), pings and
pongs, then optionally a close or one frame that breaks the protocol followed by a few more
frames. The model says what must happen: every payload byte of every data frame before the
first violation reaches the VNC server once and in order; every ping before it gets its pong;
a violation fails the connection with the RFC's code (1003 for text, 1007 for a close reason
that is not UTF-8, 1002 otherwise) and nothing after it is processed; a close is answered
with its own code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import ConformanceCase, Harness
from tests.conformance.wsframes import (
    BINARY,
    CLOSE,
    CONTINUATION,
    LONG,
    MEDIUM,
    PING,
    PONG,
    SHORT,
    TEXT,
    close_payload,
    frame,
    split_at,
)

PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
VALID_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)
INVALID_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
RESERVED_OPCODES = (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
#: The most pings one sequence sends (the proxy may rate-limit pongs beyond a burst of 20).
MAX_PINGS = 20


@dataclass(frozen=True)
class Spec:
    """One client frame, described so the model can judge it."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length_form: int | None = None
    declared_length: int | None = None

    def __repr__(self) -> str:
        fields = [f"op={self.opcode}", f"{len(self.payload)}B {self.payload[:8]!r}"]
        fields += [] if self.fin else ["fin=0"]
        fields += [f"rsv={self.rsv}"] if self.rsv else []
        fields += [] if self.masked else ["unmasked"]
        fields += [f"form={self.length_form}"] if self.length_form is not None else []
        fields += [f"declared={self.declared_length}"] if self.declared_length is not None else []
        return f"Spec({', '.join(fields)})"

    def encode(self) -> bytes:
        return frame(
            self.payload,
            self.opcode,
            fin=self.fin,
            rsv=self.rsv,
            mask=None if not self.masked else b"\x9a\x01\x55\xe3",
            length_form=self.length_form,
            declared_length=self.declared_length,
        )


@dataclass(frozen=True)
class Outcome:
    """What the model expects: bytes relayed, pongs, and how the connection ends."""

    relayed: bytes
    pongs: list[bytes]
    #: The proxy fails the connection with this code (None: it does not).
    failure: int | None = None
    #: The client closed with this close payload, validly (None: it did not).
    close: bytes | None = None


def _minimal(length: int) -> int:
    return SHORT if length < 126 else MEDIUM if length < 65536 else LONG


def _violation(spec: Spec, in_message: bool) -> int | None:
    """The close code a conforming binary relay fails with at C{spec}, if any."""
    length = len(spec.payload) if spec.declared_length is None else spec.declared_length
    if spec.rsv or not spec.masked or spec.opcode in RESERVED_OPCODES:
        return PROTOCOL_ERROR
    if length >= 2**63:
        return PROTOCOL_ERROR
    if spec.length_form is not None and spec.length_form != _minimal(length):
        return PROTOCOL_ERROR
    if spec.opcode >= CLOSE:
        if not spec.fin or length > 125:
            return PROTOCOL_ERROR
        if spec.opcode == CLOSE:
            return _close_violation(spec.payload)
        return None
    if spec.opcode == CONTINUATION and not in_message:
        return PROTOCOL_ERROR
    if spec.opcode != CONTINUATION and in_message:
        return PROTOCOL_ERROR
    if spec.opcode == TEXT:
        return UNSUPPORTED_DATA
    return None


def _close_violation(payload: bytes) -> int | None:
    if len(payload) == 1:
        return PROTOCOL_ERROR
    if len(payload) >= 2:
        (code,) = struct.unpack("!H", payload[:2])
        if not (1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999):
            return PROTOCOL_ERROR
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return INVALID_PAYLOAD
    return None


def reference(specs: list[Spec]) -> Outcome:
    """RFC 6455 for a binary relay, frame by frame, until the first close or violation."""
    relayed = b""
    pongs: list[bytes] = []
    in_message = False
    for spec in specs:
        code = _violation(spec, in_message)
        if code is not None:
            return Outcome(relayed, pongs, failure=code)
        if spec.opcode == CLOSE:
            return Outcome(relayed, pongs, close=spec.payload)
        if spec.opcode == PING:
            pongs.append(spec.payload)
        elif spec.opcode in (BINARY, CONTINUATION):
            relayed += spec.payload
            in_message = not spec.fin
    return Outcome(relayed, pongs)


_sizes = st.one_of(st.integers(0, 40), st.sampled_from([125, 126, 127, 300, 65535, 65536]))


@st.composite
def _payloads(draw: st.DrawFn, max_size: int | None = None) -> bytes:
    size = draw(_sizes if max_size is None else st.integers(0, max_size))
    seed = draw(st.binary(min_size=1, max_size=8))
    return (seed * (size // len(seed) + 1))[:size]


def _over_125(payload: bytes) -> bool:
    return len(payload) > 125


def _violations(in_message: bool) -> st.SearchStrategy[Spec]:
    data_opcode = CONTINUATION if in_message else BINARY
    return st.one_of(
        st.builds(Spec, st.just(data_opcode), _payloads(), rsv=st.integers(1, 7)),
        st.builds(Spec, st.sampled_from(RESERVED_OPCODES), _payloads(20)),
        st.builds(Spec, st.sampled_from([data_opcode, PING]), _payloads(20), masked=st.just(False)),
        st.builds(Spec, st.just(data_opcode), _payloads(125), length_form=st.just(MEDIUM)),
        st.builds(Spec, st.just(data_opcode), _payloads(200), length_form=st.just(LONG)),
        st.builds(
            Spec,
            st.just(data_opcode),
            declared_length=st.integers(2**63, 2**64 - 1),
            length_form=st.just(LONG),
        ),
        st.builds(Spec, st.sampled_from([PING, PONG]), _payloads(20), fin=st.just(False)),
        st.builds(
            Spec, st.sampled_from([PING, PONG, CLOSE]), st.binary(min_size=126, max_size=130)
        ),
        st.builds(Spec, st.just(CONTINUATION if not in_message else BINARY), _payloads(20)),
        st.builds(Spec, st.just(TEXT), st.text(max_size=20).map(str.encode)),
        st.builds(
            Spec,
            st.just(CLOSE),
            st.one_of(
                st.binary(min_size=1, max_size=1),
                st.sampled_from(INVALID_CLOSE_CODES).map(close_payload),
                st.just(close_payload(1000, b"\xed\xa0\x80 not utf-8")),
            ),
        ),
    )


@st.composite
def client_streams(draw: st.DrawFn) -> list[Spec]:
    """A plausible client: data and control frames, then maybe a close or a violation."""
    specs: list[Spec] = []
    in_message = False
    pings = 0
    for _ in range(draw(st.integers(0, 12))):
        step = draw(st.sampled_from(["data", "data", "data", "ping", "pong"]))
        if step == "data":
            fin = draw(st.booleans())
            specs.append(Spec(CONTINUATION if in_message else BINARY, draw(_payloads()), fin))
            in_message = not fin
        elif step == "ping" and pings < MAX_PINGS:
            pings += 1
            specs.append(Spec(PING, draw(_payloads(125))))
        else:
            specs.append(Spec(PONG, draw(_payloads(125))))
    ending = draw(st.sampled_from(["open", "close", "violation", "violation"]))
    if ending == "close":
        code = draw(st.one_of(st.none(), st.sampled_from(VALID_CLOSE_CODES)))
        reason = draw(st.text(max_size=10).map(str.encode)) if code is not None else b""
        specs.append(Spec(CLOSE, close_payload(code, reason)))
    elif ending == "violation":
        specs.append(draw(_violations(in_message)))
    if ending != "open":
        # What follows a close or a violation must be ignored.
        specs += draw(st.lists(st.builds(Spec, st.just(BINARY), _payloads(20)), max_size=2))
    return specs


@dataclass(frozen=True)
class ClientRun:
    """A client stream and where its reads end (None: one byte per read)."""

    specs: list[Spec]
    cuts: list[int] | None

    def reads(self) -> list[bytes]:
        data = b"".join(s.encode() for s in self.specs)
        if self.cuts is None:
            return [data[i : i + 1] for i in range(len(data))]
        return split_at(data, self.cuts)


@st.composite
def client_runs(draw: st.DrawFn) -> ClientRun:
    """A client stream cut into reads at random places, or (when short) byte by byte."""
    specs = draw(client_streams())
    size = sum(len(s.encode()) for s in specs)
    if size < 4000 and draw(st.integers(0, 9)) == 0:
        return ClientRun(specs, None)
    return ClientRun(specs, draw(st.lists(st.integers(0, size), max_size=12)))


class ConsoleModelTests(ConformanceCase, SynchronousTestCase):
    """ConsoleProtocol against the reference model, on random streams and read splits."""

    def setUp(self) -> None:
        """Each example builds its own harness."""

    @settings(max_examples=200, report_multiple_bugs=False)
    @given(client_runs())
    def test_matches_reference(self, run: ClientRun) -> None:
        """Every byte of every binary frame before the first violation reaches the VNC server
        once and in order, every ping gets its pong, and the connection ends as the model says."""
        expected = reference(run.specs)
        self.h = Harness()
        try:
            self.h.open()
            self.h.send(run.reads())
            assert self.h.pongs() == expected.pongs, (self.h.pongs(), expected.pongs)
            if expected.failure is not None:
                self.assertFailed(expected.failure, expected.relayed)
            elif expected.close is not None:
                code = struct.unpack("!H", expected.close[:2])[0] if expected.close else None
                self.assertClientCloseAnswered({code} if code else {None, 1000}, expected.relayed)
            else:
                self.assertRelaying(expected.relayed)
            self.assertNothingLogged()
        finally:
            self.h.deliver_losses()
            self.h.stop()

    def test_reference_model(self) -> None:
        """The model itself, on the cases the suite ports by hand."""
        hello = Spec(BINARY, b"hello")
        assert reference([hello, Spec(PING, b"p")]) == Outcome(b"hello", [b"p"])
        assert reference([Spec(BINARY, b"a", fin=False), Spec(CONTINUATION, b"b")]).relayed == b"ab"
        assert reference([hello, Spec(BINARY, b"x", rsv=1), hello]).failure == PROTOCOL_ERROR
        assert reference([Spec(CONTINUATION, b"x")]).failure == PROTOCOL_ERROR
        assert reference([Spec(TEXT, b"x")]).failure == UNSUPPORTED_DATA
        assert reference([Spec(CLOSE, close_payload(5000))]).failure == PROTOCOL_ERROR
        assert reference([Spec(CLOSE, close_payload(4999))]).close == close_payload(4999)
        assert reference([Spec(CLOSE, b"\x03\xe8\xff")]).failure == INVALID_PAYLOAD
        long_form = Spec(BINARY, b"x" * 200, length_form=LONG)
        assert reference([hello, long_form]) == Outcome(b"hello", [], PROTOCOL_ERROR)
        assert reference([Spec(BINARY, b"x" * 126, length_form=MEDIUM)]).relayed == b"x" * 126
