"""KEDA (built by `make tools`): its operator (`keda`, cmd/operator) and its metrics API server
(`keda-adapter`, cmd/adapter) serving external.metrics.k8s.io, which the controller manager's
HPA reads for the HPAs the operator makes from ScaledObjects.

Both run as host processes with kubeconfigs, as KEDA's own `make run` does for development; a
scaler then reaches what the host reaches (a nats-server on 127.0.0.1, commandnet.local.nats).
What a cluster would have is all there: KEDA's CRDs and RBAC (read from its module, copied next
to the binaries by `make tools`, applied unchanged: the client certificates name the service
account keda/keda-operator that those rules bind), APIService v1beta1.external.metrics.k8s.io ->
Service keda/keda-metrics-apiserver (selector-less, EndpointSlice = the host's address), and the
operator <-> adapter gRPC link over mutual TLS with one certificate (ca.crt, tls.crt, tls.key in
a cert folder, as the keda-operator's cert rotation would write it; rotation is off).
"""

from __future__ import annotations

import json
import os
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
from e2e.testbed.errors import ToolsMissingError
from e2e.testbed.procs import (
    AllOrNothing,
    Component,
    free_ports,
    http_ok,
    launch,
    stop_component,
    wait_for,
)
from e2e.testbed.tools import find_tools

NAMESPACE = "keda"
OPERATOR_SA = "keda-operator"
ADAPTER_SERVICE = "keda-metrics-apiserver"
API_SERVICE = "v1beta1.external.metrics.k8s.io"
CRDS = ("scaledobjects.keda.sh", "scaledjobs.keda.sh", "triggerauthentications.keda.sh",
        "clustertriggerauthentications.keda.sh")


def keda_config_dir() -> Path:
    """KEDA's `config/` (crd, rbac, metrics-server) that `make tools` copies beside `keda`."""
    exe = find_tools(["keda"])["keda"]
    config = exe.resolve().parent / "config"
    if not (config / "crd").is_dir():
        raise ToolsMissingError(f"{config}/crd is missing (KEDA's CRDs): run `make tools`")
    return config


class Keda(AllOrNothing):
    """KEDA's operator and metrics API server for `cluster`."""

    def __init__(self, cluster: LocalCluster, workdir: Path | None = None,
                 detach: bool = False) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir or cluster.workdir / "keda").resolve()
        self.tools = find_tools(["keda", "keda-adapter"])
        self.config = keda_config_dir()
        self.detach = detach
        self.components: dict[str, Component] = {}

    def _start(self) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cluster = self.cluster
        assert cluster.pki is not None
        self._apply_config()
        user = f"system:serviceaccount:{NAMESPACE}:{OPERATOR_SA}"
        kubeconfig = identity_kubeconfig(
            cluster, user, ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"],
            self.workdir / "client")
        certs = self.workdir / "certs"
        names = [*service_dns_names(ADAPTER_SERVICE, NAMESPACE),
                 *service_dns_names(OPERATOR_SA, NAMESPACE)]
        crt, key = serving_cert(cluster, names, certs / "tls", client=True)
        (certs / "ca.crt").write_bytes(cluster.pki.ca_cert.read_bytes())
        metrics, probe, grpc, prom = free_ports(4)
        (adapter_port,) = free_ports(1, cluster.host_ip)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "WATCH_NAMESPACE": "",
               "POD_NAMESPACE": NAMESPACE, "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE}
        self.components["keda-operator"] = launch("keda-operator", [
            str(self.tools["keda"]),
            f"--metrics-bind-address=127.0.0.1:{metrics}",
            f"--health-probe-bind-address=127.0.0.1:{probe}",
            f"--metrics-service-bind-address=127.0.0.1:{grpc}",
            f"--cert-dir={certs}",
            f"--ca-dir={certs}",
            "--enable-cert-rotation=false",
            "--leader-elect=false",
            "--zap-log-level=info",
        ], logs, self.workdir, detach=self.detach, env=env)
        url = f"http://127.0.0.1:{probe}/readyz"
        wait_for(f"keda-operator {url}", lambda: http_ok(url), cluster.start_timeout,
                 list(self.components.values()))
        self.components["keda-adapter"] = launch("keda-adapter", [
            str(self.tools["keda-adapter"]),
            f"--lister-kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={cluster.host_ip}",
            f"--secure-port={adapter_port}",
            f"--tls-cert-file={crt}",
            f"--tls-private-key-file={key}",
            f"--cert-dir={certs}",
            f"--metrics-service-address=127.0.0.1:{grpc}",
            f"--port={prom}",
            "--zap-log-level=info",
        ], logs, self.workdir, detach=self.detach, env=env)
        register(cluster, NAMESPACE, ADAPTER_SERVICE, adapter_port, "external.metrics.k8s.io",
                 "v1beta1", list(self.components.values()))

    def _apply_config(self) -> None:
        """Namespace, CRDs (server-side: they are too big for the last-applied annotation),
        and KEDA's RBAC for the operator and the metrics API server."""
        c = self.cluster
        apply(c, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
                  {"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": OPERATOR_SA, "namespace": NAMESPACE}}])
        c.kubectl("apply", "--server-side", "-f", str(self.config / "crd"))
        wait_for("KEDA's CRDs Established", self._crds_established, c.start_timeout, [],
                 interval=0.5)
        for f in ("rbac/role.yaml", "rbac/role_binding.yaml", "rbac/aggregate_cluster_roles.yaml",
                  "metrics-server/role.yaml", "metrics-server/role_binding.yaml"):
            c.kubectl("apply", "-f", str(self.config / f))

    def _crds_established(self) -> tuple[bool, str]:
        res = self.cluster.kubectl("get", "crd", *CRDS, "-o", "json", check=False)
        if res.returncode != 0:
            return False, res.stderr.strip()
        missing = [
            crd["metadata"]["name"] for crd in json.loads(res.stdout)["items"]
            if not any(c["type"] == "Established" and c["status"] == "True"
                       for c in crd.get("status", {}).get("conditions") or [])
        ]
        return not missing, f"not Established yet: {missing}"

    def state(self) -> dict[str, Any]:
        return {"kind": "keda", "workdir": str(self.workdir),
                "pids": {n: c.proc.pid for n, c in self.components.items() if c.proc}}

    def stop(self) -> None:
        """Unregister the APIService, then stop the adapter and the operator. Idempotent.
        ScaledObjects carry KEDA's finalizer: delete them while the operator still runs."""
        if self.components:
            unregister(self.cluster, API_SERVICE)
        for name in reversed(list(self.components)):
            stop_component(self.components.pop(name))

