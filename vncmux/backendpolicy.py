"""Which VNC servers a token may open: ``--allowed-backend`` and the addresses never dialled.

A token store is written by a control plane; if it (or whoever can write to it) is fooled
into naming the cloud's metadata service or a host outside the hypervisor network, the proxy
would become a way in. The policy turns a record's host into the one address to dial: a name
is resolved once and the address that was checked is the address dialled, so a DNS answer
that changes between check and connect (rebinding) cannot move the session elsewhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.handshake import IPNetwork
from vncmux.refusals import BACKEND_NOT_ALLOWED, CONSOLE_UNREACHABLE, Refused
from vncmux.tokens import format_target

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Resolves a host name to its addresses (text), once; see L{system_resolver}.
Resolve = Callable[[str], Deferred[Sequence[str]]]

DEFAULT_RESOLVE_TIMEOUT = 5.0


class BackendPolicy:
    """
    ``--allowed-backend``: the networks tokens may point into (empty: anywhere), minus
    link-local addresses (169.254.0.0/16, where clouds put their metadata service
    169.254.169.254, and fe80::/10) unless an allowed network lies wholly inside them, and
    never an unspecified, multicast or broadcast address.

    @param resolve: turns a host name into addresses (L{system_resolver} in the proxy).
    @param clock: bounds a resolution by C{timeout} seconds.
    """

    def __init__(
        self,
        allowed: Sequence[IPNetwork] = (),
        *,
        resolve: Resolve,
        clock: IReactorTime,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> None:
        self.allowed = tuple(allowed)
        self._resolve = resolve
        self._clock = clock
        self.timeout = timeout

    @classmethod
    def for_reactor(
        cls,
        reactor: IReactorTime,
        allowed: Sequence[IPNetwork] = (),
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> BackendPolicy:
        """The policy with the reactor's own name resolver (C{reactor.nameResolver})."""

        def resolve(host: str) -> Deferred[Sequence[str]]:
            # The resolver the reactor has now: one installed after start is used too.
            return system_resolver(reactor.nameResolver)(host)  # type: ignore[attr-defined]

        return cls(allowed, resolve=resolve, clock=reactor, timeout=timeout)

    def address_for(self, host: str, port: int) -> Deferred[str]:
        """
        The address to dial for a record's C{host} (an IP literal as it is, a name resolved
        once: the first of its addresses that is allowed). Fails with L{Refused}:
        C{BACKEND_NOT_ALLOWED} when no address is allowed, C{CONSOLE_UNREACHABLE} when the
        name does not resolve in time. The detail names the target, never a token.
        """
        target = format_target(host, port)
        literal = _ip(host)
        if literal is not None:
            try:
                return succeed(self.check_address(literal, target))
            except Refused as e:
                return fail(e)
        resolving = self._resolve(host)
        resolving.addTimeout(self.timeout, self._clock)
        return resolving.addCallbacks(
            self._first_allowed, self._unresolved, callbackArgs=(target,), errbackArgs=(target,)
        )

    def check_issue(self, host: str, port: int) -> Deferred[None]:
        """
        For issuing a token (admin API, ``vncmux token add``): fail with L{Refused}
        (C{BACKEND_NOT_ALLOWED}) when the proxy would refuse the target. A name that does not
        resolve here is let through: the issuer need not share the proxies' DNS, and the
        proxy checks again, authoritatively, before it dials.
        """

        def unresolved(failure: Failure) -> None:
            refused = failure.value
            if isinstance(refused, Refused) and refused.refusal == CONSOLE_UNREACHABLE:
                return None
            return failure  # type: ignore[return-value]

        return self.address_for(host, port).addCallbacks(lambda _: None, unresolved)

    def check_address(self, address: IPAddress | str, target: str = "") -> str:
        """C{address} as text when the policy allows it, else L{Refused} saying why."""
        ip = _ip(address) if isinstance(address, str) else address
        if ip is None:
            raise Refused(BACKEND_NOT_ALLOWED, f"backend {target or address}: not an address")
        why = self._refusal(ip)
        if why is not None:
            where = f"{target} ({ip})" if target and target != str(ip) else str(ip)
            raise Refused(BACKEND_NOT_ALLOWED, f"backend {where}: {why}")
        return str(ip)

    def _refusal(self, ip: IPAddress) -> str | None:
        checked = _unmapped(ip)
        if checked.is_unspecified or checked.is_multicast or _is_broadcast(checked):
            return "not a host address"
        inside = [net for net in self.allowed if checked in net]
        if self.allowed and not inside:
            return "outside --allowed-backend"
        if checked.is_link_local and not any(_link_local_network(net) for net in inside):
            return "link-local (cloud metadata) address; list it in --allowed-backend to allow"
        return None

    def _first_allowed(self, addresses: Sequence[str], target: str) -> str:
        refusals = []
        for address in addresses:
            try:
                return self.check_address(address, target)
            except Refused as e:
                refusals.append(e)
        if not refusals:
            raise Refused(CONSOLE_UNREACHABLE, f"backend {target}: the name has no address")
        raise refusals[0]

    def _unresolved(self, failure: Failure, target: str) -> Failure:
        if failure.check(TimeoutError):
            detail = f"no DNS answer within {self.timeout:g}s"
        else:
            detail = f"cannot resolve: {failure.getErrorMessage()}"
        raise Refused(CONSOLE_UNREACHABLE, f"backend {target}: {detail}")


def parse_backend_networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) for ``--allowed-backend``; ValueError names a bad one."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"{spec!r} is not a CIDR or address: {e}") from None
    return tuple(networks)


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:169.254.169.254`` is checked as the IPv4 address it reaches."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_broadcast(ip: IPAddress) -> bool:
    return isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255")


def _link_local_network(net: IPNetwork) -> bool:
    """Whether C{net} lies wholly in link-local space: it names such addresses on purpose,
    where 0.0.0.0/0 or ::/0 only happen to contain them."""
    return net.network_address.is_link_local and net.broadcast_address.is_link_local


@implementer(IResolutionReceiver)
class _Collector:
    """Gathers one resolution's addresses and fires a Deferred with them."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[Sequence[str]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        """Nothing to do: the result comes through L{addressResolved}."""

    def addressResolved(self, address: object) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


def system_resolver(resolver: IHostnameResolver) -> Resolve:
    """A L{Resolve} over Twisted's C{reactor.nameResolver} (getaddrinfo, in threads)."""

    def resolve(host: str) -> Deferred[Sequence[str]]:
        collector = _Collector()
        resolver.resolveHostName(collector, host, 0)
        return collector.done

    return resolve


__all__ = [
    "BackendPolicy",
    "Resolve",
    "parse_backend_networks",
    "system_resolver",
]
