"""CoreDNS as the cluster's DNS add-on, deployed the way upstream's coredns.yaml does (Deployment,
Service `kube-dns` at 10.96.0.10, ServiceAccount and RBAC, Corefile ConfigMap), from an image made
here out of the static binary `make tools` builds (umoci; imported, never pulled).

It reads the API server in-cluster (`kubernetes` Service through kube-proxy), so a Ready CoreDNS
also proves pods reach the API server by ClusterIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e2e.testbed.controlplane import LocalCluster
from e2e.testbed.errors import ClusterError
from e2e.testbed.node import CLUSTER_DNS, CLUSTER_DOMAIN, LocalNode
from e2e.testbed.procs import wait_for
from e2e.testbed.tools import find_tools, read_versions

NAMESPACE = "kube-system"
LABELS = {"k8s-app": "kube-dns"}

COREFILE = f""".:53 {{
    errors
    health {{
        lameduck 5s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    prometheus :9153
    forward . /etc/resolv.conf
    cache 30
    reload
    loadbalance
}}
"""


def coredns_image() -> str:
    return f"localhost/coredns:{read_versions()['COREDNS_VERSION']}"


def manifests(image: str) -> list[dict[str, Any]]:
    """Upstream's CoreDNS deployment (coredns/deployment, kubernetes/coredns.yaml.sed), with a
    local image."""
    meta = {"namespace": NAMESPACE}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns",
                      "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "coredns", **meta}, "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "labels": LABELS, **meta},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": LABELS},
             "template": {
                 "metadata": {"labels": LABELS},
                 "spec": {
                     "priorityClassName": "system-cluster-critical",
                     "serviceAccountName": "coredns",
                     "dnsPolicy": "Default",  # the node's resolv.conf, not itself
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "resources": {"limits": {"memory": "170Mi"},
                                       "requests": {"cpu": "100m", "memory": "70Mi"}},
                         "volumeMounts": [{"name": "config-volume",
                                           "mountPath": "/etc/coredns", "readOnly": True}],
                         "ports": [
                             {"containerPort": 53, "name": "dns", "protocol": "UDP"},
                             {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"},
                             {"containerPort": 9153, "name": "metrics", "protocol": "TCP"},
                         ],
                         "securityContext": {
                             "allowPrivilegeEscalation": False,
                             "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                             "readOnlyRootFilesystem": True,
                         },
                         "livenessProbe": {
                             "httpGet": {"path": "/health", "port": 8080, "scheme": "HTTP"},
                             "initialDelaySeconds": 60, "timeoutSeconds": 5,
                             "successThreshold": 1, "failureThreshold": 5,
                         },
                         "readinessProbe": {
                             "httpGet": {"path": "/ready", "port": 8181, "scheme": "HTTP"},
                             "periodSeconds": 1,
                         },
                     }],
                     "volumes": [{"name": "config-volume", "configMap": {
                         "name": "coredns",
                         "items": [{"key": "Corefile", "path": "Corefile"}]}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", **meta,
                      "labels": {**LABELS, "kubernetes.io/name": "CoreDNS"},
                      "annotations": {"prometheus.io/port": "9153",
                                      "prometheus.io/scrape": "true"}},
         "spec": {
             "selector": LABELS,
             "clusterIP": CLUSTER_DNS,
             "ports": [
                 {"name": "dns", "port": 53, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                 {"name": "metrics", "port": 9153, "protocol": "TCP"},
             ],
         }},
    ]


class CoreDNS:
    """CoreDNS on `node`: image imported, objects applied, Deployment available."""

    def __init__(self, cluster: LocalCluster, node: LocalNode) -> None:
        self.cluster = cluster
        self.node = node
        self.exe = find_tools(["coredns"])["coredns"]
        self.image = coredns_image()

    def start(self) -> CoreDNS:
        name, tag = self.image.rsplit(":", 1)
        tar = self.node.build_image(
            "coredns", tag, {"/coredns": Path(self.exe).resolve()}, {},
            ["--config.entrypoint", "/coredns"],
        )
        self.node.import_archive(tar, base_name=name)
        self.cluster.kubectl("apply", "-f", "-",
                             input=json.dumps({"apiVersion": "v1", "kind": "List",
                                               "items": manifests(self.image)}))
        try:
            wait_for("CoreDNS ready (kube-system pod k8s-app=kube-dns)", self._available,
                     self.cluster.start_timeout, list(self.node.components.values()),
                     interval=0.5)
        except ClusterError as exc:
            logs = self.cluster.kubectl("-n", NAMESPACE, "logs", "-l", "k8s-app=kube-dns",
                                        "--tail=30", check=False)
            raise ClusterError(f"{exc}\nCoreDNS log:\n{logs.stdout}{logs.stderr}") from exc
        return self

    def _available(self) -> tuple[bool, str]:
        res = self.cluster.kubectl("-n", NAMESPACE, "get", "pods", "-l", "k8s-app=kube-dns",
                                   "-o", "json", check=False)
        if res.returncode != 0:
            return False, res.stderr.strip()
        pods = json.loads(res.stdout)["items"]
        for pod in pods:
            conds = pod.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                return True, "ready"
        return False, json.dumps([p.get("status", {}) for p in pods])[:1500]

    def stop(self) -> None:
        """Delete the Deployment (the pod goes with it; the rest goes with the cluster)."""
        try:
            self.cluster.kubectl("-n", NAMESPACE, "delete", "deployment", "coredns",
                                 "--ignore-not-found", "--wait=true", "--timeout=30s",
                                 check=False, timeout=60)
        except ClusterError:
            pass  # the API server may already be gone; the node's stop kills the pod anyway
