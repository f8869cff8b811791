"""The operator's settings: environment variables, the same ``COMMANDNET_*`` names as the
worker's where they mean the same thing (the bus and its credentials)."""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from commandnet.adapters.nats_graphs import DEFAULT_GRAPH_BUCKET
from commandnet.adapters.nats_status import DEFAULT_BUCKET
from commandnet.worker.settings import BusSettings


class OperatorSettings(BusSettings):
    """Everything ``commandnet-operator`` reads (the cluster comes from the in-cluster service
    account or ``KUBECONFIG``)."""

    model_config = SettingsConfigDict(env_prefix="COMMANDNET_", extra="ignore")

    namespaces: list[str] = Field(
        default_factory=list,
        description="namespaces whose Agents this operator serves (a JSON list; empty: all, "
                    "cluster-wide)")
    status_bucket: str = Field(default=DEFAULT_BUCKET,
                               description="the workers' KV bucket of agent statuses")
    graph_bucket: str = Field(default=DEFAULT_GRAPH_BUCKET,
                              description="the workers' KV bucket of pool graphs")
    status_window: float = Field(
        default=0.5, gt=0,
        description="seconds a status change waits for more changes before one patch writes "
                    "them all (coalescing)")
    status_writes_per_second: float = Field(
        default=500.0, gt=0,
        description="status patches per second at most, all Agents together (above it, "
                    "changes wait and coalesce: status lags, nothing is lost)")
    cancel_timeout: float = Field(
        default=60.0, ge=0,
        description="seconds a deleted running Agent waits for NATS to take its cancel; then "
                    "the finalizer lets go anyway (the agent may finish its run)")
    trigger_retry: float = Field(default=5.0, gt=0,
                                 description="seconds between attempts to send a trigger")
    peering: str = Field(default="commandnet",
                         description="the ClusterKopfPeering object: one active replica")
    standalone: bool = Field(default=False, description="run without peering (development)")
    priority: int = Field(
        default_factory=lambda: secrets.randbelow(1_000_000) + 1,
        description="peering priority (default random: of replicas started together, one "
                    "acts and the others wait)")
    health_port: int = Field(default=8080, ge=0, le=65535,
                             description="port of /healthz (liveness)")
    metrics_port: int = Field(default=9090, ge=0, le=65535,
                              description="port of /metrics (Prometheus)")
    webhook_port: int = Field(default=9443, ge=1, le=65535,
                              description="port the admission webhook listens on (HTTPS)")
    webhook_host: str | None = Field(
        default=None,
        description="address the API server calls the webhook at, as a URL host (local runs); "
                    "unset with webhook_service set: the Service is used")
    webhook_service: str | None = Field(
        default=None, description="Service in front of the webhook (in-cluster runs)")
    webhook_service_namespace: str = Field(default="default",
                                           description="the webhook Service's namespace")
    webhook_service_port: int = Field(default=443, description="the webhook Service's port")
    webhook_cert_dir: str = Field(
        default="/tmp/commandnet-operator-certs",
        description="folder for the webhook's certificates when the operator makes them (an "
                    "emptyDir; made at every start)")
    webhook_cert_file: str | None = Field(
        default=None,
        description="the webhook's serving certificate (a mounted Secret, e.g. cert-manager's; "
                    "with more than one replica, all must share one); unset: made at start")
    webhook_key_file: str | None = Field(default=None,
                                         description="the serving certificate's key file")
    webhook_ca_file: str | None = Field(
        default=None, description="the CA that signed it (the API server's caBundle)")
    webhook_enabled: bool = Field(default=True, description="serve the admission webhook")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["json", "text"] = Field(default="json", description="json or text")
    webhook_configuration: str = Field(
        default="commandnet.io",
        description="name of the Validating- and MutatingWebhookConfiguration the operator "
                    "creates and keeps current; empty: serve the webhook only, the "
                    "configurations are managed elsewhere (the Helm chart)")

    @model_validator(mode="after")
    def _whole_certificate(self) -> OperatorSettings:
        given = (self.webhook_cert_file, self.webhook_key_file, self.webhook_ca_file)
        if any(given) and not all(given):
            raise ValueError("set COMMANDNET_WEBHOOK_CERT_FILE, COMMANDNET_WEBHOOK_KEY_FILE and "
                             "COMMANDNET_WEBHOOK_CA_FILE together, or none of them")
        return self
