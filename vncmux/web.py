"""Plain HTTP on the console port: the noVNC files from ``--web`` (twisted.web), else 404.

A request without an ``Upgrade`` header is handed over to a twisted.web L{WebSite}: files are
streamed with a producer (never read whole), with Range, Last-Modified/ETag and HEAD as
twisted.web does them. No listings, no access log (a page's query may carry a token), no
``Server`` header, and every connection has a deadline (``--web-timeout``) after which it is
cut, whatever it is doing: a client that reads one byte a second holds nothing for long.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from twisted.web.static import File

from vncmux.handshake import IPNetwork, is_trusted, request_scheme

#: Lifetime of the ``token`` cookie set for a page opened with ``?token=``: just long
#: enough for the page to open its WebSocket.
TOKEN_COOKIE_MAX_AGE = 60
#: Characters a token (and the WebSocket path) may have to go into a cookie unquoted
#: (RFC 6265 cookie-octet, and path characters without ``;``).
_COOKIE_SAFE = re.compile(r"[A-Za-z0-9!#$%&'()*+\-./:<=>?@\[\]^_`{|}~]+")
_PATH_SAFE = re.compile(r"[A-Za-z0-9._~/-]*")
#: noVNC's default WebSocket path (its ``path`` setting), relative to the site's root.
NOVNC_DEFAULT_PATH = "websockify"
#: The page access URLs open: noVNC's lite client, or vncmux's own page over noVNC's core.
NOVNC_PAGE = "vnc_lite.html"
#: vncmux's page over noVNC's core, for a ``--web`` directory with the core and no page:
#: the npm package @novnc/novnc ships only ``core/`` and ``vendor/``.
CORE_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pages", "core.html")


def is_novnc_core(path: str) -> bool:
    """Whether C{path} holds noVNC's core without noVNC's pages (the npm package)."""
    return not os.path.isfile(os.path.join(path, "vnc.html")) and os.path.isfile(
        os.path.join(path, "core", "rfb.js")
    )


def http_response(status: int, body: bytes, headers: dict[str, str]) -> bytes:
    """A complete HTTP/1.1 response that closes the connection afterwards."""
    lines = [f"HTTP/1.1 {status} {http.RESPONSES[status].decode('ascii')}"]
    all_headers = {
        "Content-Length": str(len(body)),
        "Connection": "close",
        "X-Content-Type-Options": "nosniff",
        **headers,
    }
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class WebRoot(File):
    """
    The files below ``--web``: C{/} is noVNC's C{vnc.html}, a directory without one is a
    404 (no listing), and a symlink that leads out of the root is a 404 too. Over noVNC's
    core alone, C{/}, C{vnc.html} and C{vnc_lite.html} are vncmux's own page (L{CORE_PAGE}).
    """

    contentTypes = {
        **File.contentTypes,
        ".js": "text/javascript; charset=utf-8",
        ".mjs": "text/javascript; charset=utf-8",
        ".html": "text/html; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".json": "application/json",
        ".svg": "image/svg+xml",
    }

    # Twisted declares it with the type of its own (deprecated) default page.
    childNotFound = notFound()  # type: ignore[assignment]
    root: str = ""
    trusted_proxies: tuple[IPNetwork, ...] = ()

    @classmethod
    def at(cls, path: str, trusted_proxies: tuple[IPNetwork, ...] = ()) -> WebRoot:
        """The root resource for the directory C{path}."""
        real = os.path.realpath(path)
        web_root = cls(real, defaultType="application/octet-stream")
        web_root.root = real
        web_root.indexNames = ["vnc.html"]
        web_root.trusted_proxies = trusted_proxies
        if is_novnc_core(real):
            page = cls(CORE_PAGE, defaultType="text/html")
            page.root = os.path.dirname(CORE_PAGE)
            page.trusted_proxies = trusted_proxies
            for name in (b"", b"vnc.html", NOVNC_PAGE.encode()):
                web_root.putChild(name, page)
        return web_root

    def createSimilarFile(self, path: str) -> IResource:
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + os.sep):
            return self.childNotFound
        child: WebRoot = super().createSimilarFile(path)  # type: ignore[no-untyped-call]  # python/mypy#16653
        child.root = self.root
        child.trusted_proxies = self.trusted_proxies
        return child

    def directoryListing(self) -> IResource:
        return self.childNotFound

    def render_GET(self, request: Request) -> bytes | int:
        """The file, with an ETag next to Last-Modified; a page opened with a token sets it
        as a cookie for its WebSocket."""
        self.restat(False)
        if self.isfile():
            stat = os.stat(self.path)
            etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'.encode()
            if request.setETag(etag) is http.CACHED:
                return b""
            if self.path.endswith((".html", ".htm")):
                self._set_token_cookie(request)
        result: bytes | int = super().render_GET(request)  # type: ignore[no-untyped-call]  # python/mypy#16653
        return result

    render_HEAD = render_GET

    def _set_token_cookie(self, request: Request) -> None:
        """
        noVNC 1.3 (Debian's) does not carry the page's ``?token=`` into its WebSocket URL, so
        nova's classic URL (``vnc_auto.html?token=…``) would reach the upgrade without one;
        the upgrade reads the ``token`` cookie, short-lived and only sent to the WebSocket path.
        """
        token = _first_arg(request, b"token")
        if not token or not _COOKIE_SAFE.fullmatch(token):
            return
        ws_path = urlsplit(_first_arg(request, b"path") or NOVNC_DEFAULT_PATH).path
        if not _PATH_SAFE.fullmatch(ws_path):
            ws_path = NOVNC_DEFAULT_PATH
        peer = getattr(request.getClientAddress(), "host", "")
        forwarded_proto = request.getHeader(b"x-forwarded-proto")
        scheme = request_scheme(
            request.isSecure(),
            is_trusted(peer, self.trusted_proxies),
            {"x-forwarded-proto": forwarded_proto.decode("latin-1") if forwarded_proto else ""},
        )
        request.addCookie(
            b"token",
            token.encode("ascii"),
            path=("/" + ws_path.lstrip("/")).encode("ascii"),
            max_age=str(TOKEN_COOKIE_MAX_AGE).encode("ascii"),
            secure=scheme == "https",
            httpOnly=True,
            sameSite="strict",
        )


def _first_arg(request: Request, name: bytes) -> str | None:
    values: list[bytes] | None = (request.args or {}).get(name)
    if not values:
        return None
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        return None


class WebRequest(Request):
    """A request whose every answer, errors included, carries the same safety headers."""

    def render(self, resrc: IResource) -> None:
        self.responseHeaders.removeHeader(b"server")
        self.setHeader(b"x-content-type-options", b"nosniff")  # type: ignore[no-untyped-call]  # python/mypy#16651
        self.setHeader(b"cache-control", b"no-cache")  # type: ignore[no-untyped-call]  # python/mypy#16651
        super().render(resrc)  # type: ignore[no-untyped-call]  # python/mypy#16653


class WebChannel(http.HTTPChannel):
    """An HTTP connection that is cut at its deadline, however busy it is."""

    _log = Logger()
    site: WebSite
    deadline: float = 60.0
    _cut: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.site.channels.add(self)
        self._cut = self.callLater(self.deadline, self._too_long)  # type: ignore[no-untyped-call]  # python/mypy#16651

    def close_when_done(self) -> None:
        """Close now if no request is in progress, else once the current answer is sent."""
        if self.requests:
            self.persistent = False
        else:
            self.loseConnection()  # type: ignore[no-untyped-call]  # python/mypy#16651

    def _too_long(self) -> None:
        self._cut = None
        self._log.info("web connection cut after {seconds}s (--web-timeout)", seconds=self.deadline)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cut, self._cut = self._cut, None
        if cut is not None and cut.active():
            cut.cancel()
        self.site.channels.discard(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # python/mypy#16653


class WebSite(Site):
    """The twisted.web site of the console port; its connections are handed over to it."""

    requestFactory = WebRequest
    # Twisted declares every HTTPFactory to build its HTTP/1.1-or-2 channel; this one builds
    # plain HTTP/1.1 channels.
    protocol = WebChannel  # type: ignore[assignment]

    def __init__(
        self,
        root: str | None,
        clock: IReactorTime,
        deadline: float,
        trusted_proxies: tuple[IPNetwork, ...] = (),
    ) -> None:
        resource = WebRoot.at(root, trusted_proxies) if root else notFound()
        super().__init__(resource, timeout=None, reactor=clock)  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.deadline = deadline
        self.channels: set[WebChannel] = set()

    def close_connections(self) -> None:
        """At shutdown: idle keep-alive connections close now, busy ones after their answer
        (and at the latest at their deadline)."""
        for channel in list(self.channels):
            channel.close_when_done()

    def buildProtocol(self, addr: IAddress | None) -> WebChannel:  # type: ignore[override]
        channel: WebChannel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]  # python/mypy#16653
        channel.deadline = self.deadline
        return channel

    def log(self, request: http.Request) -> None:
        """No access log: the query of a page may carry a token."""
