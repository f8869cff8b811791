"""OpenTelemetry tracing: one trace per agent, a span per step delivery, parents right across
two real worker processes (PostgreSQL + NATS from the fixtures), spans from the SDK's
in-memory exporter in each process (tests/graphs/traced.py writes them out at exit)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from commandnet.local.process import free_port
from tests.graphs.procs import REPO, clean_env, http_get, wait_until

pytest.importorskip("opentelemetry.sdk")

NODES = ["Hop0", "Hop1", "Flaky", "Hop2"]
OK = ("transition", "succeeded")


def _sql(dsn: str, query: str) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return list(await conn.fetch(query))
        finally:
            await conn.close()

    return asyncio.run(go())


def _setup_schema(dsn: str) -> None:
    from commandnet.adapters.postgres import PostgresPersistence

    async def go() -> None:
        store = PostgresPersistence(dsn, min_size=1, max_size=2)
        await store.setup()
        await store.close()

    asyncio.run(go())


def _traced(spans: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.graphs.traced", str(spans), *args]


class _Worker:
    def __init__(self, name: str, tmp: Path, args: list[str], env: dict[str, str]) -> None:
        self.spans = tmp / f"{name}.jsonl"
        self.log_path = tmp / f"{name}.log"
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            _traced(self.spans, "worker", "--http-host", "127.0.0.1", "--http-port",
                    str(self.port), "--worker-id", name, *args),
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            return http_get(self.port, "/readyz")[0] == 200

        wait_until(ready, 90, lambda: f"worker ready\n{self.log_path.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # drains, exits, writes its spans
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._log.close()


def _spans(*files: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in files:
        if path.exists():
            found += [json.loads(line) for line in path.read_text().splitlines() if line]
    return found


@pytest.mark.parametrize("handoff", [0, 64], ids=["via-stream", "local-handoff"])
def test_one_trace_per_agent_with_every_step_under_the_one_before(
        postgres_dsn: str, nats_url: str, tmp_path: Path, handoff: int) -> None:
    dsn, pool = postgres_dsn, f"traced{handoff}"
    _setup_schema(dsn)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = clean_env(TRACED_MARKERS=str(markers), COMMANDNET_LOCAL_HANDOFF=str(handoff))
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    args = ["--graph", "tests.graphs.traced:Hop0", "--pool", pool, "--store", dsn,
            "--bus", nats_url, "--log-level", "WARNING", "--no-migrate",
            "--sweep-interval", "0.5"]
    workers = [_Worker(name, tmp_path, args, env) for name in ("wA", "wB")]
    cli_spans, api_spans = tmp_path / "cli.jsonl", tmp_path / "api.jsonl"
    # Ids of their own: JetStream's de-duplication window spans the stream, every pool.
    by_cli = [f"{pool}-c{i}" for i in range(4)]
    by_api = [f"{pool}-a{i}" for i in range(6)]
    try:
        for worker in workers:
            worker.wait_ready()
        for agent in by_cli:  # the CLI: a trigger command, started by a worker
            done = subprocess.run(
                _traced(cli_spans, "trigger", agent, "--node", "Hop0", "--context",
                        json.dumps({"key": agent}), "--pool", pool, "--bus", nats_url),
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        done = subprocess.run(  # the API: Engine.trigger_agent with the node class
            _traced(api_spans, "api", dsn, nats_url, pool, *by_api),
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

        def finished() -> bool:
            rows = _sql(dsn, f"SELECT status FROM agents WHERE pool = '{pool}'")
            return len(rows) == 10 and all(r["status"] == "succeeded" for r in rows)

        wait_until(finished, 120, lambda: "all agents succeeded: " + str(
            _sql(dsn, f"SELECT agent_id, status, node, step FROM agents WHERE pool='{pool}'")))
    finally:
        codes = [worker.stop() for worker in workers]
    assert codes == [0, 0], [w.log_path.read_text() for w in workers]

    spans = _spans(cli_spans, api_spans, *(w.spans for w in workers))
    by_id = {s["span_id"]: s for s in spans}
    worker_pids = {s["pid"] for s in _spans(*(w.spans for w in workers))}
    assert len(worker_pids) == 2, "both workers exported spans"
    per_agent: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        agent = span["attributes"].get("commandnet.agent.id")
        if agent:
            per_agent[agent].append(span)
    assert sorted(per_agent) == sorted(by_cli + by_api)

    cross_worker = 0
    for agent, mine in per_agent.items():
        roots = [s for s in mine if s["parent_id"] is None]
        assert [(r["name"], r["kind"]) for r in roots] == [("trigger", "PRODUCER")], agent
        root = roots[0]
        assert root["pid"] not in worker_pids  # started by the CLI or the API process
        assert {s["trace_id"] for s in mine} == {root["trace_id"]}, f"{agent}: one trace"
        for span in mine:  # every parent is a span of this agent's trace that was exported
            if span["parent_id"] is not None:
                assert span["parent_id"] in by_id, f"{agent}: {span['name']} lost its parent"
                assert by_id[span["parent_id"]]["trace_id"] == root["trace_id"]

        steps = [s for s in mine if s["name"].startswith("step")]
        done = {s["attributes"]["commandnet.step"]: s for s in steps
                if s["attributes"].get("commandnet.outcome") in OK}
        assert sorted(done) == [0, 1, 2, 3], f"{agent}: {[s['attributes'] for s in steps]}"
        for step, node in enumerate(NODES):
            span = done[step]
            attrs = span["attributes"]
            assert span["name"] == f"step {node}" and attrs["commandnet.node"] == node
            assert attrs["commandnet.agent.id"] == agent and span["kind"] == "CONSUMER"
            assert attrs["commandnet.outcome"] == ("succeeded" if node == "Hop2"
                                                   else "transition")
            assert attrs["commandnet.attempt"] == (2 if node == "Flaky" else 1)
        if agent in by_cli:  # trigger (CLI) -> the worker's handling of the command -> step 0
            handled = by_id[done[0]["parent_id"]]
            assert (handled["name"], handled["kind"]) == ("handle trigger", "CONSUMER")
            assert handled["parent_id"] == root["span_id"]
            assert handled["pid"] in worker_pids
        else:  # trigger (API, the store row and step 0 written there) -> step 0
            assert done[0]["parent_id"] == root["span_id"]
        for step in range(1, len(NODES)):  # each step is a child of the step that queued it
            assert done[step]["parent_id"] == done[step - 1]["span_id"], (agent, step)
            cross_worker += done[step]["pid"] != done[step - 1]["pid"]
        # The failed first attempt of Flaky: same parent as its retry, the error recorded.
        failed = [s for s in steps if s["attributes"].get("commandnet.outcome") == "retry"]
        assert len(failed) == 1, f"{agent}: {[s['attributes'] for s in steps]}"
        assert failed[0]["name"] == "step Flaky" and failed[0]["status"] == "ERROR"
        assert failed[0]["attributes"]["commandnet.attempt"] == 1
        assert failed[0]["parent_id"] == done[1]["span_id"]
        for other in steps:  # duplicates and busy leases, if any, hang where they belong
            assert other["parent_id"] in {done[k]["span_id"] for k in range(3)} | {
                root["span_id"], done[0]["parent_id"]}, other
    if handoff == 0:
        assert cross_worker > 0, "no step ran on another worker than the step before it"


def test_nothing_is_imported_without_a_tracer_provider() -> None:
    code = (
        "import sys\n"
        "import commandnet.adapters.nats, commandnet.adapters.nats_status\n"
        "import commandnet.worker.process, commandnet.cli.main, commandnet.tracing.setup\n"
        "from commandnet.tracing import active\n"
        "from commandnet.tracing.setup import setup_tracing\n"
        "assert setup_tracing('x') is None\n"
        "assert not active()\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
        "print('clean')\n")
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr


def _put_status(nats_url: str, pool: str, agent: str, traceparent: str) -> None:
    """The status value a worker would have written after committing step 3 of ``agent``."""
    import nats

    from commandnet.adapters.nats_status import status_key

    async def go() -> None:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value("COMMANDNET_STATUS")
            await kv.put(status_key(pool, agent), json.dumps({
                "agent_id": agent, "pool": pool, "status": "running", "phase": "Running",
                "node": "Hop2", "step": 3, "error": None, "reason": None,
                "updated_at": "2026-01-01T00:00:00+00:00", "trace": traceparent}).encode())
        finally:
            await nc.close()

    asyncio.run(go())


def _agent_at_step_3(dsn: str, pool: str, agent: str, outbox: bool) -> None:
    """An agent whose step 3 was committed but whose event never reached the stream: an outbox
    row left behind (the publish failed), or nothing (JetStream lost the message)."""
    from commandnet.adapters.postgres import PostgresPersistence
    from commandnet.records import NewAgent

    async def go() -> None:
        store = PostgresPersistence(dsn, min_size=1, max_size=2)
        store.apply_migrations = False
        await store.setup()
        try:
            await store.create_agent(NewAgent(agent, "Hop0", {"key": agent}, pool=pool))
        finally:
            await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE agents SET node = 'Hop2', step = 3 WHERE agent_id = $1",
                               agent)
            if outbox:
                await conn.execute("UPDATE outbox SET step = 3 WHERE agent_id = $1", agent)
            else:
                await conn.execute("DELETE FROM outbox WHERE agent_id = $1", agent)
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_republished_step_continues_the_trace_where_the_status_left_it(
        postgres_dsn: str, nats_url: str, tmp_path: Path) -> None:
    dsn, pool = postgres_dsn, "tracedrepair"
    _setup_schema(dsn)
    env = {k: v for k, v in clean_env(TRACED_MARKERS=str(tmp_path)).items()
           if not k.startswith("OTEL_")}
    worker = _Worker("wR", tmp_path, [
        "--graph", "tests.graphs.traced:Hop0", "--pool", pool, "--store", dsn, "--bus",
        nats_url, "--log-level", "WARNING", "--no-migrate", "--sweep-interval", "0.3",
        "--outbox-grace", "1", "--stall-after", "2"], env)
    tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", {"outbox": "00f067aa0ba902b7",
                                                     "reconciler": "00f067aa0ba902b8"}
    agents = {"outbox": f"{pool}-o", "reconciler": f"{pool}-r"}
    try:
        worker.wait_ready()  # the status bucket exists now
        for how, agent in agents.items():
            _put_status(nats_url, pool, agent, f"00-{tid}-{sid[how]}-01")
            _agent_at_step_3(dsn, pool, agent, outbox=how == "outbox")

        def finished() -> bool:
            rows = _sql(dsn, f"SELECT status FROM agents WHERE pool = '{pool}'")
            return len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)

        wait_until(finished, 60, lambda: str(_sql(dsn, "SELECT agent_id, status, step FROM "
                                                       f"agents WHERE pool = '{pool}'")))
    finally:
        assert worker.stop() == 0, worker.log_path.read_text()
    spans = _spans(worker.spans)
    for how, agent in agents.items():
        mine = [s for s in spans if s["attributes"].get("commandnet.agent.id") == agent]
        republish = [s for s in mine if s["name"] == "republish"]
        assert len(republish) >= 1, mine
        for span in republish:  # a stalled agent may have been re-published by both loops
            assert span["kind"] == "PRODUCER" and span["trace_id"] == tid
            assert span["parent_id"] == sid[how]  # where the trace left off
            assert span["attributes"]["commandnet.step"] == 3
        assert how in {s["attributes"]["commandnet.recovery"] for s in republish}
        done = [s for s in mine if s["attributes"].get("commandnet.outcome") == "succeeded"]
        assert len(done) == 1 and done[0]["name"] == "step Hop2", mine
        assert done[0]["trace_id"] == tid
        assert done[0]["parent_id"] in {s["span_id"] for s in republish}


def test_the_operator_shows_the_trace_the_workers_record() -> None:
    from commandnet_operator.status import merge

    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    pending = {"phase": "Pending", "traceId": "1" * 32}  # from the operator's trigger span
    value = {"status": "running", "node": "Hop1", "step": 1,
             "updated_at": "2026-01-01T00:00:00+00:00"}
    assert merge(pending, value, 1)["traceId"] == "1" * 32  # no trace recorded: kept
    shown = merge(pending, {**value, "trace": tp}, 1)
    assert shown["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert merge(shown, {**value, "trace": tp}, 1) is shown  # nothing new: no patch
    assert merge(shown, {**value, "trace": "garbage"}, 1) is shown


def test_the_crd_has_status_trace_id() -> None:
    import yaml

    crd = yaml.safe_load((REPO / "crds" / "agents.commandnet.io.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["traceId"]["pattern"] == "^[0-9a-f]{32}$"


def test_worker_and_cli_export_by_otlp_when_the_endpoint_is_set(
        postgres_dsn: str, nats_url: str, tmp_path: Path) -> None:
    """The real set-up path (no provider given): OTEL_EXPORTER_OTLP_ENDPOINT makes the worker
    and ``commandnet trigger`` export over OTLP/HTTP, here to a receiver in the test."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from tests.graphs.procs import WorkerProc, run_cli

    received: list[tuple[str, Any]] = []  # (service.name, span)

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes
                               if a.key == "service.name")
                received.extend((service, span) for ss in rs.scope_spans for span in ss.spans)
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dsn, pool, agent = postgres_dsn, "tracedotlp", "tracedotlp-1"
    _setup_schema(dsn)
    env = {k: v for k, v in clean_env(TRACED_MARKERS=str(tmp_path)).items()
           if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
               OTEL_BSP_SCHEDULE_DELAY="200")
    worker = WorkerProc(["--graph", "tests.graphs.traced:Hop0", "--pool", pool, "--store", dsn,
                         "--bus", nats_url, "--no-migrate"], tmp_path / "w.log", env=env)
    try:
        worker.wait_ready()
        done = run_cli(["trigger", agent, "--node", "Hop0", "--context",
                        json.dumps({"key": agent}), "--pool", pool, "--bus", nats_url], env=env)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: _sql(dsn, f"SELECT 1 FROM agents WHERE agent_id = '{agent}' AND "
                                     "status = 'succeeded'"), 60, "the agent to succeed")
        worker.terminate()
        assert worker.wait(60) == 0
    finally:
        worker.stop()
        server.shutdown()
    assert "exporting spans (otlp, http/protobuf)" in worker.log
    roots = [span for service, span in received if service == "commandnet-cli"]
    assert [(s.name, len(s.parent_span_id)) for s in roots] == [("trigger", 0)]
    steps = [span for service, span in received
             if service == "commandnet-worker" and span.name.startswith("step ")]
    assert sorted(s.name for s in steps) == sorted(
        ["step Hop0", "step Hop1", "step Flaky", "step Flaky", "step Hop2"])
    assert {s.trace_id for s in steps} == {roots[0].trace_id}  # one trace, across processes


@pytest.mark.kube
def test_the_api_server_takes_a_trace_id_in_status_and_refuses_a_bad_one(kube: Any) -> None:
    """The CRD from crds/ on a real API server: status.traceId is a trace id or nothing."""
    import time

    crd = REPO / "crds" / "agents.commandnet.io.yaml"
    kube.kubectl("apply", "--server-side", "-f", str(crd))
    deadline = time.monotonic() + 60
    while "True" not in kube.kubectl("get", "crd", "agents.commandnet.io", "-o", "jsonpath="
                                     "{.status.conditions[?(@.type=='Established')].status}",
                                     check=False).stdout:
        assert time.monotonic() < deadline, "the Agent CRD is not established"
        time.sleep(0.5)
    kube.kubectl("create", "namespace", "tracing")
    agent = ("apiVersion: commandnet.io/v1alpha1\nkind: Agent\nmetadata: {name: traced}\n"
             "spec: {startNode: Hop0, pool: default, context: {}}\n")
    kube.kubectl("apply", "-n", "tracing", "-f", "-", input=agent)

    def patch(trace_id: str) -> Any:
        return kube.kubectl("patch", "agent", "traced", "-n", "tracing", "--subresource=status",
                            "--type=merge", "-p", json.dumps({"status": {"traceId": trace_id}}),
                            check=False)

    assert patch("0af7651916cd43dd8448eb211c80319c").returncode == 0
    shown = kube.kubectl("get", "agent", "traced", "-n", "tracing", "-o",
                         "jsonpath={.status.traceId}").stdout
    assert shown == "0af7651916cd43dd8448eb211c80319c"
    refused = patch("not-a-trace-id")
    assert refused.returncode != 0 and "traceId" in refused.stderr, refused.stderr
