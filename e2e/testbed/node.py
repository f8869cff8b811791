"""A real node for the local control plane: kubelet (built by `make tools`) + Debian's containerd
and runc, Debian's CNI bridge plugin, and images built here with umoci (no registry, no pulls).

    node = LocalNode(cluster, workdir).start()   # node "localhost" Ready
    node.import_archive(Path("app.tar"))         # ["localhost/app:1"]: imagePullPolicy Never
    node.stop()

Images imported into containerd at start:
    localhost/pause:3.10   the sandbox image: Debian's static `catatonit -P`
    localhost/busybox:1    Debian's static busybox, for test pods
and on demand `localhost/python:3` (`import_python_image()`): a minimal Debian bookworm root
with python3, made by mmdebstrap from the host's apt sources, cached in
~/.cache/commandnet-tools/images/.

Needs root, and Debian's packages: containerd runc containernetworking-plugins catatonit umoci
busybox-static iproute2. Findings and limits: docs/kubernetes-testbed.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from e2e.testbed.controlplane import LocalCluster
from e2e.testbed.errors import ClusterError, ToolsMissingError
from e2e.testbed.pki import sign_client_cert, write_kubeconfig
from e2e.testbed.procs import (
    AllOrNothing,
    Component,
    cmdline_mentions,
    free_ports,
    kill_group,
    launch,
    pid_alive,
    pids_running,
    stop_component,
    wait_for,
)
from e2e.testbed.tools import run_host, tools_bin

NODE_NAME = "localhost"
PAUSE_IMAGE = "localhost/pause:3.10"
BUSYBOX_IMAGE = "localhost/busybox:1"
PYTHON_IMAGE = "localhost/python:3"
IMAGE_CACHE = Path(
    os.environ.get("COMMANDNET_TOOLS_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "commandnet-tools"
) / "images"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
APT_PACKAGES = (
    "containerd runc containernetworking-plugins catatonit umoci busybox-static iproute2"
    " mmdebstrap iptables conntrack"
)
# iptables-restore and conntrack: kube-proxy's Service rules and their stale-flow clean-up.
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "umoci", "ip",
              "iptables-restore", "conntrack")
POD_CIDR = "10.244.0.0/24"
CLUSTER_DNS = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"


def node_prerequisites() -> dict[str, Path]:
    """Paths of what a node needs, or ToolsMissingError naming what is missing and the fix."""
    problems: list[str] = []
    found: dict[str, Path] = {}
    if os.geteuid() != 0:
        problems.append("a node needs root (containerd mounts, cgroups, network namespaces)")
    kubelet = tools_bin() / "kubelet"
    if not os.access(kubelet, os.X_OK):
        problems.append(f"{kubelet} is missing: run `make tools`")
    found["kubelet"] = kubelet
    missing = []
    for name in HOST_TOOLS:
        path = shutil.which(name)
        if path:
            found[name] = Path(path)
        else:
            missing.append(name)
    for name, candidates in (
        ("catatonit", ("/usr/bin/catatonit", "/usr/libexec/podman/catatonit")),
        ("busybox", ("/bin/busybox", "/usr/bin/busybox")),
    ):
        hit = next((Path(c) for c in candidates if Path(c).is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    cni = next((Path(d) for d in CNI_BIN_DIRS if (Path(d) / "bridge").is_file()), None)
    if cni is None:
        missing.append("CNI plugins (bridge, host-local, loopback)")
    else:
        found["cni"] = cni
    if missing:
        problems.append(
            f"missing {', '.join(missing)}: `apt-get install -y {APT_PACKAGES}`"
        )
    if problems:
        raise ToolsMissingError("cannot start a local node: " + "; ".join(problems))
    return found


class LocalNode(AllOrNothing):
    """containerd + kubelet in `workdir`, registered with `cluster` as node "localhost"."""

    def __init__(self, cluster: LocalCluster, workdir: Path, start_timeout: float | None = None,
                 detach: bool = False) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir).resolve()
        self.tools = node_prerequisites()
        self.start_timeout = start_timeout or cluster.start_timeout
        self.detach = detach
        self.components: dict[str, Component] = {}
        # Unique per run: two test runs on one machine must not share a bridge.
        self.bridge = f"cnb{os.getpid() % 100000}"

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    # ---- start -------------------------------------------------------------------------------

    def _start(self) -> None:
        _check_bridge_netfilter()
        sweep_stale_nodes()
        for sub in ("containerd", "cni", "images", "kubelet", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._write_containerd_config()
        self._write_cni_config()
        self._launch("containerd", [str(self.tools["containerd"]), "--config",
                                    str(self.workdir / "containerd" / "config.toml")])
        self._wait("containerd's socket", self._ctr_ok,
                   ["containerd"])
        for ref, build in ((PAUSE_IMAGE, self._build_pause), (BUSYBOX_IMAGE, self._build_busybox)):
            self.import_archive(build(), base_name=ref.rsplit(":", 1)[0])
        self._start_kubelet()

    def _write_containerd_config(self) -> None:
        d = self.workdir / "containerd"
        # restrict_oom_score_adj: this VM's root lacks CAP_SYS_RESOURCE, so runc cannot lower
        # oom_score_adj below containerd's own (the kubelet asks -998 for sandboxes):
        # "nsexec: failed to update /proc/self/oom_score_adj: Permission denied".
        (d / "config.toml").write_text(
            f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.tools['cni']}"
    conf_dir = "{self.workdir / 'cni'}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
        )

    def _write_cni_config(self) -> None:
        conf = {
            "cniVersion": "1.0.0",
            "name": "commandnet-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    # a default route via the bridge: Service IPs and the host's address
                    "isDefaultGateway": True,
                    "ipMasq": False,
                    # a pod reaching its own Service's ClusterIP comes back through the bridge
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        (self.workdir / "cni" / "10-bridge.conflist").write_text(json.dumps(conf, indent=2))

    def build_image(self, name: str, tag: str, files: Mapping[str, Path],
                    links: Mapping[str, str], config: Sequence[str],
                    rootfs_tar: Path | None = None) -> Path:
        """An OCI archive (umoci; one layer holding `files`, `links` and `rootfs_tar`'s content)
        for `import_archive(path, base_name=...)`: images without a registry or a daemon."""
        umoci = str(self.tools["umoci"])
        layout = self.workdir / "images" / name
        bundle = self.workdir / "images" / f"{name}-bundle"
        image = f"{layout}:{tag}"
        for stale in (layout, bundle):  # a restart in the same folder (CLI `up` after `down`)
            shutil.rmtree(stale, ignore_errors=True)
        for cmd in (
            [umoci, "init", "--layout", str(layout)],
            [umoci, "new", "--image", image],
            [umoci, "unpack", "--image", image, str(bundle)],
        ):
            run_host(cmd)
        rootfs = bundle / "rootfs"
        if rootfs_tar is not None:
            run_host(["tar", "-C", str(rootfs), "-xf", str(rootfs_tar)])
        for dest, src in files.items():
            target = rootfs / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        for dest, src_name in links.items():
            (rootfs / dest.lstrip("/")).symlink_to(src_name)
        run_host([umoci, "repack", "--image", image, str(bundle)])
        run_host([umoci, "config", "--image", image, *config])
        tar = self.workdir / "images" / f"{name}.tar"
        run_host(["tar", "-C", str(layout), "-cf", str(tar), "."])
        shutil.rmtree(bundle, ignore_errors=True)
        return tar

    def _build_pause(self) -> Path:
        return self.build_image(
            "pause", "3.10", {"/catatonit": self.tools["catatonit"]}, {},
            ["--config.entrypoint", "/catatonit", "--config.cmd", "-P"],
        )

    def _build_busybox(self) -> Path:
        applets = ("sh", "echo", "cat", "sleep", "ls", "env", "hostname", "wget")
        return self.build_image(
            "busybox", "1", {"/bin/busybox": self.tools["busybox"]},
            {f"/bin/{a}": "busybox" for a in applets},
            ["--config.cmd", "/bin/sh"],
        )

    def import_python_image(self) -> str:
        """Build (once per machine, then cached) and import `localhost/python:3`."""
        tar = IMAGE_CACHE / "python3-bookworm.tar"
        if not tar.is_file():
            tar.parent.mkdir(parents=True, exist_ok=True)
            mmdebstrap = shutil.which("mmdebstrap")
            if not mmdebstrap:
                raise ToolsMissingError(
                    f"mmdebstrap is missing: `apt-get install -y {APT_PACKAGES}`"
                )
            sources = next(
                (p for p in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
                 if Path(p).is_file() and Path(p).stat().st_size > 0),
                None,
            )
            if sources is None:
                raise ClusterError("no apt sources found for mmdebstrap")
            rootfs = self.workdir / "images" / "python-rootfs.tar"
            subprocess.run(
                [mmdebstrap, "--variant=essential", "--include=python3",
                 "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
                 "bookworm", str(rootfs), sources],
                capture_output=True, text=True, timeout=600, check=True,
            )
            built = self.build_image("python", "3", {}, {}, ["--config.cmd", "/usr/bin/python3"],
                                    rootfs_tar=rootfs)
            rootfs.unlink()
            shutil.move(built, tar.with_suffix(".tmp"))
            tar.with_suffix(".tmp").rename(tar)
        self.import_archive(tar, base_name=PYTHON_IMAGE.rsplit(":", 1)[0])
        return PYTHON_IMAGE

    def import_archive(self, path: Path, base_name: str | None = None) -> list[str]:
        """Import an OCI or docker archive into containerd's k8s.io namespace (where the kubelet
        looks; pods use `imagePullPolicy: Never`); return the image references it created."""
        return import_archive(self.socket, path, base_name, ctr=self.tools["ctr"])

    def _start_kubelet(self) -> None:
        pki = self.cluster.pki
        assert pki is not None
        kdir = self.workdir / "kubelet"
        crt, key = sign_client_cert(
            pki.ca_cert, pki.ca_key, f"system:node:{NODE_NAME}", ["system:nodes"], kdir / "node"
        )
        kubeconfig = kdir / "kubelet.kubeconfig"
        write_kubeconfig(kubeconfig, self.cluster.server, pki.ca_cert, crt, key,
                         f"system:node:{NODE_NAME}")
        port, healthz = free_ports(2)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",  # no systemd on these VMs
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "failSwapOn": False,
            "failCgroupV1": False,  # these VMs are cgroup v1
            "podLogsDir": str(kdir / "pod-logs"),
            # Imported images cannot be pulled again: never garbage-collect or evict them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "0%", "nodefs.available": "0%", "imagefs.available": "0%",
            },
            "resolvConf": "/etc/resolv.conf",
            # CoreDNS (e2e/testbed/dns.py) answers here; pods get `search <ns>.svc.cluster.local`
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": CLUSTER_DOMAIN,
            "registerNode": True,
            "serializeImagePulls": False,
        }
        (kdir / "config.json").write_text(json.dumps(config, indent=2))
        self._launch("kubelet", [
            str(self.tools["kubelet"]),
            f"--config={kdir / 'config.json'}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={kdir / 'root'}",
            f"--cert-dir={kdir / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            "--v=1",
        ])
        self._wait(f'node "{NODE_NAME}" Ready', self._node_ready, ["containerd", "kubelet"])

    def _node_ready(self) -> bool:
        res = self.cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if res.returncode != 0:
            return False
        conds = json.loads(res.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    # ---- helpers -----------------------------------------------------------------------------

    def _launch(self, name: str, argv: list[str]) -> None:
        self.components[name] = launch(name, argv, self.workdir / "logs", self.workdir,
                                       detach=self.detach)

    def _ctr(self, *args: str, check: bool = True) -> str:
        """Run `ctr` against this node's containerd (k8s.io namespace); its stdout."""
        res = subprocess.run(
            [str(self.tools["ctr"]), "--address", str(self.socket), "--namespace", "k8s.io",
             *args], capture_output=True, text=True, timeout=300, check=False,
        )
        if check and res.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout if res.returncode == 0 else ""

    def _ctr_ok(self) -> bool:
        return subprocess.run(
            [str(self.tools["ctr"]), "--address", str(self.socket), "version"],
            capture_output=True, timeout=30, check=False,
        ).returncode == 0

    def _wait(self, what: str, probe: Callable[[], bool], watch: list[str]) -> None:
        wait_for(what, lambda: (probe(), "not yet"), self.start_timeout,
                 [self.components[n] for n in watch], interval=0.5)

    # ---- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Delete the pods, stop kubelet, kill what containerd still runs, stop containerd and
        its shims, remove the bridge and every mount left under the work folder. Idempotent."""
        if "kubelet" in self.components and self.components["kubelet"].running:
            with contextlib.suppress(ClusterError):
                self.cluster.kubectl("delete", "pods", "--all", "--all-namespaces",
                                     "--grace-period=0", "--force", "--wait=true",
                                     "--timeout=60s", check=False, timeout=90)
        if "kubelet" in self.components:
            stop_component(self.components.pop("kubelet"))
        if "containerd" in self.components and self.components["containerd"].running:
            self._remove_all_containers()
        shims = _shims_of(self.socket)
        if "containerd" in self.components:
            stop_component(self.components.pop("containerd"))
        _cleanup_host(shims, self.bridge, self.workdir)

    def state(self) -> dict[str, Any]:
        """What the CLI's `down` needs to stop a detached node (see `stop_node_from_state`)."""
        return {
            "kind": "node", "workdir": str(self.workdir), "bridge": self.bridge,
            "socket": str(self.socket),
            "pids": {n: c.proc.pid for n, c in self.components.items() if c.proc is not None},
        }

    def _remove_all_containers(self) -> None:
        ctr = [str(self.tools["ctr"]), "--address", str(self.socket), "--namespace", "k8s.io"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            ids = subprocess.run([*ctr, "tasks", "ls", "-q"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout.split()
            for cid in ids:
                subprocess.run([*ctr, "tasks", "kill", "-a", "-s", "SIGKILL", cid],
                               capture_output=True, timeout=30, check=False)
            # containerd's CRI plugin often reaps a killed task itself (then `rm` says "not
            # found" forever): wait until the task list no longer names them.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                left = set(ids) & set(subprocess.run(
                    [*ctr, "tasks", "ls", "-q"], capture_output=True, text=True, timeout=30,
                    check=False).stdout.split())
                if not left:
                    break
                for cid in left:
                    subprocess.run([*ctr, "tasks", "rm", "-f", cid], capture_output=True,
                                   timeout=30, check=False)
                time.sleep(0.2)


def _shims_of(socket: Path) -> list[int]:
    """containerd-shim processes started by the containerd on `socket` (matched on it)."""
    pids = []
    needle = str(socket).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmd.split(b"\0", 1)[0] and needle in cmd:
            pid = int(proc.name)
            if pid_alive(pid):
                pids.append(pid)
    return pids


def _check_bridge_netfilter() -> None:
    """Pod -> ClusterIP -> pod on the same bridge needs bridged packets to pass iptables (so the
    reply is un-DNATed): br_netfilter with net.bridge.bridge-nf-call-iptables=1."""
    knob = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not knob.exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, timeout=30,
                       check=False)
    if not knob.exists():
        raise ToolsMissingError(
            "the kernel lacks br_netfilter (no /proc/sys/net/bridge): `modprobe br_netfilter`"
        )
    if knob.read_text().strip() != "1":
        knob.write_text("1\n")


def sweep_stale_nodes() -> list[str]:
    """Clear what a bed killed with -9 leaves on the host (its processes died with it, but not
    containerd's shims, the pods they run, its bridge): those would hold the pod CIDR's route and
    break the next bed. A shim is stale when no live containerd runs its bed's config; a bridge
    `cnb<pid>` when that pid is gone. Returns what it removed."""
    removed = []
    live_configs = {arg for pid in pids_running("containerd")
                    for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                    .split("\0") if arg.endswith("config.toml")}
    for pid in pids_running("containerd-shim-runc-v2"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            config = Path(argv[argv.index("-address") + 1]).parent / "config.toml"
            ours = config.is_file() and f'sandbox_image = "{PAUSE_IMAGE}"' in config.read_text()
            if ours and str(config) not in live_configs:
                task_root = str(config.parent / "state")
                for proc in Path("/proc").iterdir():  # the pods' processes outlive their shim
                    with contextlib.suppress(OSError):
                        if proc.name.isdigit() and os.readlink(proc / "root").startswith(
                                task_root):
                            os.kill(int(proc.name), 9)
                os.kill(pid, 9)
                removed.append(f"shim {pid} of {config.parent}")
                _cleanup_host([], "", config.parent.parent)
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True,
                           text=True, timeout=10, check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("cnb") and name[3:].isdigit() and not pid_alive(int(name[3:])):
            subprocess.run(["ip", "link", "delete", name], capture_output=True, timeout=10,
                           check=False)
            removed.append(f"bridge {name}")
    return removed


KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")


def remove_kubelet_chains() -> None:
    """Remove the chains the kubelet makes (its `KUBE-FIREWALL` drop rule, canaries, hint) in
    every table, unless another kubelet still runs: the next bed starts from a clean host."""
    if pids_running("kubelet"):
        return
    for cmd in ("iptables", "ip6tables"):
        exe = shutil.which(cmd)
        if exe is None:
            continue
        for table in ("filter", "nat", "mangle"):
            save = subprocess.run([f"{exe}-save", "-t", table], capture_output=True, text=True,
                                  timeout=30, check=False).stdout
            for line in save.splitlines():  # the jumps into our chains first
                parts = line.split()
                if (line.startswith("-A ") and "-j" in parts
                        and parts[parts.index("-j") + 1] in KUBELET_CHAINS):
                    subprocess.run([exe, "-t", table, "-D", *parts[1:]], capture_output=True,
                                   timeout=30, check=False)
            for chain in KUBELET_CHAINS:
                if f":{chain} " in save:
                    for op in ("-F", "-X"):
                        subprocess.run([exe, "-t", table, op, chain], capture_output=True,
                                       timeout=30, check=False)


def _cleanup_host(shims: list[int], bridge: str, workdir: Path) -> None:
    """End the shims, delete the bridge, unmount whatever is left under `workdir`, remove the
    kubelet's iptables chains."""
    for pid in shims:  # shims daemonise into their own sessions: end them by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    if bridge:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True, timeout=10,
                           check=False)
    prefix = str(workdir)
    try:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return
    for mnt in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=10, check=False)
    remove_kubelet_chains()


def import_archive(socket: Path, path: Path, base_name: str | None = None,
                   ctr: Path | str = "ctr") -> list[str]:
    """`ctr images import` of an archive into the containerd at `socket` (k8s.io namespace).
    `base_name` (e.g. "localhost/app") names OCI archives whose index carries only a tag."""
    args = ["images", "import", *(["--base-name", base_name] if base_name else []), str(path)]
    res = subprocess.run([str(ctr), "--address", str(socket), "--namespace", "k8s.io", *args],
                         capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        raise ClusterError(f"ctr {' '.join(args)} failed: {res.stderr.strip()}")
    refs = [line.split()[1] for line in res.stdout.splitlines()
            if line.startswith("unpacking ") and len(line.split()) > 1]
    if not refs:
        raise ClusterError(
            f"`ctr images import {path}` imported no named image (an OCI archive whose "
            f"index has only a tag needs base_name); output:\n{res.stdout}")
    return refs


def stop_node_from_state(state: dict[str, Any]) -> list[str]:
    """Stop a node another process started (CLI `down`): kubelet, containerd, shims, bridge,
    mounts. Pods die with their shims. Returns what was stopped."""
    stopped = []
    shims = _shims_of(Path(state["socket"]))
    for name in ("kubelet", "containerd"):
        pid = (state.get("pids") or {}).get(name)
        if isinstance(pid, int) and pid_alive(pid) and cmdline_mentions(pid, state["workdir"]):
            kill_group(pid)
            stopped.append(f"{name} (pid {pid})")
    _cleanup_host(shims, state["bridge"], Path(state["workdir"]))
    return stopped
