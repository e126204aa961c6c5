"""
Sans-IO pieces of the RFB (VNC) protocol that vncmux needs; no I/O, no clocks.

vncmux relays RFB without understanding it, with two exceptions
(docs/protocol.md, docs/sessions.md):

- ``RefusingServer`` answers a refused console as a VNC server that refuses the connection,
  because an RFB security failure is the only refusal noVNC shows its user.
- ``ClientActivityScanner`` watches the client-to-server stream for user input, so the idle
  timeout is not defeated by framebuffer traffic (noVNC requests updates forever).

Message layouts follow the RFB community specification (rfbproto).
"""

from __future__ import annotations

import struct

__all__ = [
    "SECURITY_NONE",
    "SECURITY_VNC_AUTH",
    "VERSION_3_8",
    "VERSION_LENGTH",
    "ClientActivityScanner",
    "RefusingServer",
    "parse_version",
]

#: The greeting of a 3.8 server, the newest version noVNC speaks.
VERSION_3_8 = b"RFB 003.008\n"

#: Length of an RFB ProtocolVersion message.
VERSION_LENGTH = 12

# Security types whose client side the scanner can follow (rfbproto "Security Types").
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2

_U16 = struct.Struct(">H")
_S32 = struct.Struct(">i")
_U32 = struct.Struct(">I")


def parse_version(version: bytes) -> tuple[int, int] | None:
    """``(major, minor)`` of a 12-byte ``RFB xxx.yyy\\n`` ProtocolVersion, None if malformed."""
    if (
        len(version) != VERSION_LENGTH
        or version[:4] != b"RFB "
        or version[7] != 0x2E  # "."
        or version[11] != 0x0A  # "\n"
        or not version[4:7].isdigit()
        or not version[8:11].isdigit()
    ):
        return None
    return int(version[4:7]), int(version[8:11])


def _speaks_3_3(version: tuple[int, int] | None) -> bool:
    """
    Whether the client expects the 3.3 security handshake.

    rfbproto: a server must treat an unknown 3.x below 3.7 as 3.3; 3.7 and later (Apple's
    3.889 too) negotiate a list of security types.
    """
    return version is not None and version[0] == 3 and version[1] < 7


class RefusingServer:
    """
    The server side of an RFB handshake that always fails with a reason.

    Send ``greeting()``, pass every client chunk to ``receive()`` and send what it returns; then
    close. The answer is RFB's own failure message, which noVNC shows as "New connection has
    been rejected with reason: ...".
    """

    __slots__ = ("_buffer", "_done", "_reason")

    def __init__(self, reason: str) -> None:
        # "replace": a reason must never make the refusal itself fail.
        self._reason = reason.encode("utf-8", "replace")
        self._buffer = b""
        self._done = False

    @property
    def done(self) -> bool:
        """True once the failure message was returned; later bytes are ignored."""
        return self._done

    def greeting(self) -> bytes:
        """The server's ProtocolVersion, sent first."""
        return VERSION_3_8

    def receive(self, data: bytes) -> bytes | None:
        """
        Take client bytes; return the failure message once the client's version is complete.

        Returns None until then and ever after: the message is given exactly once. Bytes past
        the 12-byte version are ignored, and never buffered.
        """
        if self._done:
            return None
        buffer = self._buffer + data[: VERSION_LENGTH - len(self._buffer)]
        if len(buffer) < VERSION_LENGTH:
            self._buffer = buffer
            return None
        self._buffer = b""
        self._done = True
        reason = _U32.pack(len(self._reason)) + self._reason
        if _speaks_3_3(parse_version(buffer)):
            # 3.3: the server picks the security type; 0 means "invalid", then the reason.
            return b"\x00\x00\x00\x00" + reason
        # 3.7+ (and anything malformed, for which 3.8 is the best guess): zero security types.
        return b"\x00" + reason


# Scanner phases.
_VERSION = 0  # collecting the client's ProtocolVersion in _head
_SECURITY_TYPE = 1  # 3.7+: the next byte is the client's chosen security type
_MESSAGES = 2  # client messages (the rest of the handshake is a plain skip)
_FALLBACK = 3  # lost track: every non-empty chunk counts as activity

# Client message types, rfbproto "Client to Server Messages".
_SET_PIXEL_FORMAT = 0
_SET_ENCODINGS = 2
_FRAMEBUFFER_UPDATE_REQUEST = 3
_KEY_EVENT = 4
_POINTER_EVENT = 5
_CLIENT_CUT_TEXT = 6
_ENABLE_CONTINUOUS_UPDATES = 150
_CLIENT_FENCE = 248
_XVP = 250
_SET_DESKTOP_SIZE = 251
_QEMU = 255
_QEMU_EXTENDED_KEY_EVENT = 0
_QEMU_AUDIO = 1

# Length of each fixed-size message by type; 0 for variable-size and unknown types.
_FIXED_SIZE = [0] * 256
_FIXED_SIZE[_SET_PIXEL_FORMAT] = 20
_FIXED_SIZE[_FRAMEBUFFER_UPDATE_REQUEST] = 10
_FIXED_SIZE[_KEY_EVENT] = 8
_FIXED_SIZE[_POINTER_EVENT] = 6
_FIXED_SIZE[_ENABLE_CONTINUOUS_UPDATES] = 10
_FIXED_SIZE[_XVP] = 4
_FIXED_INPUT = frozenset((_KEY_EVENT, _POINTER_EVENT))
_TYPE_BYTE = [bytes((t,)) for t in range(256)]

# Bytes to carry over when a header is split: more than the longest header any message needs
# before its length is known (ClientFence, 9), so a completed carry never runs short.
_HEAD_MAX = 12
# Messages counted per step of the run fast path (bounds the copy a step makes).
_RUN_WINDOW = 256

# Sentinels of _measure: need more header bytes / cannot follow this message.
_NEED_MORE = 0
_UNKNOWN = -1


def _measure(buf: bytes, off: int) -> tuple[int, bool]:
    """
    ``(length, is_input)`` of the message that starts at ``buf[off]``.

    The length is the whole message including its payload, which ``buf`` need not hold;
    it is ``_NEED_MORE`` when the header is incomplete and ``_UNKNOWN`` when the message
    cannot be followed.
    """
    avail = len(buf) - off
    kind = buf[off]
    size = _FIXED_SIZE[kind]
    if size:
        return size, kind in _FIXED_INPUT
    if kind == _SET_ENCODINGS:  # U8 type, pad, U16 count, count * S32
        if avail < 4:
            return _NEED_MORE, False
        return 4 + 4 * _U16.unpack_from(buf, off + 2)[0], False
    if kind == _CLIENT_CUT_TEXT:  # U8 type, 3 pad, S32 length (< 0: extended clipboard)
        if avail < 8:
            return _NEED_MORE, False
        return 8 + abs(_S32.unpack_from(buf, off + 4)[0]), True
    if kind == _CLIENT_FENCE:  # U8 type, 3 pad, U32 flags, U8 length, payload
        if avail < 9:
            return _NEED_MORE, False
        return 9 + buf[off + 8], False
    if kind == _SET_DESKTOP_SIZE:  # U8 type, pad, U16 w, U16 h, U8 screens, pad, screens * 16
        if avail < 8:
            return _NEED_MORE, False
        return 8 + 16 * buf[off + 6], False
    if kind == _QEMU:  # U8 type, U8 submessage type, ...
        if avail < 2:
            return _NEED_MORE, False
        subtype = buf[off + 1]
        if subtype == _QEMU_EXTENDED_KEY_EVENT:  # U16 down, U32 keysym, U32 keycode
            return 12, True
        if subtype == _QEMU_AUDIO:  # U16 operation: 0 enable, 1 disable, 2 set format (+6)
            if avail < 4:
                return _NEED_MORE, False
            operation = _U16.unpack_from(buf, off + 2)[0]
            if operation <= 1:
                return 4, False
            if operation == 2:
                return 10, False
    return _UNKNOWN, False


class ClientActivityScanner:
    """
    Tells whether a chunk of the client-to-server RFB stream held user input.

    Input is KeyEvent, PointerEvent, ClientCutText and QEMU Extended Key Event. The rule:
    ``feed(chunk)`` is True when the chunk holds the LAST byte of at least one input message,
    so a message split across chunks counts once, in the chunk that completes it.

    The scanner follows the handshake (ProtocolVersion, the security type chosen under 3.7+,
    the 16-byte VNC-auth response, ClientInit) and then message lengths; it never holds or
    changes the relayed bytes. What it cannot follow (another security type, whose handshake
    depends on the server's side; an unknown message type; garbage) switches it for good to a
    fallback where every non-empty chunk counts as activity, the chunk that switched included:
    an idle timeout that fires late is better than one that cuts off a working user.

    State is a few ints and at most a 12-byte carry; payloads (a large ClientCutText) are
    skipped by counting, never buffered.
    """

    __slots__ = ("_head", "_phase", "_security_3_3", "_skip", "_skip_input")

    def __init__(self, security_type_3_3: int = SECURITY_NONE) -> None:
        """
        ``security_type_3_3``: under RFB 3.3 the server picks the security type and the
        client does not echo it, so the caller says which one the server uses (default None).
        """
        self._security_3_3 = security_type_3_3
        self._phase = _VERSION
        self._head = b""  # a partial ProtocolVersion or message header
        self._skip = 0  # bytes of the current message (or handshake step) still to come
        self._skip_input = False  # whether the skip ends an input message

    @property
    def fallback(self) -> bool:
        """True once the scanner lost track and counts every chunk as activity."""
        return self._phase == _FALLBACK

    def feed(self, data: bytes) -> bool:
        """Scan the next chunk; True if it completed at least one input message."""
        if self._phase == _MESSAGES:
            return self._scan(data, 0)
        if self._phase == _FALLBACK or not data:
            return bool(data)
        return self._handshake(data)

    def _fall_back(self) -> bool:
        """Give up following the stream, for good; the chunk at hand counts as activity."""
        self._phase = _FALLBACK
        self._head = b""
        return True

    def _after_security(self, security_type: int) -> bool:
        """Skip what the client sends after choosing a security type; False if we can't."""
        if security_type == SECURITY_NONE:
            self._skip = 1  # ClientInit
        elif security_type == SECURITY_VNC_AUTH:
            self._skip = 16 + 1  # DES challenge response, ClientInit
        else:
            return False
        self._phase = _MESSAGES
        return True

    def _handshake(self, data: bytes) -> bool:
        """Take the version (and the 3.7+ security type byte), then scan what follows."""
        pos = 0
        if self._phase == _VERSION:
            head = self._head + data[: VERSION_LENGTH - len(self._head)]
            if len(head) < VERSION_LENGTH:
                self._head = head
                return False
            pos = VERSION_LENGTH - len(self._head)
            self._head = b""
            version = parse_version(head)
            if version is None or version[0] != 3:
                return self._fall_back()
            if not _speaks_3_3(version):
                self._phase = _SECURITY_TYPE
            elif not self._after_security(self._security_3_3):
                return self._fall_back()
        if self._phase == _SECURITY_TYPE:
            if pos == len(data):
                return False
            if not self._after_security(data[pos]):
                return self._fall_back()
            pos += 1
        return self._scan(data, pos)

    def _scan(self, data: bytes, pos: int) -> bool:
        """Follow client messages from ``data[pos]``, in jumps of whole messages."""
        n = len(data)
        active = False
        if self._skip:
            left = n - pos
            if self._skip > left:
                self._skip -= left
                return False
            pos += self._skip
            self._skip = 0
            active = self._skip_input
        if self._head and pos < n:
            head = self._head
            buf = head + data[pos : pos + _HEAD_MAX]
            size, is_input = _measure(buf, 0)
            if size == _NEED_MORE:  # only when all of data went into buf
                self._head = buf
                return active
            if size == _UNKNOWN:
                return self._fall_back()
            self._head = b""
            pos += size - len(head)
            if pos > n:
                self._skip = pos - n
                self._skip_input = is_input
                return active
            active = active or is_input
        fixed_size = _FIXED_SIZE
        fixed_input = _FIXED_INPUT
        while pos < n:
            kind = data[pos]
            size = fixed_size[kind]
            if size:
                end = pos + size
                if end < n and data[end] == kind:
                    # A burst of one fixed-size message (noVNC's pointer moves, update
                    # requests): count the run with C-level slicing, not one step each.
                    type_byte = _TYPE_BYTE[kind]
                    while True:
                        window = data[end : end + size * _RUN_WINDOW : size]
                        count = len(window) - len(window.lstrip(type_byte))
                        end += count * size
                        if count < _RUN_WINDOW:
                            break
                is_input = kind in fixed_input
            else:
                size, is_input = _measure(data, pos)
                if size == _NEED_MORE:
                    self._head = data[pos:]
                    return active
                if size == _UNKNOWN:
                    return self._fall_back()
                end = pos + size
            if end > n:
                # The last message goes on in the next chunk; the ones before it completed.
                self._skip = end - n
                self._skip_input = is_input
                return active or (is_input and end - size > pos)
            active = active or is_input
            pos = end
        return active
