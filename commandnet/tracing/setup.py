"""The SDK tracer provider and its OTLP exporter, from the standard ``OTEL_*`` variables.

A process (worker, ``commandnet trigger``, the operator) calls :func:`setup_tracing` at start:
it does nothing (and imports nothing of OpenTelemetry) unless an exporter is configured, and
it never replaces a provider the application set itself (its own exporter, or the SDK's
in-memory exporter in tests). The exporter reads the rest of its ``OTEL_EXPORTER_OTLP_*``
variables (headers, certificates, timeout, compression) itself.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import active

log = logging.getLogger("commandnet.tracing")

__all__ = ["OtelSettings", "setup_tracing"]


class OtelSettings(BaseSettings):
    """The ``OTEL_*`` variables that decide whether and where spans are exported."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    sdk_disabled: bool = Field(default=False, description="OTEL_SDK_DISABLED: trace nothing")
    traces_exporter: str = Field(
        default="otlp", description="OTEL_TRACES_EXPORTER: otlp (with an endpoint), console "
                                    "or none")
    exporter_otlp_endpoint: str | None = Field(
        default=None, description="OTEL_EXPORTER_OTLP_ENDPOINT, e.g. http://collector:4318")
    exporter_otlp_traces_endpoint: str | None = Field(
        default=None, description="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (the full URL)")
    exporter_otlp_protocol: str = Field(
        default="http/protobuf", description="OTEL_EXPORTER_OTLP_PROTOCOL: http/protobuf or "
                                             "grpc (needs opentelemetry-exporter-otlp-proto-"
                                             "grpc)")
    exporter_otlp_traces_protocol: str | None = Field(
        default=None, description="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (wins over the above)")
    service_name: str | None = Field(
        default=None, description="OTEL_SERVICE_NAME (default: the process's own name)")

    @property
    def exporter(self) -> str | None:
        """The exporter to set up: ``otlp``, ``console``, or None (tracing stays off)."""
        first = self.traces_exporter.split(",")[0].strip().lower()
        if self.sdk_disabled or first in ("none", ""):
            return None
        if first == "console":
            return "console"
        if first == "otlp" and (self.exporter_otlp_endpoint
                                or self.exporter_otlp_traces_endpoint):
            return "otlp"
        return None

    @property
    def protocol(self) -> str:
        """The OTLP protocol in force."""
        return (self.exporter_otlp_traces_protocol or self.exporter_otlp_protocol).strip()


def setup_tracing(service: str, settings: OtelSettings | None = None
                  ) -> Callable[[], None] | None:
    """Set the global SDK tracer provider with a batching exporter when one is configured.

    ``service`` is the ``service.name`` unless ``OTEL_SERVICE_NAME`` (or
    ``OTEL_RESOURCE_ATTRIBUTES``) says otherwise. Returns the function that flushes and shuts
    it down (call it at exit), or None when nothing was set up: no exporter configured, the
    ``otel`` extra not installed (a warning), or a provider already set by the application.
    """
    settings = settings or OtelSettings()
    kind = settings.exporter
    if kind is None:
        return None
    if active():
        log.info("a tracer provider is already set; commandnet uses it as it is")
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("OpenTelemetry tracing is configured (OTEL_* variables) but not installed "
                    "(%s): pip install 'commandnet[otel]'; tracing stays off", exc)
        return None
    exporter = _exporter(kind, settings.protocol)
    if exporter is None:
        return None
    attributes: dict[str, Any] = {}
    if not settings.service_name:
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans (%s%s) as service %r", kind,
             f", {settings.protocol}" if kind == "otlp" else "",
             settings.service_name or service)
    return provider.shutdown


def _exporter(kind: str, protocol: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)
    module = {"grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
              "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter"}
    if protocol not in module:
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%r is not supported (http/protobuf, grpc); "
                    "tracing stays off", protocol)
        return None
    try:
        exporter = importlib.import_module(module[protocol]).OTLPSpanExporter
    except ImportError as exc:
        log.warning("the OTLP %s exporter is not installed (%s); tracing stays off%s",
                    protocol, exc, ": pip install opentelemetry-exporter-otlp-proto-grpc"
                    if protocol == "grpc" else ": pip install 'commandnet[otel]'")
        return None
    return exporter()
