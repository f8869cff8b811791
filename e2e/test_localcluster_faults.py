"""Faults of the local control plane: a taken port, a stale or live data folder, a killed etcd,
missing tools, and the CLI's up/down. Each of these runs its own small cluster (etcd +
kube-apiserver), never the shared session one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.testbed import (
    REPO_ROOT,
    ClusterError,
    LocalCluster,
    PortInUseError,
    ToolsMissingError,
    find_tools,
    pid_alive,
)

pytestmark = pytest.mark.kube

ENVTEST = ("etcd", "kube-apiserver")


@pytest.fixture
def small_cluster(kube_tools: dict[str, Path], tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "c", components=ENVTEST)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def wait_gone(pids: list[int], limit: float = 15) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_missing_tools_fail_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMANDNET_TOOLS_BIN", str(tmp_path))
    with pytest.raises(ToolsMissingError, match=r"make tools") as err:
        find_tools()
    assert "kube-apiserver" in str(err.value) and "etcd" in str(err.value)
    with pytest.raises(ToolsMissingError, match=r"make tools"):
        LocalCluster(tmp_path / "c")


def test_kube_fixture_fails_loudly_without_tools(tmp_path: Path) -> None:
    """The `kube` fixture errors (it never skips) and says to run `make tools`."""
    (tmp_path / "test_needs_kube.py").write_text(
        "def test_uses_kube(kube):\n    raise AssertionError('must not run')\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "e2e.fixtures", "-p", "no:cacheprovider",
         "-q", "-rA", str(tmp_path / "test_needs_kube.py")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COMMANDNET_TOOLS_BIN": str(tmp_path / "no-tools")},
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "1 error" in out and "skipped" not in out, out
    assert "Run `make tools`" in out, out


def test_taken_port_is_a_clear_error_and_leaves_nothing(
    kube_tools: dict[str, Path], tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cluster = LocalCluster(tmp_path / "c", components=ENVTEST, api_port=port)
        with pytest.raises(PortInUseError, match=rf"port {port} .*kube-apiserver.*in use"):
            cluster.start()
    assert cluster.components == {}
    assert not (tmp_path / "c" / "state.json").exists()


def test_killed_etcd_is_reported_then_recovered(small_cluster: LocalCluster) -> None:
    c = small_cluster
    c.kubectl("create", "configmap", "survivor", "--from-literal=k=v")
    etcd_pid = c.components["etcd"].proc.pid  # type: ignore[union-attr]
    os.killpg(etcd_pid, signal.SIGKILL)
    assert wait_gone([etcd_pid]) == []

    with pytest.raises(ClusterError, match=r"etcd \(pid \d+\) has exited \(signal 9\)"):
        c.wait_ready(timeout=30)

    assert c.heal(timeout=120) == ["etcd"]
    got = json.loads(c.kubectl("get", "configmap", "survivor", "-o", "json").stdout)
    assert got["data"] == {"k": "v"}


def test_live_folder_is_refused_and_stop_leaves_no_process(
    kube_tools: dict[str, Path], tmp_path: Path
) -> None:
    first = LocalCluster(tmp_path / "c", components=ENVTEST).start()
    pids = [comp.proc.pid for comp in first.components.values()]  # type: ignore[union-attr]
    try:
        with pytest.raises(ClusterError, match=r"still running"):
            LocalCluster(tmp_path / "c", components=ENVTEST).start()
        assert all(pid_alive(p) for p in pids)  # the refusal did not touch the live cluster
    finally:
        first.stop()
    assert wait_gone(pids) == []


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.testbed", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_cli_up_over_stale_folder_then_down(kube_tools: dict[str, Path], tmp_path: Path) -> None:
    workdir = tmp_path / "cli"
    # A stale folder as a crash leaves it: state.json naming a dead process, junk etcd data.
    (workdir / "etcd" / "member").mkdir(parents=True)
    (workdir / "etcd" / "member" / "junk").write_text("not a wal")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (workdir / "state.json").write_text(json.dumps({"pids": {"etcd": dead.pid}}))

    up = _cli("up", "--dir", str(workdir), "--no-controllers")
    try:
        assert up.returncode == 0, up.stderr
        export = up.stdout.strip().splitlines()[-1]
        assert export == f"export KUBECONFIG={workdir / 'admin.kubeconfig'}"
        state = json.loads((workdir / "state.json").read_text())
        pids = list(state["pids"].values())
        assert all(pid_alive(p) for p in pids)
        env = {**os.environ, "KUBECONFIG": str(workdir / "admin.kubeconfig")}
        kubectl = str(find_tools(["kubectl"])["kubectl"])
        ns = subprocess.run(
            [kubectl, "get", "namespace", "default", "-o", "name"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        assert ns.stdout.strip() == "namespace/default", ns.stderr
        status = _cli("status", "--dir", str(workdir))
        assert status.returncode == 0 and "DEAD" not in status.stdout
    finally:
        down = _cli("down", "--dir", str(workdir))
    assert down.returncode == 0, down.stderr
    assert "etcd" in down.stdout and "kube-apiserver" in down.stdout
    assert wait_gone(pids) == []
    assert _cli("down", "--dir", str(workdir)).stdout.strip() == "stopped: nothing was running"
