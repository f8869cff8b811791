"""The tools `make tools` builds (versions pinned in tools/versions.env) and how to run them:
missing tools fail with the fix, every run is bounded and reports what failed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from e2e.testbed.errors import ClusterError, ToolsMissingError

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "tools" / "versions.env"
DEFAULT_TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
DEFAULT_HELM_PLUGINS = REPO_ROOT / ".tools" / "helm-plugins"

CONTROL_PLANE_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
CLIENT_TOOLS = ("kubectl", "helm", "untt")
NODE_TOOLS = ("kubelet", "kube-proxy", "coredns")
AUTOSCALING_TOOLS = ("metrics-server", "keda", "keda-adapter")


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


def run_host(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a host command (umoci, ip, ...) that must succeed; the error carries its stderr."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res
