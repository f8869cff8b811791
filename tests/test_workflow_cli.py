"""Payloads, timers, signals and resume on PostgreSQL + NATS JetStream with real worker
processes, driven by the CLI from a process without the graph's code: ``commandnet trigger
--payload``, ``commandnet signal``, ``commandnet resume``."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from commandnet.adapters.postgres import PostgresPersistence
from commandnet.records import AgentRecord, HistoryRecord
from tests.graphs.procs import WorkerProc, run_cli, wait_until
from tests.test_agents_cli import status_of, wait_status

pytestmark = pytest.mark.usefixtures("no_commandnet_env")

GRAPHS = ["--graph", "tests.graphs.waiting:TakeOrder", "--graph", "tests.graphs.waiting:Nap",
          "--graph", "tests.graphs.waiting:Split"]


@pytest.fixture
def pool() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


def workers(n: int, tmp_path: Path, pool: str, nats_url: str, dsn: str,
            *extra: str) -> list[WorkerProc]:
    procs = [WorkerProc([*GRAPHS, "--pool", pool, "--store", dsn, "--bus", nats_url, *extra],
                        tmp_path / f"worker{i}.log") for i in range(n)]
    for proc in procs:
        proc.wait_ready()
    return procs


def cli(*args: str, pool: str, nats_url: str, tmp_path: Path) -> str:
    result = run_cli([*args, "--pool", pool, "--bus", nats_url], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def stored(agent_id: str, dsn: str) -> tuple[AgentRecord, list[HistoryRecord]]:
    db = PostgresPersistence(dsn, min_size=1, max_size=2)
    await db.setup()
    try:
        rec = await db.get_agent(agent_id)
        assert rec is not None
        return rec, await db.get_history(agent_id)
    finally:
        await db.close()


def wait_parked_at(agent_id: str, node: str, pool: str, nats_url: str) -> None:
    def there() -> bool:
        found = status_of(agent_id, pool, nats_url)
        return bool(found and found["node"] == node and found["status"] == "running")

    wait_until(there, 120, f"agent {agent_id!r} to wait at {node}")


def test_payload_signal_failure_and_resume_from_the_cli(
        tmp_path: Path, nats_url: str, postgres_dsn: str, pool: str) -> None:
    procs = workers(2, tmp_path, pool, nats_url, postgres_dsn)
    opts = {"pool": pool, "nats_url": nats_url, "tmp_path": tmp_path}
    # Ids of this test's own: step events' de-dup ids name the agent, not the pool, and every
    # test shares one NATS (one work stream for all pools), while each has its own database.
    o1, o2 = f"{pool}-o1", f"{pool}-o2"
    try:
        cli("trigger", o1, "--node", "TakeOrder", "--context", '{"fail_at": "Charge"}',
            "--payload", '{"amount": 12}', **opts)
        wait_parked_at(o1, "Approved", pool, nats_url)
        sent = cli("signal", o1, "approval", "--payload", '{"by": "ana"}', "--id", "s-1",
                   **opts)
        assert "s-1" in sent
        cli("signal", o1, "approval", "--payload", '{"by": "mallory"}', "--id", "s-1", **opts)
        failed = wait_status(o1, pool, nats_url, "failed")
        assert "card declined" in failed["error"]
        cli("resume", o1, "--from", "Charge", "--context-patch", '{"fail_at": null}', **opts)
        done = wait_status(o1, pool, nats_url, "succeeded")
        assert done["node"] == "Charge"
        rec, history = asyncio.run(stored(o1, postgres_dsn))
        assert rec.context["approved_by"] == "ana"  # the duplicate signal was applied once
        assert rec.context["log"] == ["order:12", "ask", "approved:ana", "charge:12"]
        assert [(h.from_node, h.to_node, h.kind) for h in history] == [
            ("TakeOrder", "Ask", "step"), ("Ask", "Approved", "step"),
            ("Approved", "Charge", "step"), ("Charge", "Charge", "resume"),
            ("Charge", None, "step")]
        # A bad payload fails the agent with a reason naming the node.
        cli("trigger", o2, "--node", "TakeOrder", "--payload", '{"amount": "lots"}', **opts)
        assert "payload of node 'TakeOrder'" in wait_status(o2, pool, nats_url,
                                                            "failed")["error"]
    finally:
        for proc in procs:
            proc.stop()
    assert "Traceback" not in "".join(p.log for p in procs)


def test_a_timer_survives_the_sigkill_of_every_worker(
        tmp_path: Path, nats_url: str, postgres_dsn: str, pool: str) -> None:
    procs = workers(2, tmp_path, pool, nats_url, postgres_dsn)
    opts = {"pool": pool, "nats_url": nats_url, "tmp_path": tmp_path}
    ids = [f"{pool}-n{i}" for i in range(3)]
    try:
        for agent_id in ids:
            cli("trigger", agent_id, "--node", "Nap", "--context", '{"sleep_for": 30}', **opts)
        # Read from the store (fast): a busy machine must not let the timers run out first.
        wait_until(lambda: asyncio.run(parked_count(ids, "Woke", postgres_dsn)) == len(ids), 60,
                   "every agent to be parked on its timer")
        for proc in procs:
            proc.proc.kill()
            proc.stop()
        procs = workers(1, tmp_path, pool, nats_url, postgres_dsn)
        for agent_id in ids:
            found = wait_status(agent_id, pool, nats_url, "succeeded")
            assert found["step"] == 2, found
            rec, history = asyncio.run(stored(agent_id, postgres_dsn))
            assert rec.context["log"] == ["nap", "woke"]
            assert history[1].at - history[0].at >= 30  # not before its time
    finally:
        for proc in procs:
            proc.stop()


async def parked_count(ids: list[str], node: str, dsn: str) -> int:
    """How many of ``ids`` are parked at ``node`` (a timer, a signal wait or a join)."""
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM agents WHERE agent_id = ANY($1::text[]) AND node = $2 AND "
            "(wake_at IS NOT NULL OR waiting_signal IS NOT NULL OR joining IS NOT NULL)",
            ids, node)
        return count
    finally:
        await conn.close()


def test_a_fan_out_across_workers_joins_once_through_the_sigkill_of_one(
        tmp_path: Path, nats_url: str, postgres_dsn: str, pool: str) -> None:
    fast = ("--lease-seconds", "3", "--ack-wait", "3")  # the killed worker's branches return soon
    procs = workers(2, tmp_path, pool, nats_url, postgres_dsn, *fast)
    opts = {"pool": pool, "nats_url": nats_url, "tmp_path": tmp_path}
    n, fan = 120, f"{pool}-fan"
    try:
        cli("trigger", fan, "--node", "Split", "--context",
            f'{{"branches": {n}, "step_time": 8, "policy": "collect"}}', **opts)
        wait_until(lambda: asyncio.run(parked_count([fan], "Gather", postgres_dsn)) == 1, 60,
                   "the parent to wait at its join")
        procs[0].proc.kill()  # holding some of the branches, each 8 s long
        procs[0].stop()
        assert asyncio.run(ended_branches(fan, postgres_dsn)) < n  # killed in the middle
        procs.append(workers(1, tmp_path, pool, nats_url, postgres_dsn, *fast)[0])
        found = wait_status(fan, pool, nats_url, "succeeded")
        assert found["node"] == "Gather"
        rec, history = asyncio.run(stored(fan, postgres_dsn))
        assert rec.context["amount"] == sum(i * i for i in range(n))
        assert rec.context["log"] == ["split", f"gathered:{n}/{n}"]  # the join ran once
        assert [(h.from_node, h.to_node) for h in history] == [("Split", "Gather"),
                                                              ("Gather", None)]
    finally:
        for proc in procs:
            proc.stop()


async def ended_branches(parent_id: str, dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM agents WHERE parent_id = $1 "
                                         "AND status <> 'running'", parent_id)
        return count
    finally:
        await conn.close()


def test_signal_and_resume_refusals_are_clear(tmp_path: Path, nats_url: str,
                                              postgres_dsn: str, pool: str) -> None:
    bad = run_cli(["signal", "x", "go", "--payload", "{oops", "--pool", pool, "--bus", nats_url])
    assert bad.returncode == 2 and "--payload" in bad.stderr and "not valid JSON" in bad.stderr
    bad = run_cli(["resume", "x", "--from", "A", "--context-patch", "[1]", "--pool", pool,
                   "--bus", nats_url])
    assert bad.returncode == 2 and "must be a JSON object" in bad.stderr
    missing = run_cli(["resume", "x", "--pool", pool, "--bus", nats_url])
    assert missing.returncode == 2 and "--from" in missing.stderr
