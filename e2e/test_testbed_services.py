"""Services on the test bed work as on any cluster: kube-proxy (ClusterIPs) and CoreDNS
(`name.ns.svc.cluster.local`), from pods, from the host and from the API server."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from e2e.testbed import CLUSTER_DNS, PYTHON_IMAGE, LocalCluster

pytestmark = pytest.mark.kube

NS = "svc-test"
BODY = "hello from web"
SERVER = f"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {BODY!r}.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""
CLIENT = """
import json, ssl, time, urllib.error, urllib.request
out = {}
for name in ("web.svc-test.svc.cluster.local", "web"):
    for attempt in range(40):  # kube-proxy programs a new endpoint within its sync period
        try:
            with urllib.request.urlopen(f"http://{name}/", timeout=10) as r:
                out[name] = r.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if attempt == 39:
                raise
            time.sleep(0.5)
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
req = urllib.request.Request(
    "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=json.dumps({"apiVersion": "authentication.k8s.io/v1",
                     "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": "Bearer " + open(f"{sa}/token").read(),
             "Content-Type": "application/json"}, method="POST")
with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
    out["whoami"] = json.load(r)["status"]["userInfo"]["username"]
out["resolv"] = open("/etc/resolv.conf").read()
print(json.dumps(out))
"""


def python_pod(name: str, code: str, restart: str, labels: dict[str, str],
               port: int | None = None) -> dict[str, object]:
    container: dict[str, object] = {"name": name, "image": PYTHON_IMAGE,
                                    "imagePullPolicy": "Never",
                                    "command": ["python3", "-u", "-c", code]}
    if port is not None:  # Ready once it listens, not once the process started
        container["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"restartPolicy": restart, "containers": [container]},
    }


def wait_phase(k: LocalCluster, name: str, phases: tuple[str, ...], limit: float = 120
               ) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        pod: dict[str, Any] = json.loads(
            k.kubectl("-n", NS, "get", "pod", name, "-o", "json").stdout
        )
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in pod["status"].get("conditions", []))
        phase = pod["status"].get("phase")
        if phase in phases and (phase != "Running" or ready):
            return pod
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:.0f} s waiting for pod {name} to be {phases}: "
                        f"{json.dumps(pod['status'])[:2000]}")
        time.sleep(0.5)


def test_services_and_dns_from_pods_host_and_api_server(kube_with_node: LocalCluster) -> None:
    k = kube_with_node
    assert k.node is not None
    k.node.import_python_image()
    k.kubectl("create", "namespace", NS)
    k.kubectl("-n", NS, "wait", "--for=create", "serviceaccount/default", "--timeout=60s")
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }
    k.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List",
         "items": [service, python_pod("web", SERVER, "Always", {"app": "web"}, port=8080)]}))
    wait_phase(k, "web", ("Running",))

    # From a pod: the Service by its full and its short DNS name; the API server by
    # kubernetes.default.svc with the pod's own service-account token.
    client = python_pod("client", CLIENT, "Never", {})
    k.kubectl("apply", "-f", "-", input=json.dumps(client))
    pod = wait_phase(k, "client", ("Succeeded", "Failed"))
    log = k.kubectl("-n", NS, "logs", "client").stdout
    assert pod["status"]["phase"] == "Succeeded", log
    got = json.loads(log.strip().splitlines()[-1])
    assert got["web.svc-test.svc.cluster.local"] == BODY
    assert got["web"] == BODY
    assert got["whoami"] == f"system:serviceaccount:{NS}:default"
    assert f"nameserver {CLUSTER_DNS}" in got["resolv"]
    assert f"search {NS}.svc.cluster.local svc.cluster.local cluster.local" in got["resolv"]

    # From the host, by ClusterIP: kube-proxy's OUTPUT rules, the path the API server takes to
    # a webhook's Service.
    ip = k.kubectl("-n", NS, "get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}").stdout
    with urllib.request.urlopen(f"http://{ip}/", timeout=10) as resp:
        assert resp.read().decode() == BODY

    # From the API server: its service proxy reaches the Service's pod.
    raw = k.kubectl("get", "--raw", f"/api/v1/namespaces/{NS}/services/web:http/proxy/").stdout
    assert raw == BODY

    k.kubectl("delete", "namespace", NS, "--wait=false")
