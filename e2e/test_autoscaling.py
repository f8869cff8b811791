"""Autoscaling that loses nothing, on real pods and real controllers (issue 10): the controller
manager's HPA on metrics-server's CPU figures, and KEDA's nats-jetstream trigger on the pool's
backlog down to zero replicas. Every scale-down drains or hands back running steps: each agent's
history is exact and no step waited out a lease.

The suite samples replicas and backlog every 2 s and writes them, as JSON and as a PNG chart,
to ``$COMMANDNET_E2E_RESULTS`` (default ``.tools/e2e-results/``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.release import Cluster, Release, agent, cluster_under_test
from e2e.testbed.tools import REPO_ROOT
from tests.graphs.procs import wait_until

pytestmark = [pytest.mark.kube, pytest.mark.timeout(2400)]

NAMESPACE = "cn-scale"
RESULTS = Path(os.environ.get("COMMANDNET_E2E_RESULTS") or REPO_ROOT / ".tools" / "e2e-results")
# The workers' lease, longer than any queueing here: a step handed back on scale-down that had
# to wait for its lease to expire would leave a gap this long between two transitions.
LEASE_SECONDS = 120
LEASE_ENV = [{"name": "COMMANDNET_LEASE_SECONDS", "value": str(LEASE_SECONDS)},
             {"name": "COMMANDNET_ACK_WAIT", "value": str(LEASE_SECONDS // 2)}]
BURN = [(1, "Burn", "Cool"), (2, "Cool", "")]
HELLO = [(1, "Hello", "Work"), (2, "Work", "Done"), (3, "Done", "")]


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return cluster_under_test(request, tmp_path_factory.mktemp("cluster"), "kube_autoscaling")


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    """Two pools: `cpu` (HPA on CPU, 1..3) and `backlog` (KEDA on its consumer, 0..4)."""
    rel = Release(cluster, NAMESPACE, "scale", pool="cpu", graphs=["e2e.graphs:Burn"])
    rel.create_namespace()
    rel.deploy_servers()
    # The Service's ClusterIP rather than its DNS name: on the test bed KEDA runs as host
    # processes (e2e/testbed/keda.py), which reach ClusterIPs through kube-proxy but do not use
    # the cluster's DNS; in a cluster both forms work.
    ip = cluster.kubectl("get", "service", "nats", "-n", NAMESPACE, "-o",
                         "jsonpath={.spec.clusterIP}").stdout.strip()
    monitoring = f"{ip}:8222"
    fast_down = {"scaleDown": {"stabilizationWindowSeconds": 15,
                               "policies": [{"type": "Percent", "value": 100,
                                             "periodSeconds": 15}]}}
    rel.install(
        operator={"watchNamespaces": [NAMESPACE]},
        pools=[
            {"name": "cpu", "graph": ["e2e.graphs:Burn"], "env": LEASE_ENV, "maxInFlight": 4,
             "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}},
             "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3,
                             "targetCPUUtilizationPercentage": 50, "behavior": fast_down}},
            {"name": "backlog", "graph": ["e2e.graphs:Hello"], "maxInFlight": 16, "env": LEASE_ENV,
             "keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 4,
                      "pollingInterval": 3, "cooldownPeriod": 20, "lagThreshold": 8,
                      "activationLagThreshold": 0,
                      "natsServerMonitoringEndpoint": monitoring, "behavior": fast_down}},
        ])
    try:
        yield rel
    finally:
        rel.cluster.helm("uninstall", rel.name, "-n", NAMESPACE, "--wait", check=False)


class Sampler:
    """Replicas of the pools' Deployments and the backlog of their consumers, every 2 s."""

    def __init__(self, release: Release, pools: list[str]) -> None:
        self.release = release
        self.pools = pools
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def backlog(self) -> dict[str, int]:
        """pending + ack-pending of each pool's consumer, from NATS' /jsz through the API
        server's service proxy (works on any cluster)."""
        raw = self.release.cluster.kubectl(
            "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/services/nats:monitor/proxy/"
            "jsz?consumers=true", check=False).stdout
        out = {pool: 0 for pool in self.pools}
        try:
            data = json.loads(raw)
        except ValueError:
            return out
        for account in data.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                for consumer in stream.get("consumer_detail") or []:
                    if consumer.get("name") in out:
                        out[consumer["name"]] += (int(consumer.get("num_pending", 0))
                                                  + int(consumer.get("num_ack_pending", 0)))
        return out

    def replicas(self) -> dict[str, int]:
        items = self.release.cluster.json(
            "get", "deployments", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=worker")
        return {d["metadata"]["labels"].get("commandnet.io/pool", "?"):
                int(d.get("status", {}).get("readyReplicas") or 0) for d in items["items"]}

    def _run(self) -> None:
        while not self._stop.is_set():
            row: dict[str, Any] = {"t": round(time.monotonic() - self.started, 1)}
            try:
                row["replicas"] = self.replicas()
                row["backlog"] = self.backlog()
                self.rows.append(row)
            except AssertionError:
                pass  # a kubectl hiccup: the next sample counts
            self._stop.wait(2.0)

    def peak(self, pool: str) -> int:
        return max((r["replicas"].get(pool, 0) for r in self.rows), default=0)

    def save(self, name: str, title: str) -> Path:
        """JSON and a PNG chart of replicas and backlog against time."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(self.rows, indent=1))
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
        times = [r["t"] for r in self.rows]
        for pool in self.pools:
            top.step(times, [r["replicas"].get(pool, 0) for r in self.rows], where="post",
                     label=f"{pool}: ready replicas")
            bottom.plot(times, [r["backlog"].get(pool, 0) for r in self.rows],
                        label=f"{pool}: backlog (pending + ack-pending)")
        top.set_ylabel("replicas")
        bottom.set_ylabel("messages")
        bottom.set_xlabel("seconds")
        top.legend(loc="upper right")
        bottom.legend(loc="upper right")
        top.set_title(title)
        fig.tight_layout()
        path = RESULTS / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def apply_agents(release: Release, prefix: str, count: int, start: str,
                 delay: float) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    manifests = []
    for name in names:
        body = agent(name, start, delay)
        body["spec"]["pool"] = "cpu" if start == "Burn" else "backlog"
        manifests.append(body)
    for chunk in range(0, len(manifests), 100):
        release.cluster.apply(manifests[chunk:chunk + 100], namespace=NAMESPACE)
    return names


def assert_exact_and_never_waited_a_lease(release: Release, names: list[str],
                                          trail: list[tuple[int, str, str]],
                                          timeout: float) -> None:
    """All Succeeded; each history exactly ``trail``; no gap between an agent's transitions
    as long as a lease (a step handed back on drain is retried at once, not after expiry)."""
    final = release.wait_final(names, timeout)
    bad = [n for n, a in final.items() if a["status"]["phase"] != "Succeeded"]
    assert not bad, f"{len(bad)} Agents did not succeed: {bad[:5]}"
    ids = [a["status"]["agentId"] for a in final.values()]
    history = release.history(ids)
    wrong = {a: rows for a, rows in history.items() if rows != trail}
    assert not wrong, f"{len(wrong)} histories differ from {trail}: {list(wrong.items())[:3]}"
    quoted = ",".join("'" + i.replace("'", "''") + "'" for i in ids)
    gaps = release.psql(
        "SELECT agent_id, max(gap) FROM (SELECT agent_id, extract(epoch FROM at - "
        "lag(at) OVER (PARTITION BY agent_id ORDER BY step)) AS gap FROM history "
        f"WHERE agent_id IN ({quoted})) g GROUP BY agent_id HAVING max(gap) >= {LEASE_SECONDS}")
    assert not gaps, f"steps waited out a lease: {gaps[:5]}"


def test_hpa_scales_a_cpu_bound_pool_up_under_load_and_back_after(release: Release) -> None:
    with Sampler(release, ["cpu"]) as sampler:
        names = apply_agents(release, "burn", 160, "Burn", delay=0.5)
        wait_until(lambda: sampler.peak("cpu") > 1, 300,
                   lambda: f"the HPA to scale pool cpu above 1: {sampler.rows[-3:]}", interval=2)
        assert_exact_and_never_waited_a_lease(release, names, BURN, timeout=900)
        wait_until(lambda: sampler.rows and sampler.rows[-1]["replicas"].get("cpu") == 1, 300,
                   lambda: f"pool cpu back to 1 replica: {sampler.rows[-3:]}", interval=2)
    path = sampler.save("hpa", "HPA on CPU: pool cpu, 160 Agents of 0.5 s CPU each")
    assert path.stat().st_size > 0
    assert sampler.peak("cpu") >= 2


def test_keda_scales_a_pool_from_zero_on_backlog_and_back_to_zero(release: Release) -> None:
    with Sampler(release, ["backlog"]) as sampler:
        wait_until(lambda: sampler.rows and sampler.rows[-1]["replicas"].get("backlog") == 0,
                   180, "pool backlog at 0 replicas before the load", interval=2)
        # Each Agent lives >= 4.5 s (3 steps of 1.5 s) and holds one message (pending or
        # ack-pending) all that time, so the backlog is at least the Agents alive at once:
        # past 16 of them (one pod's maxInFlight) it grows however fast the operator creates
        # them, and KEDA asks for ceil(backlog / 8) pods.
        names = apply_agents(release, "keda", 500, "Hello", delay=1.5)
        wait_until(lambda: sampler.peak("backlog") > 1, 300,
                   lambda: f"KEDA to scale pool backlog above 1: {sampler.rows[-3:]}", interval=2)
        assert_exact_and_never_waited_a_lease(release, names, HELLO, timeout=1200)
        wait_until(lambda: sampler.rows[-1]["replicas"].get("backlog") == 0, 300,
                   lambda: f"pool backlog back to 0 replicas: {sampler.rows[-3:]}", interval=2)
    path = sampler.save("keda", "KEDA nats-jetstream: pool backlog, 500 Agents, min 0")
    assert path.stat().st_size > 0
    assert max(r["backlog"]["backlog"] for r in sampler.rows) > 0
