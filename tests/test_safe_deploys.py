"""Safe deploys with real worker processes (PostgreSQL + NATS JetStream): a rolling upgrade
whose new graph drops the node agents are parked at. The new workers hand such steps back
until an old worker takes them; with no old worker left, the agents fail after ``node_grace``
with reason NodeRemoved naming the node and both versions. Renamed classes with stable node
names keep running the old agents."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from commandnet import GraphAnalyzer
from commandnet.adapters.postgres import PostgresPersistence
from commandnet.workflow.deploys import version_of
from tests.graphs import deploy_v1, deploy_v2
from tests.graphs.procs import WorkerProc, run_cli, wait_until
from tests.test_agents_cli import status_of, wait_status

pytestmark = pytest.mark.usefixtures("no_commandnet_env")

V1 = version_of(GraphAnalyzer.validate(deploy_v1.Start))
V2 = version_of(GraphAnalyzer.validate(deploy_v2.Begin))


@pytest.fixture
def pool() -> str:
    return f"d{uuid.uuid4().hex[:10]}"


def worker(version: int, tmp_path: Path, pool: str, nats_url: str, dsn: str,
           *extra: str) -> WorkerProc:
    graph = f"tests.graphs.deploy_v{version}:{'Start' if version == 1 else 'Begin'}"
    proc = WorkerProc(["--graph", graph, "--pool", pool, "--store", dsn, "--bus", nats_url,
                       "--wake-interval", "0.2", *extra],
                      tmp_path / f"v{version}-{uuid.uuid4().hex[:6]}.log")
    proc.wait_ready()
    return proc


def cli(*args: str, pool: str, nats_url: str) -> None:
    result = run_cli([*args, "--pool", pool, "--bus", nats_url])
    assert result.returncode == 0, result.stderr


def trigger(agent_id: str, pool: str, nats_url: str) -> None:
    cli("trigger", agent_id, "--node", "Start", pool=pool, nats_url=nats_url)


def go(agent_id: str, pool: str, nats_url: str) -> None:
    cli("signal", agent_id, "go", pool=pool, nats_url=nats_url)


def parked_at_hold(agent_id: str, pool: str, nats_url: str) -> None:
    def there() -> bool:
        found = status_of(agent_id, pool, nats_url)
        return bool(found and found["node"] == "Hold")

    wait_until(there, 60, f"{agent_id} to wait at Hold")


async def stored(agent_id: str, dsn: str) -> tuple[list[str], str | None, list[str]]:
    db = PostgresPersistence(dsn, min_size=1, max_size=2)
    await db.setup()
    try:
        rec = await db.get_agent(agent_id)
        assert rec is not None
        history = [h.from_node for h in await db.get_history(agent_id)]
        return rec.context["log"], rec.graph_version, history
    finally:
        await db.close()


def test_new_workers_hand_a_removed_node_back_until_an_old_worker_takes_it(
        tmp_path: Path, nats_url: str, postgres_dsn: str, pool: str) -> None:
    assert V1 != V2
    old = worker(1, tmp_path, pool, nats_url, postgres_dsn)
    procs = [old]
    try:
        for i in range(4):
            trigger(f"{pool}-a{i}", pool, nats_url)
        for i in range(4):
            parked_at_hold(f"{pool}-a{i}", pool, nats_url)
        assert asyncio.run(stored(f"{pool}-a0", postgres_dsn))[1] == V1
        # The upgrade: the new worker starts, the old one is gone, then the signals come.
        new = worker(2, tmp_path, pool, nats_url, postgres_dsn, "--node-grace", "300")
        procs.append(new)
        old.terminate()
        assert old.wait(60) == 0
        for i in range(4):
            go(f"{pool}-a{i}", pool, nats_url)
        wait_until(lambda: "which this worker's graphs lack" in new.log, 60,
                   "the new worker to hand a step at Hold back")
        for i in range(4):
            assert status_of(f"{pool}-a{i}", pool, nats_url)["status"] == "running"  # type: ignore[index]
        # An old pod (still draining in a real rollout) takes the steps the new one lacks.
        draining = worker(1, tmp_path, pool, nats_url, postgres_dsn)
        procs.append(draining)
        for i in range(4):
            wait_status(f"{pool}-a{i}", pool, nats_url, "succeeded")
            log, _, history = asyncio.run(stored(f"{pool}-a{i}", postgres_dsn))
            assert log[:2] == ["start:v1", "hold:v1"] and log[2] in ("done:v1", "done:v2")
            assert history == ["Start", "Hold", "Done"]
        draining.terminate()
        assert draining.wait(60) == 0
        # New agents run the new graph; Start and Done are the renamed classes' stable names.
        fresh = f"{pool}-fresh"
        trigger(fresh, pool, nats_url)
        wait_status(fresh, pool, nats_url, "succeeded")
        assert asyncio.run(stored(fresh, postgres_dsn))[:2] == (["start:v2", "done:v2"], V2)
    finally:
        for proc in procs:
            proc.stop()
    assert "Traceback" not in "".join(p.log for p in procs)


def test_with_no_old_worker_left_the_agent_fails_naming_the_node_and_both_versions(
        tmp_path: Path, nats_url: str, postgres_dsn: str, pool: str) -> None:
    old = worker(1, tmp_path, pool, nats_url, postgres_dsn)
    procs = [old]
    try:
        trigger(f"{pool}-b0", pool, nats_url)
        parked_at_hold(f"{pool}-b0", pool, nats_url)
        old.terminate()
        assert old.wait(60) == 0
        procs.append(worker(2, tmp_path, pool, nats_url, postgres_dsn, "--node-grace", "4"))
        go(f"{pool}-b0", pool, nats_url)
        failed = wait_status(f"{pool}-b0", pool, nats_url, "failed")
        assert failed["reason"] == "NodeRemoved", failed
        assert failed["error"].startswith(f"node 'Hold' was removed: agent '{pool}-b0'"), failed
        assert V1[:12] in failed["error"] and V2[:12] in failed["error"], failed
        assert asyncio.run(stored(f"{pool}-b0", postgres_dsn))[2] == ["Start"]  # Hold never ran
    finally:
        for proc in procs:
            proc.stop()
