"""``commandnet-operator``: run the operator (settings from the environment; see ``--help``)."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
import kopf
from aiolimiter import AsyncLimiter
from pydantic import ValidationError

from commandnet.tracing.setup import setup_tracing
from commandnet.worker.logs import setup_logging
from commandnet.worker.settings import SettingsError

from . import metrics
from .handlers import Operator, registry
from .kube import Kube, load_configuration
from .link import BusLink
from .settings import OperatorSettings


def _epilog() -> str:
    lines = ["\b", "Settings (environment variables):"]
    for name, info in OperatorSettings.model_fields.items():
        lines.append(f"  COMMANDNET_{name.upper():<34} {info.description or ''}")
    return "\n".join(lines)


@click.command(epilog=_epilog(), context_settings={"max_content_width": 120})
def main() -> None:
    """Reconcile Agent resources: trigger on create, status from the workers' bucket, cancel
    on delete. The cluster comes from the pod's service account or KUBECONFIG."""
    try:
        settings = OperatorSettings()
        settings.bus_connection()  # credentials files exist, no password without a user
    except (ValidationError, SettingsError) as exc:
        raise click.ClickException(f"invalid settings: {exc}") from None
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    quiet_library_logs()
    sys.exit(asyncio.run(run(settings)))


class _DropKopfSettings(logging.Filter):
    """kopf attaches its whole OperatorSettings to each object-log record as ``settings``: a
    kilobyte of repetition per line in JSON logs; the object reference (``k8s_ref``) stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("settings", None)
        return True


def quiet_library_logs() -> None:
    """No access-log line per probe or webhook call (aiohttp logs each at INFO), no settings
    dump per kopf record."""
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropKopfSettings())


async def run(settings: OperatorSettings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    configuration = await load_configuration()
    metrics.serve(settings.metrics_port)
    # OTEL_* configures an exporter: each trigger is the root span of its agent's trace.
    stop_tracing = setup_tracing("commandnet-operator")
    memo = Operator(settings=settings, configuration=configuration, link=BusLink(settings),
                    kube=Kube(configuration),
                    limiter=AsyncLimiter(settings.status_writes_per_second, 1.0))
    await kopf.operator(
        registry=registry,
        memo=memo,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=settings.standalone,
        priority=settings.priority,
        # A peering name makes kopf's peering mandatory: every watch stays paused until the
        # peering CRD exists, even in standalone mode. Standalone asks for no peering at all.
        peering_name=None if settings.standalone else settings.peering,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz"
        if settings.health_port else None,
    )
    if stop_tracing is not None:
        await asyncio.to_thread(stop_tracing)
    return 0


if __name__ == "__main__":
    main()
