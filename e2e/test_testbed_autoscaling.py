"""Autoscaling on the test bed is done by the real controllers: metrics-server reads the real
kubelet so the controller manager's HPA scales a busy Deployment on CPU, and KEDA's operator and
metrics API server scale a Deployment 0 -> N -> 0 on a NATS JetStream consumer's lag."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from commandnet.local.nats import NatsServer
from e2e.testbed import BUSYBOX_IMAGE, LocalCluster

pytestmark = pytest.mark.kube

HPA_NS = "hpa-test"
KEDA_NS = "keda-test"


def apply(cluster: LocalCluster, *items: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}))


def get(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    res = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def wait_until(what: str, probe: Callable[[], tuple[bool, str]], timeout: float) -> str:
    """Poll `probe` until it is true; fail with its last answer after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        ok, last = probe()
        if ok:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}; last: {last}")
        time.sleep(1)


def deployment(ns: str, name: str, replicas: int, command: list[str],
               resources: dict[str, Any]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": name, "image": BUSYBOX_IMAGE,
                                     "imagePullPolicy": "Never", "command": command,
                                     "resources": resources}]}}},
    }


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def test_hpa_scales_a_busy_deployment_on_cpu(kube_autoscaling: LocalCluster) -> None:
    cluster = kube_autoscaling
    busy = deployment(HPA_NS, "busy", 1, ["sh", "-c", "while :; do :; done"],
                      {"requests": {"cpu": "50m"}, "limits": {"cpu": "200m"}})
    apply(cluster, namespace(HPA_NS), busy)
    try:
        # kubectl top: metrics-server's numbers, scraped from the kubelet.
        def top() -> tuple[bool, str]:
            res = cluster.kubectl("top", "pods", "-n", HPA_NS, "--no-headers", check=False)
            m = re.search(r"^busy-\S+\s+(\d+)m\s+(\d+)Mi", res.stdout, re.M)
            return bool(m and int(m.group(1)) > 0), res.stdout + res.stderr

        line = wait_until("`kubectl top pods` to show the busy pod's CPU", top, 120)
        millicores = int(re.search(r"(\d+)m", line).group(1))  # type: ignore[union-attr]
        assert millicores >= 50, line  # it spins on 200m of quota
        nodes = cluster.kubectl("top", "nodes", "--no-headers").stdout
        assert re.search(r"^localhost\s+\d+m\s+\d+%\s+\d+Mi", nodes, re.M), nodes

        apply(cluster, {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "busy", "namespace": HPA_NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "busy"},
                "minReplicas": 1, "maxReplicas": 3,
                "metrics": [{"type": "Resource", "resource": {
                    "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}],
            },
        })

        def scaled() -> tuple[bool, str]:
            hpa = get(cluster, "-n", HPA_NS, "hpa", "busy").get("status", {})
            dep = get(cluster, "-n", HPA_NS, "deployment", "busy")
            ok = hpa.get("desiredReplicas", 0) > 1 and dep.get("spec", {}).get("replicas", 0) > 1
            return ok, json.dumps({"hpa": hpa, "deployment": dep.get("status")})[:2000]

        wait_until("the HPA to scale deployment busy above 1 replica", scaled, 120)
        hpa = get(cluster, "-n", HPA_NS, "hpa", "busy")["status"]
        utilization = hpa["currentMetrics"][0]["resource"]["current"]["averageUtilization"]
        assert utilization > 50, hpa
        conds = {c["type"]: c for c in hpa["conditions"]}
        assert conds["ScalingActive"]["reason"] == "ValidMetricFound", conds

        def running() -> tuple[bool, str]:
            pods = get(cluster, "-n", HPA_NS, "pods", "-l", "app=busy").get("items", [])
            phases = [p.get("status", {}).get("phase") for p in pods]
            return phases.count("Running") > 1, str(phases)

        wait_until("more than one busy pod Running", running, 60)
    finally:
        cluster.kubectl("delete", "namespace", HPA_NS, "--wait=false", check=False)


async def _jetstream(url: str, publish: int, purge: bool) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if purge:
            await js.purge_stream("jobs")
            return
        await js.add_stream(name="jobs", subjects=["jobs.>"])
        await js.add_consumer("jobs", ConsumerConfig(durable_name="workers",
                                                     ack_policy=AckPolicy.EXPLICIT))
        for i in range(publish):
            await js.publish("jobs.run", f"job {i}".encode())
    finally:
        await nc.close()


def test_keda_scales_zero_to_n_and_back_on_nats_lag(kube_autoscaling: LocalCluster,
                                                     tmp_path: Path) -> None:
    cluster = kube_autoscaling
    with NatsServer(tmp_path / "nats") as nats_server:
        asyncio.run(_jetstream(nats_server.url, publish=5, purge=False))
        apply(cluster, namespace(KEDA_NS),
              deployment(KEDA_NS, "consumer", 0, ["sleep", "3600"], {}))
        apply(cluster, {
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": "consumer", "namespace": KEDA_NS},
            "spec": {
                "scaleTargetRef": {"name": "consumer"},
                "minReplicaCount": 0, "maxReplicaCount": 3,
                "pollingInterval": 2, "cooldownPeriod": 5,
                "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                    "scaleDown": {"stabilizationWindowSeconds": 0}}}},
                "triggers": [{"type": "nats-jetstream", "metadata": {
                    # the operator runs on the host: it reads the monitor port on 127.0.0.1
                    "natsServerMonitoringEndpoint": f"127.0.0.1:{nats_server.monitor_port}",
                    "account": "$G", "stream": "jobs", "consumer": "workers",
                    "lagThreshold": "2", "activationLagThreshold": "0"}}],
            },
        })
        try:
            def replicas() -> int:
                dep = get(cluster, "-n", KEDA_NS, "deployment", "consumer")
                return int(dep.get("spec", {}).get("replicas") or 0)

            def status() -> str:
                so = get(cluster, "-n", KEDA_NS, "scaledobject", "consumer").get("status", {})
                hpa = get(cluster, "-n", KEDA_NS, "hpa", "keda-hpa-consumer").get("status", {})
                return json.dumps({"replicas": replicas(), "scaledobject": so, "hpa": hpa})[:3000]

            # 5 pending messages, 2 per replica: KEDA activates (0 -> 1), then the HPA reads the
            # lag through KEDA's metrics API server and goes to ceil(5 / 2) = 3.
            wait_until("KEDA to scale consumer to 3 replicas",
                       lambda: (replicas() == 3, status()), 120)
            hpa = get(cluster, "-n", KEDA_NS, "hpa", "keda-hpa-consumer")["status"]
            external = hpa["currentMetrics"][0]["external"]  # read through the adapter
            assert external["metric"]["name"] == "s0-nats-jetstream-jobs", hpa
            assert external["current"]["averageValue"] not in ("0", "0m"), hpa
            asyncio.run(_jetstream(nats_server.url, publish=0, purge=True))
            wait_until("KEDA to scale consumer back to 0",
                       lambda: (replicas() == 0, status()), 120)
        finally:
            cluster.kubectl("-n", KEDA_NS, "delete", "scaledobject", "consumer",
                            "--ignore-not-found", "--timeout=30s", check=False, timeout=60)
            cluster.kubectl("delete", "namespace", KEDA_NS, "--wait=false", check=False)
