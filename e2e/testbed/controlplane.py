"""The control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler built by
`make tools`, the way controller-runtime's envtest serves Go operators (plus the real
controllers, so Deployments get ReplicaSets).

Everything lives in one folder: certificates, kubeconfigs, etcd's data, the logs and
`state.json` (the process ids, for `down`). The API server listens on all addresses and
advertises the host's non-loopback address, so pods reach it through the `kubernetes` Service;
clients on the host use 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from e2e.testbed.errors import ClusterError, PortInUseError
from e2e.testbed.pki import SERVICE_CIDR, Pki, make_pki, write_kubeconfig
from e2e.testbed.procs import (
    Component,
    check_alive,
    cmdline_mentions,
    free_ports,
    host_ip,
    http_ok,
    kill_group,
    launch,
    pid_alive,
    port_is_free,
    stop_component,
    wait_for,
)
from e2e.testbed.tools import CONTROL_PLANE_TOOLS, REPO_ROOT, find_tools, run_tool, tool_env

if TYPE_CHECKING:
    from e2e.testbed.node import LocalNode

DEFAULT_CLUSTER_DIR = REPO_ROOT / ".tools" / "cluster"
CLUSTER_CIDR = "10.244.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
FRONT_PROXY_CN = "front-proxy-client"
HPA_SYNC_PERIOD = "5s"
START_TIMEOUT = float(os.environ.get("COMMANDNET_KUBE_START_TIMEOUT", "180"))


class AddOn(Protocol):
    """Something started on top of a cluster (node, kube-proxy, CoreDNS): stopped before it."""

    def stop(self) -> None: ...


class LocalCluster:
    """etcd + kube-apiserver (+ kube-controller-manager + kube-scheduler) in `workdir`.

    `components` picks a subset: ("etcd", "kube-apiserver") is the envtest shape.
    `detach=True` (the CLI) lets the processes outlive this Python process; otherwise they are
    bound to it (process groups, PR_SET_PDEATHSIG, atexit).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        components: Sequence[str] = CONTROL_PLANE_TOOLS,
        api_port: int | None = None,
        detach: bool = False,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        unknown = set(components) - set(CONTROL_PLANE_TOOLS)
        if unknown or "etcd" not in components or "kube-apiserver" not in components:
            raise ValueError(f"components must include etcd and kube-apiserver: {components}")
        self.workdir = Path(workdir).resolve()
        self.component_names = [c for c in CONTROL_PLANE_TOOLS if c in components]
        self.detach = detach
        self.start_timeout = start_timeout
        self._requested_api_port = api_port
        self.tools = find_tools(self.component_names)
        self.components: dict[str, Component] = {}
        self.ports: dict[str, int] = {}
        self.pki: Pki | None = None
        self._atexit_registered = False
        self._owns_workdir = False  # set once this object has cleared the folder for itself
        self.host_ip = host_ip()
        self.node: LocalNode | None = None  # set by start_node()
        self.addons: list[AddOn] = []  # stopped in reverse order before the control plane

    # ---- paths and handles -----------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['etcd']}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for kubectl/helm/untt against this cluster (see `tool_env`)."""
        return tool_env(self.workdir, self.kubeconfig, extra)

    def run_tool(self, tool: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run kubectl/helm/untt against this cluster (see `run_tool`)."""
        return run_tool(tool, *args, env=self.env(), **kw)

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run_tool("kubectl", *args, **kw)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run_tool("helm", *args, **kw)

    async def api_client(self) -> Any:
        """A new kubernetes_asyncio ApiClient for this cluster (close it, or `async with` it)."""
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        await config.load_kube_config(
            config_file=str(self.kubeconfig), client_configuration=cfg
        )
        return client.ApiClient(configuration=cfg)

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.stop(remove=False)
            raise
        return self

    def _start(self) -> None:
        self._prepare_workdir()
        names = self.component_names
        auto = free_ports(len(names) + 1)
        self.ports = {
            "etcd": auto[0],
            "etcd-peer": auto[1],
            "kube-apiserver": self._requested_api_port or auto[2],
        }
        for i, n in enumerate(names[2:], start=3):
            self.ports[n] = auto[i]
        for what, port in self.ports.items():
            hosts = ("127.0.0.1", "0.0.0.0") if what == "kube-apiserver" else ("127.0.0.1",)
            if not all(port_is_free(port, h) for h in hosts):
                raise PortInUseError(
                    f"port {port} on 127.0.0.1 (wanted for {what}) is already in use; "
                    f"stop what holds it (`ss -ltnp 'sport = :{port}'`) or choose another port"
                )
        self.pki = make_pki(
            self.workdir / "pki",
            {
                "admin": ("commandnet-admin", ["system:masters"]),
                "controller-manager": ("system:kube-controller-manager", []),
                "scheduler": ("system:kube-scheduler", []),
                "kubelet-client": ("kube-apiserver-kubelet-client", ["system:masters"]),
                # The aggregator's client certificate towards extension API servers
                # (metrics-server, KEDA's adapter); they trust it through requestheader-*.
                "front-proxy-client": (FRONT_PROXY_CN, []),
            },
            host_ips=[self.host_ip],
        )
        for stem, user in (
            ("admin", "commandnet-admin"),
            ("controller-manager", "system:kube-controller-manager"),
            ("scheduler", "system:kube-scheduler"),
        ):
            crt, key = self.pki.clients[stem]
            write_kubeconfig(
                self.workdir / f"{stem}.kubeconfig", self.server, self.pki.ca_cert, crt, key, user
            )
        if not self.detach and not self._atexit_registered:
            atexit.register(self.stop, remove=False)
            self._atexit_registered = True

        self._launch("etcd", self._etcd_argv())
        self.wait_etcd()
        self._launch("kube-apiserver", self._apiserver_argv())
        self.wait_apiserver()
        for n in names[2:]:
            self._launch(n, self._argv_for(n))
        for n in names[2:]:
            self._wait_https_ok(n, f"https://127.0.0.1:{self.ports[n]}/healthz", "/healthz")
        if "kube-controller-manager" in names:
            # Pods are refused until the service-account controller made `default`.
            url = f"{self.server}/api/v1/namespaces/default/serviceaccounts/default"
            ctx = self.admin_ssl_context()
            self._poll("the controller manager to create serviceaccount default/default",
                       lambda: http_ok(url, ctx), self.start_timeout,
                       ["etcd", "kube-apiserver", "kube-controller-manager"])
        self._write_state()

    def _prepare_workdir(self) -> None:
        """Refuse a folder a live cluster owns; clear a stale one (left by a crash or kill -9)."""
        if self.state_file.exists():
            try:
                state = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                state = {}
            alive = {
                n: p for n, p in (state.get("pids") or {}).items() if isinstance(p, int)
                and pid_alive(p) and cmdline_mentions(p, str(self.workdir))
            }
            if alive:
                raise ClusterError(
                    f"a local cluster from {self.workdir} is still running ({alive}); "
                    "stop it first: `python -m e2e.testbed down` (or `make cluster-down`)"
                )
        if self.workdir.exists():
            for sub in ("etcd", "pki", "logs", "helm", "state.json"):
                p = self.workdir / sub
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            for p in self.workdir.glob("*.kubeconfig"):
                p.unlink()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._owns_workdir = True

    def _launch(self, name: str, argv: list[str]) -> Component:
        comp = launch(name, argv, self.workdir / "logs", self.workdir, detach=self.detach)
        self.components[name] = comp
        return comp

    def _etcd_argv(self) -> list[str]:
        etcd, peer = self.ports["etcd"], self.ports["etcd-peer"]
        return [
            str(self.tools["etcd"]),
            "--name=local",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=local=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # a throw-away test cluster: speed over durability
            "--log-level=warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        assert self.pki is not None
        pki = self.pki
        kubelet_crt, kubelet_key = pki.clients["kubelet-client"]
        proxy_crt, proxy_key = pki.clients["front-proxy-client"]
        return [
            str(self.tools["kube-apiserver"]),
            f"--etcd-servers={self.etcd_url}",
            # Pods reach the API server through the `kubernetes` Service, whose endpoint is the
            # advertised address: it must not be loopback (a pod's 127.0.0.1 is its own).
            "--bind-address=0.0.0.0",
            f"--advertise-address={self.host_ip}",
            f"--secure-port={self.ports['kube-apiserver']}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            f"--kubelet-client-certificate={kubelet_crt}",
            f"--kubelet-client-key={kubelet_key}",
            # A local kubelet registers as node "localhost" (see kube_with_node): reach it there.
            "--kubelet-preferred-address-types=Hostname,InternalIP,ExternalIP",
            # The aggregation layer: APIServices served by metrics-server and KEDA's adapter.
            # One CA signs everything here; requestheader-allowed-names keeps other client
            # certificates from asserting users through the X-Remote-* headers.
            f"--requestheader-client-ca-file={pki.ca_cert}",
            f"--requestheader-allowed-names={FRONT_PROXY_CN}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={proxy_crt}",
            f"--proxy-client-key-file={proxy_key}",
            "--profiling=false",
            "--v=1",
        ]

    def _argv_for(self, name: str) -> list[str]:
        assert self.pki is not None
        port = self.ports[name]
        if name == "kube-controller-manager":
            kc = self.workdir / "controller-manager.kubeconfig"
            return [
                str(self.tools[name]),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'pki' / 'kcm'}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                f"--cluster-signing-cert-file={self.pki.ca_cert}",
                f"--cluster-signing-key-file={self.pki.ca_key}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-cidr={CLUSTER_CIDR}",
                "--allocate-node-cidrs=true",
                "--leader-elect=false",
                "--controllers=*,bootstrapsigner,tokencleaner",
                # The HPA controller every 5 s instead of 15 s: autoscaling tests stay short.
                f"--horizontal-pod-autoscaler-sync-period={HPA_SYNC_PERIOD}",
                "--v=1",
            ]
        if name == "kube-scheduler":
            kc = self.workdir / "scheduler.kubeconfig"
            return [
                str(self.tools[name]),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'pki' / 'scheduler'}",
                "--leader-elect=false",
                "--v=1",
            ]
        raise ValueError(name)

    # ---- waiting -----------------------------------------------------------------------------

    def _check_alive(self, name: str) -> None:
        check_alive(self.components[name])

    def _poll(self, what: str, probe: Callable[[], tuple[bool, str]], timeout: float,
              watch: Sequence[str]) -> None:
        wait_for(what, probe, timeout, [self.components[n] for n in watch if n in self.components])

    def admin_ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        crt, key = self.pki.clients["admin"]
        ctx.load_cert_chain(str(crt), str(key))
        return ctx

    def wait_etcd(self, timeout: float | None = None) -> None:
        url = f"{self.etcd_url}/health"

        def probe() -> tuple[bool, str]:
            ok, last = http_ok(url, None)
            return ok and '"health":"true"' in last.replace(" ", ""), last

        self._poll(f"etcd {url}", probe, timeout or self.start_timeout, ["etcd"])

    def wait_apiserver(self, timeout: float | None = None) -> None:
        url = f"{self.server}/readyz"
        ctx = self.admin_ssl_context()
        watch = [n for n in ("etcd", "kube-apiserver") if n in self.components]
        self._poll(f"kube-apiserver {url}", lambda: http_ok(url, ctx),
                   timeout or self.start_timeout, watch)

    def _wait_https_ok(self, name: str, url: str, what: str) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # their self-signed serving certs; we only read /healthz
        self._poll(f"{name} {what} at {url}", lambda: http_ok(url, ctx),
                   self.start_timeout, [name])

    def wait_ready(self, timeout: float | None = None) -> None:
        """Every component running and the API server's /readyz ok, within `timeout`."""
        for name in self.components:
            self._check_alive(name)
        self.wait_apiserver(timeout)

    # ---- faults ------------------------------------------------------------------------------

    def restart(self, name: str, timeout: float | None = None) -> None:
        """Stop one component (if running) and start it again on the same ports and data."""
        comp = self.components[name]
        pid = comp.proc.pid if comp.proc is not None else comp.pid
        if pid and comp.running:
            kill_group(pid)
        self.heal(timeout)

    def heal(self, timeout: float | None = None) -> list[str]:
        """Restart whatever component has died, then wait for readiness. Returns what was
        restarted."""
        restarted = []
        for name in self.component_names:
            comp = self.components.get(name)
            if comp is not None and not comp.running:
                self._launch(name, comp.argv)
                if name == "etcd":
                    self.wait_etcd(timeout)
                restarted.append(name)
        self.wait_ready(timeout)
        self._write_state()
        return restarted

    # ---- stop --------------------------------------------------------------------------------

    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ports": self.ports,
            "pids": {
                n: (c.proc.pid if c.proc else c.pid) for n, c in self.components.items()
            },
            "addons": [a.state() for a in self.addons if hasattr(a, "state")],
        }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def add(self, addon: AddOn) -> None:
        """Attach something started on top of this cluster: `stop()` stops it first."""
        self.addons.append(addon)
        self._write_state()

    def remove(self, addon: AddOn) -> None:
        """Stop an attached add-on now and forget it (the cluster goes on)."""
        if addon in self.addons:
            self.addons.remove(addon)
            self._write_state()
        addon.stop()

    def stop(self, remove: bool = False) -> None:
        """Stop the add-ons (reverse start order), then end every component's process group.
        Idempotent."""
        failure: Exception | None = None
        while self.addons:
            try:
                self.addons.pop().stop()
            except Exception as exc:  # stop the rest (and the control plane) all the same
                failure = failure or exc
        self.node = None
        for name in reversed(list(self.components)):
            stop_component(self.components[name])
        self.components.clear()
        if not self._owns_workdir:
            return  # e.g. start() refused a folder that a live cluster owns: leave it alone
        with contextlib.suppress(OSError):
            self.state_file.unlink()
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if failure is not None:
            raise ClusterError(f"an add-on did not stop cleanly: {failure}") from failure

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


AddOnStopper = Callable[[dict[str, Any]], list[str]]


def stop_from_state(workdir: Path, addon_stoppers: Mapping[str, AddOnStopper] | None = None
                    ) -> list[str]:
    """Stop a cluster that another process started (CLI `down`): its add-ons first (each
    recorded add-on state goes to `addon_stoppers[state["kind"]]`), then the control plane.
    Returns what was stopped."""
    state_file = workdir / "state.json"
    if not state_file.exists():
        return []
    try:
        state = json.loads(state_file.read_text())
    except ValueError:
        state = {}
    stopped = []
    for addon in reversed(state.get("addons") or []):
        stopper = (addon_stoppers or {}).get(addon.get("kind", ""))
        if stopper is not None:
            stopped += stopper(addon)
    for name, pid in reversed(list((state.get("pids") or {}).items())):
        if isinstance(pid, int) and pid_alive(pid) and cmdline_mentions(pid, str(workdir)):
            kill_group(pid)
            stopped.append(f"{name} (pid {pid})")
    state_file.unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------------------------
# CLI
