"""``commandnet migrate --store URL``: create or upgrade the store's schema, idempotently.

For PostgreSQL it applies the numbered migrations not yet recorded in ``schema_migrations``
(under an advisory lock, so a Helm hook, an init container and starting workers may race
safely) and prints what it did; other stores create their schema as their ``setup`` does.
The URL comes from ``--store`` or ``COMMANDNET_STORE_URL``; a password from
``COMMANDNET_STORE_PASSWORD`` (a Kubernetes Secret) and the ``COMMANDNET_STORE_SSL*`` settings
are passed to the driver as they are for the worker, never printed.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import click

from ..adapters.urls import store_from_url
from ..errors import CommandNetError
from ..worker.settings import ConnectionSettings, mask_url


async def _migrate_postgres(dsn: str, timeout: float, password: str | None = None,
                            ssl: str | None = None) -> tuple[list[int], int]:
    import asyncpg  # type: ignore[import-untyped]

    from ..adapters.postgres import apply_migrations, migrations

    conn = await asyncpg.connect(dsn, timeout=timeout, password=password, ssl=ssl)
    try:
        applied = await apply_migrations(conn)
    finally:
        await conn.close()
    return applied, max(m.version for m in migrations())


async def _setup_other(url: str) -> None:
    store = store_from_url(url)
    try:
        await store.setup()
    finally:
        await store.close()


@click.command()
@click.option("--store", "store_url", metavar="URL",
              help="postgresql://user@host:5432/db or sqlite:///file.db [COMMANDNET_STORE_URL]")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True,
              help="Give up when the database stays unreachable.")
def migrate(store_url: str | None, connect_timeout: float) -> None:
    """Create or upgrade the store schema (safe to run again, and from many places at once)."""
    try:
        settings = ConnectionSettings(store_url=store_url) if store_url else ConnectionSettings()
        dsn, connection = settings.store_connection()
    except (CommandNetError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    shown = mask_url(settings.store_url)
    try:
        if urlsplit(dsn).scheme in ("postgres", "postgresql"):
            applied, newest = asyncio.run(_migrate_postgres(
                dsn, connect_timeout, connection.get("password"), connection.get("ssl")))
            if applied:
                names = ", ".join(f"{v:03d}" for v in applied)
                click.echo(f"{shown}: applied migration(s) {names}; schema at version {newest}")
            else:
                click.echo(f"{shown}: schema up to date (version {newest})")
        else:
            asyncio.run(_setup_other(dsn))
            click.echo(f"{shown}: schema ready")
    except (CommandNetError, OSError, TimeoutError) as exc:
        raise click.ClickException(f"{shown}: {exc}") from exc
    except Exception as exc:  # asyncpg's errors: report them as one line, not a traceback
        if type(exc).__module__.startswith("asyncpg"):
            raise click.ClickException(f"{shown}: {type(exc).__name__}: {exc}") from exc
        raise
