"""The worker process: settings, graph loading, logs, metrics, probes, drain; in-process and real.

In-process tests use the in-memory adapters; the process tests start ``commandnet worker`` as a
subprocess (SQLite store; the real NATS server where the test needs a bus between processes).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from commandnet import AgentRecord, AgentStatus, Engine
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.cli.worker import worker as worker_command
from commandnet.messages import StepEvent
from commandnet.records import LeaseState, NewAgent
from commandnet.worker import (
    GraphLoadError,
    PrometheusObserver,
    Worker,
    WorkerSettings,
    load_graph,
    load_settings,
    mask_url,
)
from commandnet.worker.http import ProbeServer
from commandnet.worker.logs import setup_logging
from commandnet.worker.settings import SettingsError
from tests.graphs import failing, gate, linear
from tests.graphs.procs import WorkerProc, clean_env, free_port, http_get, run_cli, wait_until


@pytest.fixture(autouse=True)
def clean_settings(no_commandnet_env: None) -> Iterator[None]:
    """Settings tests must not see the developer's COMMANDNET_* variables."""
    yield
    logging.getLogger().handlers.clear()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric sample's value (0 when it has not been created yet)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- settings


def test_settings_come_from_env_and_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDNET_GRAPH", "tests.graphs.linear:Step0, tests.graphs.gate:Hold")
    monkeypatch.setenv("COMMANDNET_POOL", "payments")
    monkeypatch.setenv("COMMANDNET_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("COMMANDNET_LOG_FORMAT", "TEXT")
    monkeypatch.setenv("COMMANDNET_MIGRATE", "false")
    s = load_settings(pool=None, max_in_flight=3, graph=())
    assert s.graph == ["tests.graphs.linear:Step0", "tests.graphs.gate:Hold"]
    assert (s.pool, s.max_in_flight, s.log_format, s.migrate) == ("payments", 3, "text", False)
    assert load_settings(graph=("a.b:C",)).graph == ["a.b:C"]


def test_settings_reject_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDNET_LEASE_SECONDS", "-1")
    with pytest.raises(ValueError, match="lease_seconds"):
        load_settings()
    result = CliRunner().invoke(worker_command, ["--graph", "tests.graphs.linear:Step0"])
    assert result.exit_code == 2
    assert "--lease-seconds / COMMANDNET_LEASE_SECONDS" in result.output


def test_passwords_come_from_env_and_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDNET_STORE_URL", "postgresql://app@db.example:5432/cn")
    monkeypatch.setenv("COMMANDNET_STORE_PASSWORD", "s3cr/t:pw")
    s = WorkerSettings()
    # handed to the driver as a password, not spliced into the URL
    assert s.store_connection() == ("postgresql://app@db.example:5432/cn", {
        "password": "s3cr/t:pw", "min_size": 2, "max_size": 10})
    summary = json.dumps(s.summary())
    assert "s3cr" not in summary and "store_password" not in summary
    assert mask_url("nats://u:pw@[::1]:4222") == "nats://u:***@[::1]:4222"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"
    assert "s3cr/t:pw" in s.secrets()
    with pytest.raises(SettingsError, match=r"COMMANDNET_STORE_PASSWORD .* names no user"):
        WorkerSettings(store_url="postgresql://db/cn",
                       store_password="s3cr/t:pw").store_connection()


# ----------------------------------------------------------------------- graph loading


@pytest.mark.parametrize(("spec", "message"), [
    ("tests.graphs.linear", "expected the form pkg.module:StartNode"),
    ("tests.graphs.nope:Start", "no module named 'tests.graphs.nope'"),
    ("tests.graphs.linear:Nope", "module 'tests.graphs.linear' has no attribute 'Nope'"),
    ("tests.graphs.broken:NotANode", "is a class NotANode, not a Node class"),
    ("tests.graphs.broken:not_a_class", "is a int, not a Node class"),
    ("tests.graphs.broken:Dangling", "Dangling.run return hint"),
])
def test_bad_graph_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(GraphLoadError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        load_graph(spec)
    assert spec in str(e.value)


def test_graph_spec_loads_the_start_node() -> None:
    assert load_graph("tests.graphs.linear:Step0") is linear.Step0


# ---------------------------------------------------------------------------- logging


def test_json_logs_redact_secrets() -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", secrets=["hunter2"], stream=out)
    log = logging.getLogger("commandnet.test")
    log.info("connecting to %s", "postgresql://u:hunter2@db/x", extra={"agent_id": "a-1"})
    try:
        raise RuntimeError("login failed for password hunter2")
    except RuntimeError:
        log.exception("boom")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["msg"] == "connecting to postgresql://u:***@db/x"
    assert lines[0]["agent_id"] == "a-1" and lines[0]["level"] == "INFO"
    assert "RuntimeError" in lines[1]["exc"]
    assert "hunter2" not in out.getvalue()


# ---------------------------------------------------------------------------- metrics


async def wait_async(check: Callable[[], Awaitable[bool]], limit: float, what: str) -> None:
    """Bounded async poll of an async ``check``."""
    deadline = asyncio.get_running_loop().time() + limit
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _true(value: object) -> bool:
    return bool(value)



async def test_prometheus_observer_counts_transitions_failures_and_retries() -> None:
    metrics = PrometheusObserver()
    bus = InMemoryEventBus()
    engine = Engine(InMemoryPersistence(), bus, graphs=[linear.Step0, failing.AlwaysFails],
                    observers=[metrics])
    metrics.bind(engine)
    reg = metrics.registry
    async with engine:
        await engine.trigger_agent("lin", linear.Step0, linear.Trail())
        await engine.trigger_agent("bad", failing.AlwaysFails, failing.Ctx())
        assert (await engine.wait_for("lin", timeout=30)).status is AgentStatus.SUCCEEDED
        assert (await engine.wait_for("bad", timeout=30)).status is AgentStatus.FAILED
        await bus.publish_raw(b"not json")
        await wait_async(lambda: _true(bus.dead_letters), 10, "the poison message dead-lettered")
    assert sample(reg, "commandnet_transitions_total", node="Step0", to_node="Step1") == 1
    assert sample(reg, "commandnet_transitions_total", node="Step9", to_node="") == 1
    assert sample(reg, "commandnet_step_duration_seconds_count", node="Step4") == 1
    assert sample(reg, "commandnet_step_failures_total", node="AlwaysFails") == 2
    assert sample(reg, "commandnet_step_retries_total", node="AlwaysFails") == 1
    assert sample(reg, "commandnet_agents_finished_total", status="succeeded") == 1
    assert sample(reg, "commandnet_agents_finished_total", status="failed") == 1
    # The retry of AlwaysFails came back as a redelivery of its nacked message.
    assert sample(reg, "commandnet_redeliveries_total") >= 1
    assert sample(reg, "commandnet_leases_total", result="granted") == 12
    assert sample(reg, "commandnet_dead_letters_total") == 1
    assert sample(reg, "commandnet_max_in_flight") == 64


async def test_lease_conflicts_are_counted() -> None:
    metrics = PrometheusObserver()
    store, bus = InMemoryPersistence(), InMemoryEventBus()
    engine = Engine(store, bus, graphs=[linear.Step0], observers=[metrics])
    await engine.start_worker()
    await store.create_agent(NewAgent("a", "Step0", {}))
    first = await store.load_and_lock_agent("a", 0, "w1", 30)  # another worker holds it
    await bus.publish(StepEvent(agent_id="a", step=0))
    await bus.publish(StepEvent(agent_id="a", step=5))

    async def both_counted() -> bool:
        return sample(metrics.registry, "commandnet_leases_total", result="stale") == 1 and \
            sample(metrics.registry, "commandnet_leases_total", result="busy") == 1

    await wait_async(both_counted, 10, "the busy and the stale lease to be counted")
    assert first.state is LeaseState.GRANTED
    assert sample(metrics.registry, "commandnet_lease_conflicts_total") == 1
    assert sample(metrics.registry, "commandnet_leases_total", result="stale") == 1
    await engine.stop(grace=0)


# ----------------------------------------------------------------------------- probes


async def test_probe_server_answers_health_readiness_and_metrics() -> None:
    state = {"ready": False}

    async def ready() -> tuple[bool, str]:
        return state["ready"], "ready" if state["ready"] else "starting"

    metrics = PrometheusObserver()
    metrics.transitions.labels("A", "B").inc()
    server = ProbeServer("127.0.0.1", 0, ready, metrics.registry)
    await server.start()

    async def get(path: str) -> tuple[int, str]:
        return await asyncio.to_thread(http_get, server.port, path)

    try:
        assert await get("/healthz") == (200, "ok\n")
        assert await get("/readyz") == (503, "starting\n")
        state["ready"] = True
        assert await get("/readyz?verbose=1") == (200, "ready\n")
        status, body = await get("/metrics")
        assert status == 200
        assert 'commandnet_transitions_total{node="A",to_node="B"} 1.0' in body
        assert (await get("/nope"))[0] == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 405")
        writer.close()
    finally:
        await server.close()


# ------------------------------------------------------------------ worker, in-process


def settings_for(*graphs: str, **extra: object) -> WorkerSettings:
    return WorkerSettings(graph=list(graphs), store_url="memory://", bus_url="memory://",
                          http_host="127.0.0.1", http_port=0, **extra)  # type: ignore[arg-type]


async def is_ready(w: Worker) -> bool:
    return (await w.ready())[0]


async def test_worker_runs_agents_serves_probes_and_drains() -> None:
    w = Worker(settings_for("tests.graphs.linear:Step0"))
    running = asyncio.create_task(w.run())
    try:
        await wait_async(lambda: is_ready(w), 30, "worker ready")
        assert await asyncio.to_thread(http_get, w.http.port, "/readyz") == (200, "ready\n")
        await w.engine.trigger_agent("a1", "Step0", {})
        rec = await w.engine.wait_for("a1", timeout=30)
        assert (rec.status, rec.step, rec.context["visited"][-1]) == (
            AgentStatus.SUCCEEDED, 10, "Step9")
        _, body = await asyncio.to_thread(http_get, w.http.port, "/metrics")
        assert 'commandnet_transitions_total{node="Step9",to_node=""} 1.0' in body
        w.request_stop("test")
        assert await asyncio.wait_for(running, 30) == 0
        assert w.draining and (await w.ready()) == (False, "draining")
    finally:
        running.cancel()


async def test_drain_hands_back_a_step_that_outlives_the_grace(tmp_path: Path) -> None:
    store, bus = InMemoryPersistence(), InMemoryEventBus()
    started, release = tmp_path / "started", tmp_path / "release"
    first = Worker(settings_for("tests.graphs.gate:Hold", drain_grace=0.2, worker_id="first"),
                   store=store, bus=bus)
    running = asyncio.create_task(first.run())
    try:
        await wait_async(lambda: is_ready(first), 30, "first worker ready")
        ctx = gate.Gate(started_file=str(started), release_file=str(release))
        await first.engine.trigger_agent("g1", gate.Hold, ctx)
        await wait_async(lambda: asyncio.to_thread(started.exists), 30, "Hold to start")
        first.request_stop("test")
        assert await asyncio.wait_for(running, 30) == 0
    finally:
        running.cancel()
    rec = await store.get_agent("g1")
    assert rec is not None and (rec.status, rec.step, rec.lease_owner) == (
        AgentStatus.RUNNING, 0, None), "the drained step must be handed back, not kept"
    release.touch()
    second = Worker(settings_for("tests.graphs.gate:Hold", worker_id="second"),
                    store=store, bus=bus)
    running = asyncio.create_task(second.run())
    try:
        rec = await second.engine.wait_for("g1", timeout=30)
        assert (rec.status, rec.step) == (AgentStatus.SUCCEEDED, 2)
        assert len(started.read_text().splitlines()) == 2  # at-least-once: Hold ran twice
        second.request_stop("test")
        assert await asyncio.wait_for(running, 30) == 0
    finally:
        running.cancel()


# --------------------------------------------------------------- worker, real processes


@pytest.mark.parametrize(("graph", "message"), [
    ("tests.graphs.nope:Start", "no module named 'tests.graphs.nope'"),
    ("tests.graphs.broken:NotANode", "not a Node class"),
    ("tests_graphs_linear_Step0", "expected the form pkg.module:StartNode"),
])
def test_bad_graph_exits_non_zero_with_a_clear_error(graph: str, message: str) -> None:
    result = run_cli(["worker", "--graph", graph, "--store", "memory://", "--bus", "memory://"])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "--graph" in result.stderr


def test_bad_store_url_exits_non_zero_with_a_clear_error() -> None:
    result = run_cli(["worker", "--graph", "tests.graphs.linear:Step0",
                      "--store", "mysql://u:topsecret@db/x", "--bus", "memory://"])
    assert result.returncode == 1, result.stderr
    assert "bad store URL 'mysql://u:***@db/x'" in result.stderr
    assert "topsecret" not in result.stderr


def test_busy_probe_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["worker", "--graph", "tests.graphs.linear:Step0", "--store",
                          "memory://", "--bus", "memory://", "--http-host", "127.0.0.1",
                          "--http-port", str(port)])
    assert result.returncode == 1, result.stderr
    assert f"cannot serve probes on 127.0.0.1:{port}" in result.stderr


def test_worker_process_serves_probes_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "cn.db"
    w = WorkerProc(["--graph", "tests.graphs.linear:Step0", "--store", f"sqlite:///{db}",
                    "--bus", "memory://", "--log-format", "json"], tmp_path / "worker.log")
    try:
        w.wait_ready()
        assert w.get("/healthz") == (200, "ok\n")
        status, body = w.get("/metrics")
        assert status == 200 and "commandnet_steps_in_flight 0.0" in body
        w.terminate()
        assert w.wait(timeout=60) == 0, w.log
        events = json_lines(w.log)
        assert any(e["msg"].startswith("SIGTERM received") for e in events), w.log
        assert any(e["msg"].startswith("drained") for e in events), w.log
    finally:
        w.stop()
    assert db.exists(), "the worker's store should have created the SQLite file"



def json_lines(log: str) -> list[dict[str, Any]]:
    """The JSON log records of a worker's output."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def create_gate_agent(db: Path, agent_id: str, tmp_path: Path) -> tuple[Path, Path]:
    """Store a Hold agent in SQLite (no worker runs it yet); returns (started, release)."""
    started, release = tmp_path / f"{agent_id}.started", tmp_path / f"{agent_id}.release"

    async def go() -> None:
        engine = Engine(SQLitePersistence(db), InMemoryEventBus(), graphs=[gate.Hold])
        await engine.trigger_agent(agent_id, gate.Hold, gate.Gate(
            started_file=str(started), release_file=str(release)))
        await engine.stop()

    asyncio.run(go())
    return started, release


def stored(db: Path, agent_id: str) -> AgentRecord:
    async def go() -> AgentRecord:
        store = SQLitePersistence(db)
        await store.setup()
        try:
            rec = await store.get_agent(agent_id)
        finally:
            await store.close()
        assert rec is not None, f"agent {agent_id!r} missing from {db}"
        return rec

    return asyncio.run(go())


def started_runs(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def drain_while_hold_runs(w: WorkerProc, started: Path, release: Path | None) -> None:
    """Wait for Hold to start on ``w``, SIGTERM it, and require exit 0 (then it is gone).

    With ``release``, the node is let go once the drain has begun (it finishes in the grace);
    without, it is still blocked when the grace ends (it is handed back).
    """
    try:
        w.wait_ready()
        wait_until(lambda: started_runs(started), 120, f"Hold to start\n{w.log}")
        w.terminate()
        if release is not None:
            wait_until(lambda: "draining: 1 step(s) in flight" in w.log, 60, "the drain")
            assert w.get("/readyz")[0] in (0, 503), "a draining worker must not be ready"
            release.touch()
        assert w.wait(timeout=120) == 0, w.log
    finally:
        w.stop()


def finish_on(w: WorkerProc, db: Path, agent_id: str) -> None:
    """Wait until ``agent_id`` succeeded (on worker ``w``), then stop ``w`` (exit 0)."""
    try:
        wait_until(lambda: stored(db, agent_id).status is AgentStatus.SUCCEEDED, 120,
                   f"{agent_id} to finish on the new worker\n{w.log}")
        w.terminate()
        assert w.wait(timeout=120) == 0, w.log
    finally:
        w.stop()


# A worker on SQLite with the in-process bus re-publishes, at start, every running agent that
# holds no live lease: so agents stored by the test reach a real worker process without NATS.
def sqlite_worker(db: Path, log: Path, *extra: str) -> WorkerProc:
    return WorkerProc(["--graph", "tests.graphs.gate:Hold", "--store", f"sqlite:///{db}",
                       "--bus", "memory://", "--lease-seconds", "30", *extra], log)


def test_sigterm_lets_a_running_step_finish_within_the_grace(tmp_path: Path) -> None:
    db = tmp_path / "cn.db"
    started, release = create_gate_agent(db, "g1", tmp_path)
    w = sqlite_worker(db, tmp_path / "a.log", "--drain-grace", "60")
    drain_while_hold_runs(w, started, release)
    rec = stored(db, "g1")
    assert rec.step == 1 and rec.context["finished_by"] == w.proc.pid, rec
    assert started_runs(started) == [str(w.proc.pid)]


def test_sigterm_hands_back_a_step_that_outlives_the_grace(tmp_path: Path) -> None:
    db = tmp_path / "cn.db"
    started, release = create_gate_agent(db, "g2", tmp_path)
    first = sqlite_worker(db, tmp_path / "first.log", "--drain-grace", "0.5")
    drain_while_hold_runs(first, started, None)
    rec = stored(db, "g2")
    assert (rec.status, rec.step, rec.lease_owner) == (AgentStatus.RUNNING, 0, None), rec
    release.touch()
    second = sqlite_worker(db, tmp_path / "second.log")
    finish_on(second, db, "g2")
    rec = stored(db, "g2")
    assert (rec.step, rec.context["finished_by"]) == (2, second.proc.pid)
    assert started_runs(started) == [str(first.proc.pid), str(second.proc.pid)]
    finals = [e for e in json_lines(second.log) if e.get("agent_id") == "g2"]
    assert finals and finals[-1]["status"] == "succeeded" and finals[-1]["node"] == "Done"


# ---------------------------------------------------- real processes on the real NATS server


@pytest.fixture
def pool() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def nats_worker(db: Path, log: Path, url: str, pool: str, *extra: str) -> WorkerProc:
    return WorkerProc(["--graph", "tests.graphs.gate:Hold", "--pool", pool, "--store",
                       f"sqlite:///{db}", "--bus", url, "--lease-seconds", "30", *extra], log)


def trigger_gate(tmp_path: Path, agent_id: str, url: str, pool: str) -> tuple[Path, Path]:
    """``commandnet trigger`` a Hold agent; returns its (started, release) files.

    ``pools ensure`` first: a client never creates the pool's stream, and the trigger may be
    sent before any worker of the pool runs (the consumer keeps it).
    """
    ensured = run_cli(["pools", "ensure", "--pool", pool, "--bus", url])
    assert ensured.returncode == 0, ensured.stderr
    started, release = tmp_path / f"{agent_id}.started", tmp_path / f"{agent_id}.release"
    ctx = json.dumps({"started_file": str(started), "release_file": str(release)})
    result = run_cli(["trigger", agent_id, "--node", "Hold", "--context", ctx, "--pool", pool,
                      "--bus", url])
    assert result.returncode == 0, result.stderr
    return started, release


def test_nats_drain_finishes_the_step_and_a_new_worker_takes_the_next(
        tmp_path: Path, nats_url: str, pool: str) -> None:
    db = tmp_path / "cn.db"
    # Sent before any worker runs: the stream keeps it for the pool's consumer.
    started, release = trigger_gate(tmp_path, "n1", nats_url, pool)
    first = nats_worker(db, tmp_path / "first.log", nats_url, pool, "--drain-grace", "120")
    drain_while_hold_runs(first, started, release)
    rec = stored(db, "n1")
    assert (rec.status, rec.step, rec.node) == (AgentStatus.RUNNING, 1, "Done"), rec
    assert rec.context["finished_by"] == first.proc.pid
    finish_on(nats_worker(db, tmp_path / "second.log", nats_url, pool), db, "n1")
    assert stored(db, "n1").step == 2
    assert started_runs(started) == [str(first.proc.pid)]  # Hold ran once


def test_nats_drain_hands_back_a_long_step_to_a_new_worker(
        tmp_path: Path, nats_url: str, pool: str) -> None:
    db = tmp_path / "cn.db"
    # Sent before any worker runs: the stream keeps it for the pool's consumer.
    started, release = trigger_gate(tmp_path, "n2", nats_url, pool)
    first = nats_worker(db, tmp_path / "first.log", nats_url, pool, "--drain-grace", "0.5")
    drain_while_hold_runs(first, started, None)
    rec = stored(db, "n2")
    assert (rec.status, rec.step, rec.lease_owner) == (AgentStatus.RUNNING, 0, None), rec
    release.touch()
    second = nats_worker(db, tmp_path / "second.log", nats_url, pool)
    finish_on(second, db, "n2")
    status = run_cli(["status", "n2", "--pool", pool, "--bus", nats_url, "--json"])
    assert json.loads(status.stdout)["phase"] == "Succeeded", status.stderr
    assert stored(db, "n2").context["finished_by"] == second.proc.pid
    assert started_runs(started) == [str(first.proc.pid), str(second.proc.pid)]


def test_unreachable_nats_is_a_clear_startup_error(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_cli(["worker", "--graph", "tests.graphs.linear:Step0", "--store",
                      f"sqlite:///{tmp_path / 'cn.db'}", "--bus", url, "--connect-timeout", "2",
                      "--http-port", "0"])
    assert result.returncode == 1
    assert f"cannot reach the bus at {url} within 2s" in result.stderr


def test_readyz_follows_the_bus_connection(tmp_path: Path, restartable_nats: Any) -> None:
    db = tmp_path / "cn.db"
    w = WorkerProc(["--graph", "tests.graphs.linear:Step0", "--store", f"sqlite:///{db}",
                    "--bus", restartable_nats.url], tmp_path / "worker.log")
    try:
        w.wait_ready()
        restartable_nats.kill()
        def unready() -> str | None:
            code, body = w.get("/readyz")
            return body if code == 503 else None

        assert "disconnected" in wait_until(unready, 60, "/readyz to report the lost bus")
        assert w.get("/healthz") == (200, "ok\n"), "liveness must not depend on the bus"
        restartable_nats.start()
        w.wait_ready()
        w.terminate()
        assert w.wait(timeout=120) == 0, w.log
    finally:
        w.stop()


# ------------------------------------------------------- real PostgreSQL and NATS, env only


def test_worker_on_postgres_and_nats_configured_by_environment(
        tmp_path: Path, postgres_dsn: str, nats_url: str, pool: str) -> None:
    secret = "Sup3r-S3cret-pw"
    env = clean_env(COMMANDNET_STORE_URL=postgres_dsn, COMMANDNET_STORE_PASSWORD=secret,
                    COMMANDNET_BUS_URL=nats_url, COMMANDNET_POOL=pool,
                    COMMANDNET_GRAPH="tests.graphs.linear:Step0", COMMANDNET_MAX_IN_FLIGHT="4")
    w = WorkerProc([], tmp_path / "worker.log", env=env)
    try:
        w.wait_ready()
        agents = [f"pg-{i}" for i in range(3)]
        for agent_id in agents:
            assert run_cli(["trigger", agent_id, "--node", "Step0"], env).returncode == 0

        def succeeded(agent_id: str) -> bool:
            done = run_cli(["status", agent_id, "--json"], env)
            return done.returncode == 0 and json.loads(done.stdout)["status"] == "succeeded"

        for agent_id in agents:  # each one: they finish in any order
            wait_until(lambda a=agent_id: succeeded(a), 120, f"{agent_id} to succeed\n{w.log}")
        for agent_id in agents:
            kv = run_cli(["status", agent_id, "--json"], env)
            row = run_cli(["status", agent_id, "--source", "store", "--json"], env)
            assert json.loads(kv.stdout)["step"] == json.loads(row.stdout)["step"] == 10, (
                kv.stderr + row.stderr)
        metrics = w.get("/metrics")[1]
        assert 'commandnet_transitions_total{node="Step0",to_node="Step1"} 3.0' in metrics
        assert 'commandnet_leases_total{result="granted"} 30.0' in metrics
        assert "commandnet_max_in_flight 4.0" in metrics
        w.terminate()
        assert w.wait(timeout=120) == 0, w.log
    finally:
        w.stop()
    assert secret not in w.log
    settings = next(e for e in json_lines(w.log) if "settings" in e)["settings"]
    assert settings["pool"] == pool and "store_password" not in settings


def test_no_migrate_on_an_empty_database_names_the_fix(postgres_dsn: str) -> None:
    result = run_cli(["worker", "--graph", "tests.graphs.linear:Step0", "--store", postgres_dsn,
                      "--bus", "memory://", "--no-migrate", "--http-port", "0"])
    assert result.returncode == 1
    assert "commandnet migrate" in result.stderr, result.stderr


def test_unreachable_postgres_is_a_clear_startup_error() -> None:
    url = f"postgresql://app@127.0.0.1:{free_port()}/cn"
    result = run_cli(["worker", "--graph", "tests.graphs.linear:Step0", "--store", url,
                      "--bus", "memory://", "--connect-timeout", "5", "--http-port", "0"])
    assert result.returncode == 1
    assert f"cannot reach the store at {url}" in result.stderr, result.stderr


def test_ack_wait_must_outlast_the_lease_heartbeat() -> None:
    with pytest.raises(ValidationError, match=r"ack_wait \(5s\) must exceed lease_seconds / 3"):
        WorkerSettings(graph=["x:Y"], lease_seconds=30, ack_wait=5)
    assert WorkerSettings(graph=["x:Y"], lease_seconds=3, ack_wait=2).ack_wait == 2
    result = CliRunner().invoke(worker_command, ["--graph", "commandnet.examples.linear:Start",
                                                 "--ack-wait", "5", "--lease-seconds", "30"])
    assert result.exit_code == 2
    assert "ack_wait (5s) must exceed lease_seconds / 3 (10s)" in result.output
