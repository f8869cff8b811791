"""The operator's Prometheus metrics (served on ``COMMANDNET_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

STATUS_LAG = Histogram(
    "commandnet_operator_status_lag_seconds",
    "Seconds from a worker's status write to the Agent status patch that shows it",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 30,
             60, 120), registry=REGISTRY)
PATCHES = Counter("commandnet_operator_status_patches_total",
                  "Agent status patches, by result (ok, conflict, gone, error)", ["result"],
                  registry=REGISTRY)
WEBHOOK = Counter("commandnet_operator_webhook_decisions_total",
                  "Admission decisions on Agents, by decision and reason",
                  ["decision", "reason"], registry=REGISTRY)
COMMANDS = Counter("commandnet_operator_commands_total",
                   "Trigger and cancel commands sent to NATS, by kind and result",
                   ["kind", "result"], registry=REGISTRY)
BUS_UP = Gauge("commandnet_operator_bus_connected",
               "1 while the operator is connected to NATS", registry=REGISTRY)
TRACKED = Gauge("commandnet_operator_agents_tracked",
                "Unfinished Agents whose status the operator keeps current", registry=REGISTRY)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on a background thread (0: not at all)."""
    if port:
        start_http_server(port, addr, registry=REGISTRY)
