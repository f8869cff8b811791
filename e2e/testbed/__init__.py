"""The local Kubernetes test bed, built from Go modules by `make tools` (no Docker, no registry).

    cluster = start_cluster(workdir)              # etcd, API server, controllers, scheduler
    cluster = start_cluster(workdir, node=True)   # plus node "localhost", kube-proxy, CoreDNS:
                                                  # pods, Services and cluster DNS work
    cluster = start_cluster(workdir, autoscaling=True)  # plus metrics-server and KEDA
    cluster.kubectl("get", "pods"); cluster.node.import_archive(path)
    cluster.stop()                                # everything, add-ons first

One module per component: tools, pki, procs (process groups), controlplane, node, proxy
(kube-proxy), dns (CoreDNS), apiservice (host-run extension API servers), metrics
(metrics-server), keda (KEDA's operator and metrics API server), bed (the composition);
`python -m e2e.testbed` is the CLI.
See docs/kubernetes-testbed.md.
"""

from e2e.testbed.bed import start_autoscaling, start_cluster, start_node
from e2e.testbed.controlplane import CLUSTER_CIDR, LocalCluster, stop_from_state
from e2e.testbed.dns import CoreDNS
from e2e.testbed.errors import ClusterError, PortInUseError, ToolsMissingError
from e2e.testbed.keda import Keda
from e2e.testbed.metrics import MetricsServer
from e2e.testbed.node import (
    BUSYBOX_IMAGE,
    CLUSTER_DNS,
    CLUSTER_DOMAIN,
    NODE_NAME,
    PAUSE_IMAGE,
    POD_CIDR,
    PYTHON_IMAGE,
    LocalNode,
    node_prerequisites,
)
from e2e.testbed.pki import SERVICE_CIDR
from e2e.testbed.procs import pid_alive
from e2e.testbed.proxy import KubeProxy
from e2e.testbed.tools import (
    AUTOSCALING_TOOLS,
    CLIENT_TOOLS,
    CONTROL_PLANE_TOOLS,
    REPO_ROOT,
    find_tools,
    read_versions,
    run_tool,
    tool_env,
)

__all__ = [
    "AUTOSCALING_TOOLS", "BUSYBOX_IMAGE", "CLIENT_TOOLS", "CLUSTER_CIDR", "CLUSTER_DNS",
    "CLUSTER_DOMAIN", "CONTROL_PLANE_TOOLS", "NODE_NAME", "PAUSE_IMAGE", "POD_CIDR",
    "PYTHON_IMAGE", "REPO_ROOT", "SERVICE_CIDR", "ClusterError", "CoreDNS", "Keda", "KubeProxy",
    "LocalCluster", "LocalNode", "MetricsServer", "PortInUseError", "ToolsMissingError",
    "find_tools", "node_prerequisites", "pid_alive", "read_versions", "run_tool",
    "start_autoscaling", "start_cluster", "start_node", "stop_from_state", "tool_env",
]
