"""kube-proxy (built by `make tools`) as a host process next to the kubelet, in iptables mode:
ClusterIPs work from pods and from the host (the API server calling a webhook's Service).

Its KUBE-* chains are global to the machine, so only one bed with a node runs at a time: a second
is refused, naming the first; `stop()` removes the chains (`kube-proxy --cleanup`). It never
touches conntrack sysctls (all conntrack settings 0 = leave as they are).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from e2e.testbed.controlplane import CLUSTER_CIDR, LocalCluster
from e2e.testbed.errors import ClusterError
from e2e.testbed.node import NODE_NAME
from e2e.testbed.pki import sign_client_cert, write_kubeconfig
from e2e.testbed.procs import (
    AllOrNothing,
    Component,
    cmdline_mentions,
    free_ports,
    http_ok,
    kill_group,
    launch,
    pid_alive,
    pids_running,
    stop_component,
    wait_for,
)
from e2e.testbed.tools import find_tools


class KubeProxy(AllOrNothing):
    """kube-proxy for node "localhost" of `cluster`, its files in `workdir`."""

    def __init__(self, cluster: LocalCluster, workdir: Path, detach: bool = False) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir).resolve()
        self.exe = find_tools(["kube-proxy"])["kube-proxy"]
        self.detach = detach
        self.component: Component | None = None
        self.healthz_port = 0

    def start(self) -> KubeProxy:
        others = [p for p in pids_running("kube-proxy") if not cmdline_mentions(p, "--cleanup")]
        if others:
            raise ClusterError(
                f"another kube-proxy is running (pids {others}); its iptables chains are global "
                "to the machine: stop that test bed first (`make cluster-down`, or end its test)"
            )
        cleanup(self.exe, self.workdir)  # chains a bed killed with -9 left behind
        return super().start()

    def _start(self) -> None:
        pki = self.cluster.pki
        assert pki is not None
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        # User system:kube-proxy: the built-in binding system:node-proxier gives it its rights.
        crt, key = sign_client_cert(pki.ca_cert, pki.ca_key, "system:kube-proxy", [],
                                    self.workdir / "kube-proxy")
        kubeconfig = self.workdir / "kube-proxy.kubeconfig"
        write_kubeconfig(kubeconfig, self.cluster.server, pki.ca_cert, crt, key,
                         "system:kube-proxy")
        self.healthz_port, metrics = free_ports(2)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": CLUSTER_CIDR,  # traffic from outside it is masqueraded
            "hostnameOverride": NODE_NAME,
            "healthzBindAddress": f"127.0.0.1:{self.healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{metrics}",
            # 0 = leave the host's conntrack sysctls alone (no nf_conntrack_max, no timeouts).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            # true would set net.ipv4.conf.all.route_localnet=1 on the host.
            "iptables": {"localhostNodePorts": False},
        }
        conf = self.workdir / "config.json"
        conf.write_text(json.dumps(config, indent=2))
        self.component = launch("kube-proxy", [str(self.exe), f"--config={conf}", "--v=1"],
                                self.workdir / "logs", self.workdir, detach=self.detach)
        url = f"http://127.0.0.1:{self.healthz_port}/healthz"
        wait_for(f"kube-proxy's first sync ({url})", lambda: http_ok(url),
                 self.cluster.start_timeout, [self.component])

    def state(self) -> dict[str, Any]:
        pid = self.component.proc.pid if self.component and self.component.proc else None
        return {"kind": "kube-proxy", "pid": pid, "workdir": str(self.workdir),
                "exe": str(self.exe)}

    def stop(self) -> None:
        """Stop kube-proxy and remove its iptables chains. Idempotent."""
        if self.component is not None:
            stop_component(self.component)
            self.component = None
            cleanup(self.exe, self.workdir)


def cleanup(exe: Path, workdir: Path) -> None:
    """`kube-proxy --cleanup` (all KUBE-* chains), unless another kube-proxy still runs."""
    if pids_running("kube-proxy"):
        return
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    with (workdir / "logs" / "kube-proxy-cleanup.log").open("ab") as out:
        subprocess.run([str(exe), "--cleanup", "--v=1"], stdout=out, stderr=subprocess.STDOUT,
                       timeout=60, check=False)


def stop_proxy_from_state(state: dict[str, Any]) -> list[str]:
    """Stop a kube-proxy another process started (CLI `down`) and clean its chains."""
    pid, workdir = state.get("pid"), state.get("workdir", "")
    stopped = []
    if isinstance(pid, int) and pid_alive(pid) and cmdline_mentions(pid, workdir):
        kill_group(pid)
        stopped.append(f"kube-proxy (pid {pid})")
    cleanup(Path(state["exe"]), Path(workdir))
    return stopped

