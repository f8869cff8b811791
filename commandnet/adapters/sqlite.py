"""SQLite store: the embedded default (standard library only).

WAL journal, ``BEGIN IMMEDIATE`` write transactions, the same fenced protocol as every store.
Several processes on one machine may share a file. Calls run on the event-loop thread: they take
microseconds, and a locked database is waited for with ``asyncio.sleep``, never by blocking.
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

from ..errors import CommandNetError, TriggerConflictError
from ..persistence import Persistence
from ..records import (
    AgentRecord,
    AgentStatus,
    Commit,
    Failure,
    HistoryRecord,
    Lease,
    LeaseState,
    NewAgent,
    OutboxEntry,
)

T = TypeVar("T")
SCHEMA_VERSION = 1
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
CREATE INDEX IF NOT EXISTS agents_running ON agents (updated_at) WHERE status = 'running';
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
_COLUMNS = ("agent_id, node, step, status, context, start_node, initial_context, attempts, "
            "error, lease_owner, lease_until, created_at, updated_at")
_FENCE = "agent_id = ? AND step = ? AND status = 'running' AND lease_owner = ?"


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
        """Run ``body`` in a BEGIN IMMEDIATE transaction, waiting (asynchronously) for the lock."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        db = self.db
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise CommandNetError(
                        f"SQLite store {self.path!r} stayed locked for {self.lock_timeout}s"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            try:
                result = body(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    # --------------------------------------------------------------- protocol

    @override
    async def create_agent(self, agent: NewAgent) -> bool:
        context = json.dumps(agent.context)

        def body(db: sqlite3.Connection) -> bool:
            old = db.execute("SELECT start_node, initial_context FROM agents WHERE agent_id = ?",
                             (agent.agent_id,)).fetchone()
            if old is not None:
                old_context = json.loads(old[1])
                if old[0] == agent.start_node and old_context == agent.context:
                    return False
                raise TriggerConflictError.between(
                    agent.agent_id, (old[0], old_context), (agent.start_node, agent.context))
            now = self.clock()
            db.execute(
                f"INSERT INTO agents ({_COLUMNS}) VALUES (?, ?, 0, ?, ?, ?, ?, 0, ?, NULL, NULL, "
                "?, ?)",
                (agent.agent_id, agent.start_node, agent.status.value, context, agent.start_node,
                 context, agent.error, now, now),
            )
            if agent.status is AgentStatus.RUNNING:
                db.execute("INSERT INTO outbox VALUES (?, 0, ?)", (agent.agent_id, now))
            return True

        return await self._write(body)

    @override
    async def load_and_lock_agent(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> Lease:
        now = self.clock()

        def body(db: sqlite3.Connection) -> Lease:
            row = db.execute(
                "UPDATE agents SET lease_owner = ?, lease_until = ? WHERE agent_id = ? AND "
                "step = ? AND status = 'running' AND (lease_until IS NULL OR lease_until <= ?) "
                f"RETURNING {_COLUMNS}",
                (owner, now + lease_seconds, agent_id, step, now),
            ).fetchone()
            if row is not None:
                return Lease(LeaseState.GRANTED, _record(row))
            found = db.execute("SELECT step, status, lease_until FROM agents WHERE agent_id = ?",
                               (agent_id,)).fetchone()
            if found is None:
                return Lease(LeaseState.MISSING)
            if found[0] != step or found[1] != "running":
                return Lease(LeaseState.STALE)
            return Lease(LeaseState.BUSY, retry_after=max(found[2] - now, 0.0))

        return await self._write(body)

    @override
    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        until = self.clock() + lease_seconds
        return await self._write(lambda db: db.execute(
            f"UPDATE agents SET lease_until = ? WHERE {_FENCE}", (until, agent_id, step, owner)
        ).rowcount == 1)

    @override
    async def save_state(self, commit: Commit) -> bool:
        done = commit.to_node is None
        context = json.dumps(commit.context)

        def body(db: sqlite3.Connection) -> bool:
            now = self.clock()
            updated = db.execute(
                "UPDATE agents SET node = COALESCE(?, node), step = step + 1, status = ?, "
                "context = ?, attempts = 0, error = NULL, lease_owner = NULL, lease_until = NULL, "
                f"updated_at = ? WHERE {_FENCE}",
                (commit.to_node, "succeeded" if done else "running", context, now,
                 commit.agent_id, commit.step, commit.owner),
            ).rowcount
            if updated != 1:
                return False
            db.execute(
                "INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?)",
                (commit.agent_id, commit.step + 1, commit.from_node, commit.to_node,
                 commit.attempts, commit.duration, now),
            )
            if not done:
                db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?)",
                           (commit.agent_id, commit.step + 1, now))
            return True

        return await self._write(body)

    @override
    async def record_failure(self, failure: Failure) -> bool:
        now = self.clock()
        return await self._write(lambda db: db.execute(
            "UPDATE agents SET attempts = ?, error = ?, lease_owner = NULL, lease_until = ?, "
            f"status = ?, updated_at = ? WHERE {_FENCE}",
            (failure.attempts, failure.error, None if failure.final else now + failure.retry_in,
             "failed" if failure.final else "running", now, failure.agent_id, failure.step,
             failure.owner),
        ).rowcount == 1)

    @override
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        await self._write(lambda db: db.execute(
            f"UPDATE agents SET lease_owner = NULL, lease_until = NULL WHERE {_FENCE}",
            (agent_id, step, owner),
        ))

    @override
    async def cancel_agent(self, agent_id: str, reason: str) -> bool:
        now = self.clock()
        return await self._write(lambda db: db.execute(
            "UPDATE agents SET status = 'cancelled', error = ?, lease_owner = NULL, "
            "lease_until = NULL, updated_at = ? WHERE agent_id = ? AND status = 'running'",
            (reason, now, agent_id),
        ).rowcount == 1)

    @override
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM agents WHERE agent_id = ?",
                              (agent_id,)).fetchone()
        return None if row is None else _record(row)

    @override
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        rows = self.db.execute(
            "SELECT agent_id, step, from_node, to_node, attempts, duration, at FROM history "
            "WHERE agent_id = ? ORDER BY step", (agent_id,)).fetchall()
        return [HistoryRecord(*row) for row in rows]

    @override
    async def pending_outbox(self, older_than: float, limit: int) -> list[OutboxEntry]:
        rows = self.db.execute(
            "SELECT agent_id, step, created_at FROM outbox WHERE created_at <= ? LIMIT ?",
            (self.clock() - older_than, limit)).fetchall()
        return [OutboxEntry(*row) for row in rows]

    @override
    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            await self._write(lambda db: db.executemany(
                "DELETE FROM outbox WHERE agent_id = ? AND step = ?",
                [(e.agent_id, e.step) for e in entries]))

    @override
    async def stalled_agents(self, older_than: float, limit: int) -> list[OutboxEntry]:
        now = self.clock()
        rows = self.db.execute(
            "SELECT agent_id, step, updated_at FROM agents WHERE status = 'running' AND "
            "updated_at <= ? AND (lease_until IS NULL OR lease_until <= ?) LIMIT ?",
            (now - older_than, now, limit)).fetchall()
        return [OutboxEntry(*row) for row in rows]



def _migrate(db: sqlite3.Connection) -> None:
    # executescript() would commit the surrounding transaction; run statement by statement.
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _record(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(
        agent_id=row[0], node=row[1], step=row[2], status=AgentStatus(row[3]),
        context=json.loads(row[4]), start_node=row[5], initial_context=json.loads(row[6]),
        attempts=row[7], error=row[8], lease_owner=row[9], lease_until=row[10],
        created_at=row[11], updated_at=row[12],
    )
