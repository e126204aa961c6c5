"""
``vncmux token add|show|revoke``: manage console tokens in the proxy's ``--tokens`` store.

The CLI is the edge of the program: it takes issued_at/expires_at from the real reactor's
clock (``task.react``). Exit codes: 0 done, 1 not found or failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from twisted.application.service import IService
from twisted.internet.defer import Deferred, inlineCallbacks

from vncmux.backendpolicy import BackendPolicy, parse_backend_networks
from vncmux.configfile import ConfigFileError
from vncmux.consoles import CONSOLE_TYPES
from vncmux.handshake import IPNetwork
from vncmux.interfaces import IRevocationFeed
from vncmux.issuing import DEFAULT_BASE_URL, TokenRequest, check_base_url, issue_token
from vncmux.options import read_options_file
from vncmux.refusals import Refused
from vncmux.rfbsecurity import decrypt_vncpasswd
from vncmux.settings import DEFAULT_TOKENS
from vncmux.tokens import (
    BadTarget,
    FileTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    UnsupportedOperation,
    check_instance,
    check_target,
    hash_token,
    open_token_store,
    parse_port,
    token_id_of,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: Printed after revoking a token in a store that cannot tell the proxies (a token file).
NO_REVOCATION_CHANNEL = (
    "note: this token store cannot reach running proxies: sessions already open with this"
    " token go on until they end"
)


class UsageError(Exception):
    """A problem with the command line or the config file (exit code 2)."""


def _base_url(text: str) -> str:
    try:
        return check_base_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _network(text: str) -> IPNetwork:
    try:
        return parse_backend_networks([text])[0]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def record_json(record: TokenRecord) -> dict[str, Any]:
    """A record for humans and scripts: with its token_id, without the backend password."""
    return {
        "token_id": record.token_id,
        "host": record.host,
        "port": record.port,
        "instance_uuid": record.instance_uuid,
        "console_type": record.console_type,
        "internal_access_path": record.internal_access_path,
        "access_url": record.access_url,
        "issued_at": record.issued_at,
        "expires_at": record.expires_at,
        "last_activity_at": record.last_activity_at,
        "max_sessions": record.max_sessions,
        "single_use": record.single_use,
        "has_password": record.password is not None,
    }


def _port(text: str) -> int:
    try:
        return parse_port(text, "--port")
    except BadTarget as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    """The ``vncmux`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tokens",
        default=argparse.SUPPRESS,
        help=f"token store: file:PATH, redis://…, rediss://…, redis+sentinel://… "
        f"(default: the config file's, else {DEFAULT_TOKENS})",
    )
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="INI file with a [vncmux] tokens = … line"
    )

    parser = argparse.ArgumentParser(prog="vncmux", description="Manage vncmux console tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="issue, show and revoke tokens")
    actions = token.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", parents=[common], help="issue a token, print it and its URL")
    add.add_argument("--host", required=True, help="VNC server host (name, IPv4 or IPv6)")
    add.add_argument("--port", required=True, type=_port, help="VNC server port")
    add.add_argument("--ttl", type=_positive(float), help="seconds until the token expires")
    add.add_argument("--instance", help="instance UUID (revoke --instance revokes them all)")
    add.add_argument(
        "--base-url", default=DEFAULT_BASE_URL, type=_base_url, help="noVNC page of the URL"
    )
    add.add_argument(
        "--allowed-backend",
        action="append",
        type=_network,
        default=argparse.SUPPRESS,
        metavar="CIDR",
        help="refuse targets outside these networks, as the proxy does (repeatable; default:"
        " the config file's allowed_backend, else any; link-local addresses only if listed)",
    )
    add.add_argument(
        "--console-type",
        choices=sorted(CONSOLE_TYPES),
        default="novnc",
        help="the listener that admits the token: novnc (--listen, the default) or serial"
        " (--serial-listen; --host/--port then name a TCP serial port)",
    )
    add.add_argument("--single-use", action="store_true", help="the token opens one session")
    add.add_argument("--max-sessions", type=_positive(int), help="concurrent sessions allowed")
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password", help="VNC password of the server (visible in ps!)")
    secret.add_argument(
        "--password-file",
        help="read the VNC password from this file: its first line, or a file written by"
        " vncpasswd (8 or 16 bytes that are not text)",
    )

    show = actions.add_parser("show", parents=[common], help="print a token's record as JSON")
    show.add_argument("token")

    revoke = actions.add_parser("revoke", parents=[common], help="revoke a token or an instance")
    revoke.add_argument("token", nargs="?")
    revoke.add_argument("--instance", help="revoke every token of this instance UUID")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; exits with status 2 on a usage error."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.action == "revoke" and (options.token is None) == (options.instance is None):
        parser.error("revoke takes either a TOKEN or --instance UUID")
    if options.action == "add":
        try:
            options.host, options.port = check_target(options.host, options.port)
        except BadTarget as e:
            parser.error(f"--host: {e}")
    if options.action in ("add", "revoke") and options.instance is not None:
        if not options.instance:
            parser.error("--instance: give the instance UUID")
        try:
            check_instance(options.instance)
        except BadTarget as e:
            parser.error(f"--instance: {e}")
    return options


def _config(options: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--config``, read and checked as ``twistd vncmux`` reads them."""
    config_path = getattr(options, "config", None)
    if not config_path:
        return {}
    try:
        return read_options_file(config_path)
    except ConfigFileError as e:
        raise UsageError(str(e)) from None


def token_source(options: argparse.Namespace) -> str:
    """``--tokens``, else ``tokens`` in the [vncmux] section of ``--config``, else the default."""
    if getattr(options, "tokens", None):
        return str(options.tokens)
    return str(_config(options).get("tokens", "").strip() or DEFAULT_TOKENS)


def allowed_backends(options: argparse.Namespace) -> tuple[IPNetwork, ...]:
    """``--allowed-backend``, else ``allowed_backend`` of ``--config`` (space-separated)."""
    given = getattr(options, "allowed_backend", None)
    if given is not None:
        return tuple(given)
    return tuple(_config(options).get("allowed-backend", ()))


@inlineCallbacks
def execute(
    options: argparse.Namespace, reactor: Any, out: IO[str], err: IO[str]
) -> Any:  # Generator: returns Deferred[int] through inlineCallbacks
    """Run a parsed command against its token store; fires with the exit code."""
    try:
        source = token_source(options)
        store = open_token_store(source, reactor)
        password = _password(options) if options.action == "add" else None
        policy = BackendPolicy.for_reactor(reactor, allowed_backends(options))
    except (UsageError, ValueError) as e:
        err.write(f"vncmux: error: {e}\n")
        return EXIT_USAGE
    service = IService(store, None)
    if service is not None:
        service.startService()
    if isinstance(store, FileTokenStore) and options.action in ("add", "revoke"):
        for problem in store.permission_problems():
            err.write(f"vncmux: warning: {problem}\n")
    try:
        code = yield _dispatch(options, store, password, policy, reactor, out, err)
    except Refused as e:
        err.write(f"vncmux: {e.refusal.reason}: {e.detail}\n")
        code = EXIT_FAILED
    except TokenStoreUnavailable as e:
        err.write(f"vncmux: token store unavailable: {e}\n")
        code = EXIT_FAILED
    except UnsupportedOperation as e:
        err.write(f"vncmux: not supported by this token store: {e}\n")
        code = EXIT_FAILED
    except ValueError as e:
        err.write(f"vncmux: error: {e}\n")
        code = EXIT_FAILED
    finally:
        if service is not None:
            yield service.stopService()
    return code


def _password(options: argparse.Namespace) -> str | None:
    if options.password_file:
        try:
            with open(options.password_file, "rb") as f:
                return read_password_file(f.read(4096))
        except OSError as e:
            raise UsageError(f"cannot read --password-file: {e.strerror}") from None
    return options.password  # type: ignore[no-any-return]


def read_password_file(data: bytes) -> str:
    """
    The VNC password in a file's bytes: a ``vncpasswd`` file (8 bytes, 16 with a view-only
    password; obfuscated, so not text) is decrypted, anything else is a password on the
    first line.
    """
    try:
        first_line: str | None = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        first_line = None
    if len(data) in (8, 16) and (first_line is None or not first_line.isprintable()):
        try:
            return decrypt_vncpasswd(data)
        except ValueError as e:
            raise UsageError(f"--password-file: {e}") from None
    if first_line is None:
        raise UsageError("--password-file is neither text nor a vncpasswd file")
    return first_line


@inlineCallbacks
def _dispatch(
    options: argparse.Namespace,
    store: Any,
    password: str | None,
    policy: BackendPolicy,
    reactor: Any,
    out: IO[str],
    err: IO[str],
) -> Any:
    if options.action == "add":
        request = TokenRequest(
            options.host,
            options.port,
            options.ttl,
            instance_uuid=options.instance or "",
            console_type=options.console_type,
            single_use=options.single_use,
            max_sessions=options.max_sessions,
            password=password,
            base_url=options.base_url,
        )
        issued = yield issue_token(request, store, policy, reactor.seconds())
        out.write(f"token: {issued.token}\n")
        out.write(f"token_id: {issued.record.token_id}\n")
        out.write(f"url: {issued.access_url}\n")
        return EXIT_OK
    if options.action == "show":
        found = yield store.lookup(options.token)
        if found is None:
            err.write("vncmux: token not found\n")
            return EXIT_FAILED
        out.write(json.dumps(record_json(found), indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    if options.instance is not None:
        count = yield store.revoke_instance(options.instance)
        if not count:
            err.write("vncmux: no tokens found for that instance\n")
            return EXIT_FAILED
        out.write(f"revoked {count} token(s)\n")
        return EXIT_OK
    token_hash = hash_token(options.token)
    revoked = yield store.revoke(token_hash)
    if not revoked:
        err.write("vncmux: token not found\n")
        return EXIT_FAILED
    out.write(f"revoked token {token_id_of(token_hash)}\n")
    if not IRevocationFeed.providedBy(store):
        # A token file has no channel to the proxies: only new connections see the change.
        out.write(NO_REVOCATION_CHANNEL + "\n")
    return EXIT_OK


def run(argv: Sequence[str], reactor: Any, out: IO[str], err: IO[str]) -> Deferred[int]:
    """Parse C{argv} and run it: for tests and embedding (argparse exits 2 on usage errors)."""
    return execute(parse_arguments(argv), reactor, out, err)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``vncmux`` console script."""
    from twisted.internet.task import react

    options = parse_arguments(argv)

    def exit_with(code: int) -> None:
        if code:
            raise SystemExit(code)  # react() turns it into the exit status

    react(lambda reactor: execute(options, reactor, sys.stdout, sys.stderr).addCallback(exit_with))
    raise AssertionError("react() returned")  # pragma: no cover


if __name__ == "__main__":
    main()
