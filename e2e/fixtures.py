"""Local Kubernetes test-bed fixtures (docs/kubernetes-testbed.md; the bed is `e2e.testbed`).

- `kube_tools`: the paths of the tools `make tools` installs; FAILS (never skips) when missing.
- `kube` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler, started
  once per test session on free ports; yields an `e2e.testbed.LocalCluster`: `.kubeconfig`,
  `.server`, `await .api_client()` (kubernetes_asyncio), `.kubectl(...)`, `.helm(...)`,
  `.run_tool("untt", ...)`, `.env()`. No node: pods stay Pending. Torn down even when tests fail.
- `kube_with_node` (session): another control plane plus node "localhost" (kubelet, containerd,
  runc), kube-proxy and CoreDNS: pods run, Services and `*.svc.cluster.local` names work as on any
  cluster. Needs root and a few Debian packages.
- `kube_autoscaling` (session, opt-in): `kube_with_node` plus metrics-server (`kubectl top`, CPU
  HPAs) and KEDA's operator and metrics API server (ScaledObjects), stopped when the session's
  last user is done; the same bed, since only one bed with a node runs per machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.testbed import (
    AUTOSCALING_TOOLS,
    LocalCluster,
    ToolsMissingError,
    find_tools,
    node_prerequisites,
    start_autoscaling,
    start_cluster,
)


@pytest.fixture(scope="session")
def kube_tools() -> dict[str, Path]:
    try:
        return find_tools()
    except ToolsMissingError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # loudly, never a skip


@pytest.fixture(scope="session")
def kube(kube_tools: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    LocalCluster
]:
    cluster = start_cluster(tmp_path_factory.mktemp("kube"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_with_node(
    kube_tools: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """A control plane of its own plus node "localhost" (kubelet + containerd + runc),
    kube-proxy (iptables mode) and CoreDNS (`kube-dns` at 10.96.0.10): pods run, reach Services
    by ClusterIP and by `name.ns.svc.cluster.local`, and reach the API server at
    `kubernetes.default.svc`. Images `localhost/busybox:1`, `localhost/pause:3.10` and
    `localhost/coredns:<version>` are imported (use `imagePullPolicy: Never`; more with
    `cluster.node.import_archive(path)`). Needs root, Debian packages and the kube-proxy and
    coredns tools; FAILS, with the fix, when something is missing. Tests that need a node use
    this one: kube-proxy's iptables chains are machine-wide, so a second bed with a node is
    refused while this one runs."""
    message = ""
    try:
        node_prerequisites()
        find_tools(["kube-proxy", "coredns"])
    except ToolsMissingError as exc:
        message = str(exc)
    if message:
        pytest.fail(message, pytrace=False)  # loudly, never a skip
    cluster = start_cluster(tmp_path_factory.mktemp("kube-node"), node=True)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_autoscaling(kube_with_node: LocalCluster) -> Iterator[LocalCluster]:
    """`kube_with_node` with metrics-server (metrics.k8s.io) and KEDA (external.metrics.k8s.io)
    added: the controller manager's HPA scales on CPU and on KEDA's triggers. Its add-ons are
    host processes (e2e/testbed/metrics.py, keda.py); FAILS with "run `make tools`" when they
    are not built. Costs ~6 s on top of the node bed (docs/kubernetes-testbed.md)."""
    message = ""
    try:
        find_tools(AUTOSCALING_TOOLS)
    except ToolsMissingError as exc:
        message = str(exc)
    if message:
        pytest.fail(message, pytrace=False)  # loudly, never a skip
    cluster = kube_with_node
    before = list(cluster.addons)
    try:
        start_autoscaling(cluster)
        yield cluster
    finally:
        for addon in reversed([a for a in cluster.addons if a not in before]):
            cluster.remove(addon)
