"""``commandnet worker``: run a worker process (flags override ``COMMANDNET_*`` variables)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
from prometheus_client import disable_created_metrics
from pydantic import ValidationError

from ..errors import CommandNetError
from ..loading import GraphLoadError
from ..worker.logs import redact, setup_logging
from ..worker.process import Worker
from ..worker.settings import WorkerSettings, load_settings

# settings field -> its flag, for error messages
_FLAGS = {
    "graph": "--graph", "pool": "--pool", "store_url": "--store", "bus_url": "--bus",
    "worker_id": "--worker-id", "max_in_flight": "--max-in-flight",
    "lease_seconds": "--lease-seconds", "drain_grace": "--drain-grace",
    "connect_timeout": "--connect-timeout", "http_host": "--http-host",
    "http_port": "--http-port", "log_level": "--log-level", "log_format": "--log-format",
    "sweep_interval": "--sweep-interval", "outbox_grace": "--outbox-grace",
    "stall_after": "--stall-after", "ack_wait": "--ack-wait", "migrate": "--migrate/--no-migrate",
    "dlq_max_bytes": "--dlq-max-bytes", "dlq_max_age": "--dlq-max-age",
    "reconcile_batch": "--reconcile-batch", "status_flush_interval": "--status-flush-interval",
    "local_handoff": "--local-handoff", "wake_interval": "--wake-interval",
    "node_grace": "--node-grace",
}


def _environment_only() -> str:
    """The settings with no flag (secrets, files, TLS, pool sizes), for ``--help``."""
    lines = [f"COMMANDNET_{name.upper()}: {field.description or ''}"
             for name, field in WorkerSettings.model_fields.items() if name not in _FLAGS]
    return "\b\nEnvironment only (secrets never go in flags):\n" + "\n".join(lines)


@click.command(epilog=_environment_only())
@click.option("--graph", "graph", multiple=True, metavar="PKG.MODULE:NODE",
              help="Start node of a graph to run; repeat for several. [COMMANDNET_GRAPH, "
                   "comma-separated]")
@click.option("--pool", help="Worker pool: consumes commandnet.<pool>.* [COMMANDNET_POOL; "
                             "default: default]")
@click.option("--store", "store_url", metavar="URL",
              help="memory://, sqlite:///file.db, postgresql://user@host/db "
                   "[COMMANDNET_STORE_URL; password: COMMANDNET_STORE_PASSWORD]")
@click.option("--bus", "bus_url", metavar="URL",
              help="nats://host:4222 or memory:// [COMMANDNET_BUS_URL; password: "
                   "COMMANDNET_BUS_PASSWORD]")
@click.option("--worker-id", help="Lease owner name, e.g. the pod name [COMMANDNET_WORKER_ID; "
                                  "default: host-pid]")
@click.option("--max-in-flight", type=int, help="Steps run at once [COMMANDNET_MAX_IN_FLIGHT; 64]")
@click.option("--lease-seconds", type=float,
              help="Lease length; a dead worker blocks its agents this long "
                   "[COMMANDNET_LEASE_SECONDS; 30]")
@click.option("--drain-grace", type=float,
              help="On SIGTERM, seconds for in-flight steps before they are handed back "
                   "[COMMANDNET_DRAIN_GRACE; 30]")
@click.option("--connect-timeout", type=float,
              help="Give up when store or bus stay unreachable [COMMANDNET_CONNECT_TIMEOUT; 30]")
@click.option("--http-host", help="Probe/metrics address [COMMANDNET_HTTP_HOST; 0.0.0.0]")
@click.option("--http-port", type=int,
              help="Probe/metrics port, 0 for any [COMMANDNET_HTTP_PORT; 8080]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False),
              help="[COMMANDNET_LOG_LEVEL; INFO]")
@click.option("--log-format", type=click.Choice(["json", "text"]),
              help="[COMMANDNET_LOG_FORMAT; json]")
@click.option("--sweep-interval", type=float,
              help="Seconds between repair sweeps [COMMANDNET_SWEEP_INTERVAL; 2]")
@click.option("--outbox-grace", type=float,
              help="Re-publish outbox rows older than this [COMMANDNET_OUTBOX_GRACE; 5]")
@click.option("--ack-wait", type=float,
              help="JetStream redelivery wait for unacknowledged steps [COMMANDNET_ACK_WAIT; 30]")
@click.option("--dlq-max-bytes", type=int,
              help="Dead-letter stream size limit, oldest dropped first; 0: none "
                   "[COMMANDNET_DLQ_MAX_BYTES; 268435456]")
@click.option("--dlq-max-age", type=float,
              help="Seconds a dead letter is kept; 0: no limit "
                   "[COMMANDNET_DLQ_MAX_AGE; 1209600]")
@click.option("--stall-after", type=float,
              help="Re-publish the step of agents idle this long [COMMANDNET_STALL_AFTER; 300]")
@click.option("--reconcile-batch", type=int,
              help="Stalled agents the pool's sweeper re-publishes per sweep at most "
                   "[COMMANDNET_RECONCILE_BATCH; 100]")
@click.option("--wake-interval", type=float,
              help="Seconds between looks for parked agents that are due "
                   "[COMMANDNET_WAKE_INTERVAL; 0.5]")
@click.option("--node-grace", type=float,
              help="Seconds a step at a node this worker lacks waits for a worker that has it "
                   "(rolling upgrades), then the agent fails: NodeRemoved "
                   "[COMMANDNET_NODE_GRACE; 600]")
@click.option("--status-flush-interval", type=float,
              help="Seconds the KV status mirror buffers writes "
                   "[COMMANDNET_STATUS_FLUSH_INTERVAL; 0.25]")
@click.option("--local-handoff", type=int,
              help="JetStream with PostgreSQL: run the next step of an agent this worker just "
                   "committed here at once, at most this many waiting; 0: always via the "
                   "stream [COMMANDNET_LOCAL_HANDOFF; 64]")
@click.option("--migrate/--no-migrate", default=None,
              help="Create/upgrade the store schema at start [COMMANDNET_MIGRATE; true]")
def worker(**flags: Any) -> None:
    """Run a worker: consume the pool's steps and commands until SIGTERM, then drain.

    Probes: GET /healthz, /readyz and /metrics on --http-host:--http-port.
    """
    settings = _settings(flags)
    # This process is the worker: *_created series only double the scrape (process-wide).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    secrets = settings.secrets()
    try:
        process = Worker(settings)
    except GraphLoadError as exc:
        raise click.BadParameter(str(exc), param_hint="'--graph'") from None
    except CommandNetError as exc:
        raise click.ClickException(redact(str(exc), secrets)) from None
    try:
        code = asyncio.run(process.run())
    except CommandNetError as exc:
        raise click.ClickException(redact(str(exc), secrets)) from None
    sys.exit(code)


def _settings(flags: dict[str, Any]) -> WorkerSettings:
    try:
        return load_settings(**flags)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a rule across fields; its message names them
                lines.append(err["msg"].removeprefix("Value error, "))
                continue
            field = str(err["loc"][0])
            where = f"{_FLAGS.get(field, field)} / COMMANDNET_{field.upper()}"
            shown = "" if "password" in field else f" (got {err.get('input')!r})"
            lines.append(f"{where}: {err['msg']}{shown}")
        raise click.UsageError("invalid settings:\n  " + "\n  ".join(lines)) from None
