"""Extension API servers that run as host processes (metrics-server, KEDA's adapter), registered
with the aggregator the way a cluster registers one: an APIService naming a Service. Here the
Service has no selector and one EndpointSlice holding the host's address, so the API server
reaches the process through the ClusterIP and kube-proxy, exactly as it would reach a pod.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
from pathlib import Path
from typing import Any

from e2e.testbed.controlplane import LocalCluster
from e2e.testbed.errors import ClusterError
from e2e.testbed.pki import sign_client_cert, sign_serving_cert, write_kubeconfig
from e2e.testbed.procs import Component, cmdline_mentions, kill_group, pid_alive, wait_for


def service_dns_names(name: str, namespace: str) -> list[str]:
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.cluster.local"]


def serving_cert(cluster: LocalCluster, names: list[str], out: Path, *,
                 client: bool = False) -> tuple[Path, Path]:
    """A certificate from the cluster's CA valid for `names`, localhost, 127.0.0.1 and the
    host's address (the API server checks the Service name; local clients use the others)."""
    pki = cluster.pki
    assert pki is not None
    return sign_serving_cert(pki.ca_cert, pki.ca_key, names[0], [*names, "localhost"],
                             ["127.0.0.1", cluster.host_ip], out, client=client)


def identity_kubeconfig(cluster: LocalCluster, user: str, groups: list[str], out: Path) -> Path:
    """A kubeconfig with a client certificate for `user` in `groups`. A user named
    system:serviceaccount:NS:NAME (groups system:serviceaccounts[:NS]) is what the RBAC rules
    written for that service account match, so upstream's RBAC manifests apply unchanged."""
    pki = cluster.pki
    assert pki is not None
    crt, key = sign_client_cert(pki.ca_cert, pki.ca_key, user, groups, out)
    kubeconfig = out.with_suffix(".kubeconfig")
    write_kubeconfig(kubeconfig, cluster.server, pki.ca_cert, crt, key, user)
    return kubeconfig


def register(cluster: LocalCluster, namespace: str, name: str, port: int, group: str,
             version: str, watch: list[Component]) -> None:
    """Serve APIService `version.group` from the host's `port`: Service `name` (443 -> `port`)
    with one EndpointSlice (the host's address), then, once kube-proxy routes the ClusterIP to
    the server, the APIService (trusting the cluster CA), then wait until it is Available.

    The order matters: the aggregator connects as soon as the APIService exists and keeps that
    HTTP/2 connection. Made before kube-proxy has programmed the ClusterIP, it leaves the host
    untranslated and this VM's egress proxy answers it (404 for ever after; see the docs)."""
    apply(cluster, [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace},
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port,
                             "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-host", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name,
                                 "endpointslice.kubernetes.io/managed-by": "commandnet-testbed"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [cluster.host_ip], "conditions": {"ready": True}}],
         "ports": [{"name": "https", "port": port, "protocol": "TCP"}]},
    ])
    ip = cluster.kubectl("-n", namespace, "get", "service", name, "-o",
                         "jsonpath={.spec.clusterIP}").stdout.strip()
    assert cluster.pki is not None
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
    server_name = f"{name}.{namespace}.svc"

    def routed() -> tuple[bool, str]:
        try:
            with socket.create_connection((ip, 443), timeout=2) as raw, \
                    ctx.wrap_socket(raw, server_hostname=server_name):
                return True, "TLS handshake with the server"
        except (OSError, ssl.SSLError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    wait_for(f"kube-proxy to route {ip}:443 (Service {namespace}/{name}) to the host's "
             f"port {port}", routed, cluster.start_timeout, watch)
    apply(cluster, [{
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": f"{version}.{group}"},
        "spec": {"group": group, "version": version,
                 "service": {"name": name, "namespace": namespace, "port": 443},
                 "caBundle": base64.b64encode(cluster.pki.ca_cert.read_bytes()).decode(),
                 "groupPriorityMinimum": 100, "versionPriority": 100}}])
    wait_available(cluster, f"{version}.{group}", watch)


def apply(cluster: LocalCluster, items: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def wait_available(cluster: LocalCluster, api_service: str, watch: list[Component]) -> None:
    """Until the aggregator reports the APIService Available (it has reached the server)."""

    def probe() -> tuple[bool, str]:
        res = cluster.kubectl("get", "apiservice", api_service, "-o", "json", check=False)
        if res.returncode != 0:
            return False, res.stderr.strip()
        conds = json.loads(res.stdout).get("status", {}).get("conditions", [])
        for cond in conds:
            if cond.get("type") == "Available":
                return cond.get("status") == "True", f"{cond.get('reason')}: {cond.get('message')}"
        return False, "no Available condition yet"

    wait_for(f"APIService {api_service} Available", probe, cluster.start_timeout, watch,
             interval=0.5)


def unregister(cluster: LocalCluster, api_service: str) -> None:
    """Delete an APIService, quietly if the API server is already gone."""
    with contextlib.suppress(ClusterError):
        cluster.kubectl("delete", "apiservice", api_service, "--ignore-not-found",
                        "--request-timeout=10s", check=False, timeout=30)


def stop_from_state(state: dict[str, Any]) -> list[str]:
    """Stop the processes of a host add-on that another process started (CLI `down`)."""
    workdir = state.get("workdir", "")
    stopped = []
    for name, pid in (state.get("pids") or {}).items():
        if isinstance(pid, int) and pid_alive(pid) and cmdline_mentions(pid, workdir):
            kill_group(pid)
            stopped.append(f"{name} (pid {pid})")
    return stopped
