"""Assembling one proxy process, and stopping it in the right order.

Twisted's MultiService stops its children all at once; a console proxy must stop accepting
first, then drain live sessions, then let go of the token store and the metrics listener.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from vncmux.admission import Gate
from vncmux.attempts import attempts_for
from vncmux.backend import BackendDialer
from vncmux.backendpolicy import BackendPolicy
from vncmux.consoles import CONSOLE_TYPES
from vncmux.events import Observers
from vncmux.interfaces import IActivitySink, IRevocationFeed, ITokenStore
from vncmux.relay import RelayStats
from vncmux.rfbsecurity import SecurityPolicy
from vncmux.settings import Settings
from vncmux.supervisor import Supervisor
from vncmux.tls import (
    DEFAULT_TLS_MIN_VERSION,
    ReloadableServerTLS,
    load_vencrypt_tls,
    tls_listener,
)
from vncmux.tokens import open_token_store
from vncmux.websocket import ConsoleFactory


@dataclass
class Console:
    """The parts of the data plane, for wiring and for tests."""

    #: The noVNC listener's factory.
    factory: ConsoleFactory
    supervisor: Supervisor
    gate: Gate
    observers: Observers
    backend_policy: BackendPolicy
    #: Every console listener's factory, by the console type it serves (``factory`` too).
    factories: dict[str, ConsoleFactory]


def open_store(settings: Settings, reactor: Any) -> ITokenStore:
    """The token store of C{--tokens}; ValueError (naming the option) when it is wrong."""
    try:
        return open_token_store(
            settings.tokens,
            reactor,
            reply_timeout=settings.store_timeout,
            reactor=reactor,
            nova_recheck_interval=settings.nova_recheck_interval,
        )
    except ValueError as e:
        raise ValueError(f"--tokens: {e}") from None


def build_console(
    settings: Settings, store: ITokenStore, reactor: Any, observers: Observers
) -> Console:
    """
    Wire supervisor, dialer, gate and WebSocket factory around one token store: one gate
    and factory per console listener (C{settings.listeners}), sharing the token store, the
    supervisor (so the session limits count every console type together), the target
    policy, the failed-attempt counts and the relay counters.
    """
    supervisor = Supervisor(
        reactor,
        observers,
        settings.limits,
        activity=IActivitySink(store, None),
        revocations=IRevocationFeed(store, None),
    )
    security = security_policy(settings)
    vencrypt = load_vencrypt_tls(
        settings.vencrypt_ca_certs, settings.vencrypt_client_cert, settings.vencrypt_client_key
    )
    policy = BackendPolicy.for_reactor(reactor, settings.allowed_backends, settings.connect_timeout)
    attempts = attempts_for(store, reactor, settings.max_failed_tokens)
    stats = RelayStats()
    factories = {}
    gates = {}
    for console_type, _ in settings.listeners:
        kind = CONSOLE_TYPES[console_type]
        dialer = BackendDialer(
            reactor,
            reactor,
            settings.connect_timeout,
            supervisor.connections,
            security,
            vencrypt,
            kind.rfb_greeting,
        )
        sessions = kind.sessions(supervisor)
        gate = gates[console_type] = Gate(
            store,
            dialer,
            sessions,
            reactor,
            observers,
            settings.store_timeout,
            policy,
            attempts,
            console_type,
        )
        factories[console_type] = ConsoleFactory(
            settings,
            gate,
            supervisor,
            observers,
            reactor,
            reactor=reactor,
            kind=kind,
            stats=stats,
            sessions=sessions,
        )
    return Console(factories["novnc"], supervisor, gates["novnc"], observers, policy, factories)


def security_policy(settings: Settings) -> SecurityPolicy:
    """
    What the RFB security proxy may negotiate. With a CA bundle VeNCrypt must verify the
    server's certificate (X509 sub-types, as nova); without one it can only encrypt
    (anonymous TLS: TLSNone, TLSVnc).
    """
    return SecurityPolicy(
        frozenset(settings.auth_schemes),
        x509=settings.vencrypt_ca_certs is not None,
        anonymous_tls=settings.vencrypt_ca_certs is None,
    )


class Listener(Service):
    """
    Listens on an endpoint and remembers the port: readiness asks whether it is up, tests ask
    which port ``tcp:0`` got, and a listener that cannot start stops the process.

    An ``ssl:`` endpoint is served with vncmux's TLS (L{vncmux.tls}): at least
    C{tls_min_version}, modern ciphers, and a certificate that L{reload} re-reads without
    dropping a connection.
    """

    _log = Logger()

    def __init__(
        self,
        description: str,
        factory: IProtocolFactory,
        reactor: Any,
        tls_min_version: str = DEFAULT_TLS_MIN_VERSION,
    ) -> None:
        self.description = description
        self.tls_min_version = tls_min_version
        self._factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self.tls: ReloadableServerTLS | None = None
        self._listening: Deferred[IListeningPort] | None = None
        #: A listening socket made by the parent of C{--workers}: (descriptor, family).
        self._adopted: tuple[int, int] | None = None

    def adopt(self, fd: int, family: int) -> None:
        """
        Accept on the listening socket C{fd} (of C{family}) instead of listening on the
        endpoint: a worker of C{--workers} serves the socket its parent made. The endpoint
        string still says whether to wrap connections in TLS.
        """
        self._adopted = (fd, family)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        try:
            tls = tls_listener(self._reactor, self.description, self.tls_min_version)
        except ValueError as e:
            self._listening = fail(e)
        else:
            if self._adopted is not None:
                factory = self._factory
                if tls is not None:
                    self.tls = tls[1]
                    factory = TLSMemoryBIOFactory(self.tls, False, factory)
                self._listening = maybeDeferred(self._adopt, factory, *self._adopted)
            elif tls is None:
                endpoint = serverFromString(self._reactor, self.description)
                self._listening = endpoint.listen(self._factory)
            else:
                endpoint, self.tls = tls
                self._listening = endpoint.listen(
                    TLSMemoryBIOFactory(self.tls, False, self._factory)
                )
        self._listening.addCallbacks(self._listened, self._failed)

    def _adopt(self, factory: IProtocolFactory, fd: int, family: int) -> IListeningPort:
        """Serve C{fd} with the reactor's own copy of it (C{adoptStreamPort} duplicates it),
        so that stopping the port lets go of the socket in this process."""
        os.set_blocking(fd, False)  # accept() runs until EAGAIN
        try:
            port: IListeningPort = self._reactor.adoptStreamPort(fd, family, factory)
        finally:
            os.close(fd)
        return port

    def reload(self) -> None:
        """Re-read what can change under a running listener: the TLS certificate and key."""
        if self.tls is not None:
            self.tls.reload()

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def _failed(self, failure: Failure) -> None:
        self._log.critical(
            "cannot listen on {where}: {error}",
            where=self.description,
            error=failure.getErrorMessage(),
        )
        if self._reactor.running:
            self._reactor.stop()

    def listening(self) -> Deferred[IListeningPort]:
        """Fire with the listening port once it is up."""
        assert self._listening is not None, "not started"
        up: Deferred[IListeningPort] = Deferred()

        def tell(port: IListeningPort) -> IListeningPort:
            up.callback(port)
            return port

        self._listening.addCallback(tell)
        return up

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        if self._listening is not None:
            self._listening.cancel()
        return None


class ProxyService(MultiService):
    """
    The whole proxy: one listener per console type. On stop (SIGTERM under twistd): stop
    listening (every listener) at once, let live
    sessions run for up to the drain timeout, end the rest with 1001 'going away', wait
    for their sockets to flush and close, then stop everything else.
    """

    _log = Logger()

    def __init__(self, settings: Settings, console: Console, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.settings = settings
        self.console = console
        #: Every console listener, by console type; C{listener} is the noVNC one.
        self.listeners = {
            console_type: Listener(endpoint, console.factories[console_type], reactor)
            for console_type, endpoint in settings.listeners
        }
        self.listener = self.listeners["novnc"]
        for listener in self.listeners.values():
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]  # python/mypy#16651
        console.supervisor.setServiceParent(self)  # type: ignore[no-untyped-call]  # python/mypy#16651

    @property
    def accepting(self) -> bool:
        """Whether every console listener is up (for readiness)."""
        return all(listener.port is not None for listener in self.listeners.values())

    def add(self, service: IService) -> None:
        """Another part (token store, metrics listener), stopped after the drain."""
        service.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        stopping = gatherResults(
            [maybeDeferred(listener.stopService) for listener in self.listeners.values()],
            consumeErrors=True,
        )
        stopping.addCallback(lambda _: self._close_web_connections())
        grace = self.settings.drain_timeout
        close_timeout = self.settings.close_timeout + 1.0
        stopping.addCallback(lambda _: self.console.supervisor.drain(grace, close_timeout))
        return stopping.addCallback(lambda _: Deferred.fromCoroutine(self._stop_the_rest()))

    def _close_web_connections(self) -> None:
        """Plain HTTP connections are not sessions: idle ones close now, busy ones after
        their answer."""
        for factory in self.console.factories.values():
            factory.web.close_connections()

    async def _stop_the_rest(self) -> None:
        """The supervisor first (it writes the last activity back to the store), then the
        others in reverse order, each after the previous one has stopped."""
        listeners = list(self.listeners.values())
        rest = [s for s in reversed(list(self)) if s not in listeners and s.running]
        rest.sort(key=lambda s: s is not self.console.supervisor)
        for service in rest:
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                self._log.failure("stopping {service} failed", service=service)
