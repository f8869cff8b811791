"""SQLite store: the embedded default (standard library only).

WAL journal, ``BEGIN IMMEDIATE`` write transactions, the same fenced protocol as every store.
Several processes on one machine may share a file. Calls run on the event-loop thread: they take
microseconds, and a locked database is waited for with ``asyncio.sleep``, never by blocking.
Writes are group-committed: the writes of many agents that arrive together share one transaction
(and, with ``FULL``, one flush), and each caller returns only once its own write is committed.
``synchronous="NORMAL"`` survives a process crash (not a power cut); ``"FULL"`` survives both.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from typing_extensions import override

from ..errors import CommandNetError, StoreUnavailableError
from ..leasing.kept import kept_lease
from ..persistence import Persistence
from ..records import (
    AgentRecord,
    AgentStatus,
    Branch,
    Commit,
    Failure,
    HistoryRecord,
    Lease,
    LeaseState,
    NewAgent,
    OutboxEntry,
    SignalOutcome,
    SweepClaim,
    branch_id,
)
from ..workflow.records import PARENT_CANCELLED, SIBLING_FAILED
from .conflict import trigger_conflict

T = TypeVar("T")
SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id        TEXT PRIMARY KEY,
    node            TEXT NOT NULL,
    step            INTEGER NOT NULL,
    status          TEXT NOT NULL,
    context         TEXT NOT NULL,
    start_node      TEXT NOT NULL,
    initial_context TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    lease_owner     TEXT,
    lease_until     REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    agent_id  TEXT NOT NULL,
    step      INTEGER NOT NULL,
    from_node TEXT NOT NULL,
    to_node   TEXT,
    attempts  INTEGER NOT NULL,
    duration  REAL NOT NULL,
    at        REAL NOT NULL,
    PRIMARY KEY (agent_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    agent_id   TEXT NOT NULL,
    step       INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (agent_id, step)
) WITHOUT ROWID;
"""
# Version 2: pools, crash counting, recorded re-publishes, the pool's sweeper and resync mark.
SCHEMA_2 = """
ALTER TABLE agents ADD COLUMN pool TEXT NOT NULL DEFAULT 'default';
ALTER TABLE agents ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN republished_at REAL;
ALTER TABLE agents ADD COLUMN lease_alone INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS agents_running;
CREATE INDEX agents_running ON agents (pool, updated_at) WHERE status = 'running';
CREATE INDEX agents_changed ON agents (pool, updated_at, agent_id);
CREATE TABLE sweeps (
    pool           TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    until          REAL NOT NULL,
    resynced_until REAL
);
"""
# Version 3: step payloads, parked agents (a timer or a signal wait), kept signals, history kinds.
SCHEMA_3 = """
ALTER TABLE agents ADD COLUMN payload TEXT;
ALTER TABLE agents ADD COLUMN wake_at REAL;
ALTER TABLE agents ADD COLUMN waiting TEXT;
ALTER TABLE agents ADD COLUMN timeout_node TEXT;
ALTER TABLE history ADD COLUMN kind TEXT NOT NULL DEFAULT 'step';
CREATE INDEX IF NOT EXISTS agents_due ON agents (pool, wake_at) WHERE wake_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS signals (
    agent_id      TEXT NOT NULL,
    signal_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    payload       TEXT,
    created_at    REAL NOT NULL,
    consumed_step INTEGER,
    PRIMARY KEY (agent_id, signal_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS signals_kept ON signals (agent_id, name, created_at)
    WHERE consumed_step IS NULL;
"""
# Version 4: fan-out and join. A branch row names its parent, the step its fan-out moved the
# parent to and its index; the parent records its join (step, policy) and
# ``joining``, the branches still running while it waits at the join.
SCHEMA_4 = """
ALTER TABLE agents ADD COLUMN parent_id TEXT;
ALTER TABLE agents ADD COLUMN parent_step INTEGER;
ALTER TABLE agents ADD COLUMN branch_index INTEGER;
ALTER TABLE agents ADD COLUMN joining INTEGER;
ALTER TABLE agents ADD COLUMN join_step INTEGER;
ALTER TABLE agents ADD COLUMN join_policy TEXT;
CREATE INDEX IF NOT EXISTS agents_branches ON agents (parent_id, parent_step, branch_index)
    WHERE parent_id IS NOT NULL;
"""
# Version 5: safe deploys: the version of the graph that triggered the agent or ran its last step.
SCHEMA_5 = "ALTER TABLE agents ADD COLUMN graph_version TEXT"
_COLUMNS = ("agent_id, node, step, status, context, start_node, initial_context, attempts, "
            "error, lease_owner, lease_until, created_at, updated_at, pool, crashes, payload, "
            "wake_at, waiting, parent_id, joining, graph_version")
_NOT_PARKED = "wake_at IS NULL AND waiting IS NULL AND joining IS NULL"
_HISTORY = ("INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at, "
            "kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_FENCE = "agent_id = ? AND step = ? AND status = 'running' AND lease_owner = ?"
_BRANCH = (f"INSERT OR REPLACE INTO agents ({_COLUMNS}, parent_step, branch_index) VALUES "
           "(?, ?, 0, 'running', ?, ?, ?, 0, NULL, NULL, NULL, ?, ?, ?, 0, NULL, NULL, NULL, ?, "
           "NULL, ?, ?, ?)")
# Cancels the running children of an agent (the first reason) and their running descendants.
_CANCEL_BRANCHES = """
WITH RECURSIVE doomed (agent_id) AS (
    SELECT agent_id FROM agents WHERE parent_id = ?1 AND status = 'running'
    UNION
    SELECT a.agent_id FROM agents a JOIN doomed d ON a.parent_id = d.agent_id
    WHERE a.parent_id IS NOT NULL AND a.status = 'running'
)
UPDATE agents SET status = 'cancelled', error = CASE WHEN parent_id = ?1 THEN ?2 ELSE ?3 END,
    lease_owner = NULL, lease_until = NULL, wake_at = NULL, waiting = NULL, timeout_node = NULL,
    joining = NULL, updated_at = ?4
WHERE agent_id IN doomed
"""


class SQLitePersistence(Persistence):
    """A store in one SQLite file (``":memory:"`` for a private, throwaway one)."""

    def __init__(
        self,
        path: str | Path = "commandnet.db",
        *,
        synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL",
        lock_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.synchronous = synchronous
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ connection

    @override
    async def setup(self) -> None:
        if self._db is not None:
            return
        db = sqlite3.connect(self.path, isolation_level=None, timeout=0.05)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        self._db = db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise CommandNetError(
                f"{self.path}: schema version {version} is newer than this commandnet "
                f"understands ({SCHEMA_VERSION}); upgrade commandnet"
            )
        if version < SCHEMA_VERSION:
            await self._write(_migrate)

    @override
    async def close(self) -> None:
        if self._writer is not None:  # commit what callers are waiting for
            await asyncio.shield(self._writer)
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (``setup()`` opens it)."""
        if self._db is None:
            raise CommandNetError(f"SQLite store {self.path!r} is not open; call setup() first")
        return self._db

    async def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in a ``BEGIN IMMEDIATE`` transaction; return once it is committed.

        Group commit: calls made while the writer is busy are queued and committed together,
        in one transaction, by one writer task; each caller still returns only after the commit
        that holds its change. If a body raises, the batch is rolled back and every body of it
        runs again in a transaction of its own, so one failure touches no other caller.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((body, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="commandnet-sqlite-writer")
        return await future  # type: ignore[no-any-return]

    async def _drain(self) -> None:
        batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        try:
            while self._queue:
                await asyncio.sleep(0)  # let the callers resumed by the last commit join in
                batch = [(body, f) for body, f in self._queue if not f.done()]
                self._queue.clear()
                if not batch:
                    continue
                try:
                    await self._begin()
                    results = [body(self.db) for body, _ in batch]
                    self.db.execute("COMMIT")
                except BaseException as exc:
                    self._rollback()
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    if len(batch) == 1 or isinstance(exc, StoreUnavailableError):
                        for _, f in batch:
                            _settle(f, exc=exc)
                        continue
                    for body, f in batch:  # one by one: each failure goes to its own caller
                        try:
                            await self._begin()
                            result = body(self.db)
                            self.db.execute("COMMIT")
                        except BaseException as one:
                            self._rollback()
                            if isinstance(one, asyncio.CancelledError):
                                raise
                            _settle(f, exc=one)
                        else:
                            _settle(f, result)
                    continue
                for (_, f), result in zip(batch, results, strict=True):
                    _settle(f, result)
        finally:
            self._writer = None
            for _, f in [*batch, *self._queue]:  # only if this task was cancelled: never hang
                f.cancel()
            self._queue.clear()

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            self._db.execute("ROLLBACK")

    async def _begin(self) -> None:
        """``BEGIN IMMEDIATE``, waiting (asynchronously) while another connection writes."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(
                        f"SQLite store {self.path!r} stayed locked for {self.lock_timeout}s"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)

    # --------------------------------------------------------------- protocol

    @override
    async def create_agent(self, agent: NewAgent) -> bool:
        context = json.dumps(agent.context)
        payload = _dump(agent.payload)

        def body(db: sqlite3.Connection) -> bool:
            old = db.execute("SELECT start_node, initial_context FROM agents WHERE agent_id = ?",
                             (agent.agent_id,)).fetchone()
            if old is not None and not old[0]:  # a cancel came first: fill in, stay cancelled
                db.execute("UPDATE agents SET node = ?, start_node = ?, context = ?, "
                           "initial_context = ? WHERE agent_id = ?",
                           (agent.start_node, agent.start_node, context, context,
                            agent.agent_id))
                return False
            if old is not None:
                old_context = json.loads(old[1])
                if old[0] == agent.start_node and old_context == agent.context:
                    return False
                raise trigger_conflict(
                    agent.agent_id, (old[0], old_context), (agent.start_node, agent.context))
            now = self.clock()
            db.execute(
                f"INSERT INTO agents ({_COLUMNS}) VALUES (?, ?, 0, ?, ?, ?, ?, 0, ?, NULL, NULL, "
                "?, ?, ?, 0, ?, NULL, NULL, NULL, NULL, ?)",
                (agent.agent_id, agent.start_node, agent.status.value, context, agent.start_node,
                 context, agent.error, now, now, agent.pool, payload, agent.graph_version),
            )
            if agent.status is AgentStatus.RUNNING:
                db.execute("INSERT INTO outbox VALUES (?, 0, ?)", (agent.agent_id, now))
            return True

        return await self._write(body)

    @override
    async def load_and_lock_agent(
        self, agent_id: str, step: int, owner: str, lease_seconds: float, pool: str = "default",
        alone: bool = False,
    ) -> Lease:
        def body(db: sqlite3.Connection) -> Lease:
            now = self.clock()  # after the lock: a lease granted after a wait lasts in full
            row = db.execute(
                "UPDATE agents SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 - "
                "(lease_owner IS NOT NULL AND NOT lease_alone), crashes = crashes + "
                "(lease_owner IS NOT NULL), lease_alone = ? AND (crashes > 0 OR lease_owner "
                "IS NOT NULL) WHERE agent_id = ? AND step = ? AND status = 'running' AND "
                f"pool = ? AND (lease_until IS NULL OR lease_until <= ?) AND {_NOT_PARKED} "
                f"RETURNING {_COLUMNS}, join_step",
                (owner, now + lease_seconds, alone, agent_id, step, pool, now),
            ).fetchone()
            if row is not None and row[21] == step:  # a fan-out's join: the branches' results
                results = _results(db, agent_id, step)
                db.execute("UPDATE agents SET payload = ? WHERE agent_id = ?",
                           (json.dumps(results), agent_id))
                return Lease(LeaseState.GRANTED, _record(row, results))
            if row is not None:
                return Lease(LeaseState.GRANTED, _record(row))
            found = db.execute(f"SELECT step, status, lease_until, pool, {_NOT_PARKED} "
                               "FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if found is None:
                return Lease(LeaseState.MISSING)
            if found[3] != pool:
                return Lease(LeaseState.FOREIGN)
            if found[0] != step or found[1] != "running" or not found[4]:
                return Lease(LeaseState.STALE)  # past, final, or parked until wake_due
            return Lease(LeaseState.BUSY, retry_after=max(found[2] - now, 0.0))

        return await self._write(body)

    @override
    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        return await self._write(lambda db: db.execute(
            f"UPDATE agents SET lease_until = ? WHERE {_FENCE}",
            (self.clock() + lease_seconds, agent_id, step, owner)).rowcount == 1)

    @override
    async def save_state(self, commit: Commit) -> bool:
        done = commit.to_node is None
        context = json.dumps(commit.context)
        waits = not done and commit.waiting is not None
        sleeps = not done and not waits and commit.wake_in is not None
        fans = not done and not waits and not sleeps and commit.branches is not None
        branches = commit.branches or ()
        join = (commit.step + 1, commit.join_policy) if fans else (None, None)
        keep = kept_lease(commit)  # the next step's lease, kept by the committing worker

        def body(db: sqlite3.Connection) -> bool:
            now = self.clock()
            payload, wake_at, waiting, timeout_node = _dump(commit.payload), None, None, None
            joining = None
            kept = None
            if waits:  # a signal kept before the wait began is consumed at once
                kept = db.execute(
                    "SELECT signal_id, payload FROM signals WHERE agent_id = ? AND name = ? AND "
                    "consumed_step IS NULL ORDER BY created_at, signal_id LIMIT 1",
                    (commit.agent_id, commit.waiting)).fetchone()
                if kept is not None:
                    payload, wake_at = kept[1], now
                else:
                    waiting, timeout_node = commit.waiting, commit.timeout_node
                    wake_at = None if commit.wake_in is None else now + commit.wake_in
            elif sleeps and commit.wake_in is not None:  # a timer
                wake_at = now + commit.wake_in
            elif fans:  # parked at the join until the branches have ended (none: due at once)
                joining = len(branches) or None
                wake_at = None if branches else now
            updated = db.execute(
                "UPDATE agents SET node = COALESCE(?, node), step = step + 1, status = ?, "
                "context = ?, payload = ?, wake_at = ?, waiting = ?, timeout_node = ?, "
                "joining = ?, join_step = COALESCE(?, join_step), "
                "join_policy = COALESCE(?, join_policy), "
                "graph_version = COALESCE(?, graph_version), "
                "attempts = ?, crashes = 0, error = NULL, lease_owner = ?, lease_until = ?, "
                f"lease_alone = 0, updated_at = ? WHERE {_FENCE} RETURNING pool, parent_id, "
                "graph_version",
                (commit.to_node, "succeeded" if done else "running", context, payload, wake_at,
                 waiting, timeout_node, joining, *join, commit.graph_version,
                 int(keep is not None), None if keep is None else commit.owner,
                 None if keep is None else now + keep, now,
                 commit.agent_id, commit.step,
                 commit.owner),
            ).fetchall()
            if len(updated) != 1:
                return False
            if fans:
                _create_branches(db, commit.agent_id, commit.step + 1, branches, updated[0][0],
                                 now, updated[0][2])
            elif done and updated[0][1] is not None:
                _branch_ended(db, commit.agent_id, now)
            if kept is not None:
                db.execute("UPDATE signals SET consumed_step = ? WHERE agent_id = ? AND "
                           "signal_id = ?", (commit.step + 1, commit.agent_id, kept[0]))
            db.execute(_HISTORY, (commit.agent_id, commit.step + 1, commit.from_node,
                                  commit.to_node, commit.attempts, commit.duration, now, "step"))
            if not done and not waits and not sleeps and not fans:  # parked: wake_due's
                db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?)",
                           (commit.agent_id, commit.step + 1, now))
            return True

        return await self._write(body)

    @override
    async def record_failure(self, failure: Failure) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            now = self.clock()
            updated = db.execute(
                "UPDATE agents SET attempts = ?, error = ?, lease_owner = NULL, lease_until = ?, "
                f"status = ?, updated_at = ? WHERE {_FENCE} RETURNING parent_id",
                (failure.attempts, failure.error,
                 None if failure.final else now + failure.retry_in,
                 "failed" if failure.final else "running", now, failure.agent_id, failure.step,
                 failure.owner),
            ).fetchall()
            if failure.final and updated and updated[0][0] is not None:
                _branch_ended(db, failure.agent_id, now)
            return len(updated) == 1

        return await self._write(body)

    @override
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE agents SET lease_owner = NULL, lease_until = NULL, "
            f"attempts = max(attempts - 1, 0) WHERE {_FENCE}", (agent_id, step, owner),
        ))

    @override
    async def wake_due(self, pool: str, limit: int) -> list[OutboxEntry]:
        def body(db: sqlite3.Connection) -> list[OutboxEntry]:
            now = self.clock()
            due = db.execute(  # the partial index agents_due: only parked rows are read
                "SELECT agent_id, step, node, waiting, timeout_node FROM agents "
                "WHERE pool = ? AND wake_at IS NOT NULL AND wake_at <= ? AND status = 'running' "
                "ORDER BY wake_at LIMIT ?", (pool, now, limit)).fetchall()
            woken = []
            for agent_id, step, node, waiting, timeout_node in due:
                if waiting is not None:  # the signal wait ran out: on to its timeout node
                    step, timeout_node = step + 1, timeout_node or node
                    db.execute("UPDATE agents SET node = ?, step = ?, payload = NULL, "
                               "attempts = 0 WHERE agent_id = ?", (timeout_node, step, agent_id))
                    db.execute(_HISTORY, (agent_id, step, node, timeout_node, 0, 0.0, now,
                                          "timeout"))
                db.execute("UPDATE agents SET wake_at = NULL, waiting = NULL, "
                           "timeout_node = NULL, updated_at = ? WHERE agent_id = ?",
                           (now, agent_id))
                db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?)", (agent_id, step, now))
                woken.append(OutboxEntry(agent_id, step, now))
            return woken

        return await self._write(body)

    @override
    async def signal_agent(self, agent_id: str, name: str, signal_id: str,
                           payload: Any) -> SignalOutcome:
        data = _dump(payload)

        def body(db: sqlite3.Connection) -> SignalOutcome:
            now = self.clock()
            row = db.execute("SELECT status, step, waiting, start_node FROM agents "
                             "WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is None or not row[3]:  # a cancel tombstone is no agent
                return SignalOutcome.MISSING
            if row[0] != "running":
                return SignalOutcome.FINAL
            delivered = row[2] == name
            stored = db.execute(
                "INSERT INTO signals (agent_id, signal_id, name, payload, created_at, "
                "consumed_step) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (agent_id, signal_id, name, data, now, row[1] if delivered else None)).rowcount
            if stored != 1:
                return SignalOutcome.DUPLICATE
            if not delivered:
                return SignalOutcome.KEPT
            db.execute("UPDATE agents SET payload = ?, waiting = NULL, timeout_node = NULL, "
                       "wake_at = ?, updated_at = ? WHERE agent_id = ?",
                       (data, now, now, agent_id))
            return SignalOutcome.DELIVERED

        return await self._write(body)

    @override
    async def resume_agent(self, agent_id: str, node: str, context: dict[str, Any],
                           pool: str = "default") -> bool:
        data = json.dumps(context)

        def body(db: sqlite3.Connection) -> bool:
            now = self.clock()
            row = db.execute(
                "SELECT node, step FROM agents WHERE agent_id = ? AND pool = ? AND status IN "
                "('failed', 'cancelled') AND start_node != ''", (agent_id, pool)).fetchone()
            if row is None:  # running, succeeded, another pool's, or a cancel tombstone
                return False
            step = row[1] + 1
            db.execute(
                "UPDATE agents SET status = 'running', node = ?, step = ?, context = ?, "
                "payload = NULL, error = NULL, attempts = 0, crashes = 0, lease_owner = NULL, "
                "lease_until = NULL, lease_alone = 0, wake_at = NULL, waiting = NULL, "
                "timeout_node = NULL, joining = NULL, republished_at = NULL, updated_at = ? "
                "WHERE agent_id = ?",
                (node, step, data, now, agent_id))
            db.execute(_HISTORY, (agent_id, step, row[0], node, 0, 0.0, now, "resume"))
            db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?)", (agent_id, step, now))
            return True

        return await self._write(body)

    @override
    async def cancel_agent(self, agent_id: str, reason: str, pool: str = "default") -> bool:
        def body(db: sqlite3.Connection) -> bool:
            now = self.clock()
            # A tombstone for an id not triggered yet (empty start node), else the update.
            cancelled = db.execute(
                f"INSERT INTO agents ({_COLUMNS}) VALUES (?, '', 0, 'cancelled', '{{}}', '', "
                "'{}', 0, ?, NULL, NULL, ?, ?, ?, 0, NULL, NULL, NULL, NULL, NULL, NULL) ON "
                "CONFLICT "
                "(agent_id) "
                "DO UPDATE SET status = 'cancelled', error = excluded.error, lease_owner = NULL, "
                "lease_until = NULL, wake_at = NULL, waiting = NULL, timeout_node = NULL, "
                "joining = NULL, updated_at = excluded.updated_at WHERE status = 'running' "
                "RETURNING start_node",
                (agent_id, reason, now, now, pool)).fetchall()
            if not cancelled:
                return False
            if cancelled[0][0]:  # not a new tombstone: its branches, then its own parent's join
                db.execute(_CANCEL_BRANCHES, (agent_id, PARENT_CANCELLED, PARENT_CANCELLED,
                                              now))
                _branch_ended(db, agent_id, now)
            return True

        return await self._write(body)

    @override
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM agents WHERE agent_id = ?",
                              (agent_id,)).fetchone()
        return None if row is None else _record(row)

    @override
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        rows = self.db.execute(
            "SELECT agent_id, step, from_node, to_node, attempts, duration, at, kind FROM "
            "history "
            "WHERE agent_id = ? ORDER BY step", (agent_id,)).fetchall()
        return [HistoryRecord(*row) for row in rows]

    @override
    async def pending_outbox(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        rows = self.db.execute(
            "SELECT o.agent_id, o.step, o.created_at FROM outbox o JOIN agents a USING "
            "(agent_id) WHERE o.created_at <= ? AND (? IS NULL OR a.pool = ?) "
            "ORDER BY o.created_at LIMIT ?",
            (self.clock() - older_than, pool, pool, limit)).fetchall()
        return [OutboxEntry(*row) for row in rows]

    @override
    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            await self._write(lambda db: db.executemany(
                "DELETE FROM outbox WHERE agent_id = ? AND step = ?",
                [(e.agent_id, e.step) for e in entries]))

    @override
    async def stalled_agents(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        def body(db: sqlite3.Connection) -> list[OutboxEntry]:
            now = self.clock()
            rows = db.execute(
                "UPDATE agents SET republished_at = ? WHERE agent_id IN (SELECT agent_id FROM "
                "agents WHERE status = 'running' AND (? IS NULL OR pool = ?) AND "
                "updated_at <= ? AND coalesce(republished_at, 0) <= ? AND "
                f"(lease_until IS NULL OR lease_until <= ?) AND {_NOT_PARKED} "
                "ORDER BY updated_at LIMIT ?) "
                "RETURNING agent_id, step, updated_at",
                (now, pool, pool, now - older_than, now - older_than, now, limit)).fetchall()
            return sorted((OutboxEntry(*row) for row in rows), key=lambda e: e.created_at)

        return await self._write(body)

    @override
    async def claim_sweep(self, pool: str, owner: str, seconds: float) -> SweepClaim | None:
        def body(db: sqlite3.Connection) -> SweepClaim | None:
            now = self.clock()
            row = db.execute(
                "INSERT INTO sweeps (pool, owner, until) VALUES (?, ?, ?) ON CONFLICT (pool) "
                "DO UPDATE SET owner = excluded.owner, until = excluded.until "
                "WHERE sweeps.owner = excluded.owner OR sweeps.until <= ? "
                "RETURNING resynced_until", (pool, owner, now + seconds, now)).fetchone()
            return None if row is None else SweepClaim(now, row[0])

        return await self._write(body)

    @override
    async def mark_resynced(self, pool: str, until: float) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE sweeps SET resynced_until = ? WHERE pool = ?", (until, pool)))

    @override
    async def changed_agents(
        self, pool: str, after: tuple[float, str], until: float, limit: int
    ) -> list[AgentRecord]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM agents WHERE pool = ? AND (updated_at, agent_id) > (?, ?) "
            "AND updated_at <= ? ORDER BY updated_at, agent_id LIMIT ?",
            (pool, after[0], after[1], until, limit)).fetchall()
        return [_record(row) for row in rows]



def _settle(future: asyncio.Future[Any], result: Any = None,
            exc: BaseException | None = None) -> None:
    if not future.done():  # its caller may have been cancelled meanwhile
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


def _migrate(db: sqlite3.Connection) -> None:
    # Read again under the write lock: another process may have migrated meanwhile.
    version = db.execute("PRAGMA user_version").fetchone()[0]
    # executescript() would commit the surrounding transaction; run statement by statement.
    for script in (SCHEMA, SCHEMA_2, SCHEMA_3, SCHEMA_4, SCHEMA_5)[version:]:
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _create_branches(db: sqlite3.Connection, parent_id: str, step: int,
                     branches: Sequence[Branch], pool: str, now: float,
                     version: str | None) -> None:
    """The fan-out that moved ``parent_id`` to ``step``: a running row and a step 0 event for
    each branch (a retried commit would make the same ids)."""
    rows = []
    for i, branch in enumerate(branches):
        context = json.dumps(branch.context)
        rows.append((branch_id(parent_id, step, i), branch.node, context, branch.node, context,
                     now, now, pool, parent_id, version, step, i))
    db.executemany(_BRANCH, rows)
    db.executemany("INSERT OR REPLACE INTO outbox VALUES (?, 0, ?)",
                   [(row[0], now) for row in rows])


def _branch_ended(db: sqlite3.Connection, agent_id: str, now: float) -> None:
    """Count the ended branch ``agent_id`` down at its parent's join, if the parent still waits
    there; fail fast: a branch that did not succeed fails the parent and cancels its siblings."""
    row = db.execute(
        "SELECT b.status, b.error, p.agent_id, p.join_policy FROM agents b JOIN agents p "
        "ON p.agent_id = b.parent_id WHERE b.agent_id = ? AND p.status = 'running' AND "
        "p.joining IS NOT NULL AND p.join_step = b.parent_step AND p.step = b.parent_step",
        (agent_id,)).fetchone()
    if row is None:
        return
    status, error, parent_id, policy = row
    if status != "succeeded" and policy == "fail_fast":
        db.execute("UPDATE agents SET status = 'failed', error = ?, joining = NULL, "
                   "updated_at = ? WHERE agent_id = ?",
                   (f"branch {agent_id!r} {status}: {error}", now, parent_id))
        db.execute(_CANCEL_BRANCHES, (parent_id, SIBLING_FAILED, PARENT_CANCELLED, now))
        return
    db.execute("UPDATE agents SET joining = CASE WHEN joining > 1 THEN joining - 1 END, "
               "wake_at = CASE WHEN joining > 1 THEN NULL ELSE ? END, updated_at = ? "
               "WHERE agent_id = ?", (now, now, parent_id))


def _results(db: sqlite3.Connection, parent_id: str, step: int) -> list[dict[str, Any]]:
    """The results of the branches of the fan-out that moved ``parent_id`` to ``step``."""
    rows = db.execute(
        "SELECT agent_id, status, node, context, error FROM agents WHERE parent_id = ? AND "
        "parent_step = ? ORDER BY branch_index", (parent_id, step)).fetchall()
    return [{"agent_id": agent_id, "status": status, "node": node,
             "context": json.loads(context), "error": error}
            for agent_id, status, node, context, error in rows]


def _record(row: Sequence[Any], results: list[dict[str, Any]] | None = None) -> AgentRecord:
    """An agent row as read; ``results``: a join's payload, given instead of the stored one."""
    return AgentRecord(
        agent_id=row[0], node=row[1], step=row[2], status=AgentStatus(row[3]),
        context=json.loads(row[4]), start_node=row[5], initial_context=json.loads(row[6]),
        attempts=row[7], error=row[8], lease_owner=row[9], lease_until=row[10],
        created_at=row[11], updated_at=row[12], pool=row[13], crashes=row[14],
        payload=_load(row[15]) if results is None else results, wake_at=row[16],
        waiting=row[17], parent_id=row[18], joining=row[19], graph_version=row[20],
    )


def _dump(payload: Any) -> str | None:
    """A payload as stored: JSON text, or NULL for None."""
    return None if payload is None else json.dumps(payload)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)
