"""The images `make images` builds (e2e/testbed/images.py), checked from their OCI archives: what
a pod relies on (user, entrypoint, labels, read-only root) and that each one runs. The archives
are cached: after the first build these tests take seconds. Nothing is skipped: a machine without
buildah fails with the command that installs it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.manifests import OFFICIAL_IMAGES, server_manifests
from e2e.testbed import images

APP_IMAGES = ("worker", "operator", "e2e-graphs")
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "x86_64-linux-gnu-gcc", "ld", "make")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = [t for t in ("buildah", "mmdebstrap", "umoci", "unshare") if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: `apt-get install -y {images.APT_PACKAGES}`")


def _config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = images.image_config(name)["config"]
    return config


def _run(name: str, argv: list[str], timeout: float = 60) -> str:
    proc = images.run_in_image(name, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{name} {argv}: exit {proc.returncode}\n{out}"
    return out


@contextlib.contextmanager
def _server(name: str, argv: list[str] | None, env: dict[str, str] | None = None,
            writable: tuple[str, ...] = ("/tmp",)) -> Iterator[subprocess.Popen[str]]:
    proc = images.run_in_image(name, argv, env=env, writable=writable,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(what: str, probe: Any, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"{what}: the server exited with {proc.returncode}:\n{out[-3000:]}")
        with contextlib.suppress(Exception):
            if probe():
                return
        time.sleep(0.3)
    pytest.fail(f"gave up after {timeout} s waiting for {what}")


@pytest.mark.parametrize("name", [*APP_IMAGES, "nats", "postgres"])
def test_non_root_numeric_user_and_labels(name: str) -> None:
    config = _config(name)
    uid, _, gid = config["User"].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), config["User"]
    labels = config.get("Labels") or {}
    for label in ("title", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{label}"), (name, label, labels)
    assert config.get("ExposedPorts"), name


@pytest.mark.parametrize("name", ["worker", "operator"])
def test_app_images_entrypoint_env_and_labels(name: str) -> None:
    config = _config(name)
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == f"commandnet-{name}"
    assert labels["org.opencontainers.image.version"] == images.VERSION
    assert labels["org.opencontainers.image.revision"]
    assert labels["org.opencontainers.image.source"]
    assert config["User"] == "10001:10001"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert env["USER"] == env["LOGNAME"] == "commandnet"
    assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"
    if name == "worker":
        assert config["Entrypoint"] == ["commandnet"] and config["Cmd"] == ["worker"]
        assert "8080/tcp" in config["ExposedPorts"]
    else:
        assert config["Entrypoint"] == ["commandnet-operator"]


@pytest.mark.parametrize("name", APP_IMAGES)
def test_no_compiler_or_build_tools(name: str) -> None:
    root = images.rootfs(name)
    bins = [root / d for d in ("usr/bin", "usr/local/bin", "bin", "opt/commandnet/bin")]
    found = [str(b / c) for b in bins for c in COMPILERS if (b / c).exists()]
    assert not found, f"compilers in {name}: {found}"
    site = next((root / "opt/commandnet/lib").glob("python3*/site-packages"))
    tools = sorted(p.name for p in site.iterdir()
                   if p.name.split("-")[0] in ("setuptools", "wheel", "Cython", "_distutils_hack"))
    assert not tools, f"build tools in {name}'s venv: {tools}"
    assert not (root / "usr/lib/gcc").exists(), "gcc's back end (cc1) in the final stage"
    assert not (root / "usr/include/python3.11").exists(), "Python headers in the final stage"
    assert not (root / "src").exists() and not (root / "wheels").exists(), "build stage leaked"


def test_worker_runs_on_a_read_only_root() -> None:
    assert "worker" in _run("worker", ["--help"])
    out = _run("worker", ["worker", "--help"])
    assert "--graph" in out and "--pool" in out
    # The graph image built through examples/custom-worker/Dockerfile imports its graph.
    config = _config("e2e-graphs")
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["COMMANDNET_GRAPH"] == "e2e.graphs:Hello" and env["PYTHONPATH"] == "/app"
    assert config["Entrypoint"] == ["commandnet"] and config["Cmd"] == ["worker"]
    out = _run("e2e-graphs", ["graph", "e2e.graphs:Hello"])
    assert "Work" in out and "Done" in out, out


def test_operator_runs_on_a_read_only_root() -> None:
    assert "Usage" in _run("operator", ["--help"])
    # Every module of the operator imports from the venv (kopf, kubernetes-asyncio, cryptography).
    modules = ("admission", "crd", "handlers", "kube", "link", "main", "metrics", "resource",
               "settings", "status", "webhook")
    script = "; ".join(f"import commandnet_operator.{m}" for m in modules) + "; print('ok')"
    proc = images.run_in_image("operator", ["-c", script], entrypoint=["python3"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip().endswith("ok"), out


@pytest.mark.parametrize("name", ["worker", "operator"])
def test_the_user_has_a_name(name: str) -> None:
    """kopf names its peering identity with getpass.getuser(): a uid unknown to /etc/passwd and
    no USER/LOGNAME crashed the operator's pod (KeyError: 'getpwuid(): uid not found: 10001')."""
    script = ("import getpass, os, pwd; print(pwd.getpwuid(os.getuid()).pw_name); "
              "[os.environ.pop(k, None) for k in ('USER', 'LOGNAME')]; print(getpass.getuser())")
    proc = images.run_in_image(name, ["-c", script], entrypoint=["python3"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["commandnet", "commandnet"], out
    # Any other uid (a chart's runAsUser) still gets a name from the environment.
    proc = images.run_in_image(name, ["-c", "import getpass; print(getpass.getuser())"],
                               entrypoint=["python3"], user="12345:12345",
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "commandnet", out


def test_postgres_image_initialises_and_accepts_connections() -> None:
    import asyncpg

    port = _free_port()
    env = {"POSTGRES_USER": "commandnet", "POSTGRES_PASSWORD": "s3cret",
           "POSTGRES_DB": "commandnet", "PGDATA": "/var/lib/postgresql/data/pgdata"}
    writable = ("/tmp", "/var/lib/postgresql/data", "/var/run/postgresql")
    with _server("postgres", ["postgres", "-p", str(port)], env, writable) as proc:

        def probe() -> bool:
            async def connect() -> int:
                conn = await asyncpg.connect(host="127.0.0.1", port=port, user="commandnet",
                                             password="s3cret", database="commandnet",
                                             timeout=2)
                try:
                    value: int = await conn.fetchval("SELECT 41 + 1")
                    return value
                finally:
                    await conn.close()
            return asyncio.run(connect()) == 42

        _wait(f"PostgreSQL on 127.0.0.1:{port}", probe, proc, timeout=90)

        async def wrong_password() -> None:
            await asyncpg.connect(host="127.0.0.1", port=port, user="commandnet",
                                  password="wrong", database="commandnet", timeout=2)

        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(wrong_password())
        # The manifest's readiness probe, run the way the kubelet runs it (the image's PATH).
        probe = images.run_in_image("postgres", ["pg_isready", "--host=127.0.0.1",
                                                 f"--port={port}"], entrypoint=[],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = probe.communicate(timeout=30)
        assert probe.returncode == 0 and "accepting connections" in out, out


def test_nats_image_serves_jetstream() -> None:
    port, monitor = _free_port(), _free_port()
    args = ["--jetstream", "--store_dir=/data", f"--port={port}", f"--http_port={monitor}"]
    with _server("nats", args, writable=("/tmp", "/data")) as proc:

        def healthy() -> bool:
            url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        _wait(f"nats-server /healthz on {monitor}", healthy, proc)

        async def stream_roundtrip() -> int:
            import nats

            nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=2)
            try:
                js = nc.jetstream()
                await js.add_stream(name="IMAGETEST", subjects=["imagetest.>"])
                ack = await js.publish("imagetest.one", b"hello")
                info = await js.stream_info("IMAGETEST")
                assert info.state.messages == 1
                return int(ack.seq)
            finally:
                await nc.close()

        assert asyncio.run(stream_roundtrip()) == 1


def test_server_manifests_substitute_images() -> None:
    local = server_manifests(images.LOCAL_SERVER_IMAGES)
    official = server_manifests()
    for docs, want in ((local, images.LOCAL_SERVER_IMAGES), (official, OFFICIAL_IMAGES)):
        pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"]
                for d in docs if d["kind"] == "Deployment"}
        assert set(pods) == {"nats", "postgres"}
        for name, pod in pods.items():
            (container,) = pod["containers"]
            assert container["image"] == want[name]
            assert (container.get("imagePullPolicy") == "Never") == (docs is local)
            # Pod Security "restricted"
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] > 0
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert container["readinessProbe"]
    services = {d["metadata"]["name"]: d for d in local if d["kind"] == "Service"}
    assert {p["port"] for p in services["nats"]["spec"]["ports"]} == {4222, 8222}
    assert {p["port"] for p in services["postgres"]["spec"]["ports"]} == {5432}
    assert server_manifests(OFFICIAL_IMAGES, pull_policy="IfNotPresent")[1]["spec"]["template"][
        "spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"


def test_unchanged_tree_is_cached() -> None:
    started = time.monotonic()
    first = images.build()
    assert images.build() == first
    assert time.monotonic() - started < 60, "a warm build should only hash the tree"
    assert all(p.is_file() for p in first.values())


@pytest.mark.kube
def test_server_manifests_pass_pod_security_restricted(kube: Any) -> None:
    """The API server's PodSecurity admission, enforcing "restricted", admits the pods of both
    image sets (server-side dry run; no node needed)."""
    import yaml

    namespace = "images-psa"
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted"}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "postgres",
                                                            "namespace": namespace},
         "stringData": {"password": "x"}}]))
    deadline = time.monotonic() + 60  # the controller manager makes the default account
    while kube.kubectl("get", "serviceaccount", "default", "-n", namespace,
                       check=False).returncode != 0:
        assert time.monotonic() < deadline, "no default service account in 60 s"
        time.sleep(0.5)
    for chosen in (images.LOCAL_SERVER_IMAGES, OFFICIAL_IMAGES):
        docs = server_manifests(chosen)
        pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": d["metadata"]["name"]},
                 "spec": d["spec"]["template"]["spec"]} for d in docs if d["kind"] == "Deployment"]
        res = kube.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-",
                           input=yaml.safe_dump_all([*docs, *pods]), check=False)
        assert res.returncode == 0 and "PodSecurity" not in res.stderr, res.stderr
        assert "pod/postgres created" in res.stdout and "pod/nats created" in res.stdout


def test_cache_key_follows_context_and_parents(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What decides a rebuild: a context file's content or mode, a build argument, the parent."""
    script = tmp_path / "entrypoint.sh"
    script.write_text("#!/bin/sh\n")
    nats = images.IMAGES["nats"]
    monkeypatch.setitem(images.IMAGES, "nats", dataclasses.replace(
        nats, context=lambda: {"Dockerfile": images.REPO / nats.dockerfile, "e.sh": script}))
    first = images.key("nats")
    assert images.key("nats") == first
    script.write_text("#!/bin/sh\nexit 0\n")
    second = images.key("nats")
    script.chmod(0o755)
    third = images.key("nats")
    assert len({first, second, third}) == 3
    assert images.key("nats", base="registry") != third

    graphs = images.key("e2e-graphs")
    worker = images.IMAGES["worker"]
    monkeypatch.setitem(images.IMAGES, "worker", dataclasses.replace(
        worker, build_args={**worker.build_args, "VERSION": "0.0.0-test"}))
    assert images.key("e2e-graphs") != graphs
