"""One typed settings model for the worker: ``COMMANDNET_*`` environment variables, then flags.

Precedence: a CLI flag beats its environment variable beats the default. Secrets (passwords,
the bus token, NKey seeds, credentials files) come only from the environment or from mounted
files (``..._FILE``), in Kubernetes from a Secret; no flag takes one. They are handed to the
drivers as credentials (asyncpg ``password=``, nats-py ``user=``/``password=``/``token=``/
``nkeys_seed=``/``user_credentials=``), never spliced into a URL, so any character works and no
URL carries them; :func:`mask_url` hides a password written into a URL wherever it is shown.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..errors import CommandNetError


class SettingsError(CommandNetError):
    """A setting is missing or invalid; the message names the setting and its variable."""


class BusSettings(BaseSettings):
    """Where the bus is and how to log in to it: the worker's, the agent commands' and the
    operator's (which never talks to the store) ``COMMANDNET_BUS_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="COMMANDNET_", extra="ignore")

    # Secrets that may come from their variable or from a file (``<name>_file``), and the URL
    # fields that may carry a password; subclasses add theirs.
    secret_fields: ClassVar[tuple[str, ...]] = ("bus_password", "bus_token")
    url_fields: ClassVar[tuple[str, ...]] = ("bus_url",)

    bus_url: str = Field(default="nats://127.0.0.1:4222",
                         description="memory://, nats://[user@]host:4222, tls://host:4222")
    bus_password: SecretStr | None = Field(
        default=None, description="NATS password of the URL's user (from a Secret, never a "
                                  "flag)")
    bus_password_file: str | None = Field(
        default=None, description="a file holding the NATS password (a mounted Secret)")
    bus_token: SecretStr | None = Field(default=None, description="NATS token auth")
    bus_token_file: str | None = Field(default=None,
                                       description="a file holding the NATS token")
    bus_nkey_seed_file: str | None = Field(
        default=None, description="a file holding a NATS NKey user seed (SU...)")
    bus_creds_file: str | None = Field(
        default=None, description="a NATS .creds file (user JWT and seed; decentralised auth)")
    bus_tls_ca_file: str | None = Field(
        default=None, description="CA certificate file the NATS server's certificate is "
                                  "verified with (turns TLS on)")
    bus_tls_cert_file: str | None = Field(
        default=None, description="client certificate file for NATS (mutual TLS)")
    bus_tls_key_file: str | None = Field(default=None,
                                         description="the NATS client certificate's key file")

    @model_validator(mode="after")
    def _one_source_per_secret(self) -> Self:
        for name in self.secret_fields:
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"COMMANDNET_{name.upper()} and COMMANDNET_{name.upper()}_FILE "
                                 "are both set; set one")
        return self

    # ------------------------------------------------------------------ secrets

    def _secret(self, name: str) -> str | None:
        """Secret ``name`` from its variable or from its ``_FILE`` (trailing newline dropped)."""
        value: SecretStr | None = getattr(self, name)
        if value is not None:
            return value.get_secret_value() or None
        path: str | None = getattr(self, f"{name}_file", None)
        if path is None:
            return None
        return _read_file(path, f"COMMANDNET_{name.upper()}_FILE").rstrip("\r\n") or None

    def bus_connection(self) -> tuple[str, dict[str, Any]]:
        """The bus URL without credentials, and ``{"auth": NatsAuth}`` for a NATS bus (for
        :func:`~commandnet.adapters.urls.bus_from_url`); ``{}`` for other buses."""
        from ..adapters.connection import (
            ConnectionConfigError,
            NatsAuth,
            client_tls_context,
            split_nats_servers,
        )

        parts = urlsplit(self.bus_url)
        if parts.scheme not in ("nats", "tls"):
            return self.bus_url, {}
        password = self._secret("bus_password")
        if password is not None and not parts.username:
            raise SettingsError(
                f"COMMANDNET_BUS_PASSWORD is set but the URL {mask_url(self.bus_url)!r} names "
                "no user; write it as nats://USER@host:4222")
        for path, variable in ((self.bus_nkey_seed_file, "COMMANDNET_BUS_NKEY_SEED_FILE"),
                               (self.bus_creds_file, "COMMANDNET_BUS_CREDS_FILE")):
            if path is not None:
                _read_file(path, variable, check_only=True)
        tls = None
        if self.bus_tls_ca_file or self.bus_tls_cert_file or self.bus_tls_key_file:
            try:
                tls = client_tls_context(
                    self.bus_tls_ca_file, self.bus_tls_cert_file, self.bus_tls_key_file,
                    what="COMMANDNET_BUS_TLS_CA_FILE/_CERT_FILE/_KEY_FILE:")
            except ConnectionConfigError as exc:
                raise SettingsError(str(exc)) from None
        # A URL's own user:pass@ (or token@) counts, percent-decoded; the variables win.
        servers, in_url = split_nats_servers(self.bus_url)
        token = self._secret("bus_token")
        user: str | None = None
        if password is not None:
            user = unquote(parts.username or "")
        else:
            user, password = in_url.user, in_url.password
            token = token if token is not None else in_url.token
        auth = NatsAuth(user=user, password=password, token=token,
                        nkeys_seed=self.bus_nkey_seed_file,
                        user_credentials=self.bus_creds_file, tls=tls)
        return servers[0], {"auth": auth}

    def secrets(self) -> list[str]:
        """Every secret value this configuration holds, for log redaction."""
        found: list[str] = []
        for name in self.secret_fields:
            try:
                value = self._secret(name)
            except SettingsError:
                value = None
            if value:
                found.append(value)
        for url in (getattr(self, name) for name in self.url_fields):
            parts = urlsplit(url)
            value = parts.password
            if (value is None and parts.scheme in ("nats", "tls") and url == self.bus_url
                    and self.bus_password is None and self.bus_password_file is None):
                value = parts.username  # a NATS URL's lone user is a token
            if value:
                found += [value, unquote(value)]
        for path in (self.bus_nkey_seed_file, self.bus_creds_file):
            found += _seeds_in(path)
        return [s for s in dict.fromkeys(found) if s]


class ConnectionSettings(BusSettings):
    """Where the store and the bus are: shared by the worker and the agent commands."""

    secret_fields: ClassVar[tuple[str, ...]] = ("store_password", *BusSettings.secret_fields)
    url_fields: ClassVar[tuple[str, ...]] = ("store_url", *BusSettings.url_fields)

    pool: str = Field(default="default", min_length=1, pattern=r"^[A-Za-z0-9_-]+$",
                      description="worker pool: the bus subjects commandnet.<pool>.*")
    store_url: str = Field(default="sqlite:///commandnet.db",
                           description="memory://, sqlite:///relative.db, sqlite:////abs.db, "
                                       "postgresql://user@host:5432/db")
    store_password: SecretStr | None = Field(
        default=None, description="PostgreSQL password of the URL's user (from a Secret, "
                                  "never a flag)")
    store_password_file: str | None = Field(
        default=None, description="a file holding the PostgreSQL password (a mounted Secret)")
    store_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca",
                           "verify-full"] | None = Field(
        default=None, description="PostgreSQL sslmode, as libpq's (default: prefer, or the "
                                  "URL's ?sslmode=)")
    store_sslrootcert: str | None = Field(
        default=None, description="CA certificate file that signed the server's certificate "
                                  "(verify-ca, verify-full; require then verifies too)")
    store_sslcert: str | None = Field(
        default=None, description="client certificate file (PostgreSQL cert auth)")
    store_sslkey: str | None = Field(default=None, description="client certificate's key file")
    store_pool_min: int = Field(default=2, ge=0,
                                description="PostgreSQL connections kept open (each of the "
                                            "store's two pools)")
    store_pool_max: int = Field(default=10, ge=1,
                                description="PostgreSQL connections at most (each of the "
                                            "store's two pools)")
    @model_validator(mode="after")
    def _pool_sizes(self) -> Self:
        if self.store_pool_min > self.store_pool_max:
            raise ValueError(f"store_pool_min ({self.store_pool_min}) exceeds store_pool_max "
                             f"({self.store_pool_max})")
        return self

    def store_connection(self) -> tuple[str, dict[str, Any]]:
        """The store URL without its password, and the keyword arguments for the store
        (``password``, ``ssl``, pool sizes) for :func:`~commandnet.adapters.urls.store_from_url`.

        TLS file paths go into the URL's query (``sslrootcert``, ``sslcert``, ``sslkey``, as
        libpq spells them; they are not secrets), so asyncpg applies libpq's sslmode rules.
        """
        parts = urlsplit(self.store_url)
        if parts.scheme not in ("postgres", "postgresql"):
            return self.store_url, {}
        password = self._secret("store_password")
        if password is not None and not parts.username:
            raise SettingsError(
                f"COMMANDNET_STORE_PASSWORD is set but the URL {mask_url(self.store_url)!r} "
                "names no user; write it as postgresql://USER@host/db")
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        for key, path in (("sslrootcert", self.store_sslrootcert),
                          ("sslcert", self.store_sslcert), ("sslkey", self.store_sslkey)):
            if path is not None:
                _read_file(path, f"COMMANDNET_STORE_{key.upper()}", check_only=True)
                query[key] = path
        url = urlunsplit(parts._replace(netloc=_without_password(parts),
                                        query=urlencode(query)))
        options: dict[str, Any] = {"min_size": self.store_pool_min,
                                   "max_size": self.store_pool_max}
        if password is not None:
            options["password"] = password
        if self.store_sslmode is not None:
            options["ssl"] = self.store_sslmode
        return url, options


class WorkerSettings(ConnectionSettings):
    """Everything ``commandnet worker`` needs; each field is ``COMMANDNET_<FIELD>`` in the env.

    ``graph`` lists start nodes as ``pkg.module:StartNode``; in the environment, separate several
    with commas (``COMMANDNET_GRAPH=app.a:Start,app.b:Begin``).
    """

    graph: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="start nodes to run, pkg.module:StartNode")
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                           min_length=1, description="lease owner name (the pod name in k8s)")
    max_in_flight: int = Field(default=64, ge=1, description="steps run at once by this process")
    lease_seconds: float = Field(default=30.0, gt=0,
                                 description="how long a dead worker blocks its agents")
    drain_grace: float = Field(default=30.0, ge=0,
                               description="on SIGTERM, seconds in-flight steps may finish in "
                                           "before they are handed back")
    connect_timeout: float = Field(default=30.0, gt=0,
                                   description="give up starting when store or bus stay away")
    http_host: str = Field(default="0.0.0.0", description="probes and metrics listen here")
    http_port: int = Field(default=8080, ge=0, le=65535,
                           description="probes and metrics port (0: any free port)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    sweep_interval: float = Field(default=2.0, gt=0,
                                  description="seconds between outbox/stalled-agent sweeps")
    outbox_grace: float = Field(default=5.0, ge=0,
                                description="age of an outbox row before it is re-published")
    ack_wait: float = Field(default=30.0, gt=0,
                            description="JetStream: seconds an unacknowledged delivery waits "
                                        "before redelivery (a killed worker's steps); must "
                                        "exceed the lease heartbeat, lease_seconds / 3")
    dlq_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0,
                               description="JetStream: the dead-letter stream keeps at most this "
                                           "many bytes, dropping the oldest (0: no limit)")
    dlq_max_age: float = Field(default=14 * 24 * 3600.0, ge=0,
                               description="JetStream: seconds a dead letter is kept (0: until "
                                           "the size limit drops it)")
    stall_after: float = Field(default=300.0, gt=0,
                               description="age of an unleased running agent before its step "
                                           "is re-published")
    wake_interval: float = Field(default=0.5, gt=0,
                                 description="seconds between this worker's looks for parked "
                                             "agents that are due (timers, signal timeouts, "
                                             "joins)")
    node_grace: float = Field(default=600.0, ge=0,
                              description="safe deploys: seconds a step at a node this worker's "
                                          "graphs lack waits for a worker that has it (an old "
                                          "pod of a rolling upgrade) before the agent fails "
                                          "with reason NodeRemoved")
    status_flush_interval: float = Field(
        default=0.25, gt=0, description="seconds between writes of buffered statuses to the "
                                        "NATS KV status bucket (a status is written at most "
                                        "this long after its commit)")
    reconcile_batch: int = Field(default=100, ge=1,
                                 description="stalled agents the pool's sweeper re-publishes per "
                                             "sweep at most (bounds the repair traffic)")
    local_handoff: int = Field(
        default=64, ge=0, description="JetStream with PostgreSQL: the next step of an agent "
                                      "whose step this worker committed runs here at once, "
                                      "without a stream round trip, at most this many waiting "
                                      "(0: every step goes through the stream); the step's "
                                      "durable outbox row stays its recovery until it commits")
    migrate: bool = Field(default=True,
                          description="apply PostgreSQL schema migrations at start (false: "
                                      "only check the schema is current; run `commandnet "
                                      "migrate` instead). SQLite always creates its schema")

    @field_validator("graph", mode="before")
    @classmethod
    def _split_graphs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [str(v).strip() for v in value if str(v).strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ack_wait_outlasts_heartbeat(self) -> WorkerSettings:
        # In-progress acks come every lease_seconds / 3; a shorter ack wait would redeliver
        # steps that are still running.
        if self.ack_wait <= self.lease_seconds / 3:
            raise ValueError(f"ack_wait ({self.ack_wait:g}s) must exceed lease_seconds / 3 "
                             f"({self.lease_seconds / 3:g}s), the lease heartbeat")
        return self

    def jetstream_options(self) -> dict[str, Any]:
        """The worker's JetStream tuning (consumer ack wait, dead-letter stream limits)."""
        return {"ack_wait": self.ack_wait, "dlq_max_bytes": self.dlq_max_bytes,
                "dlq_max_age": self.dlq_max_age}

    def summary(self) -> dict[str, Any]:
        """The settings as they may be logged: URLs masked, secrets left out."""
        data = self.model_dump(exclude={"store_password", "bus_password", "bus_token",
                                        "store_password_file", "bus_password_file",
                                        "bus_token_file"})
        data["store_url"] = mask_url(self.store_url)
        data["bus_url"] = mask_url(self.bus_url)
        return data


def load_settings(**overrides: Any) -> WorkerSettings:
    """Settings from the environment, with ``overrides`` (CLI flags; None = not given) on top."""
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    return WorkerSettings(**given)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log or print)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _without_password(parts: Any) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{user}{host}{port}"


def _read_file(path: str, variable: str, *, check_only: bool = False) -> str:
    """The text of ``path``; SettingsError naming ``variable`` when it cannot be read."""
    try:
        if check_only:
            with open(path, "rb"):
                return ""
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"{variable}={path!r}: {exc.strerror or exc}") from None


def _seeds_in(path: str | None) -> list[str]:
    """NKey seeds (``S...`` lines) in a seed or creds file, for redaction; [] if unreadable."""
    if path is None:
        return []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith("S") and len(line.strip()) > 40
            and line.strip().isalnum()]
