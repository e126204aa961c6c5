"""
Where the Redis token store is: the ``--tokens`` URL parsed into a L{RedisConfig}, the TLS
options of ``rediss://``, and the one text that names a connection failure without a password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from vncmux.tokens.targets import BadTarget, format_target, parse_target

#: websockify format: keys are ``<namespace>:<token>`` (websockify's TokenRedis namespace).
#: A prefix is required, so a client's token can only name keys written as tokens, never
#: any other key of the database.
DEFAULT_WEBSOCKIFY_NAMESPACE = "websockify"

#: Both stay well below autobahn's default openHandshakeTimeout (5 s), which bounds the lookup.
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_REPLY_TIMEOUT = 2.0
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

SCHEMES = ("redis", "rediss", "redis+sentinel")
#: Spellings of Sentinel with TLS, refused with a reason: txredisapi's Sentinel client
#: connects to the master without TLS.
SENTINEL_TLS_SCHEMES = ("rediss+sentinel", "redis+sentinels")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """
    Where the tokens live, parsed from a ``--tokens`` URL: ``redis://[[user]:password@]host
    [:port][/db]``, ``rediss://…`` (TLS) or ``redis+sentinel://[[user]:password@]h1:p1,h2:p2
    /master[/db]``. Query options: ``format=websockify``, ``connect_timeout``,
    ``reply_timeout`` (seconds), ``namespace`` (format=websockify: keys are
    ``NAMESPACE:TOKEN``, default ``websockify``), ``ssl_ca_certs`` (rediss: PEM file of trusted
    CAs), ``ssl_certfile`` and ``ssl_keyfile`` (rediss: client certificate and its key, for a
    server with ``tls-auth-clients yes``; the key may be in the certificate file) and
    ``sentinel_password`` (redis+sentinel). Passwords never appear in C{repr} or logs.
    """

    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    sentinel_master: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    websockify_format: bool = False
    namespace: str = DEFAULT_WEBSOCKIFY_NAMESPACE
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connect_timeout: float | None = None,
        reply_timeout: float | None = None,
    ) -> RedisConfig:
        """Parse a token store URL; C{ValueError} (never quoting a password) when it is wrong."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in SCHEMES:
            if scheme in SENTINEL_TLS_SCHEMES:
                raise ValueError(
                    "Sentinel with TLS is not supported: txredisapi's Sentinel client connects"
                    " to the master without TLS"
                )
            raise ValueError(f"a Redis token store URL starts with {', '.join(SCHEMES)}")
        rest, _, fragment = rest.partition("#")
        if fragment:
            raise ValueError("a Redis URL has no #fragment")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hostlist = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            if not colon:
                raise ValueError(
                    "the Redis URL has credentials without a ':'; write redis://:PASSWORD@host"
                    " or redis://USER:PASSWORD@host"
                )
            username = unquote(user) or None
            password = unquote(secret)
        sentinel = scheme == "redis+sentinel"
        default_port = DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_REDIS_PORT
        parts = hostlist.split(",") if sentinel else [hostlist]
        hosts = tuple(_parse_host(h, default_port) for h in parts)
        master = None
        db_text = path
        if sentinel:
            master, _, db_text = path.partition("/")
            if not master:
                raise ValueError(
                    "a redis+sentinel URL names the master: redis+sentinel://h1:p1,h2:p2/master"
                )
        db_text = db_text.rstrip("/")
        if db_text and not db_text.isdigit():
            raise ValueError(f"Redis database {db_text!r} is not a number")
        db = int(db_text or 0)

        values: dict[str, str | None] = dict(
            format="vncmux",
            ssl_ca_certs=None,
            ssl_certfile=None,
            ssl_keyfile=None,
            sentinel_password=None,
            namespace=None,
        )
        allowed = {"format", "connect_timeout", "reply_timeout", "namespace"}
        allowed |= {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"} if scheme == "rediss" else set()
        allowed |= {"sentinel_password"} if sentinel else set()
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ValueError("the Redis URL query is not name=value&…") from None
        for name, value in pairs:
            if name not in allowed:
                raise ValueError(
                    f"unknown Redis URL option {name!r} (known: {', '.join(sorted(allowed))})"
                )
            values[name] = value
        if values["format"] not in ("vncmux", "websockify"):
            raise ValueError("format must be 'vncmux' or 'websockify'")
        namespace = values["namespace"]
        if namespace is not None and values["format"] != "websockify":
            raise ValueError("namespace is an option of format=websockify")
        namespace = _namespace(DEFAULT_WEBSOCKIFY_NAMESPACE if namespace is None else namespace)
        if values["ssl_keyfile"] and not values["ssl_certfile"]:
            raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
        return cls(
            hosts=hosts,
            db=db,
            username=username,
            password=password,
            tls=scheme == "rediss",
            ca_certs=values["ssl_ca_certs"],
            certfile=values["ssl_certfile"],
            keyfile=values["ssl_keyfile"],
            sentinel_master=unquote(master) if master else None,
            sentinel_password=values["sentinel_password"],
            websockify_format=values["format"] == "websockify",
            namespace=namespace,
            connect_timeout=_seconds(
                "connect_timeout",
                values.get("connect_timeout", connect_timeout),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            reply_timeout=_seconds(
                "reply_timeout", values.get("reply_timeout", reply_timeout), DEFAULT_REPLY_TIMEOUT
            ),
        )

    def redacted_url(self) -> str:
        """The URL for logs and errors: the password is shown as ``***``."""
        scheme = "redis+sentinel" if self.sentinel_master else "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:***@"
        hosts = ",".join(format_target(h, p) for h, p in self.hosts)
        path = f"/{quote(self.sentinel_master, safe='')}" if self.sentinel_master else ""
        path += f"/{self.db}"
        query = ""
        if self.websockify_format:
            query = f"?format=websockify&namespace={quote(self.namespace, safe='')}"
        return f"{scheme}://{auth}{hosts}{path}{query}"

    def websockify_key(self, token: str) -> str:
        """The key websockify's TokenRedis reads for C{token}: ``NAMESPACE:TOKEN``."""
        return f"{self.namespace}:{token}"


def _namespace(text: str) -> str:
    """A websockify key namespace: required, and apart from vncmux's own keys."""
    namespace = text.strip().rstrip(":")
    if not namespace:
        raise ValueError("namespace must not be empty: without a prefix a token could name any key")
    if namespace == "vncmux" or namespace.startswith("vncmux:"):
        raise ValueError("namespace must not be vncmux's own key prefix 'vncmux:'")
    return namespace


def _parse_host(text: str, default_port: int) -> tuple[str, int]:
    text = unquote(text.strip())
    if not text:
        raise ValueError("the Redis URL has no host")
    try:
        if text.startswith("[") and text.endswith("]"):
            return parse_target(f"{text}:{default_port}")
        if text.count(":") == 1 or text.startswith("["):
            return parse_target(text)
        if ":" in text:
            raise ValueError("put an IPv6 Redis address in brackets: redis://[::1]:6379")
        return parse_target(f"{text}:{default_port}")
    except BadTarget:
        # Not quoted: a URL typo can put the password where the host should be.
        raise ValueError(
            "bad Redis host or port in the URL: write host:port or [v6addr]:port"
        ) from None


def _seconds(name: str, value: object, default: float) -> float:
    """A timeout option: C{default} when not given, else 0 < seconds < 3600."""
    if value is None:
        return default
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number of seconds") from None
    if not 0 < seconds < 3600:
        raise ValueError(f"{name} must be a positive number of seconds")
    return seconds


def tls_options(config: RedisConfig) -> Any:
    """Verified TLS for ``rediss://``: platform trust, or the CAs in C{ssl_ca_certs}; with
    C{ssl_certfile} (and C{ssl_keyfile}) a client certificate."""
    from twisted.internet.ssl import (
        Certificate,
        PrivateCertificate,
        optionsForClientTLS,
        trustRootFromCertificates,
    )

    trust = None
    if config.ca_certs:
        try:
            with open(config.ca_certs, encoding="ascii") as f:
                pem = f.read()
        except OSError as e:
            raise ValueError(f"ssl_ca_certs {config.ca_certs}: {e.strerror}") from None
        end = "-----END CERTIFICATE-----"
        blocks = [block + end for block in pem.split(end) if "-----BEGIN CERTIFICATE" in block]
        if not blocks:
            raise ValueError(f"ssl_ca_certs {config.ca_certs} holds no PEM certificate")
        trust = trustRootFromCertificates(
            [Certificate.loadPEM(block.encode("ascii")) for block in blocks]
        )
    client = None
    if config.certfile:
        client_pem = b""
        for name, path in (("ssl_certfile", config.certfile), ("ssl_keyfile", config.keyfile)):
            if path:
                try:
                    with open(path, "rb") as f:
                        client_pem += f.read() + b"\n"
                except OSError as e:
                    raise ValueError(f"{name} {path}: {e.strerror}") from None
        try:
            client = PrivateCertificate.loadPEM(client_pem)
        except Exception:  # pyOpenSSL raises its own errors; never quote a key
            raise ValueError(
                f"ssl_certfile {config.certfile} (with ssl_keyfile) holds no PEM certificate"
                " and matching unencrypted private key"
            ) from None
    return optionsForClientTLS(config.hosts[0][0], trustRoot=trust, clientCertificate=client)


def describe_connection_error(config: RedisConfig, why: str) -> str:
    """txredisapi's text, naming a refused password as such, and never any password."""
    text = why.removeprefix("Redis error: ")
    refused = "could not auth: "
    if text.startswith(refused):
        reply = text.removeprefix(refused).rstrip(".")
        text = f"Redis refused the credentials (AUTH failed: {reply})"
    for secret in (config.password, config.sentinel_password):
        if secret:
            text = text.replace(secret, "***")
    return text
