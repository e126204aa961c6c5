"""TLS for ``ssl:`` listeners: a minimum version, modern ciphers, and certificates that can be
re-read (SIGHUP) without dropping a connection.

Twisted's own ``ssl:`` endpoint reads the certificate once. Here the listener is the same
``tcp:`` endpoint with Twisted's TLS protocol wrapped around the factory, and the TLS side is
L{ReloadableServerTLS}: every new connection gets the I{current} OpenSSL context, and a
reload swaps that context only once the new files loaded and their key matched. Connections
already open keep the context they started with (each holds its own reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

#: ``--tls-min-version`` values.
TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
DEFAULT_TLS_MIN_VERSION = "1.2"
#: TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only, the "intermediate" profile of
#: Mozilla's server-side TLS guide without its finite-field DHE suites (they would need DH
#: parameters). TLS 1.3 suites are OpenSSL's, all of them modern.
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: ``ssl:`` endpoint arguments taken here; anything else is refused with a reason.
_SSL_ARGUMENTS = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}


class TLSFilesError(ValueError):
    """The certificate, chain or key cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """Where an ``ssl:`` listener's certificate (plus chain) and key are read from."""

    certificate: str
    private_key: str
    extra_chain: str | None = None


def endpoint_arguments(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint string as Twisted does: the type, then ``:``-separated arguments,
    ``name=value`` ones by name; a backslash escapes the next character (``\\:``).
    """
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind, positional, named = parts[0], [], {}
    for part in parts[1:]:
        name, sep, value = part.partition("=")
        if sep:
            named[name] = value
        else:
            positional.append(part)
    return kind, positional, named


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def tls_listener(
    reactor: Any, description: str, min_version: str = DEFAULT_TLS_MIN_VERSION
) -> tuple[IStreamServerEndpoint, ReloadableServerTLS] | None:
    """
    For an ``ssl:`` description: the plain ``tcp:`` endpoint to listen on and the TLS side
    to wrap around the factory; C{None} for any other endpoint. C{ValueError} (also
    L{TLSFilesError}) when the description or the files cannot be used.
    """
    kind, positional, named = endpoint_arguments(description)
    if kind != "ssl":
        return None
    unknown = set(named) - _SSL_ARGUMENTS
    if unknown:
        raise ValueError(
            f"ssl: listener option {', '.join(sorted(unknown))} is not supported (vncmux sets"
            " the TLS version with --tls-min-version and uses ECDHE ciphers)"
        )
    port = named.get("port") or (positional[0] if positional else "")
    if not port or len(positional) > 1:
        raise ValueError("ssl: listener needs exactly one port: ssl:PORT:privateKey=...")
    private_key = named.get("privateKey", "server.pem")
    files = TLSFiles(named.get("certKey", private_key), private_key, named.get("extraCertChain"))
    tls = ReloadableServerTLS(files, min_version)
    tcp = f"tcp:{_quote(port)}"
    for name in ("interface", "backlog"):
        if name in named:
            tcp += f":{name}={_quote(named[name])}"
    return serverFromString(reactor, tcp), tls


@dataclass(frozen=True, slots=True)
class LoadedTLS:
    """An OpenSSL server context and the certificate it presents."""

    context: SSL.Context
    certificate: x509.Certificate

    def describe(self) -> str:
        """The subject and expiry of the certificate, for the log."""
        cert = self.certificate
        return f"{cert.subject.rfc4514_string()}, expires {cert.not_valid_after_utc:%Y-%m-%d}"


def load_context(files: TLSFiles, min_version: str = DEFAULT_TLS_MIN_VERSION) -> LoadedTLS:
    """A server OpenSSL context from the files; L{TLSFilesError} says what is wrong."""
    chain = _certificates(files.certificate)
    if files.extra_chain:
        chain += _certificates(files.extra_chain)
    key = _private_key(files.private_key)
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLS_VERSIONS[min_version],
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
    )
    try:
        return LoadedTLS(options.getContext(), chain[0])
    except SSL.Error as e:
        raise TLSFilesError(
            f"the key in {files.private_key} does not belong to the certificate in"
            f" {files.certificate} ({_openssl_reason(e)})"
        ) from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFilesError(f"{path}: {e.strerror}") from None


def _certificates(path: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise TLSFilesError(f"{path} holds no PEM certificate") from None
    return certificates


def _private_key(path: str) -> Any:
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        # Never the content: it is a private key, or was meant to be.
        raise TLSFilesError(f"{path} holds no unencrypted PEM private key") from None


def _openssl_reason(error: SSL.Error) -> str:
    reasons = [entry[2] for entry in error.args[0] if len(entry) == 3] if error.args else []
    return ", ".join(str(r) for r in reasons) or "OpenSSL refused them"


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    The TLS side of an ``ssl:`` listener. L{reload} reads the files again; if they do not
    load the error is logged and the context in use is kept, so a half-copied certificate
    never takes the listener down.
    """

    _log = Logger()

    def __init__(self, files: TLSFiles, min_version: str = DEFAULT_TLS_MIN_VERSION) -> None:
        self.files = files
        self.min_version = min_version
        self.loaded = load_context(files, min_version)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A connection on the context current now; a later reload does not change it."""
        return SSL.Connection(self.loaded.context, None)

    def reload(self) -> bool:
        """Re-read the files; C{True} when new connections now use them."""
        try:
            loaded = load_context(self.files, self.min_version)
        except TLSFilesError as e:
            self._log.error(
                "TLS: cannot reload the certificate ({why}); still serving {current}",
                why=str(e),
                current=self.loaded.describe(),
            )
            return False
        self.loaded = loaded
        self._log.info(
            "TLS: certificate reloaded from {path}: {certificate}",
            path=self.files.certificate,
            certificate=loaded.describe(),
        )
        return True


__all__ = [
    "DEFAULT_TLS_MIN_VERSION",
    "MODERN_CIPHERS",
    "TLS_VERSIONS",
    "ReloadableServerTLS",
    "TLSFiles",
    "LoadedTLS",
    "TLSFilesError",
    "endpoint_arguments",
    "load_context",
    "tls_listener",
]


@implementer(IOpenSSLClientConnectionCreator)
class AnonymousClientTLS:
    """
    TLS without certificates (anonymous Diffie-Hellman), what VeNCrypt's TLSNone and TLSVnc
    sub-types use: it encrypts, but a man in the middle can read it. TLS 1.3 has no anonymous
    cipher suites, and OpenSSL allows them only at security level 0.
    """

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"aNULL:!eNULL:@SECLEVEL=0")
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


@dataclass(frozen=True, slots=True)
class VencryptTLS:
    """The TLS that vncmux's security proxy starts with VNC servers (VeNCrypt)."""

    #: X509 sub-types: the server's certificate checked against the CA bundle (not its name,
    #: as nova does not), our client certificate shown when given; None without a CA bundle.
    x509: CertificateOptions | None
    anonymous: AnonymousClientTLS


def load_vencrypt_tls(
    ca_certs: str | None, client_cert: str | None, client_key: str | None
) -> VencryptTLS:
    """Read nova's ``vencrypt_*`` files once, at start; L{TLSFilesError} says what is wrong."""
    if (client_cert is None) != (client_key is None):
        raise TLSFilesError("a VeNCrypt client certificate needs its key, and the other way round")
    x509_options = None
    if ca_certs is not None:
        identity: dict[str, Any] = {}
        if client_cert is not None and client_key is not None:
            chain = _certificates(client_cert)
            identity = {
                "certificate": crypto.X509.from_cryptography(chain[0]),
                "extraCertChain": [crypto.X509.from_cryptography(c) for c in chain[1:]],
                "privateKey": crypto.PKey.from_cryptography_key(_private_key(client_key)),
            }
        x509_options = CertificateOptions(
            verify=True,
            caCerts=[crypto.X509.from_cryptography(c) for c in _certificates(ca_certs)],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            **identity,
        )
        try:
            x509_options.getContext()
        except SSL.Error as e:
            raise TLSFilesError(
                f"the key in {client_key} does not belong to the certificate in"
                f" {client_cert} ({_openssl_reason(e)})"
            ) from None
    return VencryptTLS(x509_options, AnonymousClientTLS())
