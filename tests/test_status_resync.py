"""The status bucket tells the truth after a crash (issue 7 item 6).

A worker mirrors each commit's status into the NATS KV bucket from a buffer flushed every
``COMMANDNET_STATUS_FLUSH_INTERVAL`` seconds (0.25 by default), so a worker SIGKILLed between
its last commit and the next flush leaves the bucket behind the store: an Agent resource would
show Running for ever. The pool's sweeper replays the store's status of agents quiet for 5 s
(:class:`commandnet.worker.resync.StatusResync`), so another worker of the pool repairs it.

The window is made deterministic with a worker whose flush interval is 60 s: it commits the
agents' last steps, the test sees the store final while the bucket still shows them running (or
has no key at all), and SIGKILLs it. Real ``commandnet worker`` processes, PostgreSQL, NATS.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from commandnet.adapters.memory import InMemoryPersistence
from commandnet.adapters.nats_status import read_status, status_key
from commandnet.local.nats import NatsServer
from commandnet.observer import Observer, StatusInfo
from commandnet.records import NewAgent
from commandnet.worker.resync import StatusResync
from tests.graphs.procs import WorkerProc, clean_env, run_cli, wait_until
from tests.test_distributed_faults import setup_schema, sql

POOL = "resync"
GATED = ["g1", "g2", "g3"]  # tests.graphs.gate: Hold (waits for a file) -> Done
FAILING = "f1"  # tests.graphs.failing: AlwaysFails, 2 attempts


def kv(nats_url: str, agent_id: str) -> dict[str, Any] | None:
    """The agent's value in the status bucket (None: no key)."""
    return asyncio.run(read_status(nats_url, POOL, agent_id))


def kv_all(nats_url: str, agents: list[str]) -> dict[str, dict[str, Any] | None]:
    async def go() -> dict[str, dict[str, Any] | None]:
        from commandnet.adapters.nats_status import StatusReader

        async with StatusReader(nats_url) as reader:
            return {a: await reader.get_status(a, POOL) for a in agents}

    return asyncio.run(go())


def shown(value: dict[str, Any] | None) -> tuple[str, str, int] | None:
    return None if value is None else (value["status"], value["node"], value["step"])


def cli_trigger(nats_url: str, agent_id: str, node: str, context: dict[str, Any]) -> None:
    """``commandnet trigger``, as a user or the operator sends it (a worker creates the row)."""
    done = run_cli(["trigger", "--pool", POOL, "--bus", nats_url, "--node", node,
                    "--context", json.dumps(context), agent_id])
    assert done.returncode == 0, done.stderr


def stored(dsn: str) -> dict[str, tuple[str, str, int]]:
    rows = sql(dsn, "SELECT agent_id, status, node, step FROM agents")
    return {r["agent_id"]: (r["status"], r["node"], r["step"]) for r in rows}


def hold_sweep_turn(dsn: str, seconds: float) -> bool:
    """Take (or, with ``seconds=0``, give back) the pool's repair turn as owner "elsewhere",
    as another worker of the pool holding it would; False while a worker holds it."""
    from commandnet.adapters.postgres import PostgresPersistence

    async def go() -> bool:
        store = PostgresPersistence(dsn, min_size=1, max_size=1)
        await store.setup()
        try:
            return await store.claim_sweep(POOL, "elsewhere", seconds) is not None
        finally:
            await store.close()

    return asyncio.run(go())


FINAL = {**{g: ("succeeded", "Done", 2) for g in GATED}, FAILING: ("failed", "AlwaysFails", 0)}


def crash_before_flush(tmp_path: Path, dsn: str, nats: NatsServer, *,
                       after_resync_pass: bool) -> None:
    setup_schema(dsn)
    args = ["--graph", "tests.graphs.gate:Hold", "--graph", "tests.graphs.failing:AlwaysFails",
            "--pool", POOL, "--store", dsn, "--bus", nats.url, "--lease-seconds", "2",
            "--ack-wait", "3", "--sweep-interval", "0.5", "--drain-grace", "0",
            "--log-level", "WARNING", "--no-migrate"]
    started, release = tmp_path / "started", tmp_path / "release"
    gate = {"started_file": str(started), "release_file": str(release)}
    procs: list[WorkerProc] = []
    try:
        # W0 (default flush): creates the agents, starts Hold, mirrors "running" at step 0;
        # then drains (SIGTERM, no grace: Hold is handed back, the mirror flushed at close).
        w0 = WorkerProc([*args, "--worker-id", "W0"], tmp_path / "w0.log")
        procs.append(w0)
        w0.wait_ready(90)
        for agent in GATED:
            cli_trigger(nats.url, agent, "Hold", gate)
        running = dict.fromkeys(GATED, ("running", "Hold", 0))
        wait_until(lambda: {a: shown(v) for a, v in kv_all(nats.url, GATED).items()} == running
                   and len(started.read_text().split()) == len(GATED),
                   60, f"W0 to mirror the gated agents as running and start Hold\n{w0.log}")
        w0.terminate()
        assert w0.wait(60) == 0, w0.log
        if not after_resync_pass:
            # The pool's repair turn (outbox sweep, reconciler, status resync) is another
            # worker's, as it usually is: W1 only runs steps and mirrors their statuses.
            wait_until(lambda: hold_sweep_turn(dsn, 600), 30, "W0's sweep turn to lapse")

        # W1 (flush every 60 s): finishes them, and fails f1; nothing reaches the bucket.
        slow = clean_env(COMMANDNET_STATUS_FLUSH_INTERVAL="60")
        w1 = WorkerProc([*args, "--worker-id", "W1"], tmp_path / "w1.log", env=slow)
        procs.append(w1)
        w1.wait_ready(90)
        release.touch()
        cli_trigger(nats.url, FAILING, "AlwaysFails", {"n": 1})
        wait_until(lambda: stored(dsn) == FINAL, 60,
                   f"W1 to finish the agents in the store ({stored(dsn)})\n{w1.log}")
        if after_resync_pass:
            # Let W1's resync pass replay the final statuses (into its 60 s buffer) and
            # record the pool as resynced past them before the kill.
            last = sql(dsn, "SELECT max(updated_at) AS t FROM agents")[0]["t"]
            wait_until(lambda: sql(dsn, "SELECT resynced_until FROM sweeps WHERE pool = $1",
                                   POOL)[0]["resynced_until"] >= last, 60,
                       f"W1's status resync to pass the last commit\n{w1.log}")
        before = {a: shown(v) for a, v in kv_all(nats.url, [*GATED, FAILING]).items()}
        if after_resync_pass:
            # The pool is recorded as resynced past these commits: so they must be written.
            assert before == FINAL, (
                f"the pool is marked resynced past statuses its mirror has not written: {before}")
        else:
            assert before == {**running, FAILING: None}, (
                f"the bucket moved before the kill (a flush happened): {before}")
        w1.proc.send_signal(signal.SIGKILL)
        w1.wait(30)
        hold_sweep_turn(dsn, 0)  # the other sweeper is gone too: W2 takes the turn

        # W2 (default flush): the pool's sweeper replays the store's statuses.
        w2 = WorkerProc([*args, "--worker-id", "W2"], tmp_path / "w2.log")
        procs.append(w2)
        w2.wait_ready(90)
        want = {a: FINAL[a] for a in [*GATED, FAILING]}
        wait_until(lambda: {a: shown(v) for a, v in kv_all(nats.url, list(want)).items()}
                   == want, 60,
                   f"the bucket to show the stored final statuses {want}\n{w2.log}")
        failed = kv(nats.url, FAILING)
        assert failed is not None and "AlwaysFails failed on purpose" in (failed["error"] or "")
        assert failed["phase"] == "Failed" and failed["pool"] == POOL
        # What `commandnet status` (and the operator) reads.
        done = run_cli(["status", "--pool", POOL, "--bus", nats.url, "--json", "g1"])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "succeeded", done.stdout
        assert status_key(POOL, "g1") == "resync.g1"
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.slow
def test_a_status_lost_with_a_sigkilled_worker_reaches_the_bucket(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer,
) -> None:
    """SIGKILL right after the last commits: the next worker's resync writes them."""
    crash_before_flush(tmp_path, postgres_dsn, restartable_nats, after_resync_pass=False)


@pytest.mark.slow
def test_a_resync_lost_with_a_sigkilled_worker_is_not_marked_done(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer,
) -> None:
    """The resync mark only passes statuses the mirror has written: once the store records
    the pool as resynced past the last commits, the bucket shows them, even from a worker
    whose own flush would come 60 s later; SIGKILLed then, nothing is lost. (Before the fix
    the pass only buffered its replays and marked them done: killed before its flush, the
    worker took them along and no later pass replayed them.)"""
    crash_before_flush(tmp_path, postgres_dsn, restartable_nats, after_resync_pass=True)


class BufferingMirror(Observer):
    """A mirror that, like the KV observer, only buffers ``on_status`` until ``flush``."""

    def __init__(self, writes: bool) -> None:
        self.writes = writes
        self.buffered: list[StatusInfo] = []
        self.written: list[StatusInfo] = []

    async def on_status(self, info: StatusInfo) -> None:
        self.buffered.append(info)

    async def flush(self) -> bool:
        if not self.writes:
            return False
        self.written += self.buffered
        self.buffered = []
        return True


async def test_the_resync_mark_only_passes_statuses_its_mirrors_wrote() -> None:
    """In process: a pass whose mirror cannot write does not move the mark, so the next pass
    (here: another worker's, after this one died with its buffer) replays the same agents."""
    now = [1000.0]
    store = InMemoryPersistence(clock=lambda: now[0])
    for agent in ("x1", "x2"):
        await store.create_agent(NewAgent(agent, "Hold", {}, pool=POOL))
    now[0] += 10  # quiet for longer than the resync's 5 s

    failing = BufferingMirror(writes=False)
    assert await StatusResync(store, POOL, "dying", [failing]).run_once() == 2
    assert [i.agent_id for i in failing.buffered] == ["x1", "x2"] and not failing.written
    assert store.sweeps[POOL][2] is None, "marked resynced although nothing was written"

    now[0] += 60  # the dying worker's sweep turn has lapsed
    healthy = BufferingMirror(writes=True)
    assert await StatusResync(store, POOL, "next", [healthy]).run_once() == 2
    assert [i.agent_id for i in healthy.written] == ["x1", "x2"]
    assert store.sweeps[POOL][2] == pytest.approx(now[0] - 5)
    assert await StatusResync(store, POOL, "next", [healthy]).run_once() == 0
