"""``commandnet trigger | cancel | status``: argument checks, reading the store, and (with the
real NATS server) commands travelling to a worker process that has the graph's code.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from commandnet import Engine
from commandnet.adapters.memory import InMemoryEventBus
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.cli.agents import cancel, status, trigger
from tests.graphs import linear
from tests.graphs.procs import WorkerProc, free_port, run_cli, wait_until

pytestmark = pytest.mark.usefixtures("no_commandnet_env")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def finished_agent(db: Path, agent_id: str) -> None:
    """Run one linear agent to the end in ``db`` (in this process, memory bus)."""
    async def go() -> None:
        engine = Engine(SQLitePersistence(db), InMemoryEventBus(), graphs=[linear.Step0])
        async with engine:
            await engine.trigger_agent(agent_id, linear.Step0, linear.Trail())
            await engine.wait_for(agent_id, timeout=30)

    asyncio.run(go())


# ------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(("context", "message"), [
    ("{not json", "--context is not valid JSON"),
    ("[1, 2]", "--context must be a JSON object"),
    ('"text"', "not a JSON str"),
    ("@/nonexistent/ctx.json", "cannot read /nonexistent/ctx.json"),
])
def test_trigger_rejects_a_context_that_is_not_a_json_object(context: str, message: str) -> None:
    result = CliRunner().invoke(trigger, ["a1", "--node", "Step0", "--context", context,
                                          "--bus", "nats://127.0.0.1:1"])
    assert result.exit_code == 2
    assert message in result.output


def test_trigger_and_cancel_refuse_a_bus_no_worker_can_see() -> None:
    for command, args in ((trigger, ["a1", "--node", "Step0"]), (cancel, ["a1"])):
        result = CliRunner().invoke(command, [*args, "--bus", "memory://"])
        assert result.exit_code == 2
        assert "memory:// lives inside one process" in result.output


def test_bad_bus_url_is_named() -> None:
    result = CliRunner().invoke(cancel, ["a1", "--bus", "amqp://u:pw@mq/x"])
    assert result.exit_code == 2
    assert "unsupported bus URL" in result.output and "pw@" not in result.output


def test_status_from_the_store_as_table_and_json(tmp_path: Path) -> None:
    db = tmp_path / "cn.db"
    finished_agent(db, "agent-7")
    args = ["agent-7", "--store", sqlite_url(db), "--bus", "memory://"]
    table = CliRunner().invoke(status, args)
    assert table.exit_code == 0, table.output
    assert "agent agent-7" in table.output and "succeeded" in table.output
    as_json = CliRunner().invoke(status, [*args, "--json"])
    found = json.loads(as_json.output)
    assert (found["status"], found["node"], found["step"]) == ("succeeded", "Step9", 10)


def test_status_of_a_missing_agent_or_store_is_an_error(tmp_path: Path) -> None:
    db = tmp_path / "cn.db"
    finished_agent(db, "agent-7")
    missing = CliRunner().invoke(status, ["nobody", "--store", sqlite_url(db), "--bus",
                                          "memory://"])
    assert missing.exit_code == 1
    assert "no agent 'nobody' in the store" in missing.output
    nowhere = tmp_path / "typo.db"
    result = CliRunner().invoke(status, ["agent-7", "--store", sqlite_url(nowhere), "--bus",
                                         "memory://"])
    assert result.exit_code == 1 and "no SQLite store at" in result.output
    assert not nowhere.exists(), "status must not create a store where there was none"


def test_connection_settings_come_from_the_worker_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "cn.db"
    finished_agent(db, "agent-8")
    monkeypatch.setenv("COMMANDNET_STORE_URL", sqlite_url(db))
    monkeypatch.setenv("COMMANDNET_BUS_URL", "memory://")
    result = CliRunner().invoke(status, ["agent-8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["step"] == 10


# ------------------------------------------------- real NATS: commands reach a worker process


@pytest.fixture
def pool() -> str:
    """A pool of the test's own: its subjects, consumer and status keys are not shared."""
    return f"t{uuid.uuid4().hex[:10]}"


def status_of(agent_id: str, pool: str, url: str) -> dict[str, Any] | None:
    """``commandnet status --json`` in a process of its own; None when there is no agent."""
    result = run_cli(["status", agent_id, "--pool", pool, "--bus", url, "--json"])
    if result.returncode == 1 and f"no agent {agent_id!r}" in result.stderr:
        return None
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def wait_status(agent_id: str, pool: str, url: str, wanted: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = status_of(agent_id, pool, url)
        return found if found and found["status"] == wanted else None

    return wait_until(check, 120, f"agent {agent_id!r} to be {wanted}", interval=0.2)


def test_trigger_status_and_cancel_through_a_worker_process(
        tmp_path: Path, nats_url: str, pool: str) -> None:
    db = tmp_path / "cn.db"
    worker = WorkerProc(["--graph", "tests.graphs.linear:Step0", "--graph",
                         "tests.graphs.gate:Hold", "--pool", pool, "--store", sqlite_url(db),
                         "--bus", nats_url], tmp_path / "worker.log")
    bus = ["--pool", pool, "--bus", nats_url]
    try:
        worker.wait_ready()
        # A linear agent, triggered by name from a folder where the graph cannot be imported.
        done = run_cli(["trigger", "a1", "--node", "Step0", "--context", '{"visited": []}',
                        *bus, "--wait", "--timeout", "120"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr + worker.log
        final = json.loads(done.stdout.splitlines()[-1])
        assert (final["status"], final["phase"], final["node"], final["step"]) == (
            "succeeded", "Succeeded", "Step9", 10)
        table = run_cli(["status", "a1", *bus])
        assert table.returncode == 0 and "Succeeded" in table.stdout, table.stderr

        # Cancel while its node runs: the in-flight result is discarded at commit.
        started, release = tmp_path / "g1.started", tmp_path / "g1.release"
        ctx = json.dumps({"started_file": str(started), "release_file": str(release)})
        assert run_cli(["trigger", "g1", "--node", "Hold", "--context", ctx, *bus]).returncode == 0
        wait_until(started.exists, 120, "Hold to start")
        cancelled = run_cli(["cancel", "g1", "--reason", "operator said so", *bus])
        assert cancelled.returncode == 0, cancelled.stderr
        assert wait_status("g1", pool, nats_url, "cancelled")["error"] == "operator said so"
        release.touch()
        wait_until(lambda: "commandnet_steps_in_flight 0.0" in worker.get("/metrics")[1], 120,
                   "the cancelled step to end")
        in_store = run_cli(["status", "g1", "--source", "store", "--store", sqlite_url(db),
                            "--json", *bus])
        assert json.loads(in_store.stdout)["status"] == "cancelled", in_store.stderr
        assert json.loads(in_store.stdout)["step"] == 0

        # Requests the worker refuses end failed, with the reason kept.
        bad_ctx = run_cli(["trigger", "b1", "--node", "Hold", "--context", '{"x": 1}', *bus])
        assert bad_ctx.returncode == 0
        assert "does not validate" in wait_status("b1", pool, nats_url, "failed")["error"]
        assert run_cli(["trigger", "u1", "--node", "Nope", *bus]).returncode == 0
        assert "unknown node 'Nope'" in wait_status("u1", pool, nats_url, "failed")["error"]

        missing = run_cli(["status", "nobody", *bus])
        assert missing.returncode == 1 and "no agent 'nobody'" in missing.stderr

        metrics = worker.get("/metrics")[1]
        for line in ('commandnet_transitions_total{node="Step0",to_node="Step1"} 1.0',
                     'commandnet_transitions_total{node="Step9",to_node=""} 1.0',
                     'commandnet_agents_finished_total{status="succeeded"} 1.0',
                     'commandnet_agents_finished_total{status="cancelled"} 1.0',
                     'commandnet_agents_finished_total{status="failed"} 2.0'):
            assert line in metrics, f"{line} not in /metrics:\n{metrics}"
    finally:
        worker.stop()


def test_unreachable_bus_is_a_clear_error() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_cli(["trigger", "a1", "--node", "Step0", "--bus", url,
                      "--connect-timeout", "2"])
    assert result.returncode == 1
    assert f"cannot reach the bus at {url} within 2s" in result.stderr
    status = run_cli(["status", "a1", "--bus", url, "--connect-timeout", "2"])
    assert status.returncode == 1
    assert status.stderr.strip() == f"Error: cannot reach the bus at {url} within 2s"
