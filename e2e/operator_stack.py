"""The operator's test stack: the test bed's API server, a NATS server of its own, a PostgreSQL
database, ``commandnet worker`` processes of one pool and a ``commandnet-operator`` process.

Shared by ``e2e/test_operator.py`` and ``make bench-operator``. Every process it starts is
stopped by :meth:`OperatorStack.stop`, also when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from commandnet.local.nats import NatsServer
from commandnet.local.postgres import PostgresServer
from commandnet.local.process import free_port
from e2e.testbed import LocalCluster
from tests.graphs.procs import REPO, WorkerProc, clean_env, http_get, wait_until

CRDS = REPO / "crds"
GRAPHS = ("e2e.graphs:Hello", "e2e.graphs:Six1")
_databases = itertools.count(1)


def operator_cmd() -> list[str]:
    """The ``commandnet-operator`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "commandnet-operator"
    return [str(script)] if script.exists() else [sys.executable, "-m", "commandnet_operator"]


def agent_manifest(name: str, namespace: str, start: str = "Hello", pool: str = "e2e",
                   context: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """An Agent resource."""
    return {"apiVersion": "commandnet.io/v1alpha1", "kind": "Agent",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"startNode": start, "pool": pool,
                     "context": context if context is not None else {"name": name}, **spec}}


@contextlib.contextmanager
def scratch_database(server: PostgresServer, prefix: str) -> Iterator[str]:
    """A new database on ``server`` (started again if a test stopped it), dropped after."""
    if not server.running:
        server.start()
    name = f"{prefix}_{next(_databases)}_{os.getpid()}"
    dsn = server.create_database(name)
    try:
        yield dsn
    finally:
        with contextlib.suppress(Exception):
            server.drop_database(name)


class OperatorProc:
    """A ``commandnet-operator`` subprocess against the stack's API server and NATS."""

    def __init__(self, kube: LocalCluster, nats_url: str, workdir: Path, *,
                 kubeconfig: Path | None = None, **settings: str) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        self.webhook_port = free_port()
        self.log_path = workdir / f"operator-{time.monotonic_ns()}.log"
        env = clean_env(
            KUBECONFIG=str(kubeconfig or kube.kubeconfig), COMMANDNET_BUS_URL=nats_url,
            COMMANDNET_WEBHOOK_HOST="127.0.0.1",
            COMMANDNET_WEBHOOK_PORT=str(self.webhook_port),
            COMMANDNET_WEBHOOK_CERT_DIR=str(workdir / "webhook-certs"),
            COMMANDNET_HEALTH_PORT=str(self.health_port),
            COMMANDNET_METRICS_PORT=str(self.metrics_port),
            COMMANDNET_LOG_FORMAT="text",
            **{f"COMMANDNET_{k.upper()}": v for k, v in settings.items()})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(operator_cmd(), cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        """Everything the operator wrote so far."""
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        """The ``/metrics`` text."""
        return http_get(self.metrics_port, "/metrics")[1]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the liveness endpoint (kopf answers once it runs)."""
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log}")
            return http_get(self.health_port, "/healthz")[0] == 200

        wait_until(up, timeout, f"the operator's /healthz\n{self.log[-3000:]}")

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class OperatorStack:
    """NATS, workers of pool ``pool`` on PostgreSQL ``store_url``, and the operator."""

    def __init__(self, kube: LocalCluster, workdir: Path, store_url: str, *, pool: str = "e2e",
                 workers: int = 2, graphs: Sequence[str] = GRAPHS) -> None:
        self.kube = kube
        self.workdir = workdir
        self.store_url = store_url
        self.pool = pool
        self.graphs = list(graphs)
        self.worker_count = workers
        self.nats = NatsServer(workdir / "nats")
        self.workers: list[WorkerProc] = []
        self.operator: OperatorProc | None = None
        self.operator_kubeconfig: Path | None = None  # None: the test bed's admin

    # ------------------------------------------------------------------ lifecycle

    def install_crds(self) -> None:
        """Apply the CRDs (the Agent's and kopf's peering) and the peering object."""
        self.kubectl("apply", "-f", str(CRDS))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     "crd/agents.commandnet.io", "crd/clusterkopfpeerings.kopf.dev")
        self.kubectl("apply", "-f", str(REPO / "operator" / "deploy" / "peering.yaml"))

    def start(self, **operator_settings: str) -> OperatorStack:
        """Apply the CRDs; start NATS, the workers, then the operator; wait for all."""
        self.install_crds()
        self.nats.start()
        for _ in range(self.worker_count):
            self.start_worker()
        for worker in self.workers:
            worker.wait_ready()
        self.start_operator(**operator_settings)
        return self

    def start_worker(self) -> WorkerProc:
        """One more ``commandnet worker`` of the pool."""
        args: list[str] = ["--pool", self.pool, "--store", self.store_url, "--bus",
                           self.nats.url, "--log-format", "text", "--sweep-interval", "1"]
        for graph in self.graphs:
            args += ["--graph", graph]
        worker = WorkerProc(args, self.workdir / f"worker-{len(self.workers)}.log",
                            env=clean_env(PYTHONPATH=str(REPO)))
        self.workers.append(worker)
        return worker

    def start_operator(self, **settings: str) -> OperatorProc:
        """Start the operator and wait until it serves (webhook registered)."""
        self.operator = OperatorProc(self.kube, self.nats.url, self.workdir,
                                     kubeconfig=self.operator_kubeconfig, **settings)
        self.operator.wait_ready()
        wait_until(lambda: self.kubectl("get", "validatingwebhookconfiguration",
                                        "commandnet.io", check=False).returncode == 0,
                   60, "the operator to register its webhook")
        return self.operator

    def stop(self) -> None:
        """Stop everything this stack started (whatever state it is in)."""
        if self.operator is not None:
            self.operator.stop()
        for worker in self.workers:
            worker.stop()
        self.nats.stop()

    # ------------------------------------------------------------------ kubectl

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``kubectl ARGS`` against the test bed (raises on failure when ``check``)."""
        return self.kube.kubectl(*args, input=stdin, timeout=timeout, check=check)

    def apply(self, manifests: Iterable[dict[str, Any]], check: bool = True,
              dry_run: bool = False) -> subprocess.CompletedProcess[str]:
        """``kubectl apply`` a list of resources at once (``dry_run``: server-side, webhooks
        included, nothing stored)."""
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)})
        extra = ["--dry-run=server"] if dry_run else []
        return self.kubectl("apply", *extra, "-f", "-", stdin=body, check=check)

    def agents(self, namespace: str) -> dict[str, dict[str, Any]]:
        """The namespace's Agents by name."""
        out = self.kubectl("get", "agents", "-n", namespace, "-o", "json").stdout
        return {a["metadata"]["name"]: a for a in json.loads(out)["items"]}

    def agent(self, namespace: str, name: str) -> dict[str, Any] | None:
        """One Agent, or None."""
        result = self.kubectl("get", "agent", name, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def wait_phase(self, namespace: str, name: str, phases: Sequence[str],
                   timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the Agent's phase is one of ``phases``; returns the Agent."""
        def reached() -> dict[str, Any] | None:
            agent = self.agent(namespace, name)
            if agent and agent.get("status", {}).get("phase") in phases:
                return agent
            return None

        return wait_until(reached, timeout, f"Agent {namespace}/{name} to be {phases}: "
                          f"{self.agent(namespace, name)}\n{self.operator_log_tail()}",
                          interval=0.25)

    def namespace(self, name: str) -> str:
        """Create a namespace (idempotent); returns its name."""
        self.kubectl("create", "namespace", name, check=False)
        return name

    def operator_log_tail(self, chars: int = 3000) -> str:
        """The end of the operator's log, for failure messages."""
        return self.operator.log[-chars:] if self.operator is not None else ""

