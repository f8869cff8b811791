"""metrics-server (built by `make tools`) serving metrics.k8s.io: what `kubectl top` and the
controller manager's HPA read. It scrapes the real kubelet's `/metrics/resource`.

It runs as a host process, not a pod: the node registers as `localhost` and its kubelet serves
on 127.0.0.1 only, which a pod cannot reach (its 127.0.0.1 is its own). As a host process it
reaches the kubelet by the node's Hostname address, as the API server does. Everything else is
as on a cluster: upstream's RBAC for its service account (the client certificate names that
account), APIService v1beta1.metrics.k8s.io -> Service kube-system/metrics-server (a selector-less
Service whose EndpointSlice is the host's address), delegated authentication of the aggregator's
front-proxy certificate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e.testbed.apiservice import (
    apply,
    identity_kubeconfig,
    register,
    service_dns_names,
    serving_cert,
    unregister,
)
from e2e.testbed.controlplane import LocalCluster
from e2e.testbed.procs import AllOrNothing, Component, free_ports, launch, stop_component
from e2e.testbed.tools import find_tools

NAMESPACE = "kube-system"
NAME = "metrics-server"
API_SERVICE = "v1beta1.metrics.k8s.io"
SERVICE_ACCOUNT_USER = f"system:serviceaccount:{NAMESPACE}:{NAME}"
RESOLUTION = "10s"  # metrics-server's minimum


def rbac() -> list[dict[str, Any]]:
    """Upstream's manifests/base/rbac.yaml (v0.8.0) for its service account."""
    sa = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    crb = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": NAME, "namespace": NAMESPACE}},
        {"apiVersion": crb, "kind": "ClusterRole",
         "metadata": {"name": "system:aggregated-metrics-reader", "labels": {
             "rbac.authorization.k8s.io/aggregate-to-admin": "true",
             "rbac.authorization.k8s.io/aggregate-to-edit": "true",
             "rbac.authorization.k8s.io/aggregate-to-view": "true"}},
         "rules": [{"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": crb, "kind": "ClusterRole", "metadata": {"name": "system:metrics-server"},
         "rules": [{"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                   {"apiGroups": [""], "resources": ["pods", "nodes"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": crb, "kind": "RoleBinding",
         "metadata": {"name": "metrics-server-auth-reader", "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "extension-apiserver-authentication-reader"},
         "subjects": sa},
        {"apiVersion": crb, "kind": "ClusterRoleBinding",
         "metadata": {"name": "metrics-server:system:auth-delegator"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:auth-delegator"},
         "subjects": sa},
        {"apiVersion": crb, "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:metrics-server"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:metrics-server"},
         "subjects": sa},
    ]


class MetricsServer(AllOrNothing):
    """metrics-server for `cluster` (which needs a node to have anything to measure)."""

    def __init__(self, cluster: LocalCluster, workdir: Path | None = None,
                 detach: bool = False) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir or cluster.workdir / NAME).resolve()
        self.exe = find_tools([NAME])[NAME]
        self.detach = detach
        self.component: Component | None = None
        self.port = 0

    def _start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        kubeconfig = identity_kubeconfig(
            self.cluster, SERVICE_ACCOUNT_USER,
            ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"],
            self.workdir / "client")
        crt, key = serving_cert(self.cluster, service_dns_names(NAME, NAMESPACE),
                                self.workdir / "serving")
        (self.port,) = free_ports(1, self.cluster.host_ip)
        apply(self.cluster, rbac())
        argv = [
            str(self.exe),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={self.cluster.host_ip}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={crt}",
            f"--tls-private-key-file={key}",
            f"--cert-dir={self.workdir}",
            # The kubelet's serving certificate is its own self-signed one.
            "--kubelet-insecure-tls",
            # Node "localhost": its Hostname address is the kubelet's 127.0.0.1.
            "--kubelet-preferred-address-types=Hostname",
            "--kubelet-use-node-status-port",  # the kubelet's port is a free one, not 10250
            f"--metric-resolution={RESOLUTION}",
            "--kubelet-request-timeout=5s",  # must be below the resolution (default 10 s)
            "--v=1",
        ]
        self.component = launch(NAME, argv, self.workdir / "logs", self.workdir,
                                detach=self.detach)
        register(self.cluster, NAMESPACE, NAME, self.port, "metrics.k8s.io", "v1beta1",
                 [self.component])

    def state(self) -> dict[str, Any]:
        pid = self.component.proc.pid if self.component and self.component.proc else None
        return {"kind": NAME, "pids": {NAME: pid}, "workdir": str(self.workdir)}

    def stop(self) -> None:
        """Unregister the APIService (an unavailable one would stall discovery and namespace
        deletion for the rest of the cluster's life), then stop the process. Idempotent."""
        if self.component is not None:
            unregister(self.cluster, API_SERVICE)
            stop_component(self.component)
            self.component = None
