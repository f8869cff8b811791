"""How to reach NATS and PostgreSQL: credentials and TLS passed to the clients as credentials.

Nothing here imports a driver, so settings can be built and checked without nats-py or asyncpg.

A password never travels inside a URL: :func:`split_nats_servers` takes ``user:password@`` out
of NATS URLs (percent-decoded, so any character works) and returns clean URLs plus a
:class:`NatsAuth` for ``nats.connect(user=..., password=...)``. The adapters log servers with
:func:`server_address` (host and port only).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from ..errors import CommandNetError

__all__ = [
    "NatsAuth",
    "client_tls_context",
    "server_address",
    "split_nats_servers",
    "strip_userinfo",
]


class ConnectionConfigError(CommandNetError):
    """A TLS file or credential setting cannot be used (the message names it, never a secret)."""


@dataclass(frozen=True)
class NatsAuth:
    """How a NATS client authenticates, and its TLS; every field optional.

    ``user``/``password``: user-password auth. ``token``: token auth. ``nkeys_seed``: path of a
    file holding an NKey seed (``SU...``). ``user_credentials``: path of a ``.creds`` file (a
    user JWT and its seed; decentralised auth). ``tls``: a client SSL context (server CA,
    client certificate); ``tls_hostname``: the name to verify the server's certificate against
    when it is not the URL's host. Secrets are left out of ``repr``.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkeys_seed: str | None = None
    user_credentials: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (only the ones that are set)."""
        given = {
            "user": self.user, "password": self.password, "token": self.token,
            "nkeys_seed": self.nkeys_seed, "user_credentials": self.user_credentials,
            "tls": self.tls, "tls_hostname": self.tls_hostname,
        }
        return {key: value for key, value in given.items() if value is not None}


def _netloc(parts: SplitResult) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port is not None else host


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (scheme, host, port, path and query kept)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=_netloc(parts)))


def server_address(url: str) -> str:
    """``host:port`` of a server URL: what the adapters log (never the user or password)."""
    try:
        return _netloc(urlsplit(url if "//" in url else f"//{url}")) or "?"
    except ValueError:
        return "?"


def split_nats_servers(servers: str | list[str],
                       auth: NatsAuth | None = None) -> tuple[list[str], NatsAuth]:
    """Server URLs without credentials, and the auth to connect with.

    Credentials written in a URL (``nats://user:pass@host``, ``nats://token@host``) are
    percent-decoded and moved into the auth, as NATS URLs mean them; what ``auth`` sets wins.
    """
    urls = [servers] if isinstance(servers, str) else list(servers)
    user = password = token = None
    clean = []
    for url in urls:
        parts = urlsplit(url)
        if parts.username is not None:
            if parts.password is not None:
                user, password = unquote(parts.username), unquote(parts.password)
            else:
                token = unquote(parts.username)
        clean.append(strip_userinfo(url))
    auth = auth or NatsAuth()
    if auth.user is not None or auth.token is not None or auth.password is not None:
        return clean, auth
    if user is not None:
        return clean, replace(auth, user=user, password=password)
    if token is not None:
        return clean, replace(auth, token=token)
    return clean, auth


def client_tls_context(ca_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None, *, what: str = "TLS") -> ssl.SSLContext:
    """A TLS client context: trust ``ca_file`` (else the system CAs), present ``cert_file`` /
    ``key_file`` as the client certificate when given. Hostnames are verified."""
    for name, path in (("CA", ca_file), ("certificate", cert_file), ("key", key_file)):
        if path is not None and not Path(path).is_file():
            raise ConnectionConfigError(f"{what} {name} file {path!r} does not exist")
    if key_file is not None and cert_file is None:
        raise ConnectionConfigError(f"{what}: a key file without a certificate file")
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionConfigError(f"{what} files unusable: {exc}") from None
    return context
