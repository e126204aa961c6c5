"""The metrics port: ``/metrics``, ``/healthz``, ``/readyz`` and the admin API, on one Site.

L{build_observability} is the one call ``build_service`` makes; everything here renders on the
reactor thread (no WSGI, no thread pool) and writes no access log (paths may hold a token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from vncmux.admin import LocalSessions, admin_resources, read_admin_secret
from vncmux.backendpolicy import BackendPolicy
from vncmux.health import Liveness, Readiness, write_json
from vncmux.interfaces import ISessionDirectory, ITokenStore
from vncmux.issuing import DEFAULT_BASE_URL
from vncmux.metrics import Metrics, MetricsPage, new_registry
from vncmux.service import Listener
from vncmux.tokens import RedisTokenStore

if TYPE_CHECKING:
    from vncmux.relay import RelayStats
    from vncmux.supervisor import Supervisor

#: Idle HTTP connections on the metrics port are closed after this many seconds.
HTTP_TIMEOUT = 60


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return write_json(request, 404, {"error": "not found"})


class Root(Resource):
    """The top of the metrics port: named children, a JSON 404 for anything else."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        """``/`` is this index; unknown paths (and the admin API when it is off) are 404."""
        return self if path == b"" and not request.postpath else _NotFound()  # type: ignore[no-untyped-call]  # python/mypy#16651

    def render_GET(self, request: Request) -> bytes:
        """``/`` lists what this port serves."""
        return write_json(request, 200, {"paths": sorted("/" + p.decode() for p in self.children)})


class QuietSite(Site):
    """A Site without an access log: a ``DELETE /tokens/<token>`` line would leak the token."""

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        """No access log."""


def build_http_root(
    metrics: Metrics,
    readiness: Readiness,
    admin: dict[bytes, Resource] | None = None,
) -> Root:
    """The resource tree: ``/metrics``, ``/healthz``, ``/readyz`` and the admin pages."""
    root = Root()  # type: ignore[no-untyped-call]  # python/mypy#16651
    root.putChild(b"metrics", MetricsPage(new_registry(metrics)))
    root.putChild(b"healthz", Liveness())  # type: ignore[no-untyped-call]  # python/mypy#16651
    root.putChild(b"readyz", readiness)
    for name, resource in (admin or {}).items():
        root.putChild(name, resource)
    return root


def build_observability(
    endpoint: str | None,
    reactor: Any,
    supervisor: Supervisor,
    store: ITokenStore,
    relay_stats: RelayStats,
    listener_up: Callable[[], bool],
    *,
    admin_token_file: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    backend_policy: BackendPolicy | None = None,
    sessions: ISessionDirectory | None = None,
) -> tuple[Listener | None, Metrics]:
    """
    Build the metrics port and the metrics observer.

    @param endpoint: ``--metrics`` (an endpoint string), or C{None} for ``none``.
    @param reactor: listens on C{endpoint}, and is the clock of ``/readyz`` and the admin API.
    @param supervisor: its live session table is read at scrape time; ``/readyz`` compares
        its reservations with ``--max-sessions``; the admin API ends sessions through it.
    @param store: pinged by ``/readyz``; issues and revokes tokens when it is an ITokenAdmin;
        a Redis store's reconnections are counted (``vncmux_token_store_reconnects_total``).
    @param relay_stats: the console factory's L{RelayStats} (C{factory.stats}).
    @param listener_up: whether the console listener is listening (C{ProxyService.accepting}).
    @param admin_token_file: ``--admin-token-file``; C{None} leaves the admin API off.
    @param base_url: the noVNC page that ``POST /tokens`` builds access URLs on.
    @param backend_policy: which targets ``POST /tokens`` may name; by default any but
        link-local addresses, names resolved with C{reactor.nameResolver}.
    @param sessions: the sessions the admin API lists and ends; by default this process's
        (L{LocalSessions}), with a Redis store the fleet's (L{vncmux.fleet.FleetSessions}).
    @return: the service to add to the proxy (C{None} when C{endpoint} is C{None}) and the
        L{Metrics} observer to add to the session observers (it counts either way).
    @raise ValueError: the admin token file cannot be read or is empty.
    """
    reconnects = (lambda: store.reconnects) if isinstance(store, RedisTokenStore) else lambda: 0
    metrics = Metrics(supervisor.sessions, relay_stats, reconnects)
    if endpoint is None:
        return None, metrics
    secret = read_admin_secret(admin_token_file) if admin_token_file else None
    readiness = Readiness(store, reactor, listener_up, supervisor)
    admin = None
    if secret:
        policy = backend_policy or BackendPolicy.for_reactor(reactor)
        admin = admin_resources(
            secret,
            sessions or LocalSessions(supervisor),
            store,
            reactor,
            base_url,
            backend_policy=policy,
        )
    site = QuietSite(  # type: ignore[no-untyped-call]  # python/mypy#16651
        build_http_root(metrics, readiness, admin), timeout=HTTP_TIMEOUT, reactor=reactor
    )
    return Listener(endpoint, site, reactor), metrics


__all__ = ["QuietSite", "Root", "build_http_root", "build_observability"]
