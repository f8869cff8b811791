"""``commandnet-operator``: run the operator (settings from the environment; see ``--help``)."""

from __future__ import annotations

import asyncio
import sys

import click
import kopf
from aiolimiter import AsyncLimiter
from pydantic import ValidationError

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
    sys.exit(asyncio.run(run(settings)))


async def run(settings: OperatorSettings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    configuration = await load_configuration()
    metrics.serve(settings.metrics_port)
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
        peering_name=settings.peering,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz"
        if settings.health_port else None,
    )
    return 0


if __name__ == "__main__":
    main()
