"""The product on real pods: NATS and PostgreSQL as pods, `helm install` of charts/commandnet with
the e2e graphs' worker image, Agents applied with kubectl (issue 9).

Runs against the test bed (a node of its own, images built here and imported) or, with
``COMMANDNET_E2E_KUBECONFIG`` and ``COMMANDNET_E2E_IMAGES``, any cluster (`make e2e-kind`). The
tests share one release and run in file order; the last one uninstalls it.
"""

from __future__ import annotations

import pytest

from e2e.release import Cluster, Release, agent, cluster_under_test
from tests.graphs.procs import wait_until

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

HELLO = [(1, "Hello", "Work"), (2, "Work", "Done"), (3, "Done", "")]
SIX = [(i, f"Six{i}", f"Six{i + 1}" if i < 6 else "") for i in range(1, 7)]


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return cluster_under_test(request, tmp_path_factory.mktemp("cluster"), "kube_with_node")


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Release:
    rel = Release(cluster, "cn-e2e")
    rel.create_namespace()
    rel.deploy_servers()
    rel.install(operator={"watchNamespaces": [rel.namespace]})
    return rel


def agent_ids(agents: dict[str, dict[str, object]]) -> dict[str, str]:
    return {name: a["status"]["agentId"] for name, a in agents.items()}  # type: ignore[index]


def apply_batch(release: Release, prefix: str, count: int, start: str = "Hello",
                delay: float = 0.0) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    release.cluster.apply([agent(n, start, delay) for n in names], namespace=release.namespace)
    return names


def assert_all_succeeded(release: Release, names: list[str], trail: list[tuple[int, str, str]],
                         timeout: float) -> None:
    """Every Agent Succeeded at the graph's last node, and the store holds each transition once."""
    final = release.wait_final(names, timeout)
    bad = {n: a["status"] for n, a in final.items() if a["status"]["phase"] != "Succeeded"
           or a["status"].get("currentNode") != trail[-1][1]}
    assert not bad, f"{len(bad)} Agents did not succeed at {trail[-1][1]}: {list(bad.items())[:3]}"
    history = release.history(agent_ids(final).values())
    wrong = {a: rows for a, rows in history.items() if rows != trail}
    assert not wrong, f"{len(wrong)} agents' history is not exactly {trail}: " \
                      f"{list(wrong.items())[:3]}"


def test_the_chart_runs_agents_to_their_last_node(release: Release) -> None:
    assert len(release.pods("worker")) == 2 and len(release.pods("operator")) == 1
    names = apply_batch(release, "hello", 20)
    assert_all_succeeded(release, names, HELLO, timeout=240)


def test_deleting_a_worker_pod_mid_run_loses_nothing(release: Release) -> None:
    names = apply_batch(release, "kill", 40, start="Six1", delay=0.5)
    wait_until(lambda: sum(a.get("status", {}).get("phase") == "Running"
                           for a in release.agents().values()) >= 10,
               120, "Agents running", interval=1)
    victim = release.pods("worker")[0]["metadata"]["name"]
    release.cluster.kubectl("delete", "pod", victim, "-n", release.namespace, "--wait=false")
    assert_all_succeeded(release, names, SIX, timeout=420)
    assert victim not in {p["metadata"]["name"] for p in release.pods("worker")}


def test_helm_upgrade_rolls_the_workers_while_300_agents_run(release: Release) -> None:
    before = {p["metadata"]["name"] for p in release.pods("worker")}
    names = apply_batch(release, "roll", 300, delay=0.2)
    release.upgrade(workers={"podAnnotations": {"commandnet.io/e2e-roll": "2"}})
    after = {p["metadata"]["name"] for p in release.pods("worker")}
    assert not before & after, f"the upgrade left pods {before & after} in place"
    assert_all_succeeded(release, names, HELLO, timeout=900)


def test_the_operator_pod_deleted_mid_run_converges(release: Release) -> None:
    names = apply_batch(release, "op", 30, start="Six1", delay=0.5)
    wait_until(lambda: any(a.get("status", {}).get("phase") == "Running"
                           for a in release.agents().values()), 120, "an Agent running",
               interval=1)
    victim = release.pods("operator")[0]["metadata"]["name"]
    release.cluster.kubectl("delete", "pod", victim, "-n", release.namespace)
    assert_all_succeeded(release, names, SIX, timeout=420)
    assert victim not in {p["metadata"]["name"] for p in release.pods("operator")}


def test_helm_uninstall_leaves_nothing_but_the_crd_and_the_agents(release: Release) -> None:
    agents_before = set(release.agents())
    release.uninstall()
    cluster = release.cluster
    selector = f"app.kubernetes.io/instance={release.name}"
    kinds = ",".join(["deployments", "replicasets", "pods", "services", "serviceaccounts",
                      "configmaps", "secrets", "jobs", "poddisruptionbudgets", "roles",
                      "rolebindings", "leases"])
    cluster_kinds = "clusterroles,clusterrolebindings,validatingwebhookconfigurations," \
                    "mutatingwebhookconfigurations"

    def left() -> list[str]:
        return (cluster.kubectl("get", kinds, "-n", release.namespace, "-l", selector, "-o",
                                "name").stdout.split()
                + cluster.kubectl("get", cluster_kinds, "-l", selector, "-o",
                                  "name").stdout.split())

    # Pods end after their grace period (workers drain); nothing may stay beyond it.
    grace = 60 + 30 + 10
    try:
        wait_until(lambda: not left(), grace + 30, "the release's objects to go", interval=2)
    except AssertionError:
        raise AssertionError(f"left after helm uninstall: {left()}") from None
    everything = cluster.kubectl("get", cluster_kinds, "-o", "name").stdout.split()
    ours = f"/{release.name}-commandnet"
    assert not [h for h in everything if ours in h], everything
    assert cluster.kubectl("get", "crd", "agents.commandnet.io", check=False).returncode == 0
    assert set(release.agents()) == agents_before
