"""PostgreSQL store (asyncpg): the production store, shared by every worker of every pool.

Each method is ONE statement sent as one round trip on a pooled connection that is returned at
once (no connection is held while a node runs); statements are prepared once per connection and
cached by asyncpg. Multi-table changes (create, commit) are single statements with
data-modifying CTEs, so they are atomic without an explicit transaction. Times come from the
database clock (``now()``) and are returned as epoch seconds. Connection errors propagate: the
engine nacks the message and the bus redelivers it later.

Only what must survive a crash waits for the WAL flush: creating, committing, failing and
cancelling agents. Leases (take, extend, release) and outbox clean-up run on a second pool whose
sessions have ``synchronous_commit = off``: they are visible to every worker at once, and a crash
of the database may forget only the last few of them, which the protocol already tolerates (a
forgotten lease is a lease that expired, and a commit fenced by it fails because the crash
dropped its connection; a forgotten outbox delete is re-published by the sweeper and dropped as
a duplicate or stale event). A transition therefore costs one durable flush, not three.

Schema migrations are numbered files in ``sql/postgres/``, applied by :meth:`setup` (or
``commandnet migrate``) under an advisory lock, recorded in ``schema_migrations``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from typing_extensions import override

from ..errors import CommandNetError, ContextValidationError, TriggerConflictError
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
    SweepClaim,
)

# pg_advisory_xact_lock key for migrations: "cmdnet" in ASCII, shared by every commandnet worker.
MIGRATION_LOCK = 0x636D646E6574
_DDL = 24 * 3600.0  # migrations may wait for another worker's, or rewrite big tables


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8"


_RECORD = (
    "agent_id, node, step, status, context, start_node, initial_context, attempts, error, "
    f"lease_owner, {_epoch('lease_until')} AS lease_until, {_epoch('created_at')} AS created_at, "
    f"{_epoch('updated_at')} AS updated_at, pool, crashes"
)
_FENCE = "agent_id = $1 AND step = $2 AND status = 'running' AND lease_owner = $3"

# One row: (true, NULL, NULL) when created, or (false, start_node, initial_context). No row
# means a concurrent trigger of the same id was not yet visible to this statement's snapshot.
# A cancel tombstone (empty start node) takes the request but stays cancelled, with no event.
SQL_CREATE = """
WITH ins AS (
    INSERT INTO agents (agent_id, node, step, status, context, start_node, initial_context,
                        error, created_at, updated_at, pool)
    VALUES ($1, $2, 0, $3, $4::jsonb, $2, $4::jsonb, $5, now(), now(), $6)
    ON CONFLICT (agent_id) DO UPDATE SET node = $2, start_node = $2, context = $4::jsonb,
        initial_context = $4::jsonb
    WHERE agents.start_node = ''
    RETURNING agent_id, status
), event AS (
    INSERT INTO outbox (agent_id, step, created_at)
    SELECT agent_id, 0, now() FROM ins WHERE status = 'running'
)
SELECT status = $3 AS created, $2 AS start_node, $4::jsonb AS initial_context FROM ins
UNION ALL
SELECT false, start_node, initial_context FROM agents
WHERE agent_id = $1 AND NOT EXISTS (SELECT 1 FROM ins)
"""
SQL_EXISTING = "SELECT start_node, initial_context FROM agents WHERE agent_id = $1"

# The lease: one conditional UPDATE; when it matches nothing, the same statement classifies why
# from the row as it stood at the statement's start (a concurrent change shows as BUSY, and the
# redelivery then sees the truth).
SQL_LEASE = f"""
WITH granted AS (
    UPDATE agents SET lease_owner = $3, lease_until = now() + $4::float8 * interval '1 second',
        attempts = attempts + 1 - (lease_owner IS NOT NULL AND NOT lease_alone)::int,
        crashes = crashes + (lease_owner IS NOT NULL)::int,
        lease_alone = $6 AND (crashes > 0 OR lease_owner IS NOT NULL)
    WHERE agent_id = $1 AND step = $2 AND status = 'running' AND pool = $5
      AND (lease_until IS NULL OR lease_until <= now())
    RETURNING {_RECORD}
)
SELECT 'granted' AS state, 0.0::float8 AS retry_after, granted.* FROM granted
UNION ALL
SELECT CASE WHEN a.pool <> $5 THEN 'foreign'
            WHEN a.status <> 'running' OR a.step <> $2 THEN 'stale' ELSE 'busy' END,
       greatest(coalesce({_epoch('a.lease_until - now()')}, 0.0), 0.0),
       NULL, NULL, NULL, NULL, NULL::jsonb, NULL, NULL::jsonb, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL
FROM agents a
WHERE a.agent_id = $1 AND NOT EXISTS (SELECT 1 FROM granted)
"""

SQL_EXTEND = f"""
UPDATE agents SET lease_until = now() + $4::float8 * interval '1 second'
WHERE {_FENCE} RETURNING true
"""

# The transition: fenced UPDATE, history row, (unless final) the next step's outbox event and
# the end of this step's own outbox row (left in place when the bus handed the step over
# locally instead of publishing it; usually gone already), one statement, hence one
# transaction and one round trip.
SQL_COMMIT = f"""
WITH moved AS (
    UPDATE agents SET
        node = coalesce($5::text, node), step = $2 + 1,
        status = CASE WHEN $5::text IS NULL THEN 'succeeded' ELSE 'running' END,
        context = $6::jsonb, attempts = 0, crashes = 0, error = NULL, lease_owner = NULL,
        lease_until = NULL, updated_at = now()
    WHERE {_FENCE}
    RETURNING agent_id
), hist AS (
    INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at)
    SELECT agent_id, $2 + 1, $4, $5::text, $7, $8, now() FROM moved
), event AS (
    INSERT INTO outbox (agent_id, step, created_at)
    SELECT agent_id, $2 + 1, now() FROM moved WHERE $5::text IS NOT NULL
), done AS (
    DELETE FROM outbox o USING moved WHERE o.agent_id = moved.agent_id AND o.step = $2
)
SELECT count(*) FROM moved
"""

SQL_FAILURE = f"""
UPDATE agents SET
    attempts = $4, error = $5, lease_owner = NULL,
    lease_until = CASE WHEN $6 THEN NULL ELSE now() + $7::float8 * interval '1 second' END,
    status = CASE WHEN $6 THEN 'failed' ELSE 'running' END, updated_at = now()
WHERE {_FENCE} RETURNING true
"""

SQL_RELEASE = f"""
UPDATE agents SET lease_owner = NULL, lease_until = NULL, attempts = greatest(attempts - 1, 0)
WHERE {_FENCE}
"""

# A running agent is cancelled; an unknown id gets a tombstone its trigger will respect.
SQL_CANCEL = """
INSERT INTO agents (agent_id, node, step, status, context, start_node, initial_context, error,
                    created_at, updated_at, pool)
VALUES ($1, '', 0, 'cancelled', '{}'::jsonb, '', '{}'::jsonb, $2, now(), now(), $3)
ON CONFLICT (agent_id) DO UPDATE SET status = 'cancelled', error = $2, lease_owner = NULL,
    lease_until = NULL, updated_at = now()
WHERE agents.status = 'running'
RETURNING true
"""

SQL_GET = f"SELECT {_RECORD} FROM agents WHERE agent_id = $1"

SQL_HISTORY = f"""
SELECT agent_id, step, from_node, to_node, attempts, duration, {_epoch('at')} AS at
FROM history WHERE agent_id = $1 ORDER BY step
"""

SQL_PENDING = f"""
SELECT o.agent_id, o.step, {_epoch('o.created_at')} AS created_at
FROM outbox o JOIN agents a USING (agent_id)
WHERE o.created_at <= now() - $1::float8 * interval '1 second' AND ($3::text IS NULL OR a.pool = $3)
ORDER BY o.created_at LIMIT $2
"""

SQL_CLEAR = """
DELETE FROM outbox WHERE (agent_id, step) IN (SELECT * FROM unnest($1::text[], $2::int[]))
"""

# Claims what it returns (republished_at), skipping rows another sweeper is claiming.
# {pool} is "pool = $3" (the engine's case, served by the index) or "$3::text IS NULL".
SQL_STALLED = f"""
WITH found AS (
    SELECT agent_id FROM agents
    WHERE status = 'running' AND {{pool}}
      AND (lease_until IS NULL OR lease_until <= now())
      AND updated_at <= now() - $1::float8 * interval '1 second'
      AND (republished_at IS NULL OR republished_at <= now() - $1::float8 * interval '1 second')
    ORDER BY updated_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE agents a SET republished_at = now() FROM found WHERE a.agent_id = found.agent_id
RETURNING a.agent_id, a.step, {_epoch('a.updated_at')} AS created_at
"""

SQL_CLAIM_SWEEP = f"""
INSERT INTO sweeps (pool, owner, until) VALUES ($1, $2, now() + $3::float8 * interval '1 second')
ON CONFLICT (pool) DO UPDATE SET owner = $2, until = now() + $3::float8 * interval '1 second'
WHERE sweeps.owner = $2 OR sweeps.until <= now()
RETURNING {_epoch('now()')} AS now, {_epoch('resynced_until')} AS resynced_until
"""

SQL_MARK_RESYNCED = "UPDATE sweeps SET resynced_until = to_timestamp($2) WHERE pool = $1"

# The keyset compares epoch floats exactly as they are returned (to_timestamp() of a float
# may round a microsecond); the plain range lets the index find the start.
SQL_CHANGED = f"""
SELECT {_RECORD} FROM agents
WHERE pool = $1 AND updated_at >= to_timestamp($2) - interval '1 millisecond'
  AND ({_epoch('updated_at')}, agent_id) > ($2::float8, $3::text)
  AND updated_at <= to_timestamp($4)
ORDER BY agents.updated_at, agents.agent_id LIMIT $5
"""


class MigrationError(CommandNetError):
    """The database schema is newer than this commandnet, or a migration failed."""


@dataclass(frozen=True)
class Migration:
    """One numbered schema change (``NNN_name.sql``)."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The packaged migrations, in version order."""
    found: list[Migration] = []
    folder = resources.files("commandnet.adapters").joinpath("sql", "postgres")
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version number: {versions}")
    return found


async def apply_migrations(conn: asyncpg.Connection) -> list[int]:
    """Apply the missing migrations in one transaction; the versions applied (maybe none).

    Safe when several workers start at once: the first takes a transaction-scoped advisory lock,
    the others wait for it and then find nothing left to do.
    """
    known = migrations()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=_DDL)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        newest = max((m.version for m in known), default=0)
        if applied and max(applied) > newest:
            raise MigrationError(
                f"database schema version {max(applied)} is newer than this commandnet "
                f"understands ({newest}); upgrade commandnet")
        done: list[int] = []
        for migration in known:
            if migration.version in applied:
                continue
            try:
                await conn.execute(migration.sql, timeout=_DDL)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version:03d}_{migration.name}.sql failed: {exc}"
                ) from exc
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
            done.append(migration.version)
        return done


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb <-> Python objects, as text (asyncpg's default is to leave JSON as str).
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


async def _no_reset(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset on release costs one round trip per call (RESET ALL, UNLISTEN,
    # ...); this store never changes session state, so there is nothing to reset.
    return None


class _Coalescer:
    """Runs one ``flush`` at a time; calls arriving meanwhile share the next one.

    Every worker clears one outbox row per transition; under load these become one DELETE for
    many rows instead of one round trip each. A caller returns once its rows are deleted (or
    gets the error), exactly as with a call of its own; at low load it costs no waiting.
    """

    def __init__(self, flush: Callable[[list[OutboxEntry]], Awaitable[None]]) -> None:
        self._flush = flush
        self._waiting: list[tuple[Sequence[OutboxEntry], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, entries: Sequence[OutboxEntry]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller cancelled while waiting must not leave an unretrieved error behind.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append((entries, done))
        if self._task is None:
            # A task of its own: cancelling one caller never cancels the others' delete.
            self._task = asyncio.create_task(self._drain(), name="commandnet-outbox-clear")
        await done

    async def _drain(self) -> None:
        batch: list[tuple[Sequence[OutboxEntry], asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await self._flush([e for entries, _ in batch for e in entries])
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
                batch = []
        finally:
            self._task = None
            # Cancelled (the loop is shutting down): no caller may wait for ever.
            for _, done in [*batch, *self._waiting]:
                if not done.done():
                    done.cancel()
            self._waiting = []


def _unstorable(agent_id: str, node: str, exc: Exception) -> ContextValidationError:
    # jsonb holds neither NaN/Infinity nor the character U+0000, which Python's json accepts.
    detail = " ".join(str(exc).split())
    return ContextValidationError(
        f"agent {agent_id!r}: the context for node {node!r} cannot be stored in PostgreSQL "
        f"jsonb ({detail}); NaN, Infinity and U+0000 are not JSON")


def _record(row: asyncpg.Record) -> AgentRecord:
    return AgentRecord(
        agent_id=row["agent_id"], node=row["node"], step=row["step"],
        status=AgentStatus(row["status"]), context=row["context"],
        start_node=row["start_node"], initial_context=row["initial_context"],
        attempts=row["attempts"], error=row["error"], lease_owner=row["lease_owner"],
        lease_until=row["lease_until"], created_at=row["created_at"],
        updated_at=row["updated_at"], pool=row["pool"], crashes=row["crashes"],
    )


class PostgresPersistence(Persistence):
    """A store in a PostgreSQL database reached through an asyncpg pool.

    ``commit_clears_outbox``: :meth:`save_state` also deletes the committed step's own outbox
    row, so a bus may hand a step over locally and leave that row as its recovery path.

    ``dsn`` is a libpq URL (``postgresql://user:pass@host:5432/db``). ``apply_migrations``
    False leaves the schema to ``commandnet migrate`` (setup then only checks it is current).
    ``soft_commits`` False makes leases and outbox clean-up durable too (one pool, three WAL
    flushes per transition). ``min_size``/``max_size`` apply to each of the two pools.
    ``command_timeout`` bounds every statement, so a database that vanished without closing
    the connection (a partition) fails the call instead of hanging it. Extra keyword arguments
    go to :func:`asyncpg.create_pool` (``statement_cache_size=0`` behind PgBouncer in
    transaction mode older than 1.21).
    """

    commit_clears_outbox = True

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        apply_migrations: bool = True,
        soft_commits: bool = True,
        command_timeout: float | None = 60.0,
        **pool_options: Any,
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.apply_migrations = apply_migrations
        self.soft_commits = soft_commits
        self.pool_options = {"command_timeout": command_timeout, **pool_options}
        self._pool: asyncpg.Pool | None = None
        self._soft_pool: asyncpg.Pool | None = None
        self._clearer = _Coalescer(self._delete_outbox)

    # ------------------------------------------------------------ connection

    @override
    async def setup(self) -> None:
        if self._pool is not None:
            return
        pool = await self._create_pool()
        try:
            async with pool.acquire() as conn:
                if self.apply_migrations:
                    await apply_migrations(conn)
                else:
                    await self._check_schema(conn)
            soft = await self._create_pool(synchronous_commit="off") if self.soft_commits else pool
        except BaseException:
            await pool.close()
            raise
        self._pool, self._soft_pool = pool, soft

    async def _create_pool(self, **settings: str) -> asyncpg.Pool:
        options = dict(self.pool_options)
        options["server_settings"] = {**options.get("server_settings", {}), **settings}
        return await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size,
            init=_init_connection, reset=_no_reset, **options)

    async def _check_schema(self, conn: asyncpg.Connection) -> None:
        newest = max(m.version for m in migrations())
        try:
            current = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        except asyncpg.UndefinedTableError:
            current = None
        if current != newest:
            raise MigrationError(
                f"database schema version {current} but this commandnet needs {newest}: run "
                "`commandnet migrate --store URL` (or let the worker apply migrations)")

    @override
    async def close(self) -> None:
        pools = {p for p in (self._pool, self._soft_pool) if p is not None}
        self._pool = self._soft_pool = None
        for pool in pools:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (``setup()`` creates it)."""
        if self._pool is None:
            raise CommandNetError("PostgresPersistence used before setup() (or after close())")
        return self._pool

    @property
    def soft_pool(self) -> asyncpg.Pool:
        """The pool for statements a crash may forget (``synchronous_commit = off``)."""
        if self._soft_pool is None:
            raise CommandNetError("PostgresPersistence used before setup() (or after close())")
        return self._soft_pool

    # ------------------------------------------------------------ protocol

    @override
    async def create_agent(self, agent: NewAgent) -> bool:
        try:
            row = await self.pool.fetchrow(SQL_CREATE, agent.agent_id, agent.start_node,
                                           agent.status.value, agent.context, agent.error,
                                           agent.pool)
        except asyncpg.DataError as exc:
            raise _unstorable(agent.agent_id, agent.start_node, exc) from exc
        if row is None:  # a concurrent trigger committed after our snapshot: read it now
            row = await self.pool.fetchrow(SQL_EXISTING, agent.agent_id)
            if row is None:
                raise CommandNetError(f"agent {agent.agent_id!r}: trigger neither inserted nor "
                                      "found (was it deleted concurrently?)")
        elif row["created"]:
            return True
        if row["start_node"] == agent.start_node and row["initial_context"] == agent.context:
            return False
        raise TriggerConflictError.between(
            agent.agent_id, (row["start_node"], row["initial_context"]),
            (agent.start_node, agent.context))

    @override
    async def load_and_lock_agent(
        self, agent_id: str, step: int, owner: str, lease_seconds: float, pool: str = "default",
        alone: bool = False,
    ) -> Lease:
        row = await self.soft_pool.fetchrow(SQL_LEASE, agent_id, step, owner,
                                           float(lease_seconds), pool, alone)
        if row is None:
            return Lease(LeaseState.MISSING)
        state = LeaseState(row["state"])
        if state is LeaseState.GRANTED:
            return Lease(state, _record(row))
        if state is LeaseState.BUSY:
            return Lease(state, retry_after=row["retry_after"])
        return Lease(state)

    @override
    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        done = await self.soft_pool.fetchval(SQL_EXTEND, agent_id, step, owner,
                                             float(lease_seconds))
        return bool(done)

    @override
    async def save_state(self, commit: Commit) -> bool:
        try:
            moved = await self.pool.fetchval(
                SQL_COMMIT, commit.agent_id, commit.step, commit.owner, commit.from_node,
                commit.to_node, commit.context, commit.attempts, float(commit.duration))
        except asyncpg.DataError as exc:
            raise _unstorable(commit.agent_id, commit.to_node or commit.from_node, exc) from exc
        return bool(moved)

    @override
    async def record_failure(self, failure: Failure) -> bool:
        done = await self.pool.fetchval(
            SQL_FAILURE, failure.agent_id, failure.step, failure.owner, failure.attempts,
            failure.error, failure.final, float(failure.retry_in))
        return bool(done)

    @override
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        await self.soft_pool.execute(SQL_RELEASE, agent_id, step, owner)

    @override
    async def cancel_agent(self, agent_id: str, reason: str, pool: str = "default") -> bool:
        return bool(await self.pool.fetchval(SQL_CANCEL, agent_id, reason, pool))

    @override
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        row = await self.pool.fetchrow(SQL_GET, agent_id)
        return None if row is None else _record(row)

    @override
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        rows = await self.pool.fetch(SQL_HISTORY, agent_id)
        return [HistoryRecord(r["agent_id"], r["step"], r["from_node"], r["to_node"],
                              r["attempts"], r["duration"], r["at"]) for r in rows]

    @override
    async def pending_outbox(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        rows = await self.soft_pool.fetch(SQL_PENDING, float(older_than), limit, pool)
        return [OutboxEntry(r["agent_id"], r["step"], r["created_at"]) for r in rows]

    @override
    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            await self._clearer.submit(entries)

    async def _delete_outbox(self, entries: list[OutboxEntry]) -> None:
        await self.soft_pool.execute(SQL_CLEAR, [e.agent_id for e in entries],
                                     [e.step for e in entries])

    @override
    async def stalled_agents(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        sql = SQL_STALLED.format(pool="$3::text IS NULL" if pool is None else "pool = $3")
        rows = await self.soft_pool.fetch(sql, float(older_than), limit, pool)
        found = [OutboxEntry(r["agent_id"], r["step"], r["created_at"]) for r in rows]
        return sorted(found, key=lambda e: e.created_at)

    @override
    async def claim_sweep(self, pool: str, owner: str, seconds: float) -> SweepClaim | None:
        row = await self.soft_pool.fetchrow(SQL_CLAIM_SWEEP, pool, owner, float(seconds))
        return None if row is None else SweepClaim(row["now"], row["resynced_until"])

    @override
    async def mark_resynced(self, pool: str, until: float) -> None:
        await self.soft_pool.execute(SQL_MARK_RESYNCED, pool, float(until))

    @override
    async def changed_agents(
        self, pool: str, after: tuple[float, str], until: float, limit: int
    ) -> list[AgentRecord]:
        rows = await self.pool.fetch(SQL_CHANGED, pool, float(after[0]), after[1], float(until),
                                     limit)
        return [_record(r) for r in rows]
