"""The one way to get a test bed: `start_cluster(workdir)` for a control plane, and
`start_cluster(workdir, node=True)` for a cluster like any other: a node that runs pods,
kube-proxy (Services) and CoreDNS (`name.ns.svc.cluster.local`); `autoscaling=True` adds
metrics-server and KEDA (opt-in: they cost start-up time). `cluster.stop()` stops it all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from e2e.testbed.controlplane import LocalCluster
from e2e.testbed.dns import CoreDNS
from e2e.testbed.errors import ClusterError, PortInUseError
from e2e.testbed.node import LocalNode, node_prerequisites
from e2e.testbed.tools import AUTOSCALING_TOOLS, CONTROL_PLANE_TOOLS, find_tools


def start_cluster(workdir: Path, components: Sequence[str] = CONTROL_PLANE_TOOLS, *,
                  node: bool = False, autoscaling: bool = False) -> LocalCluster:
    """A started cluster in a fresh folder under `workdir`; with `node=True` also a node,
    kube-proxy and CoreDNS (needs root and Debian packages; see `node_prerequisites`); with
    `autoscaling=True` (implies a node) also metrics-server and KEDA (`start_autoscaling`).
    Free ports are picked just before use; if another process grabs one in between, it tries
    once more with new ones (any other failure is reported as it is)."""
    node = node or autoscaling
    if autoscaling:
        find_tools(AUTOSCALING_TOOLS)
    if node:
        if tuple(components) != CONTROL_PLANE_TOOLS:
            raise ValueError("a node needs the whole control plane (controllers, scheduler)")
        node_prerequisites()
        find_tools(["kube-proxy", "coredns"])
    for attempt in (1, 2):
        cluster = LocalCluster(workdir / f"try{attempt}", components=components)
        try:
            cluster.start()
        except PortInUseError:
            if attempt == 2:
                raise
            continue
        if node:
            try:
                start_node(cluster)
                if autoscaling:
                    start_autoscaling(cluster)
            except BaseException:
                cluster.stop()
                raise
        return cluster
    raise AssertionError("unreachable")


def start_node(cluster: LocalCluster, detach: bool = False) -> LocalNode:
    """Node "localhost" (containerd + kubelet), kube-proxy and CoreDNS on a started cluster,
    their files under `cluster.workdir / "node"`; attached to the cluster, so `cluster.stop()`
    stops them first. Sets and returns `cluster.node`."""
    from e2e.testbed.proxy import KubeProxy

    if cluster.node is not None:
        raise ClusterError(f"{cluster.workdir} already has a node")
    workdir = cluster.workdir / "node"
    node = LocalNode(cluster, workdir, detach=detach)
    cluster.add(node.start())  # on failure start() has stopped what it started
    cluster.node = node
    cluster.add(KubeProxy(cluster, workdir / "proxy", detach=detach).start())
    cluster.add(CoreDNS(cluster, node).start())
    return node


def start_autoscaling(cluster: LocalCluster, detach: bool = False) -> None:
    """metrics-server (metrics.k8s.io: `kubectl top`, CPU/memory HPAs) and KEDA's operator and
    metrics API server (external.metrics.k8s.io: ScaledObjects) on a cluster with a node;
    attached to it, so `cluster.stop()` stops them first."""
    from e2e.testbed.keda import Keda
    from e2e.testbed.metrics import MetricsServer

    if cluster.node is None:
        raise ClusterError("autoscaling needs a node: start_cluster(dir, autoscaling=True)")
    cluster.add(MetricsServer(cluster, detach=detach).start())
    cluster.add(Keda(cluster, detach=detach).start())
