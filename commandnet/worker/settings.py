"""One typed settings model for the worker: ``COMMANDNET_*`` environment variables, then flags.

Precedence: a CLI flag beats its environment variable beats the default. Secrets (the store and
bus passwords) come from the environment, in Kubernetes from a Secret, and are spliced into the
URL only when a connection is made; :func:`mask_url` hides them wherever a URL is shown.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..errors import CommandNetError


class SettingsError(CommandNetError):
    """A setting is missing or invalid; the message names the setting and its variable."""


class ConnectionSettings(BaseSettings):
    """Where the store and the bus are: shared by the worker and the agent commands."""

    model_config = SettingsConfigDict(env_prefix="COMMANDNET_", extra="ignore")

    pool: str = Field(default="default", min_length=1, pattern=r"^[A-Za-z0-9_-]+$",
                      description="worker pool: the bus subjects commandnet.<pool>.*")
    store_url: str = Field(default="sqlite:///commandnet.db",
                           description="memory://, sqlite:///relative.db, sqlite:////abs.db, "
                                       "postgresql://user@host:5432/db")
    store_password: SecretStr | None = Field(
        default=None, description="spliced into store_url (from a Secret, never a flag)")
    bus_url: str = Field(default="nats://127.0.0.1:4222", description="memory:// or nats://host:4222")
    bus_password: SecretStr | None = Field(
        default=None, description="spliced into bus_url (from a Secret, never a flag)")

    def store_dsn(self) -> str:
        """The store URL with its password, for connecting only (never log it)."""
        return with_password(self.store_url, self.store_password, "COMMANDNET_STORE_PASSWORD")

    def bus_dsn(self) -> str:
        """The bus URL with its password, for connecting only (never log it)."""
        return with_password(self.bus_url, self.bus_password, "COMMANDNET_BUS_PASSWORD")

    def secrets(self) -> list[str]:
        """Every secret value this configuration holds, for log redaction."""
        found = [s.get_secret_value() for s in (self.store_password, self.bus_password) if s]
        for url in (self.store_url, self.bus_url):
            password = urlsplit(url).password
            if password:
                found.append(password)
        return [s for s in found if s]


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
    stall_after: float = Field(default=300.0, gt=0,
                               description="age of an unleased running agent before its step "
                                           "is re-published")
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

    def summary(self) -> dict[str, Any]:
        """The settings as they may be logged: URLs masked, secrets left out."""
        data = self.model_dump(exclude={"store_password", "bus_password"})
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


def with_password(url: str, secret: SecretStr | None, variable: str) -> str:
    """``url`` with ``secret`` as its password (the URL must name the user)."""
    if secret is None or not secret.get_secret_value():
        return url
    parts = urlsplit(url)
    if not parts.username:
        raise SettingsError(
            f"{variable} is set but the URL {mask_url(url)!r} names no user; "
            f"write it as scheme://USER@host/..."
        )
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    password = quote(secret.get_secret_value(), safe="")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{host}{port}"))
