"""The cluster, as kubernetes-asyncio finds it (in-cluster service account, else
``KUBECONFIG``): one source for kopf's login and for the operator's own API calls."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import Configuration

from .resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

COMPONENT = "commandnet-operator"


async def load_configuration() -> Configuration:
    """The API server and credentials: the pod's service account, else ``KUBECONFIG``."""
    configuration = Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    else:
        await config.load_kube_config(client_configuration=configuration)
    return configuration


async def connection_info(configuration: Configuration) -> kopf.ConnectionInfo:
    """kopf's view of the same credentials (a projected token is re-read when it expires:
    kopf logs in again on a 401)."""
    token = await configuration.get_api_key_with_prefix("BearerToken") or None
    if token is not None and token.lower().startswith("bearer "):
        token = token[len("bearer "):]
    return kopf.ConnectionInfo(
        server=configuration.host or "",
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        scheme="Bearer" if token else None,
        token=token,
    )


def api_message(exc: client.ApiException) -> str:
    """The API server's own words for a refusal (its Status ``message``)."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


class Kube:
    """The operator's own API calls (status patches, deletions), on kubernetes-asyncio."""

    def __init__(self, configuration: Configuration) -> None:
        self.api = client.ApiClient(configuration)
        self.objects = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.instance = socket.gethostname()

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                           uid: str) -> None:
        """Merge ``status`` into the Agent's status, only if it is still the Agent ``uid``
        (a deleted and re-created name is another agent)."""
        body = {"metadata": {"uid": uid}, "status": status}
        await self.objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body,
            _content_type="application/merge-patch+json")  # type: ignore[call-arg]

    async def post_event(self, agent: dict[str, Any], kind: str, reason: str,
                         message: str) -> None:
        """A core/v1 Event about ``agent`` (a body with metadata), as ``kubectl describe``
        shows them."""
        meta = agent["metadata"]
        when = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.",
                                         namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=API_VERSION, kind=KIND, name=meta["name"],
                namespace=meta["namespace"], uid=meta["uid"]),
            type=kind, reason=reason, message=message[:1024], count=1,
            first_timestamp=when, last_timestamp=when,
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT, reporting_instance=self.instance)
        await self.core.create_namespaced_event(meta["namespace"], event)

    async def delete_agent(self, namespace: str, name: str, uid: str) -> None:
        """Delete the Agent ``uid`` (a re-created name is left alone)."""
        await self.objects.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name,
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid),
                                        propagation_policy="Background"))

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.api.close()
