"""Local Kubernetes control-plane fixtures (issue 4; docs/kubernetes-testbed.md).

- `kube_tools`: the paths of the tools `make tools` installs; FAILS (never skips) when missing.
- `kube` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler, started
  once per test session on free loopback ports; yields an `e2e.localcluster.LocalCluster`:
  `.kubeconfig`, `.server`, `await .api_client()` (kubernetes_asyncio), `.kubectl(...)`,
  `.helm(...)`, `.run_tool("untt", ...)`, `.env()`. Torn down even when tests fail.
- `kube_with_node` (session): another such control plane plus a real node (kubelet, containerd,
  runc; e2e/localnode.py), so pods run. Needs root and a few Debian packages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.localcluster import LocalCluster, ToolsMissingError, find_tools, start_cluster


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
    """A control plane of its own plus a real node "localhost" (kubelet + containerd + runc):
    pods run, with images `localhost/busybox:1` and `localhost/pause:3.10` imported (use
    `imagePullPolicy: Never`). Needs root and Debian packages (e2e/localnode.py); FAILS, with
    the fix, when they are missing."""
    from e2e.localnode import LocalNode, node_prerequisites

    message = ""
    try:
        node_prerequisites()
    except ToolsMissingError as exc:
        message = str(exc)
    if message:
        pytest.fail(message, pytrace=False)  # loudly, never a skip
    cluster = start_cluster(tmp_path_factory.mktemp("kube-node"))
    node: LocalNode | None = None
    try:
        node = LocalNode(cluster, cluster.workdir / "node").start()
        cluster.node = node
        yield cluster
    finally:
        if node is not None:
            node.stop()
        cluster.stop()
