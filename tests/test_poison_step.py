"""A step that kills its worker is not retried for ever (issue 7 item 2).

Real ``commandnet worker`` processes on PostgreSQL and NATS, one at a time, with a short lease
and ack wait; the test starts a new worker whenever one dies, until the poison agent is final.
The poison node (``tests.graphs.poison:Danger``, 2 attempts) ends its worker with
``os._exit(137)`` (no exception, no cleanup: an OOM kill or a segfault), or raises a
``BaseException`` that ``except Exception`` would not catch. Taking a lease counts an attempt
and, when the previous lease was never settled, a crash; a step that crashed runs alone on an
idle worker, and deaths there count, so after ``max_attempts`` of them the next worker fails
the agent with "worker died during the step (N times)" instead of running it again.
Before that change, every worker that took the step died, the message went to the
dead-letter stream after ``max_deliver`` and the reconciler re-published it: a crash loop.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from commandnet.local.nats import NatsServer
from tests.graphs import poison
from tests.graphs.procs import WorkerProc, wait_until
from tests.test_distributed_faults import bus_state, setup_schema, sql, trigger

pytestmark = pytest.mark.slow

LEASE, ACK_WAIT = 1.0, 2.0
INNOCENT = 20  # ordinary agents of the same pool, triggered with the poison one
LIVENESS = 3.0  # seconds without an answer to /healthz before the "kubelet" kills a worker


class OneWorker:
    """Exactly one worker of the pool; a worker that exits on its own is replaced.

    Like a Kubernetes liveness probe, a worker that answered ``/healthz`` once and then stops
    answering for :data:`LIVENESS` seconds is killed (SIGKILL) and replaced: a worker whose
    event loop was torn down by a ``SystemExit`` raised in a node can hang in asyncio's
    shutdown with its probe server closed (see the report on issue 7).
    """

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.tmp_path, self.args = tmp_path, args
        self.procs: list[WorkerProc] = []
        self.deaths: list[tuple[int, int]] = []  # (pid, exit code) of workers that died
        self.liveness_kills: list[int] = []  # pids killed for an unanswered /healthz
        self._healthy = False
        self._silent_since: float | None = None

    @property
    def current(self) -> WorkerProc:
        return self.procs[-1]

    def spawn(self) -> WorkerProc:
        n = len(self.procs)
        proc = WorkerProc([*self.args, "--worker-id", f"w{n}"], self.tmp_path / f"w{n}.log")
        self.procs.append(proc)
        self._healthy, self._silent_since = False, None
        return proc

    def _probe(self) -> None:
        """The liveness probe: kill a worker that stopped answering /healthz."""
        now = time.monotonic()
        if self.current.get("/healthz")[0] == 200:
            self._healthy, self._silent_since = True, None
        elif self._healthy:
            self._silent_since = self._silent_since or now
            if now - self._silent_since > LIVENESS and self.current.proc.poll() is None:
                self.liveness_kills.append(self.current.proc.pid)
                self.current.proc.kill()
                self.current.proc.wait(30)

    def replace_dead(self) -> None:
        if self.current.proc.poll() is None:
            self._probe()
        code = self.current.proc.poll()
        if code is not None:
            self.deaths.append((self.current.proc.pid, code))
            self.spawn()

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stop()

    def logs(self, limit: int = 4000) -> str:
        return "\n".join(f"--- {p.log_path.name} (exit {p.proc.poll()})\n{p.log[-limit:]}"
                         for p in self.procs)


def run_poison(tmp_path: Path, dsn: str, nats: NatsServer, pool: str,
               mode: str) -> dict[str, Any]:
    """Trigger one ``mode`` poison agent and :data:`INNOCENT` ordinary ones on a pool of one
    (re)started worker; wait until all are final and the bus is drained."""
    setup_schema(dsn)
    runs = tmp_path / "runs"
    runs.touch()
    fleet = OneWorker(tmp_path, [
        "--graph", "tests.graphs.poison:Begin", "--pool", pool, "--store", dsn,
        "--bus", nats.url, "--lease-seconds", str(LEASE), "--ack-wait", str(ACK_WAIT),
        "--sweep-interval", "0.5", "--outbox-grace", "1", "--stall-after", "3",
        "--drain-grace", "1", "--log-level", "WARNING", "--no-migrate"])
    try:
        fleet.spawn().wait_ready(90)
        agents: dict[str, dict[str, Any]] = {
            f"ok{i}": {"mode": "ok", "runs_file": ""} for i in range(INNOCENT)}
        agents["poison"] = {"mode": mode, "runs_file": str(runs)}
        trigger(dsn, nats.url, pool, poison.Begin, agents)

        def all_final() -> bool:
            fleet.replace_dead()
            rows = sql(dsn, "SELECT count(*) AS n FROM agents WHERE status <> 'running'")
            return bool(rows[0]["n"] == len(agents))

        # Each death costs a worker start and an ack wait; a crash loop never gets here.
        wait_until(all_final, 90, f"every agent to end ({mode} poison)\n{fleet.logs()}",
                   interval=0.1)
        row = dict(sql(dsn, "SELECT status, node, step, attempts, crashes, error "
                            "FROM agents WHERE agent_id = 'poison'")[0])
        innocent = sql(dsn, "SELECT agent_id, status, node, step, error FROM agents "
                            "WHERE agent_id <> 'poison'")
        history = [tuple(r) for r in sql(dsn, "SELECT step, from_node, to_node FROM history "
                                              "WHERE agent_id = 'poison' ORDER BY step")]

        # No crash loop afterwards: the step's message is settled, nothing is dead-lettered,
        # and the worker of the moment keeps running without touching the step again.
        state: dict[str, tuple[int, int]] = {}

        def drained() -> bool:
            fleet.replace_dead()
            state["now"] = bus_state(nats.url, pool)
            return state["now"][0] == 0

        wait_until(drained, ACK_WAIT * 3 + 30,
                   f"pool {pool!r} to hold nothing unacknowledged ({state})", interval=0.5)
        deaths_when_failed = list(fleet.deaths)
        # Past a lease, an ack wait and a stall period: a redelivery or a reconciler's
        # re-publish would have run the step again by now.
        quiet_until = time.monotonic() + 3 + ACK_WAIT + LEASE
        while time.monotonic() < quiet_until:
            fleet.replace_dead()
            time.sleep(0.1)
        return {
            "row": row, "innocent": [dict(r) for r in innocent], "history": history,
            "runs": runs.read_text().split(), "deaths": deaths_when_failed,
            "deaths_later": fleet.deaths[len(deaths_when_failed):],
            "bus": state["now"], "worker_alive": fleet.current.proc.poll() is None,
            "liveness_kills": list(fleet.liveness_kills),
            "logs": fleet.logs(),
        }
    finally:
        fleet.stop_all()


def assert_failed_after_deaths(result: dict[str, Any], exit_code: int) -> None:
    row, n = result["row"], poison.MAX_ATTEMPTS
    logs = result["logs"]
    codes = [code for _, code in result["deaths"]]
    # Every run of the step killed its worker. A death while the worker ran other steps too
    # is not counted against it (it may have been a bystander); the runs alone on an idle
    # worker are, and after max_attempts of those the agent fails.
    assert len(codes) == row["crashes"] >= n and set(codes) == {exit_code}, (
        f"workers that died: {result['deaths']}, row {row}\n{logs}")
    assert result["liveness_kills"] == [], result["liveness_kills"]
    assert result["runs"] == [str(pid) for pid, _ in result["deaths"]], (
        f"Danger ran in {result['runs']}, the dead workers were {result['deaths']}")
    assert row["status"] == "failed", f"poison agent: {row}\n{logs}"
    assert (row["node"], row["step"], row["attempts"]) == ("Danger", 1, n + 1), row
    assert f"worker died during the step ({row['crashes']} times) at node 'Danger'" in (
        row["error"] or "")
    assert result["history"] == [(1, "Begin", "Danger")]
    assert result["deaths_later"] == [] and result["worker_alive"], (
        f"a worker died after the agent failed: {result['deaths_later']}\n{logs}")
    assert result["bus"] == (0, 0), f"(unacknowledged, dead letters): {result['bus']}"
    assert_innocent_succeeded(result)


def assert_innocent_succeeded(result: dict[str, Any]) -> None:
    wrong = [r for r in result["innocent"]
             if (r["status"], r["node"], r["step"]) != ("succeeded", "Fine", 2)]
    assert len(result["innocent"]) == INNOCENT and not wrong, (
        f"ordinary agents of the pool did not succeed: {wrong[:5]}")


def test_a_step_that_calls_os_exit_fails_after_max_attempts_deaths(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer,
) -> None:
    """``os._exit(137)`` in the node: its workers die until max_attempts deaths count."""
    result = run_poison(tmp_path, postgres_dsn, restartable_nats, "poison-exit", "exit")
    assert_failed_after_deaths(result, 137)


@pytest.mark.parametrize(("mode", "error"), [
    ("system_exit", "SystemExit: 3"), ("interrupt", "KeyboardInterrupt"),
    ("base", "Poison: poison step")])
def test_a_base_exception_in_a_node_is_a_failed_attempt_and_the_worker_lives(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer, mode: str, error: str,
) -> None:
    """``SystemExit(3)``, ``KeyboardInterrupt`` or a ``BaseException`` subclass raised by a node
    is the node's failure, like any exception: recorded with its error, retried per the policy,
    then the agent is failed. The worker neither exits nor hangs."""
    result = run_poison(tmp_path, postgres_dsn, restartable_nats, f"poison-{mode}", mode)
    row, n, logs = result["row"], poison.MAX_ATTEMPTS, result["logs"]
    assert result["deaths"] == [] and result["deaths_later"] == [], f"{result['deaths']}\n{logs}"
    assert result["liveness_kills"] == [], result["liveness_kills"]
    assert len(result["runs"]) == n and len(set(result["runs"])) == 1, (
        f"Danger ran {result['runs']} (want {n} times in the one worker)\n{logs}")
    assert row["status"] == "failed", f"poison agent: {row}\n{logs}"
    assert (row["node"], row["step"], row["attempts"], row["crashes"]) == ("Danger", 1, n, 0)
    assert (row["error"] or "").startswith(error), row
    assert result["history"] == [(1, "Begin", "Danger")]
    assert result["worker_alive"] and result["bus"] == (0, 0), result["bus"]
    assert_innocent_succeeded(result)
