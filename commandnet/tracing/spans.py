"""Spans and W3C trace context for bus messages. Imports OpenTelemetry: load this module only
when :func:`commandnet.tracing.active` says a provider is set.

- Publishing (:func:`publishing`): a trigger (a ``TriggerCommand``, or the first step event of
  an agent triggered through the API) starts a new trace whose root is a ``trigger`` span, linked
  to the caller's span if there is one: one trace per agent. A step event published while a
  delivery of the same agent is handled carries that delivery's span as its parent. A re-publish
  by the outbox sweeper or the reconciler gets a ``republish`` span under the parent it is given
  (the span that published the step first, as the status bucket remembers it).
- Consuming (:func:`handle`): each delivery gets a span, child of the ``traceparent`` in its
  headers, current while the engine handles it (so user spans in ``Node.run`` nest under it);
  it ends when the task that settled the delivery finishes, after the engine's observer hooks,
  which :class:`~commandnet.tracing.observer.TracingObserver` uses to add node, attempt and
  outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from ..bus import Delivery, Handler
from ..messages import AnyMessage, StepEvent, TriggerCommand
from . import trace_id_of

__all__ = [
    "AGENT_ID", "ATTEMPT", "NEXT_NODE", "NODE", "OUTCOME", "POOL", "RECOVERY", "STEP",
    "Handling", "TracedDelivery", "context_from", "current_handling", "current_headers",
    "current_traceparent", "handle", "plan", "publishing", "trace_id_of", "traceparent_of",
]

# Span attributes (one name per fact, as OpenTelemetry's conventions spell them).
AGENT_ID = "commandnet.agent.id"
NODE = "commandnet.node"
STEP = "commandnet.step"
ATTEMPT = "commandnet.attempt"
OUTCOME = "commandnet.outcome"
NEXT_NODE = "commandnet.next_node"
POOL = "commandnet.pool"
RECOVERY = "commandnet.recovery"
DELIVERIES = "commandnet.delivery.count"
SETTLED = "commandnet.delivery.settled"

Message = AnyMessage
Plan = Literal["continue", "trigger", "recover", "plain"]

_HANDLING = otel_context.create_key("commandnet.handling")
_tracers: dict[int, trace.Tracer] = {}


def _tracer() -> trace.Tracer:
    provider = trace.get_tracer_provider()
    found = _tracers.get(id(provider))
    if found is None:
        found = _tracers[id(provider)] = trace.get_tracer("commandnet", tracer_provider=provider)
    return found


# ------------------------------------------------------------------------------ consuming


class Handling:
    """A delivery being handled and its span. The span ends when the task that settled the
    delivery finishes (the engine's observers run after the ack), or when handing it over
    failed."""

    __slots__ = ("agent_id", "ended", "kind", "origin", "outcome", "parent", "settled_as",
                 "span")

    def __init__(self, span: Span, agent_id: str | None, kind: str = "step",
                 parent: otel_context.Context | None = None) -> None:
        self.span = span
        self.parent = parent  # the context the message carried
        self.agent_id = agent_id
        self.kind = kind
        self.outcome: str | None = None
        self.settled_as: str | None = None
        self.ended = False
        self.origin = asyncio.current_task()  # the bus's fetch loop

    def set_outcome(self, outcome: str) -> None:
        """What became of the delivery (the first word wins, later ones are more detail)."""
        self.outcome = outcome
        self.span.set_attribute(OUTCOME, outcome)

    def settled(self, how: str) -> None:
        """The delivery was acked, nacked or dead-lettered from the current task."""
        if self.settled_as is not None:
            return
        self.settled_as = how
        self.span.set_attribute(SETTLED, how)
        task = asyncio.current_task()
        if task is None or task is self.origin or task.done():
            self.end()
        else:
            task.add_done_callback(lambda _: self.end())

    def end(self) -> None:
        """End the span once; an outcome nobody named is how the delivery was settled."""
        if self.ended:
            return
        self.ended = True
        if self.outcome is None:
            self.span.set_attribute(OUTCOME, self.settled_as or "unsettled")
        self.span.end()


class TracedDelivery(Delivery):
    """The engine's view of a delivery whose settling ends its span."""

    def __init__(self, inner: Delivery, handling: Handling) -> None:
        self.inner = inner
        self.handling = handling
        self.data = inner.data
        self.deliveries = inner.deliveries

    async def ack(self) -> None:
        try:
            await self.inner.ack()
        finally:
            self.handling.settled("ack")

    async def nack(self, delay: float) -> None:
        # A bus that re-publishes the message to nack it (a step handed over in-process) does
        # so in the context the message came with: the retry is a sibling of this attempt.
        token = otel_context.attach(self.handling.parent or otel_context.Context())
        try:
            await self.inner.nack(delay)
        finally:
            otel_context.detach(token)
            self.handling.settled("nack")

    async def in_progress(self) -> None:
        await self.inner.in_progress()

    async def dead_letter(self, reason: str) -> None:
        try:
            await self.inner.dead_letter(reason)
        finally:
            self.handling.settled("dead_letter")


def _peek(data: bytes) -> dict[str, Any]:
    """The message's fields, as far as they can be read (the engine judges them)."""
    try:
        fields = json.loads(data)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


async def handle(handler: Handler, delivery: Delivery, headers: Mapping[str, str] | None,
                 subject: str, pool: str) -> None:
    """Hand ``delivery`` to ``handler`` inside a new span, child of the context in
    ``headers``; the handler's tasks inherit it as their current span."""
    fields = _peek(delivery.data)
    kind = str(fields.get("kind") or "malformed")
    parent = propagate.extract(dict(headers or {}))
    attributes: dict[str, Any] = {
        "messaging.system": "nats", "messaging.operation.type": "process",
        "messaging.destination.name": subject, POOL: pool, DELIVERIES: delivery.deliveries,
    }
    agent_id = fields.get("agent_id")
    if isinstance(agent_id, str):
        attributes[AGENT_ID] = agent_id
    if isinstance(fields.get("step"), int):
        attributes[STEP] = fields["step"]
    if fields.get("redo"):
        attributes[RECOVERY] = "reconciler"
    if isinstance(fields.get("start_node"), str):
        attributes[NODE] = fields["start_node"]
    name = "step" if kind == "step" else f"handle {kind}"
    span = _tracer().start_span(name, context=parent, kind=SpanKind.CONSUMER,
                                attributes=attributes)
    handling = Handling(span, agent_id if isinstance(agent_id, str) else None, kind, parent)
    ctx = otel_context.set_value(_HANDLING, handling, trace.set_span_in_context(span, parent))
    token = otel_context.attach(ctx)
    try:
        await handler(TracedDelivery(delivery, handling))
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        handling.end()
        raise
    finally:
        otel_context.detach(token)


def current_handling(agent_id: str | None = None) -> Handling | None:
    """The delivery handled in this task (of ``agent_id``, if given), or None."""
    found = otel_context.get_value(_HANDLING)
    if not isinstance(found, Handling) or (agent_id is not None and found.agent_id != agent_id):
        return None
    return found


# ----------------------------------------------------------------------------- publishing


def plan(message: Message) -> Plan:
    """How a message about to be published joins a trace:

    - ``continue``: a step event of the agent whose delivery this task handles (the next step,
      or step 0 from a trigger command): its span is the parent;
    - ``trigger``: a trigger command, or the first step event of an agent triggered here (the
      API): a new trace, rooted in a ``trigger`` span;
    - ``recover``: any other step event (the outbox sweeper, the reconciler): the publisher
      looks up where the agent's trace left off and passes it to :func:`publishing`;
    - ``plain``: a cancel, a signal or a resume: the caller's context, if any.
    """
    if not isinstance(message, StepEvent | TriggerCommand):
        return "plain"
    if isinstance(message, TriggerCommand):
        return "trigger"
    if not message.redo and current_handling(message.agent_id) is not None:
        return "continue"
    if message.step == 0 and not message.redo:
        return "trigger"
    return "recover"


@contextlib.contextmanager
def publishing(message: Message, subject: str, pool: str, how: Plan | None = None,
               parent: otel_context.Context | None = None) -> Iterator[dict[str, str]]:
    """The trace headers for ``message`` (see :func:`plan`), inside the span that publishes
    it when it needs one (``trigger``, ``republish``), which ends when the block does."""
    how = how or plan(message)
    headers: dict[str, str] = {}
    if how in ("continue", "plain"):
        propagate.inject(headers)
        yield headers
        return
    attributes: dict[str, Any] = {
        "messaging.system": "nats", "messaging.operation.type": "send",
        "messaging.destination.name": subject, POOL: pool, AGENT_ID: message.agent_id,
    }
    if how == "trigger":
        name, links = "trigger", []
        caller = trace.get_current_span().get_span_context()
        if caller.is_valid:  # a new trace per agent, linked to what triggered it
            links.append(Link(caller))
        if isinstance(message, TriggerCommand):
            attributes[NODE] = message.start_node
        context = otel_context.Context()  # empty: the trigger span is a root
    else:
        assert isinstance(message, StepEvent)
        name, links = "republish", []
        attributes[STEP] = message.step
        attributes[RECOVERY] = "reconciler" if message.redo else "outbox"
        context = parent if parent is not None else otel_context.Context()
    with _tracer().start_as_current_span(name, context=context, kind=SpanKind.PRODUCER,
                                         links=links, attributes=attributes):
        propagate.inject(headers)
        yield headers


# -------------------------------------------------------------------------------- helpers


def traceparent_of(span: Span) -> str | None:
    """The W3C ``traceparent`` naming ``span``, or None for an invalid one."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_from(traceparent: object) -> otel_context.Context | None:
    """A context whose remote parent is ``traceparent``, or None when it is not one."""
    if trace_id_of(traceparent) is None:
        return None
    ctx = propagate.extract({"traceparent": str(traceparent)})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def current_headers() -> dict[str, str]:
    """The current context as message headers (empty when there is none)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def current_traceparent(agent_id: str) -> str | None:
    """The ``traceparent`` of the delivery of ``agent_id`` handled in this task, or None
    (the status bucket stores it, so a re-publish can continue the trace from there)."""
    handling = current_handling(agent_id)
    if handling is None or handling.kind not in ("step", "trigger"):
        return None  # a cancel's context is the canceller's, not the agent's trace
    return traceparent_of(handling.span)
