"""A local Kubernetes control plane built from `make tools`: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler on loopback ports, the way controller-runtime's envtest
serves Go operators (plus the real controllers, so Deployments get ReplicaSets).

    python -m e2e.localcluster up      # prints `export KUBECONFIG=...`
    python -m e2e.localcluster status
    python -m e2e.localcluster down

The pytest fixture `kube` (e2e/fixtures.py) starts the same thing for a test session.

Everything lives in one folder: certificates (made here with `cryptography`), kubeconfigs, etcd's
data, the components' logs and `state.json` (the process ids, for `down`). Each component runs in
its own process group; `stop()` ends the groups (TERM, then KILL), and the fixture's children also
die with the test process (PR_SET_PDEATHSIG), so a failed or killed test run leaves nothing behind.
Every wait is bounded and says what it was waiting for.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSIONS_FILE = REPO_ROOT / "tools" / "versions.env"
DEFAULT_TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
DEFAULT_HELM_PLUGINS = REPO_ROOT / ".tools" / "helm-plugins"
DEFAULT_CLUSTER_DIR = REPO_ROOT / ".tools" / "cluster"

SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_CIDR = "10.244.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

CONTROL_PLANE_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
CLIENT_TOOLS = ("kubectl", "helm", "untt")

START_TIMEOUT = float(os.environ.get("COMMANDNET_KUBE_START_TIMEOUT", "180"))


class ClusterError(RuntimeError):
    """The local control plane could not be started, or stopped being healthy."""


class ToolsMissingError(ClusterError):
    """A binary that `make tools` installs is not there."""


class PortInUseError(ClusterError):
    """A port the control plane wanted is taken by another process."""


# --------------------------------------------------------------------------------------------
# tools


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def tools_bin() -> Path:
    return Path(os.environ.get("COMMANDNET_TOOLS_BIN", str(DEFAULT_TOOLS_BIN)))


def find_tools(names: Iterable[str] = CONTROL_PLANE_TOOLS + CLIENT_TOOLS) -> dict[str, Path]:
    """Paths of the tools, or ToolsMissingError naming every missing one and the fix."""
    bin_dir = tools_bin()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        path = bin_dir / name
        if path.is_file() and os.access(path, os.X_OK):
            found[name] = path
        else:
            missing.append(name)
    if missing:
        raise ToolsMissingError(
            f"missing test-bed tools in {bin_dir}: {', '.join(missing)}. "
            "Run `make tools` (first build: see docs/kubernetes-testbed.md for time and disk)."
        )
    return found


def tool_env(
    workdir: Path, kubeconfig: Path | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for kubectl/helm/untt: the kubeconfig (if any), the local helm plugin folder
    (`helm unittest`), helm's homes inside `workdir`, and .tools/bin first on PATH."""
    env = dict(os.environ)
    helm_home = Path(workdir) / "helm"
    env.update(
        HELM_PLUGINS=os.environ.get("HELM_PLUGINS", str(DEFAULT_HELM_PLUGINS)),
        HELM_CONFIG_HOME=str(helm_home / "config"),
        HELM_CACHE_HOME=str(helm_home / "cache"),
        HELM_DATA_HOME=str(helm_home / "data"),
        PATH=f"{tools_bin()}{os.pathsep}{env.get('PATH', '')}",
    )
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    if extra:
        env.update(extra)
    return env


def run_tool(
    tool: str,
    *args: str,
    env: Mapping[str, str],
    input: str | bytes | None = None,
    check: bool = True,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool from .tools/bin; on failure (check=True) the error carries the command, exit
    code, stdout and stderr. Bounded by `timeout`."""
    exe = tools_bin() / tool
    if not exe.exists():
        raise ToolsMissingError(f"{exe} is missing: run `make tools`")
    data = input.decode() if isinstance(input, bytes) else input
    try:
        res = subprocess.run(
            [str(exe), *args], input=data, capture_output=True, text=True,
            env=dict(env), timeout=timeout, cwd=cwd, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"`{tool} {' '.join(args)}` did not finish in {timeout} s") from exc
    if check and res.returncode != 0:
        raise ClusterError(
            f"`{tool} {' '.join(args)}` failed with exit code {res.returncode}\n"
            f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
        )
    return res


# --------------------------------------------------------------------------------------------
# ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# certificates


@dataclass
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_pub: Path
    sa_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(folder: Path, clients: Mapping[str, tuple[str, Sequence[str]]]) -> Pki:
    """A CA, a serving certificate for the API server, client certificates (name -> (CN, [O])),
    and the service-account key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=30)

    def name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("commandnet-local-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, orgs: Sequence[str], server: bool) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn, orgs))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_encipherment=False, key_cert_sign=False,
                    crl_sign=False, content_commitment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
            sans: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(service_ip),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    def save(stem: str, key: Any, cert: x509.Certificate) -> tuple[Path, Path]:
        crt, k = folder / f"{stem}.crt", folder / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(k, key)
        return crt, k

    ca_crt_path, ca_key_path = save("ca", ca_key, ca_cert)
    serving = save("apiserver", *leaf("kube-apiserver", (), server=True))
    pki = Pki(
        ca_crt_path, ca_key_path, serving[0], serving[1], folder / "sa.pub", folder / "sa.key"
    )
    for stem, (cn, orgs) in clients.items():
        pki.clients[stem] = save(stem, *leaf(cn, orgs, server=False))

    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa)
    pki.sa_pub.write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def sign_client_cert(
    ca_cert: Path, ca_key: Path, cn: str, orgs: Sequence[str], out: Path
) -> tuple[Path, Path]:
    """A client certificate (CN, O=orgs) signed by an existing CA: `out`.crt and `out`.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    crt_path, key_path = out.with_suffix(".crt"), out.with_suffix(".key")
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return crt_path, key_path


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> None:
    """A self-contained kubeconfig (certificates embedded). JSON is valid YAML."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            }
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
        "preferences": {},
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)


# --------------------------------------------------------------------------------------------
# processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Child side of Popen: ask the kernel to SIGKILL us when the test process dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def kill_group(pgid: int, grace: float = 10.0) -> None:
    """TERM the process group, wait up to `grace` seconds, then KILL it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Members may be zombies of ours; reap what we can and check the leader's state.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(-pgid, os.WNOHANG)
    return pid_alive(pgid)


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # set for components adopted from state.json (CLI `down`)

    @property
    def running(self) -> bool:
        if self.proc is not None:
            # A killed multi-threaded process shows as a zombie ("Z") a moment before the
            # kernel lets us reap it: count it as gone already.
            return self.proc.poll() is None and pid_alive(self.proc.pid)
        return self.pid is not None and pid_alive(self.pid)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"    {line}" for line in text[-lines:])

    def describe_exit(self) -> str:
        code = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=5)
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        return (
            f"{self.name} (pid {self.proc.pid if self.proc else self.pid}) has exited ({how}); "
            f"last lines of {self.log}:\n{self.log_tail()}"
        )


# --------------------------------------------------------------------------------------------
# the cluster


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
        self.node: Any = None  # the e2e.localnode.LocalNode that kube_with_node attaches

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
            if not port_is_free(port):
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
            },
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
                       lambda: self._http_probe(url, ctx), self.start_timeout,
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
                and pid_alive(p) and _cmdline_mentions(p, str(self.workdir))
            }
            if alive:
                raise ClusterError(
                    f"a local cluster from {self.workdir} is still running ({alive}); "
                    "stop it first: `python -m e2e.localcluster down` (or `make cluster-down`)"
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
        log = self.workdir / "logs" / f"{name}.log"
        comp = Component(name, argv, log)
        with log.open("ab") as out:
            comp.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # own process group: kill_group() takes all of it
                preexec_fn=None if self.detach else _die_with_parent,
            )
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
        return [
            str(self.tools["kube-apiserver"]),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
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
        comp = self.components[name]
        if not comp.running:
            text = comp.log_tail(400)
            msg = comp.describe_exit()
            if "address already in use" in text:
                raise PortInUseError(f"{name} could not bind its port: {msg}")
            raise ClusterError(msg)

    def _poll(self, what: str, probe: Callable[[], tuple[bool, str]], timeout: float,
              watch: Sequence[str]) -> None:
        """Call probe() until it reports success; fail (never hang) after `timeout` seconds or
        as soon as a watched component has died, saying what was being waited for."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            for name in watch:
                self._check_alive(name)
            ok, last = probe()
            if ok:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"  {n} log ({self.components[n].log}):\n{self.components[n].log_tail()}"
                    for n in watch if n in self.components
                )
                raise ClusterError(
                    f"gave up after {timeout:.0f} s waiting for {what}; "
                    f"last answer: {last}\n{tails}"
                )
            time.sleep(0.25)

    def _http_probe(self, url: str, ctx: ssl.SSLContext | None) -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                body = resp.read(2000).decode(errors="replace")
                return resp.status == 200, f"HTTP {resp.status}: {body.strip()[:300]}"
        except urllib.error.HTTPError as exc:
            body = exc.read(4000).decode(errors="replace")
            failed = [ln for ln in body.splitlines() if "failed" in ln]
            return False, f"HTTP {exc.code}: {'; '.join(failed) or body.strip()[:300]}"
        except (OSError, ssl.SSLError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    def admin_ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        crt, key = self.pki.clients["admin"]
        ctx.load_cert_chain(str(crt), str(key))
        return ctx

    def wait_etcd(self, timeout: float | None = None) -> None:
        url = f"{self.etcd_url}/health"

        def probe() -> tuple[bool, str]:
            ok, last = self._http_probe(url, None)
            return ok and '"health":"true"' in last.replace(" ", ""), last

        self._poll(f"etcd {url}", probe, timeout or self.start_timeout, ["etcd"])

    def wait_apiserver(self, timeout: float | None = None) -> None:
        url = f"{self.server}/readyz"
        ctx = self.admin_ssl_context()
        watch = [n for n in ("etcd", "kube-apiserver") if n in self.components]
        self._poll(f"kube-apiserver {url}", lambda: self._http_probe(url, ctx),
                   timeout or self.start_timeout, watch)

    def _wait_https_ok(self, name: str, url: str, what: str) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # their self-signed serving certs; we only read /healthz
        self._poll(f"{name} {what} at {url}", lambda: self._http_probe(url, ctx),
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
        }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def stop(self, remove: bool = False) -> None:
        """End every component's process group (reverse start order). Idempotent."""
        for name in reversed(list(self.components)):
            comp = self.components[name]
            pid = comp.proc.pid if comp.proc else comp.pid
            if pid is not None:
                kill_group(pid)
            if comp.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    comp.proc.wait(timeout=5)
        self.components.clear()
        if not self._owns_workdir:
            return  # e.g. start() refused a folder that a live cluster owns: leave it alone
        with contextlib.suppress(OSError):
            self.state_file.unlink()
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(workdir: Path, components: Sequence[str] = CONTROL_PLANE_TOOLS
                  ) -> LocalCluster:
    """A started cluster in ``workdir``. Free ports are picked just before use; if another
    process grabs one in between, it tries once more with new ones (any other failure is
    reported as it is)."""
    for attempt in (1, 2):
        cluster = LocalCluster(workdir / f"try{attempt}", components=components)
        try:
            return cluster.start()
        except PortInUseError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _cmdline_mentions(pid: int, text: str) -> bool:
    """True if the process's command line contains `text` (guards against a reused pid)."""
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


def stop_from_state(workdir: Path) -> list[str]:
    """Stop a cluster that another process started (CLI `down`). Returns what was stopped."""
    state_file = workdir / "state.json"
    if not state_file.exists():
        return []
    try:
        state = json.loads(state_file.read_text())
    except ValueError:
        state = {}
    stopped = []
    for name, pid in reversed(list((state.get("pids") or {}).items())):
        if isinstance(pid, int) and pid_alive(pid) and _cmdline_mentions(pid, str(workdir)):
            kill_group(pid)
            stopped.append(f"{name} (pid {pid})")
    state_file.unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.localcluster",
        description="Start or stop the local Kubernetes control plane built by `make tools`.",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_CLUSTER_DIR,
                        help=f"work folder (default: {DEFAULT_CLUSTER_DIR})")
    parser.add_argument("--port", type=int, default=None,
                        help="API server port (default: a free one)")
    parser.add_argument("--no-controllers", action="store_true",
                        help="only etcd and kube-apiserver (no controller manager, no scheduler)")
    args = parser.parse_args(argv)
    workdir: Path = args.dir.resolve()

    if args.command == "down":
        stopped = stop_from_state(workdir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        if workdir.exists():
            shutil.rmtree(workdir / "etcd", ignore_errors=True)
        return 0
    if args.command == "status":
        state_file = workdir / "state.json"
        if not state_file.exists():
            print(f"no cluster in {workdir}")
            return 1
        state = json.loads(state_file.read_text())
        for name, pid in state.get("pids", {}).items():
            print(f"{name:25} pid {pid:<8} {'running' if pid_alive(pid) else 'DEAD'}")
        print(f"export KUBECONFIG={state['kubeconfig']}")
        return 0

    components = CONTROL_PLANE_TOOLS[:2] if args.no_controllers else CONTROL_PLANE_TOOLS
    try:
        cluster = LocalCluster(workdir, components=components, api_port=args.port, detach=True)
        cluster.start()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"local Kubernetes {read_versions().get('KUBERNETES_VERSION', '?')} is up at "
          f"{cluster.server} (logs: {workdir / 'logs'}); stop it with `make cluster-down`",
          file=sys.stderr)
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
