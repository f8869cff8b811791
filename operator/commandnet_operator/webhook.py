"""The admission webhook's server: kopf's, with certificates the operator makes at start.

In a cluster the API server reaches it through a Service (``COMMANDNET_WEBHOOK_SERVICE``);
on a developer's machine through a URL host (``COMMANDNET_WEBHOOK_HOST``). kopf keeps the
ValidatingWebhookConfiguration current, ``caBundle`` included, so a new certificate after a
restart needs nothing from the user. Replicas that each made their own CA would fight over
``caBundle``: with more than one, mount one certificate (``COMMANDNET_WEBHOOK_CERT_FILE``...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import kopf

from commandnet.local.certs import CertAuthority, TlsFiles

from .settings import OperatorSettings

CERT_DAYS = 365  # made anew at every start; a year outlives any pod


def _certificates(settings: OperatorSettings, hosts: list[str]) -> TlsFiles:
    """The mounted certificate when given, else a CA and a certificate made now."""
    given = (settings.webhook_cert_file, settings.webhook_key_file, settings.webhook_ca_file)
    if all(given):  # the settings refuse some without the others
        cert, key, ca = (Path(str(f)) for f in given)
        return TlsFiles(cert=cert, key=key, ca=ca)
    authority = CertAuthority(Path(settings.webhook_cert_dir), name="commandnet-operator-ca",
                              days=CERT_DAYS)
    return authority.issue(hosts[0], hosts=hosts)


class ServiceWebhookServer(kopf.WebhookServer):
    """kopf's server, advertised as a Service reference instead of a URL."""

    def __init__(self, *, service: str, namespace: str, service_port: int,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.service = service
        self.namespace = namespace
        self.service_port = service_port

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async for config in super().__call__(fn):
            yield kopf.WebhookClientConfig(
                caBundle=config.get("caBundle"),
                service=kopf.WebhookClientConfigService(
                    name=self.service, namespace=self.namespace, port=self.service_port,
                    path=self.path or ""))


def webhook_server(settings: OperatorSettings) -> kopf.WebhookServer:
    """The server, with a CA and a serving certificate made now in ``webhook_cert_dir``."""
    hosts = ["localhost", "127.0.0.1"]
    if settings.webhook_host:
        hosts.insert(0, settings.webhook_host)
    if settings.webhook_service:
        svc, ns = settings.webhook_service, settings.webhook_service_namespace
        hosts += [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
    files = _certificates(settings, hosts)
    if settings.webhook_service and not settings.webhook_host:
        return ServiceWebhookServer(service=settings.webhook_service,
                                    namespace=settings.webhook_service_namespace,
                                    service_port=settings.webhook_service_port,
                                    addr="0.0.0.0", port=settings.webhook_port,
                                    certfile=files.cert, pkeyfile=files.key, cafile=files.ca)
    return kopf.WebhookServer(host=settings.webhook_host or "127.0.0.1", addr="0.0.0.0",
                              port=settings.webhook_port, certfile=files.cert,
                              pkeyfile=files.key, cafile=files.ca)
