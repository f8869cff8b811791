"""The e2e suite's view of a cluster: any kubeconfig, the product's images on its nodes, NATS and
PostgreSQL as pods, and the chart installed with helm (e2e/test_release.py).

Two ways in, one suite:

- the test bed (`make e2e-local`, and `make test`): a control plane and a node of its own
  (e2e.testbed), the images built from the Dockerfiles with buildah and imported into the node;
- any cluster (`make e2e-kind`): ``COMMANDNET_E2E_KUBECONFIG`` names its kubeconfig and
  ``COMMANDNET_E2E_IMAGES`` (JSON) the images already loaded there, e.g.
  ``{"worker": "commandnet-worker:e2e", "operator": ..., "graphs": ..., "nats": "nats:2.11-alpine",
  "postgres": "postgres:16"}``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.testbed.tools import REPO_ROOT
from tests.graphs.procs import wait_until

CHART = REPO_ROOT / "charts" / "commandnet"
KUBECONFIG_ENV = "COMMANDNET_E2E_KUBECONFIG"
IMAGES_ENV = "COMMANDNET_E2E_IMAGES"
POOL = "e2e"
GRAPHS = ("e2e.graphs:Hello", "e2e.graphs:Six1")
DB_USER, DB_NAME = "commandnet", "commandnet"


@dataclass(frozen=True)
class Images:
    """The image of each part, as the cluster's nodes know it."""

    worker: str
    operator: str
    graphs: str  # the worker image plus e2e/graphs.py (examples/custom-worker/Dockerfile)
    nats: str
    postgres: str
    pull_policy: str = "IfNotPresent"

    @classmethod
    def from_env(cls, text: str) -> Images:
        data = json.loads(text)
        missing = {"worker", "operator", "graphs", "nats", "postgres"} - set(data)
        if missing:
            raise ValueError(f"{IMAGES_ENV} lacks {sorted(missing)}: {text}")
        return cls(**data)


def _binary(name: str) -> str:
    """The test bed's build of a tool when there is one, else the one on PATH (kind users)."""
    built = REPO_ROOT / ".tools" / "bin" / name
    if built.exists():
        return str(built)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} not found: run `make tools` or put it on PATH")
    return found


class Cluster:
    """kubectl and helm against one kubeconfig."""

    def __init__(self, kubeconfig: Path, workdir: Path, images: Images) -> None:
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.images = images
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig),
                    "HELM_CONFIG_HOME": str(workdir / "helm-config"),
                    "HELM_CACHE_HOME": str(workdir / "helm-cache"),
                    "HELM_DATA_HOME": str(workdir / "helm-data")}

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([_binary(tool), *args], env=self.env, input=input, text=True,
                                capture_output=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kw)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kw)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, manifests: Iterable[dict[str, Any]], namespace: str | None = None) -> None:
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)})
        extra = ["-n", namespace] if namespace else []
        self.kubectl("apply", *extra, "-f", "-", input=body)


def cluster_under_test(request: Any, workdir: Path, bed_fixture: str) -> Cluster:
    """COMMANDNET_E2E_KUBECONFIG's cluster with COMMANDNET_E2E_IMAGES there, else the test
    bed that pytest fixture ``bed_fixture`` gives (one node per machine: kube-proxy's rules are
    machine-wide), with the images built from the Dockerfiles and imported into its node."""
    if os.environ.get(KUBECONFIG_ENV):
        return Cluster(Path(os.environ[KUBECONFIG_ENV]), workdir,
                       Images.from_env(os.environ.get(IMAGES_ENV, "")))
    from e2e.testbed import images as built

    archives = built.build(["worker", "operator", "e2e-graphs", "nats", "postgres"])
    bed = request.getfixturevalue(bed_fixture)
    assert bed.node is not None
    for path in archives.values():
        bed.node.import_archive(path)
    return Cluster(bed.kubeconfig, workdir, Images(
        worker=built.ref("worker"), operator=built.ref("operator"),
        graphs=built.ref("e2e-graphs"), nats=built.ref("nats"), postgres=built.ref("postgres"),
        pull_policy="Never"))


def agent(name: str, start: str = "Hello", delay: float = 0.0) -> dict[str, Any]:
    """An Agent of the e2e pool."""
    return {"apiVersion": "commandnet.io/v1alpha1", "kind": "Agent",
            "metadata": {"name": name},
            "spec": {"startNode": start, "pool": POOL,
                     "context": {"name": name, "delay": delay}}}


class Release:
    """The chart installed in ``namespace`` with NATS and PostgreSQL pods beside it."""

    def __init__(self, cluster: Cluster, namespace: str, name: str = "cn", *, pool: str = POOL,
                 graphs: Sequence[str] = GRAPHS, worker_image: str | None = None) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.name = name
        self.pool = pool
        self.graphs = list(graphs)
        self.worker_image = worker_image or cluster.images.graphs
        self.password = secrets.token_hex(12)
        self._installed: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up

    def create_namespace(self) -> None:
        """The namespace, enforcing Pod Security "restricted" for everything in it."""
        self.cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": self.namespace,
            "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                       "pod-security.kubernetes.io/warn": "restricted"}}}])

    def deploy_servers(self) -> None:
        """NATS (JetStream) and PostgreSQL from e2e/manifests/, and the Secret the chart reads."""
        from e2e.manifests import server_manifests

        images = self.cluster.images
        self.cluster.kubectl("create", "secret", "generic", "postgres", "-n", self.namespace,
                             f"--from-literal=password={self.password}")
        self.cluster.apply(server_manifests({"nats": images.nats, "postgres": images.postgres},
                                            pull_policy=images.pull_policy),
                           namespace=self.namespace)
        svc = f"{self.namespace}.svc.cluster.local"
        self.cluster.kubectl(
            "create", "secret", "generic", "commandnet-connection", "-n", self.namespace,
            f"--from-literal=store-url=postgresql://{DB_USER}:{self.password}@postgres.{svc}:5432/"
            f"{DB_NAME}", f"--from-literal=bus-url=nats://nats.{svc}:4222")
        for name in ("nats", "postgres"):
            self.rollout(name)

    def values(self, **extra: Any) -> dict[str, Any]:
        images = self.cluster.images
        worker_repo, worker_tag = self.worker_image.rsplit(":", 1)
        op_repo, op_tag = images.operator.rsplit(":", 1)
        values: dict[str, Any] = {
            "image": {"repository": worker_repo, "tag": worker_tag,
                      "pullPolicy": images.pull_policy},
            "connection": {"existingSecret": "commandnet-connection"},
            "workers": {"replicas": 2, "drainGraceSeconds": 20, "nodeTimeoutSeconds": 30,
                        "logFormat": "text",
                        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}}},
            "pools": [{"name": self.pool, "graph": self.graphs}],
            "operator": {"image": {"repository": op_repo, "tag": op_tag,
                                   "pullPolicy": images.pull_policy}},
        }
        return _merge(values, extra)

    def install(self, **extra: Any) -> None:
        """``helm install``; with the Agent CRD already there (another release owns it, kept
        by its resource policy) this one leaves it alone (`crds.install: false`), as a user's
        second release must."""
        crd = self.cluster.kubectl("get", "crd", "agents.commandnet.io", check=False)
        if crd.returncode == 0:
            extra = _merge({"crds": {"install": False}}, extra)
        self._installed = extra
        self._helm("install", self.values(**extra))

    def upgrade(self, **extra: Any) -> None:
        """A new revision: the install's values with ``extra`` merged over them."""
        self._helm("upgrade", self.values(**_merge(self._installed, extra)))

    def _helm(self, verb: str, values: dict[str, Any]) -> None:
        path = self.cluster.workdir / f"values-{verb}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(values))
        self.cluster.helm(verb, self.name, str(CHART), "-n", self.namespace, "-f", str(path),
                          "--wait", "--timeout", "5m", timeout=420)

    def uninstall(self) -> None:
        self.cluster.helm("uninstall", self.name, "-n", self.namespace, "--wait",
                          "--timeout", "3m", timeout=240)

    def rollout(self, deployment: str, timeout: int = 300) -> None:
        self.cluster.kubectl("rollout", "status", f"deployment/{deployment}", "-n",
                             self.namespace, f"--timeout={timeout}s", timeout=timeout + 30)

    # ------------------------------------------------------------------ reading

    def pods(self, component: str) -> list[dict[str, Any]]:
        """Running pods of one of the chart's components (``worker`` or ``operator``)."""
        items = self.cluster.json("get", "pods", "-n", self.namespace, "-l",
                                  f"app.kubernetes.io/instance={self.name},"
                                  f"app.kubernetes.io/component={component}")["items"]
        return [p for p in items if p["metadata"].get("deletionTimestamp") is None]

    def agents(self) -> dict[str, dict[str, Any]]:
        items = self.cluster.json("get", "agents", "-n", self.namespace)["items"]
        return {a["metadata"]["name"]: a for a in items}

    def wait_final(self, names: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Wait until every named Agent is Succeeded, Failed or Cancelled; returns them."""
        wanted = set(names)

        def done() -> dict[str, dict[str, Any]] | None:
            now = {n: a for n, a in self.agents().items() if n in wanted}
            final = {n for n, a in now.items()
                     if a.get("status", {}).get("phase") in ("Succeeded", "Failed", "Cancelled")}
            return now if final == wanted else None

        def progress() -> str:
            phases: dict[str, int] = {}
            for name, a in self.agents().items():
                if name in wanted:
                    phase = a.get("status", {}).get("phase", "-")
                    phases[phase] = phases.get(phase, 0) + 1
            return f"{len(wanted)} Agents to be final; phases now {phases}"

        try:
            result: dict[str, dict[str, Any]] = wait_until(done, timeout, "Agents", interval=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {progress()}\n{self.logs('operator')}") from None
        return result

    def psql(self, query: str) -> list[list[str]]:
        """Rows of ``query``, run by psql inside the PostgreSQL pod (tab-separated fields)."""
        out = self.cluster.kubectl(
            "exec", "-n", self.namespace, "deploy/postgres", "--", "psql", "-U", DB_USER,
            "-d", DB_NAME, "-tA", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", query).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def history(self, agent_ids: Iterable[str]) -> dict[str, list[tuple[int, str, str]]]:
        """(step, from, to) of each agent's transitions as the store holds them."""
        ids = list(agent_ids)
        quoted = ",".join("'" + i.replace("'", "''") + "'" for i in ids)
        rows = self.psql("SELECT agent_id, step, from_node, coalesce(to_node, '') FROM history "
                         f"WHERE agent_id IN ({quoted}) ORDER BY agent_id, step")
        out: dict[str, list[tuple[int, str, str]]] = {i: [] for i in ids}
        for agent_id, step, src, dst in rows:
            out[agent_id].append((int(step), src, dst))
        return out

    def logs(self, component: str, lines: int = 60) -> str:
        result = self.cluster.kubectl(
            "logs", "-n", self.namespace, "-l",
            f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}",
            f"--tail={lines}", "--prefix", check=False)
        return result.stdout + result.stderr


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
