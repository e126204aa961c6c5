"""``--allowed-backend``: which address a token's host becomes, resolved once, or why not."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vncmux.backendpolicy import BackendPolicy, parse_backend_networks, system_resolver
from vncmux.refusals import BACKEND_NOT_ALLOWED, CONSOLE_UNREACHABLE, Refused


class _Resolver:
    """Answers names from a table, counting the questions; C{pending} names never answer."""

    def __init__(self, table: dict[str, list[str]], pending: Sequence[str] = ()) -> None:
        self.table = table
        self.pending = set(pending)
        self.asked: list[str] = []

    def __call__(self, host: str) -> Deferred[Sequence[str]]:
        self.asked.append(host)
        if host in self.pending:
            return Deferred()
        return succeed(self.table.get(host, []))


class BackendPolicyTests(SynchronousTestCase):
    """The policy returns the address to dial or refuses with a reason an operator reads."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.resolver = _Resolver(
            {
                "vnc.internal": ["10.1.2.3"],
                "rebind.example": ["169.254.169.254", "10.1.2.4"],
                "metadata.example": ["169.254.169.254"],
                "outside.example": ["192.0.2.1", "198.51.100.2"],
            },
            pending=["slow.example"],
        )

    def policy(self, *cidrs: str) -> BackendPolicy:
        return BackendPolicy(
            parse_backend_networks(cidrs), resolve=self.resolver, clock=self.clock, timeout=3
        )

    def address(self, policy: BackendPolicy, host: str, port: int = 5900) -> str:
        return self.successResultOf(policy.address_for(host, port))

    def refused(self, policy: BackendPolicy, host: str, port: int = 5900) -> Refused:
        failure = self.failureResultOf(policy.address_for(host, port), Refused)
        return failure.value  # type: ignore[return-value]

    def test_default_allows_any_host_address(self) -> None:
        """Without --allowed-backend every unicast address is allowed, literals unresolved."""
        policy = self.policy()
        self.assertEqual(self.address(policy, "127.0.0.1"), "127.0.0.1")
        self.assertEqual(self.address(policy, "2001:DB8::1"), "2001:db8::1")
        self.assertEqual(self.address(policy, "192.0.2.9"), "192.0.2.9")
        self.assertEqual(self.resolver.asked, [])

    def test_names_resolved_once(self) -> None:
        """A name is resolved once; the address checked is the address returned (dialled)."""
        policy = self.policy("10.0.0.0/8")
        self.assertEqual(self.address(policy, "vnc.internal"), "10.1.2.3")
        self.assertEqual(self.resolver.asked, ["vnc.internal"])
        self.assertEqual(self.address(policy, "rebind.example"), "10.1.2.4")

    def test_outside_the_list(self) -> None:
        """Literals and names outside every allowed network: 4403 'backend not allowed'."""
        policy = self.policy("10.0.0.0/8", "fd00::/8")
        for host in ["192.0.2.1", "2001:db8::1", "outside.example", "::ffff:192.0.2.1"]:
            with self.subTest(host=host):
                refusal = self.refused(policy, host)
                self.assertEqual(refusal.refusal, BACKEND_NOT_ALLOWED)
                self.assertEqual((refusal.refusal.code, refusal.refusal.reason),
                                 (4403, "backend not allowed"))  # fmt: skip
                self.assertIn("outside --allowed-backend", refusal.detail)
                self.assertIn(host.lower(), refusal.detail)
        self.assertEqual(self.address(policy, "fd00::5"), "fd00::5")

    def test_link_local_needs_an_explicit_entry(self) -> None:
        """169.254.169.254 (also IPv4-mapped, or behind a name) and fe80:: are refused, even
        with 0.0.0.0/0 allowed, unless a listed network lies inside link-local space."""
        for policy in (self.policy(), self.policy("0.0.0.0/0", "::/0")):
            for host in ["169.254.169.254", "::ffff:169.254.169.254", "fe80::1",
                         "metadata.example"]:  # fmt: skip
                with self.subTest(host=host):
                    refusal = self.refused(policy, host)
                    self.assertEqual(refusal.refusal, BACKEND_NOT_ALLOWED)
                    self.assertIn("link-local", refusal.detail)
        explicit = self.policy("169.254.169.254/32", "fe80::/64")
        self.assertEqual(self.address(explicit, "169.254.169.254"), "169.254.169.254")
        self.assertEqual(self.address(explicit, "fe80::1"), "fe80::1")

    def test_never_dialled(self) -> None:
        """Unspecified, multicast and broadcast addresses are never backends."""
        policy = self.policy("0.0.0.0/0", "::/0")
        for host in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"]:
            with self.subTest(host=host):
                self.assertIn("not a host address", self.refused(policy, host).detail)

    def test_resolution_failures(self) -> None:
        """A name with no address, or no DNS answer in time: 4502 'console unreachable'."""
        policy = self.policy()
        refusal = self.refused(policy, "nowhere.example")
        self.assertEqual(refusal.refusal, CONSOLE_UNREACHABLE)
        slow = policy.address_for("slow.example", 5900)
        self.assertNoResult(slow)
        self.clock.advance(3)
        refusal = self.failureResultOf(slow, Refused).value
        self.assertEqual(refusal.refusal, CONSOLE_UNREACHABLE)  # type: ignore[union-attr]
        self.assertIn("no DNS answer within 3s", refusal.detail)  # type: ignore[union-attr]
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_networks(self) -> None:
        """A bad --allowed-backend value is a ValueError that names it."""
        self.assertEqual([str(n) for n in parse_backend_networks(["10.0.0.1/8", "::1"])],
                         ["10.0.0.0/8", "::1/128"])  # fmt: skip
        error = self.assertRaises(ValueError, parse_backend_networks, ["10.0.0.0/33"])
        self.assertIn("10.0.0.0/33", str(error))


class SystemResolverTests(SynchronousTestCase):
    """system_resolver adapts Twisted's IHostnameResolver to a list of address strings."""

    def test_collects_addresses(self) -> None:
        """Every address the resolver reports, once each, in order."""

        class FakeNameResolver:
            def resolveHostName(self, receiver, host, port=0, *args, **kwargs):  # type: ignore[no-untyped-def]
                receiver.resolutionBegan(None)
                receiver.addressResolved(IPv4Address("TCP", "10.0.0.1", 0))
                receiver.addressResolved(IPv6Address("TCP", "fd00::1", 0))
                receiver.addressResolved(IPv4Address("TCP", "10.0.0.1", 0))
                receiver.resolutionComplete()
                return None

        resolve = system_resolver(FakeNameResolver())  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(resolve("h")), ["10.0.0.1", "fd00::1"])
