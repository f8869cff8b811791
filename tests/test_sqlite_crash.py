"""A worker process is SIGKILLed half way through a 10-node graph; a new one finishes the job."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AGENTS = 20

WORKER = f"""
import asyncio, sys
from commandnet import Engine
from commandnet.adapters.memory import InMemoryEventBus
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.examples.linear import Start as Step0, Trail as Counter

async def main(path, trigger):
    engine = Engine(SQLitePersistence(path), InMemoryEventBus(), graphs=[Step0],
                    lease_seconds=1.0, max_in_flight=8)
    await engine.start_worker()
    if trigger:
        for i in range({AGENTS}):
            await engine.trigger_agent(f"agent-{{i}}", Step0, Counter())
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2] == "trigger"))
"""


def _worker(db: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMMANDNET_EXAMPLE_DELAY": "0.05"}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(db), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db, timeout=5) as conn:
        return conn.execute(sql).fetchall()


def _wait(db: Path, sql: str, want: int, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _rows(db, sql)[0][0] >= want:
                return
        except sqlite3.OperationalError:
            pass  # table not created yet
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_sigkill_mid_run_then_a_new_worker_finishes(tmp_path: Path) -> None:
    db = tmp_path / "agents.db"
    first = _worker(db, "trigger")
    try:
        _wait(db, "SELECT count(*) FROM history", AGENTS * 4, "some progress")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    done_before = _rows(db, "SELECT count(*) FROM agents WHERE status = 'succeeded'")[0][0]
    history_before = _rows(db, "SELECT count(*) FROM history")[0][0]
    assert done_before < AGENTS, "the worker finished before it was killed: nothing was tested"
    assert history_before < AGENTS * 10

    second = _worker(db, "resume")
    try:
        _wait(db, "SELECT count(*) FROM agents WHERE status = 'succeeded'", AGENTS,
              "every agent to succeed after the restart")
    finally:
        second.kill()
        second.wait(10)
    agents = _rows(db, "SELECT agent_id, node, step, status FROM agents ORDER BY agent_id")
    assert len(agents) == AGENTS
    assert {(node, step, status) for _, node, step, status in agents} == {
        ("Step9", 10, "succeeded")}
    per_agent = _rows(db, "SELECT agent_id, count(*), count(DISTINCT step), min(step), max(step) "
                          "FROM history GROUP BY agent_id")
    assert len(per_agent) == AGENTS
    assert {row[1:] for row in per_agent} == {(10, 10, 1, 10)}
    contexts = _rows(db, "SELECT context FROM agents")
    assert all(c[0].count("Step") == 10 for c in contexts)
    assert _rows(db, "SELECT count(*) FROM outbox") == [(0,)]
