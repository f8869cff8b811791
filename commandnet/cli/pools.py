"""``commandnet pools ensure --pool P``: create a pool's JetStream layout up front, idempotently.

Only workers and this command create or change streams, consumers and buckets (clients such
as ``trigger``, ``cancel``, ``status`` and the operator connect publish-only). Running it before
the first worker starts (the Helm chart's install hook) creates the work stream, the bounded
dead-letter stream, the status and graph buckets and the pool's durable consumer, so commands
sent early wait in the consumer (its ``num_pending`` shows the backlog, which KEDA can scale
on) instead of failing for want of a stream. Settings come from flags or the worker's
``COMMANDNET_*`` variables (``BUS_URL``, ``POOL``, credentials and TLS, ``ACK_WAIT``,
``DLQ_MAX_BYTES``, ``DLQ_MAX_AGE``), so the consumer and streams get the same config the
workers will give them. Running it again changes nothing (or aligns a config that differs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from ..adapters.urls import bus_from_url
from ..errors import CommandNetError
from ..worker.logs import redact
from ..worker.settings import WorkerSettings, load_settings, mask_url
from .agents import reach


@click.group()
def pools() -> None:
    """Worker pools on the bus."""


@pools.command()
@click.option("--pool", help="Worker pool [COMMANDNET_POOL; default: default]")
@click.option("--bus", "bus_url", metavar="URL", help="nats://host:4222 [COMMANDNET_BUS_URL]")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True,
              help="Give up when the bus stays unreachable.")
def ensure(pool: str | None, bus_url: str | None, connect_timeout: float) -> None:
    """Create the streams, status and graph buckets and the pool's consumer (idempotent)."""
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for name in ("nats", "commandnet.nats"):  # one clear error instead of retry tracebacks
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        settings = load_settings(pool=pool, bus_url=bus_url)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise click.UsageError("invalid settings:\n  " + "\n  ".join(lines)) from None
    if urlsplit(settings.bus_url).scheme not in ("nats", "tls"):
        raise click.UsageError(f"pools ensure needs a NATS bus (nats://host:4222), not "
                               f"{mask_url(settings.bus_url)}")
    try:
        found = asyncio.run(ensure_pool(settings, connect_timeout))
    except CommandNetError as exc:
        raise click.ClickException(redact(str(exc), settings.secrets())) from None
    click.echo(f"pool {settings.pool!r} ready on {mask_url(settings.bus_url)}: stream "
               f"{found['stream']!r}, dead letters {found['dlq_stream']!r}, status bucket "
               f"{found['status_bucket']!r}, graph bucket {found['graph_bucket']!r}, consumer "
               f"{found['consumer']!r} with {found['num_pending']} message(s) pending")


async def ensure_pool(settings: WorkerSettings, within: float = 10.0) -> dict[str, Any]:
    """Create or align the pool's streams, bucket and consumer; returns what it ensured."""
    from ..adapters.nats import JetStreamBus

    url, connection = settings.bus_connection()
    bus = bus_from_url(url, settings.pool, **connection, **settings.jetstream_options())
    assert isinstance(bus, JetStreamBus)
    async def ensure() -> Any:
        await bus.connect()  # a managing bus: streams and bucket
        await bus.ensure_consumer()
        return await bus.jetstream().consumer_info(bus.stream, bus.consumer)

    try:
        info = await reach("bus", settings.bus_url, ensure(), within)
    finally:
        await bus.close()
    return {"stream": bus.stream, "dlq_stream": bus.dlq_stream,
            "status_bucket": bus.status_bucket, "graph_bucket": bus.graph_bucket,
            "consumer": bus.consumer,
            "num_pending": int(info.num_pending or 0)}
