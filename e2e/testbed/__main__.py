"""The test bed's CLI: `python -m e2e.testbed up [--node] | status | down`.

`up` starts it detached (it outlives this command) and prints `export KUBECONFIG=...` on stdout
(messages go to stderr), so `eval "$(python -m e2e.testbed up)"` works; `down` stops it all;
`up --autoscaling` adds metrics-server and KEDA;
`import ARCHIVE...` puts OCI archives (e2e/testbed/images.py) into a running node's containerd.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from e2e.testbed.apiservice import stop_from_state as stop_host_addon
from e2e.testbed.bed import start_autoscaling, start_node
from e2e.testbed.controlplane import DEFAULT_CLUSTER_DIR, LocalCluster, stop_from_state
from e2e.testbed.errors import ClusterError
from e2e.testbed.node import import_archive, stop_node_from_state
from e2e.testbed.procs import pid_alive
from e2e.testbed.proxy import stop_proxy_from_state
from e2e.testbed.tools import CONTROL_PLANE_TOOLS, read_versions

STOPPERS = {"node": stop_node_from_state, "kube-proxy": stop_proxy_from_state,
            "metrics-server": stop_host_addon, "keda": stop_host_addon}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.testbed",
        description="Start or stop the local Kubernetes test bed built by `make tools`.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "import"])
    parser.add_argument("archives", nargs="*", type=Path,
                        help="import: OCI archives to put into the node's containerd")
    parser.add_argument("--dir", type=Path, default=DEFAULT_CLUSTER_DIR,
                        help=f"work folder (default: {DEFAULT_CLUSTER_DIR})")
    parser.add_argument("--port", type=int, default=None,
                        help="API server port (default: a free one)")
    parser.add_argument("--no-controllers", action="store_true",
                        help="only etcd and kube-apiserver (no controller manager, no scheduler)")
    parser.add_argument("--node", action="store_true",
                        help="the full bed: plus a node (kubelet, containerd), kube-proxy and "
                             "CoreDNS (needs root)")
    parser.add_argument("--autoscaling", action="store_true",
                        help="the full bed plus metrics-server and KEDA (implies --node)")
    args = parser.parse_intermixed_args(argv)
    workdir: Path = args.dir.resolve()

    if args.command == "down":
        stopped = stop_from_state(workdir, STOPPERS)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        if workdir.exists():
            shutil.rmtree(workdir / "etcd", ignore_errors=True)
        return 0
    if args.command == "import":
        return _import(workdir, args.archives)
    if args.command == "status":
        state_file = workdir / "state.json"
        if not state_file.exists():
            print(f"no cluster in {workdir}")
            return 1
        state = json.loads(state_file.read_text())
        pids = dict(state.get("pids", {}))
        for addon in state.get("addons", []):
            pids.update(addon.get("pids") or {})
            if isinstance(addon.get("pid"), int):
                pids[addon["kind"]] = addon["pid"]
        for name, pid in pids.items():
            print(f"{name:25} pid {pid:<8} {'running' if pid_alive(pid) else 'DEAD'}")
        print(f"export KUBECONFIG={state['kubeconfig']}")
        return 0

    args.node = args.node or args.autoscaling
    if args.node and args.no_controllers:
        parser.error("--node needs the controllers")
    components = CONTROL_PLANE_TOOLS[:2] if args.no_controllers else CONTROL_PLANE_TOOLS
    cluster: LocalCluster | None = None
    try:
        cluster = LocalCluster(workdir, components=components, api_port=args.port, detach=True)
        cluster.start()
        if args.node:
            start_node(cluster, detach=True)
        if args.autoscaling:
            start_autoscaling(cluster, detach=True)
    except ClusterError as exc:
        if cluster is not None:
            cluster.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    what = "with node localhost, kube-proxy and CoreDNS " if args.node else ""
    if args.autoscaling:
        what += "and metrics-server and KEDA "
    print(f"local Kubernetes {read_versions().get('KUBERNETES_VERSION', '?')} is up {what}at "
          f"{cluster.server} (logs: {workdir / 'logs'}); stop it with `make cluster-down`",
          file=sys.stderr)
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _import(workdir: Path, archives: Sequence[Path]) -> int:
    """Import archives into the detached node recorded in the folder's state.json."""
    state_file = workdir / "state.json"
    nodes = [a for a in (json.loads(state_file.read_text()).get("addons", [])
                         if state_file.exists() else []) if a.get("kind") == "node"]
    if not nodes:
        print(f"error: no node runs from {workdir}: start one with `up --node`", file=sys.stderr)
        return 1
    for path in archives:
        refs = import_archive(Path(nodes[0]["socket"]), path)
        print(f"imported {', '.join(refs)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
