"""A real node for the local control plane: kubelet (built by `make tools`) + Debian's containerd
and runc, Debian's CNI bridge plugin, and images built here with umoci (no registry, no pulls).

    node = LocalNode(cluster, workdir).start()   # node "localhost" Ready
    ...                                           # pods with imagePullPolicy: Never
    node.stop()

Images imported into containerd (see `IMAGES`):
    localhost/pause:3.10   the sandbox image: Debian's static `catatonit -P`
    localhost/busybox:1    Debian's static busybox, for test pods
    localhost/python:3     on demand (`import_python_image()`): a minimal Debian bookworm
                           root with python3 (full stdlib), made by mmdebstrap from the
                           host's apt sources, cached in ~/.cache/commandnet-tools/images/

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
from pathlib import Path

from e2e.localcluster import (
    ClusterError,
    Component,
    LocalCluster,
    ToolsMissingError,
    _die_with_parent,
    free_ports,
    kill_group,
    pid_alive,
    sign_client_cert,
    tools_bin,
    write_kubeconfig,
)

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
    " mmdebstrap"
)
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "umoci", "ip")
POD_CIDR = "10.244.0.0/24"


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


class LocalNode:
    """containerd + kubelet in `workdir`, registered with `cluster` as node "localhost"."""

    def __init__(self, cluster: LocalCluster, workdir: Path, start_timeout: float = 180) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir).resolve()
        self.tools = node_prerequisites()
        self.start_timeout = start_timeout
        self.components: dict[str, Component] = {}
        # Unique per run: two test runs on one machine must not share a bridge.
        self.bridge = f"cnb{os.getpid() % 100000}"

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> LocalNode:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for sub in ("containerd", "cni", "images", "kubelet", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._write_containerd_config()
        self._write_cni_config()
        self._launch("containerd", [str(self.tools["containerd"]), "--config",
                                    str(self.workdir / "containerd" / "config.toml")])
        self._wait("containerd's socket", lambda: self._ctr("version", check=False) == 0,
                   ["containerd"])
        for ref, build in ((PAUSE_IMAGE, self._build_pause), (BUSYBOX_IMAGE, self._build_busybox)):
            tar = build()
            name = ref.rsplit(":", 1)[0]
            self._ctr("images", "import", "--base-name", name, str(tar))
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
                    "ipMasq": False,
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

    def _oci_image(self, name: str, tag: str, files: dict[str, Path], links: dict[str, str],
                   config: list[str], rootfs_tar: Path | None = None) -> Path:
        """An OCI layout with one layer holding `files`, packed into a tar for `ctr import`."""
        umoci = str(self.tools["umoci"])
        layout = self.workdir / "images" / name
        bundle = self.workdir / "images" / f"{name}-bundle"
        image = f"{layout}:{tag}"
        for cmd in (
            [umoci, "init", "--layout", str(layout)],
            [umoci, "new", "--image", image],
            [umoci, "unpack", "--image", image, str(bundle)],
        ):
            _run(cmd)
        rootfs = bundle / "rootfs"
        if rootfs_tar is not None:
            _run(["tar", "-C", str(rootfs), "-xf", str(rootfs_tar)])
        for dest, src in files.items():
            target = rootfs / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        for dest, src_name in links.items():
            (rootfs / dest.lstrip("/")).symlink_to(src_name)
        _run([umoci, "repack", "--image", image, str(bundle)])
        _run([umoci, "config", "--image", image, *config])
        tar = self.workdir / "images" / f"{name}.tar"
        _run(["tar", "-C", str(layout), "-cf", str(tar), "."])
        shutil.rmtree(bundle, ignore_errors=True)
        return tar

    def _build_pause(self) -> Path:
        return self._oci_image(
            "pause", "3.10", {"/catatonit": self.tools["catatonit"]}, {},
            ["--config.entrypoint", "/catatonit", "--config.cmd", "-P"],
        )

    def _build_busybox(self) -> Path:
        applets = ("sh", "echo", "cat", "sleep", "ls", "env", "hostname", "wget")
        return self._oci_image(
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
            built = self._oci_image("python", "3", {}, {}, ["--config.cmd", "/usr/bin/python3"],
                                    rootfs_tar=rootfs)
            rootfs.unlink()
            shutil.move(built, tar.with_suffix(".tmp"))
            tar.with_suffix(".tmp").rename(tar)
        self._ctr("images", "import", "--base-name", PYTHON_IMAGE.rsplit(":", 1)[0], str(tar))
        return PYTHON_IMAGE

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
        log = self.workdir / "logs" / f"{name}.log"
        comp = Component(name, argv, log)
        with log.open("ab") as out:
            comp.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.components[name] = comp

    def _ctr(self, *args: str, check: bool = True) -> int:
        res = subprocess.run(
            [str(self.tools["ctr"]), "--address", str(self.socket), "--namespace", "k8s.io",
             *args], capture_output=True, text=True, timeout=120, check=False,
        )
        if check and res.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)} failed: {res.stderr.strip()}")
        return res.returncode

    def _wait(self, what: str, probe: object, watch: list[str]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for name in watch:
                comp = self.components[name]
                if not comp.running:
                    raise ClusterError(comp.describe_exit())
            if probe():  # type: ignore[operator]
                return
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"  {n} log:\n{self.components[n].log_tail()}" for n in watch
                )
                raise ClusterError(
                    f"gave up after {self.start_timeout:.0f} s waiting for {what}\n{tails}"
                )
            time.sleep(0.5)

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
            comp = self.components.pop("kubelet")
            if comp.proc is not None:
                kill_group(comp.proc.pid)
        if "containerd" in self.components and self.components["containerd"].running:
            self._remove_all_containers()
        shims = self._our_shims()
        if "containerd" in self.components:
            comp = self.components.pop("containerd")
            if comp.proc is not None:
                kill_group(comp.proc.pid)
        for pid in shims:  # shims daemonise into their own sessions: end them by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True,
                           timeout=10, check=False)
        self._unmount_under_workdir()

    def _remove_all_containers(self) -> None:
        ctr = [str(self.tools["ctr"]), "--address", str(self.socket), "--namespace", "k8s.io"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            ids = subprocess.run([*ctr, "tasks", "ls", "-q"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout.split()
            for cid in ids:
                subprocess.run([*ctr, "tasks", "kill", "-a", "-s", "SIGKILL", cid],
                               capture_output=True, timeout=30, check=False)
            deadline = time.monotonic() + 15
            for cid in ids:
                while time.monotonic() < deadline and subprocess.run(
                    [*ctr, "tasks", "rm", "-f", cid], capture_output=True, timeout=30,
                    check=False,
                ).returncode != 0:
                    time.sleep(0.2)

    def _our_shims(self) -> list[int]:
        """containerd-shim processes started by this node's containerd (matched on its socket)."""
        pids = []
        needle = str(self.socket).encode()
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

    def _unmount_under_workdir(self) -> None:
        prefix = str(self.workdir)
        try:
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        except OSError:
            return
        for mnt in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=10, check=False)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
