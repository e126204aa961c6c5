"""Plain HTTP on the console port: the noVNC files from ``--web``, else 404.

Only GET and HEAD of regular files below the web root; no listings, no autobahn status page.
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import posixpath
from urllib.parse import unquote, urlsplit

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request"}


def http_response(status: int, body: bytes, headers: dict[str, str], head: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection afterwards."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    all_headers = {
        "Content-Length": str(len(body)),
        "Connection": "close",
        "X-Content-Type-Options": "nosniff",
        **headers,
    }
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def _plain(status: int, head: bool = False, extra: dict[str, str] | None = None) -> bytes:
    body = f"{status} {_REASONS[status]}\n".encode()
    headers = {"Content-Type": "text/plain; charset=utf-8", **(extra or {})}
    return http_response(status, body, headers, head)


class StaticFiles:
    """Serves regular files below C{root}; C{root} of None serves nothing (404 for all)."""

    def __init__(self, root: str | None, index: str = "vnc.html") -> None:
        self.root = os.path.realpath(root) if root else None
        self.index = index

    def respond(self, method: str, target: str) -> bytes:
        """The full HTTP response to a non-upgrade request for C{target}."""
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _plain(405, extra={"Allow": "GET, HEAD"})
        path = self._resolve(target)
        if path is None:
            return _plain(404, head)
        try:
            mtime = os.stat(path).st_mtime
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            return _plain(404, head)
        ext = os.path.splitext(path)[1].lower()
        content_type = (
            _TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"
        )
        headers = {
            "Content-Type": content_type,
            "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
            "Cache-Control": "no-cache",
        }
        return http_response(200, body, headers, head)

    def _resolve(self, target: str) -> str | None:
        if self.root is None:
            return None
        path = unquote(urlsplit(target).path)
        if "\0" in path:
            return None
        relative = posixpath.normpath("/" + path).lstrip("/")
        if relative in ("", "."):
            relative = self.index
        full = os.path.realpath(os.path.join(self.root, relative))
        if not (full == self.root or full.startswith(self.root + os.sep)):
            return None
        return full if os.path.isfile(full) else None
