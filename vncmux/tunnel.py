"""
Nova's ``internal_access_path``, sans-IO: a console reached through an HTTP CONNECT tunnel on
its compute host, which must answer 200 before the console protocol starts.

Nova (``nova/console/websocketproxy.py``) sends ``CONNECT <path> HTTP/1.1`` and a blank line,
then accepts any answer whose status line contains "200". vncmux differs in three places:
it sends the ``Host`` header HTTP/1.1 requires, it accepts only the status code 200 itself
(not a 404 whose reason mentions 200), and it bounds the answer's head (nova reads until a
blank line comes, however long that takes). The path is never logged: nova's paths have held
session references.
"""

from __future__ import annotations

from vncmux.refusals import CONSOLE_UNREACHABLE, Refused

#: Longest answer head read from a tunnel endpoint.
MAX_ANSWER_HEAD = 8192
#: Longest part of a status line quoted in the operator's log.
_QUOTED_STATUS = 80


class ConnectTunnel:
    """Send L{request}, feed the answer to L{receive} until it returns the console's bytes."""

    def __init__(self, path: str, host: str) -> None:
        if any(c in path for c in " \r\n") or any(c in host for c in " \r\n"):
            raise ValueError("a tunnel path or host with white space")
        self._request = f"CONNECT {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        self._head = b""

    def request(self) -> bytes:
        return self._request

    def receive(self, data: bytes) -> bytes | None:
        """
        Take the endpoint's bytes: None while its answer is incomplete, then what followed the
        answer (the start of the console protocol). A refusal raises L{Refused} (4502).
        """
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_ANSWER_HEAD:
                raise Refused(
                    CONSOLE_UNREACHABLE, f"tunnel answer head over {MAX_ANSWER_HEAD} bytes"
                )
            self._head = head
            return None
        self._head = b""
        status_line = head[: head.find(b"\r\n")]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or parts[1] != b"200":
            quoted = status_line[:_QUOTED_STATUS].decode("latin-1")
            raise Refused(CONSOLE_UNREACHABLE, f"tunnel answered {quoted!r}, not 200")
        return head[end + 4 :]
