"""Build a store or a bus from a URL, importing only the driver that URL needs.

Stores: ``memory://``, ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (as
SQLAlchemy spells them), ``postgresql://user@host/db``.
Buses: ``memory://``, ``nats://host:4222`` (pool from the ``pool`` argument).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from ..bus import EventBus
from ..errors import CommandNetError
from ..persistence import Persistence


def store_from_url(url: str, **options: Any) -> Persistence:
    """A Persistence for ``url``; ``options`` (``password``, ``ssl``, ``min_size``, ...) go to
    PostgresPersistence and are ignored by the other stores."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from .memory import InMemoryPersistence

        return InMemoryPersistence()
    if scheme == "sqlite":
        from .sqlite import SQLitePersistence

        if not url.startswith("sqlite:///"):
            raise CommandNetError(f"SQLite URL {url!r} must start with sqlite:/// (relative path) "
                                  "or sqlite://// (absolute path)")
        return SQLitePersistence(url.removeprefix("sqlite:///"))
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresPersistence

        return PostgresPersistence(url, **options)
    raise CommandNetError(f"unsupported store URL {url!r} (memory://, sqlite:///, postgresql://)")


def bus_from_url(url: str, pool: str = "default", **options: Any) -> EventBus:
    """An EventBus for ``url`` serving worker pool ``pool``; ``options`` (``auth``, ...) go to
    JetStreamBus."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from .memory import InMemoryEventBus

        return InMemoryEventBus()
    if scheme in ("nats", "tls"):
        from .nats import JetStreamBus

        return JetStreamBus(url, pool=pool, **options)
    raise CommandNetError(f"unsupported bus URL {url!r} (memory://, nats://)")
