"""Tracing glue for the JetStream bus: the trace context rides in the message headers.

:class:`~commandnet.adapters.nats.JetStreamBus` calls :func:`publish` and :func:`deliver`
instead of its plain paths while :func:`commandnet.tracing.active`. A re-publish (outbox
sweeper, reconciler) continues the agent's trace from the ``trace`` field of its value in the
status bucket: the ``traceparent`` of the span that committed its latest step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate

from ..bus import Delivery, Handler
from ..messages import encode
from .spans import Message, context_from, handle, plan, publishing

if TYPE_CHECKING:
    from ..adapters.nats import JetStreamBus

log = logging.getLogger("commandnet.tracing")

__all__ = ["deliver", "deliver_local", "publish", "recovered_context"]


async def publish(bus: JetStreamBus, message: Message) -> None:
    """Publish ``message`` with trace headers (see :func:`~.spans.plan`)."""
    subject = bus.subject_for(message)
    how = plan(message)
    parent = await recovered_context(bus, message.agent_id) if how == "recover" else None
    with publishing(message, subject, bus.pool, how, parent) as headers:
        await bus.publish_raw(encode(message), subject, message.dedup_id, headers=headers)


async def deliver(bus: JetStreamBus, handler: Handler, delivery: Delivery,
                  headers: Mapping[str, str] | None, subject: str) -> None:
    """Hand a fetched message to the engine inside its span."""
    await handle(handler, delivery, headers, subject, bus.pool)


async def deliver_local(bus: JetStreamBus, handler: Handler, delivery: Delivery) -> None:
    """Hand a step event handed over in this process (no stream message) to the engine inside
    its span, child of the span that published it (current in this task, which the publishing
    task started)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    await handle(handler, delivery, headers, bus.events_subject, bus.pool)


async def recovered_context(bus: JetStreamBus, agent_id: str,
                            within: float = 2.0) -> otel_context.Context | None:
    """Where the agent's trace left off: the ``trace`` its status value holds, or None (no
    status written yet, or written without tracing, or the bucket did not answer)."""
    from ..adapters.nats_status import status_key

    try:
        async with asyncio.timeout(within):
            kv = await bus.jetstream().key_value(bus.status_bucket)
            entry = await kv.get(status_key(bus.pool, agent_id))
        value = json.loads(entry.value or b"{}")
    except Exception as exc:  # not found, not connected, a timeout: publish without a parent
        log.debug("no trace context for agent %r: %s: %s", agent_id, type(exc).__name__, exc)
        return None
    return context_from(value.get("trace")) if isinstance(value, dict) else None
