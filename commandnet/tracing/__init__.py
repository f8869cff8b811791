"""OpenTelemetry tracing, the ``otel`` extra: one trace per agent, one span per step delivery.

Nothing here imports OpenTelemetry until a tracer provider is in use: :func:`active` only
looks at ``sys.modules``, so a process without the extra (or without a configured provider)
imports nothing and does nothing per step. See ``docs/tracing.md`` for the design.

- :func:`active`: whether commandnet should trace (a real tracer provider is set).
- :mod:`.spans`: the trigger span, the span of each delivery, W3C ``traceparent`` headers.
- :mod:`.observer`: :class:`~.observer.TracingObserver` fills a step's span with its node,
  attempt and outcome (add it to an :class:`~commandnet.Engine`'s observers).
- :mod:`.nats`: what the JetStream bus calls instead of its plain publish and hand-over
  while tracing is active (headers, the status bucket's ``trace`` on recovery).
- :mod:`.setup`: :func:`~.setup.setup_tracing`, the SDK provider and OTLP exporter from the
  standard ``OTEL_*`` variables (workers, the CLI and the operator call it).
"""

from __future__ import annotations

import sys

__all__ = ["TRACE_HEADERS", "active", "trace_id_of"]

# The headers the W3C propagators write (OTEL_PROPAGATORS may add others, e.g. b3); a message
# copied by the bus (a renewal) keeps them.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def active() -> bool:
    """Whether a real tracer provider is set. Cheap, and imports nothing: a process that never
    imported OpenTelemetry cannot have set a provider."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def trace_id_of(traceparent: object) -> str | None:
    """The trace id (32 hex digits) in a ``traceparent`` value, or None."""
    if not isinstance(traceparent, str):
        return None
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or set(parts[1]) == {"0"}:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()
