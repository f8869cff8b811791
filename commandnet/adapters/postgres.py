"""PostgreSQL store (asyncpg): the production store, shared by every worker of every pool.

Each method is ONE statement sent as one round trip on a pooled connection that is returned at
once (no connection is held while a node runs); statements are prepared once per connection and
cached by asyncpg. Multi-table changes (create, commit, wake, resume) are single statements with
data-modifying CTEs, so they are atomic without an explicit transaction. The two exceptions
serialise on the agent's row: a signal, and a commit that starts a signal wait, each lock the row
first and read the signals in a later statement of the same transaction (one statement would read
them in a snapshot taken before its lock wait, and could miss a signal: a lost wake-up). Times
come from the database clock (``now()``) and are returned as epoch seconds. Connection errors
propagate: the engine nacks the message and the bus redelivers it later.

Only what must survive a crash waits for the WAL flush: creating, committing, failing,
cancelling, waking, signalling and resuming agents. Leases (take, extend, release) and outbox
clean-up run on a second pool whose sessions have ``synchronous_commit = off``: they are visible
to every worker at once, and a crash of the database may forget only the last few of them, which
the protocol already tolerates (a forgotten lease is a lease that expired, and a commit fenced
by it fails because the crash dropped its connection; a forgotten outbox delete is re-published
by the sweeper and dropped as a duplicate or stale event). A transition therefore costs one
durable flush, not three; and under load less than one, as plain moves and outbox deletes that
arrive while earlier ones are being written share the next statement (group commit,
``commandnet.adapters.batching``): each row still fenced on its own, each caller back only once
its statement has committed.

Schema migrations are numbered files in ``sql/postgres/``, applied by :meth:`setup` (or
``commandnet migrate``) under an advisory lock, recorded in ``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from typing_extensions import override

from ..errors import CommandNetError, ContextValidationError
from ..leasing.kept import kept_lease
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
    SignalOutcome,
    SweepClaim,
    branch_id,
)
from ..workflow.records import PARENT_CANCELLED, SIBLING_FAILED
from .batching import Batcher
from .conflict import trigger_conflict

# pg_advisory_xact_lock key for migrations: "cmdnet" in ASCII, shared by every commandnet worker.
MIGRATION_LOCK = 0x636D646E6574
_DDL = 24 * 3600.0  # migrations may wait for another worker's, or rewrite big tables


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8"


def _columns(payload: str = "payload") -> str:
    """The columns of an AgentRecord; ``payload``: the expression that gives the payload."""
    return (
        "agent_id, node, step, status, context, start_node, initial_context, attempts, error, "
        f"lease_owner, {_epoch('lease_until')} AS lease_until, "
        f"{_epoch('created_at')} AS created_at, {_epoch('updated_at')} AS updated_at, pool, "
        f"crashes, {payload}, {_epoch('wake_at')} AS wake_at, waiting_signal AS waiting, "
        "parent_id, joining, graph_version")


_RECORD = _columns()
# A NULL for each column of _RECORD (typed where a UNION needs it), for rows without a record.
_NO_RECORD = ", ".join(["NULL"] * 4 + ["NULL::jsonb", "NULL", "NULL::jsonb"] + ["NULL"] * 8
                       + ["NULL::jsonb", "NULL::float8", "NULL::text", "NULL::text",
                          "NULL::integer", "NULL::text"])
_FENCE = "agent_id = $1 AND step = $2 AND status = 'running' AND lease_owner = $3"
_PARKED = "(wake_at IS NOT NULL OR waiting_signal IS NOT NULL OR joining IS NOT NULL)"
# At a fan-out's join step, the payload is the branches' results in branch order.
_JOIN_PAYLOAD = """CASE WHEN agents.join_step = agents.step THEN (
    SELECT coalesce(jsonb_agg(jsonb_build_object('agent_id', b.agent_id, 'status', b.status,
        'node', b.node, 'context', b.context, 'error', b.error) ORDER BY b.branch_index),
        '[]'::jsonb)
    FROM agents b WHERE b.parent_id = agents.agent_id AND b.parent_step = agents.step)
    ELSE agents.payload END AS payload"""

# One row: (true, NULL, NULL) when created, or (false, start_node, initial_context). No row
# means a concurrent trigger of the same id was not yet visible to this statement's snapshot.
# A cancel tombstone (empty start node) takes the request but stays cancelled, with no event.
SQL_CREATE = """
WITH ins AS (
    INSERT INTO agents (agent_id, node, step, status, context, start_node, initial_context,
                        error, created_at, updated_at, pool, payload, graph_version)
    VALUES ($1, $2, 0, $3, $4::jsonb, $2, $4::jsonb, $5, now(), now(), $6, $7::jsonb, $8)
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
# redelivery then sees the truth). A parked agent's step is STALE: wake_due publishes it again.
# The pool is compared with IS NOT DISTINCT FROM (the same for a NOT NULL column) because that
# cannot use an index: the row must be found by its primary key. With statistics not yet
# gathered (a burst of triggers before autovacuum's ANALYZE) a plain `pool = $5` let the
# planner pick agents_running_updated (pool, updated_at) and scan every running agent of the
# pool: 11 ms a lease at 100,000 agents instead of 0.1 ms (make bench-scale).
SQL_LEASE = f"""
WITH granted AS (
    UPDATE agents SET lease_owner = $3, lease_until = now() + $4::float8 * interval '1 second',
        attempts = attempts + 1 - (lease_owner IS NOT NULL AND NOT lease_alone)::int,
        crashes = crashes + (lease_owner IS NOT NULL)::int,
        lease_alone = $6 AND (crashes > 0 OR lease_owner IS NOT NULL)
    WHERE agent_id = $1 AND step = $2 AND status = 'running' AND pool IS NOT DISTINCT FROM $5
      AND (lease_until IS NULL OR lease_until <= now()) AND NOT {_PARKED}
    RETURNING {_columns(_JOIN_PAYLOAD)}
)
SELECT 'granted' AS state, 0.0::float8 AS retry_after, granted.* FROM granted
UNION ALL
SELECT CASE WHEN a.pool <> $5 THEN 'foreign'
            WHEN a.status <> 'running' OR a.step <> $2 OR a.wake_at IS NOT NULL
                 OR a.waiting_signal IS NOT NULL OR a.joining IS NOT NULL THEN 'stale'
            ELSE 'busy' END,
       greatest(coalesce({_epoch('a.lease_until - now()')}, 0.0), 0.0),
       {_NO_RECORD}
FROM agents a
WHERE a.agent_id = $1 AND NOT EXISTS (SELECT 1 FROM granted)
"""

SQL_EXTEND = f"""
UPDATE agents SET lease_until = now() + $4::float8 * interval '1 second'
WHERE {_FENCE} RETURNING true
"""

# The row a statement changed (a CTE: agent_id, status, error, parent_id, parent_step), if it
# ended a branch, counts down its parent's join if the parent still waits there; at 0
# the parent is due (wake_due writes its event). Fail fast: a branch that did not succeed
# fails the parent, naming it; the caller then cancels the siblings in a statement of its own
# (SQL_CANCEL_CHILDREN: taking their locks here, after the parent's, could deadlock with a
# sibling's commit, which locks itself, then the parent). The parent's row lock serialises
# concurrent countdowns.
_FAIL_FAST = "(e.status <> 'succeeded' AND p.join_policy = 'fail_fast')"


def _join_countdown(ended: str = "ended") -> str:
    """The countdown CTE, reading the changed row from CTE ``ended``."""
    return f"""
parent AS (
    UPDATE agents p SET
        status = CASE WHEN {_FAIL_FAST} THEN 'failed' ELSE 'running' END,
        error = CASE WHEN {_FAIL_FAST} THEN format('branch %L %s: %s', e.agent_id, e.status,
                                                   e.error) ELSE p.error END,
        joining = CASE WHEN NOT {_FAIL_FAST} AND p.joining > 1 THEN p.joining - 1 END,
        wake_at = CASE WHEN NOT {_FAIL_FAST} AND p.joining <= 1 THEN now() END,
        updated_at = now()
    FROM {ended} e
    WHERE e.status <> 'running' AND e.parent_id IS NOT NULL AND p.agent_id = e.parent_id
      AND p.status = 'running' AND p.joining IS NOT NULL AND p.join_step = e.parent_step
      AND p.step = e.parent_step
    RETURNING p.agent_id, p.status
)"""


# What a statement ending an agent returns besides its own count: the parent it failed.
_FAILED_PARENT = "(SELECT agent_id FROM parent WHERE status = 'failed') AS failed_parent"

# The transition: fenced UPDATE, history row, (unless final) the next step's outbox event and
# the end of this step's own outbox row (left in place when the bus handed the step over
# locally instead of publishing it; usually gone already), one statement, hence one
# transaction and one round trip. A timer ($10: wake in seconds) parks the agent instead of
# writing the event: wake_due writes it when the time has come. $12 (seconds; the caller
# passes it for a plain move only): the owner keeps the next step's lease, its attempt counted.
SQL_COMMIT = f"""
WITH moved AS (
    UPDATE agents SET
        node = coalesce($5::text, node), step = $2 + 1,
        status = CASE WHEN $5::text IS NULL THEN 'succeeded' ELSE 'running' END,
        context = $6::jsonb, payload = $9::jsonb, attempts = ($12::float8 IS NOT NULL)::int,
        crashes = 0, error = NULL, lease_alone = false,
        lease_owner = CASE WHEN $12::float8 IS NOT NULL THEN $3 END,
        lease_until = now() + $12::float8 * interval '1 second', updated_at = now(),
        wake_at = CASE WHEN $5::text IS NOT NULL
                       THEN now() + $10::float8 * interval '1 second' END,
        graph_version = coalesce($11::text, graph_version)
    WHERE {_FENCE}
    RETURNING agent_id, status, error, parent_id, parent_step
), hist AS (
    INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at)
    SELECT agent_id, $2 + 1, $4, $5::text, $7, $8, now() FROM moved
), event AS (
    INSERT INTO outbox (agent_id, step, created_at)
    SELECT agent_id, $2 + 1, now() FROM moved WHERE $5::text IS NOT NULL AND $10::float8 IS NULL
), done AS (
    DELETE FROM outbox o USING moved WHERE o.agent_id = moved.agent_id AND o.step = $2
), {_join_countdown("moved")}
SELECT (SELECT count(*) FROM moved) AS moved, {_FAILED_PARENT}
"""
# Plain moves (the next step runs at once, nothing parks or ends) of many agents in one statement
# and one transaction (group commit, PostgresPersistence._commit_moves), each row fenced as in
# SQL_COMMIT. The rows are found by primary key whatever the statistics say: agent_id = ANY
# (estimated from the array) and a status test no partial index can serve (before ANALYZE the
# planner took agents_running_updated and read every running agent); batches stay small enough
# (Batcher limit) that the planner keeps to the index.
SQL_COMMIT_MOVES = """
WITH moved AS (
    UPDATE agents a SET
        node = i.to_node, step = i.step + 1, status = 'running', context = i.context,
        payload = i.payload, attempts = (i.keep IS NOT NULL)::int, crashes = 0, error = NULL,
        lease_alone = false, lease_owner = CASE WHEN i.keep IS NOT NULL THEN i.owner END,
        lease_until = now() + i.keep * interval '1 second', updated_at = now(), wake_at = NULL,
        graph_version = coalesce(i.graph_version, a.graph_version)
    FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                $7::int[], $8::float8[], $9::jsonb[], $10::text[], $11::float8[])
        AS i (agent_id, step, owner, from_node, to_node, context, attempts, duration, payload,
              graph_version, keep)
    WHERE a.agent_id = ANY($1::text[]) AND a.agent_id = i.agent_id AND a.step = i.step
        AND a.status IS NOT DISTINCT FROM 'running' AND a.lease_owner = i.owner
    RETURNING a.agent_id, a.step, i.from_node, i.to_node, i.attempts, i.duration
), hist AS (
    INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at)
    SELECT agent_id, step, from_node, to_node, attempts, duration, now() FROM moved
), event AS (
    INSERT INTO outbox (agent_id, step, created_at) SELECT agent_id, step, now() FROM moved
), done AS (
    DELETE FROM outbox o USING moved WHERE o.agent_id = moved.agent_id AND o.step = moved.step - 1
)
SELECT agent_id FROM moved
"""

# The end of a transition that parks the agent (a wait, a fan-out): its history row and the
# end of this step's own outbox row; the event is wake_due's to write.
_PARKING_TAIL = """hist AS (
    INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at)
    SELECT agent_id, $2 + 1, $4, $5, $7, $8, now() FROM moved
), done AS (
    DELETE FROM outbox o USING moved WHERE o.agent_id = moved.agent_id AND o.step = $2
)
SELECT count(*) FROM moved"""

# A transition that fans out ($10: a JSON array of {id, node, context}, joined by policy
# $11): the parent parks at its join ($5) counting its branches (none: due at once), and each
# branch is created as a running agent of the same pool with its step 0 event.
SQL_COMMIT_FANOUT = f"""
WITH moved AS (
    UPDATE agents SET node = $5, step = $2 + 1, status = 'running', context = $6::jsonb,
        payload = $9::jsonb, attempts = 0, crashes = 0, error = NULL, lease_owner = NULL,
        lease_until = NULL, updated_at = now(),
        joining = nullif(jsonb_array_length($10::jsonb), 0),
        wake_at = CASE WHEN jsonb_array_length($10::jsonb) = 0 THEN now() END,
        join_step = $2 + 1, join_policy = $11,
        graph_version = coalesce($12::text, graph_version)
    WHERE {_FENCE}
    RETURNING agent_id, pool, graph_version
), branches AS (
    INSERT INTO agents (agent_id, node, step, status, context, start_node, initial_context,
                        created_at, updated_at, pool, parent_id, parent_step, branch_index,
                        graph_version)
    SELECT b.item->>'id', b.item->>'node', 0, 'running', b.item->'context', b.item->>'node',
           b.item->'context', now(), now(), moved.pool, moved.agent_id, $2 + 1, b.i - 1,
           moved.graph_version
    FROM moved, jsonb_array_elements($10::jsonb) WITH ORDINALITY AS b (item, i)
    RETURNING agent_id
), events AS (
    INSERT INTO outbox (agent_id, step, created_at) SELECT agent_id, 0, now() FROM branches
), {_PARKING_TAIL}
"""

# A transition that waits for a signal ($11, until $10 seconds if not NULL, then $12), run in
# a transaction after SQL_LOCK_FENCED has locked the agent's row: this statement's snapshot is
# taken after the lock, so it sees every signal committed before (signal_agent locks the row
# too). The oldest kept signal of the name is consumed at once, making the agent due now with
# its payload; otherwise the agent parks. No event either way: wake_due writes it.
SQL_LOCK_FENCED = f"SELECT true FROM agents WHERE {_FENCE} FOR UPDATE"
SQL_COMMIT_WAIT = f"""
WITH sig AS (
    SELECT signal_id, payload FROM signals
    WHERE agent_id = $1 AND name = $11 AND consumed_step IS NULL
    ORDER BY created_at, signal_id LIMIT 1
), used AS (
    UPDATE signals s SET consumed_step = $2 + 1 FROM sig
    WHERE s.agent_id = $1 AND s.signal_id = sig.signal_id
), moved AS (
    UPDATE agents SET
        node = $5, step = $2 + 1, status = 'running', context = $6::jsonb,
        payload = CASE WHEN sig.signal_id IS NULL THEN $9::jsonb ELSE sig.payload END,
        attempts = 0, crashes = 0, error = NULL, lease_owner = NULL, lease_until = NULL,
        updated_at = now(),
        waiting_signal = CASE WHEN sig.signal_id IS NULL THEN $11 END,
        timeout_node = CASE WHEN sig.signal_id IS NULL THEN $12::text END,
        wake_at = CASE WHEN sig.signal_id IS NULL
                       THEN now() + $10::float8 * interval '1 second' ELSE now() END,
        graph_version = coalesce($13::text, graph_version)
    FROM (VALUES (true)) AS one (x) LEFT JOIN sig ON true
    WHERE {_FENCE}
    RETURNING agent_id
), {_PARKING_TAIL}
"""

SQL_FAILURE = f"""
WITH ended AS (
    UPDATE agents SET
        attempts = $4, error = $5, lease_owner = NULL,
        lease_until = CASE WHEN $6 THEN NULL ELSE now() + $7::float8 * interval '1 second' END,
        status = CASE WHEN $6 THEN 'failed' ELSE 'running' END, updated_at = now()
    WHERE {_FENCE}
    RETURNING agent_id, status, error, parent_id, parent_step
), {_join_countdown()}
SELECT (SELECT count(*) FROM ended) AS moved, {_FAILED_PARENT}
"""

SQL_RELEASE = f"""
UPDATE agents SET lease_owner = NULL, lease_until = NULL, attempts = greatest(attempts - 1, 0)
WHERE {_FENCE}
"""

# A running agent is cancelled (a branch counts down its parent's join); an unknown id gets a
# tombstone its trigger will respect. The caller then cancels its branches (SQL_CANCEL_CHILDREN).
SQL_CANCEL = f"""
WITH ended AS (
    INSERT INTO agents (agent_id, node, step, status, context, start_node, initial_context,
                        error, created_at, updated_at, pool)
    VALUES ($1, '', 0, 'cancelled', '{{}}'::jsonb, '', '{{}}'::jsonb, $2, now(), now(), $3)
    ON CONFLICT (agent_id) DO UPDATE SET status = 'cancelled', error = $2, lease_owner = NULL,
        lease_until = NULL, wake_at = NULL, waiting_signal = NULL, timeout_node = NULL,
        joining = NULL, updated_at = now()
    WHERE agents.status = 'running'
    RETURNING agent_id, status, error, parent_id, parent_step
), {_join_countdown()}
SELECT (SELECT count(*) FROM ended) AS moved, {_FAILED_PARENT}
"""

# The running children of the agents $1 whose parent has ended (failed or cancelled) are
# cancelled with reason $2; the caller repeats with the ids returned, one generation a
# statement (a statement never holds a child's lock while it waits for its parent's, the order
# a commit takes them in, so there is no deadlock).
SQL_CANCEL_CHILDREN = """
UPDATE agents c SET status = 'cancelled', error = $2, lease_owner = NULL, lease_until = NULL,
    wake_at = NULL, waiting_signal = NULL, timeout_node = NULL, joining = NULL,
    updated_at = now()
FROM agents p
WHERE c.parent_id = ANY($1::text[]) AND c.status = 'running' AND p.agent_id = c.parent_id
  AND p.status IN ('failed', 'cancelled')
RETURNING c.agent_id
"""

# A signal, in a transaction after SQL_SIGNAL_LOCK has locked the agent's row (so a commit
# that starts a wait either saw the signal or is seen waiting here). $5: the step that
# consumes it when the agent waits for the name, else NULL (the signal is kept).
SQL_SIGNAL_LOCK = """
SELECT status, step, waiting_signal, start_node FROM agents WHERE agent_id = $1 FOR UPDATE
"""
SQL_SIGNAL = """
WITH ins AS (
    INSERT INTO signals (agent_id, signal_id, name, payload, created_at, consumed_step)
    VALUES ($1, $3, $2, $4::jsonb, now(), $5)
    ON CONFLICT (agent_id, signal_id) DO NOTHING
    RETURNING consumed_step
), delivered AS (
    UPDATE agents SET payload = $4::jsonb, waiting_signal = NULL, timeout_node = NULL,
        wake_at = now(), updated_at = now()
    WHERE agent_id = $1 AND EXISTS (SELECT 1 FROM ins WHERE consumed_step IS NOT NULL)
)
SELECT count(*) FROM ins
"""

# Due parked agents of pool $1 (at most $2, oldest first; rows another worker is waking are
# skipped): a signal wait that ran out moves to its timeout node (none: it stays on its node) at
# the next step (a timeout history row); every one is unparked and its step event written to
# the outbox.
SQL_WAKE = f"""
WITH due AS (
    SELECT agent_id, node, wake_at, waiting_signal IS NOT NULL AS timed_out,
           coalesce(nullif(timeout_node, ''), node) AS timeout_node
    FROM agents
    WHERE pool = $1 AND wake_at IS NOT NULL AND wake_at <= now() AND status = 'running'
    ORDER BY wake_at LIMIT $2
    FOR UPDATE SKIP LOCKED
), woke AS (
    UPDATE agents a SET
        node = CASE WHEN due.timed_out THEN due.timeout_node ELSE a.node END,
        step = a.step + due.timed_out::int,
        payload = CASE WHEN due.timed_out THEN NULL ELSE a.payload END,
        attempts = CASE WHEN due.timed_out THEN 0 ELSE a.attempts END,
        wake_at = NULL, waiting_signal = NULL, timeout_node = NULL, updated_at = now()
    FROM due WHERE a.agent_id = due.agent_id
    RETURNING a.agent_id, a.step, due.node AS from_node, a.node AS to_node, due.timed_out,
              due.wake_at
), hist AS (
    INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at, kind)
    SELECT agent_id, step, from_node, to_node, 0, 0.0, now(), 'timeout' FROM woke
    WHERE timed_out
), event AS (
    INSERT INTO outbox (agent_id, step, created_at)
    SELECT agent_id, step, now() FROM woke
    ON CONFLICT (agent_id, step) DO NOTHING
)
SELECT agent_id, step, {_epoch('now()')} AS created_at FROM woke ORDER BY wake_at, agent_id
"""

# A failed or cancelled agent (not a cancel tombstone) of pool $4 runs again from node $2 with
# context $3 at the next step: a resume history row and the step's event. The locking CTE
# reads the row as it is once locked (the node it leaves).
SQL_RESUME = """
WITH old AS (
    SELECT agent_id, node, step FROM agents
    WHERE agent_id = $1 AND status IN ('failed', 'cancelled') AND pool = $4
      AND start_node <> ''
    FOR UPDATE
), moved AS (
    UPDATE agents a SET status = 'running', node = $2, step = old.step + 1, context = $3::jsonb,
        payload = NULL, error = NULL, attempts = 0, crashes = 0, lease_owner = NULL,
        lease_until = NULL, lease_alone = false, wake_at = NULL, waiting_signal = NULL,
        timeout_node = NULL, joining = NULL, republished_at = NULL, updated_at = now()
    FROM old WHERE a.agent_id = old.agent_id
    RETURNING a.agent_id, a.step, old.node AS from_node
), hist AS (
    INSERT INTO history (agent_id, step, from_node, to_node, attempts, duration, at, kind)
    SELECT agent_id, step, from_node, $2, 0, 0.0, now(), 'resume' FROM moved
), event AS (
    INSERT INTO outbox (agent_id, step, created_at)
    SELECT agent_id, step, now() FROM moved
    ON CONFLICT (agent_id, step) DO NOTHING
)
SELECT count(*) FROM moved
"""

SQL_GET = f"SELECT {_RECORD} FROM agents WHERE agent_id = $1"

SQL_HISTORY = f"""
SELECT agent_id, step, from_node, to_node, attempts, duration, {_epoch('at')} AS at, kind
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
    WHERE status = 'running' AND {{pool}} AND NOT {_PARKED}
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
        payload=row["payload"], wake_at=row["wake_at"], waiting=row["waiting"],
        parent_id=row["parent_id"], joining=row["joining"], graph_version=row["graph_version"],
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
        self._clearer = Batcher(self._delete_outbox, name="commandnet-outbox-clear")
        self._mover = Batcher(self._commit_moves, concurrency=2, name="commandnet-commit")

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
                                           agent.pool, agent.payload, agent.graph_version)
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
        raise trigger_conflict(
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
        if commit.plain:  # group-committed
            return await self._mover.submit(commit)
        return await self._save_one(commit)

    async def _save_one(self, commit: Commit) -> bool:
        wake_in = None if commit.wake_in is None else float(commit.wake_in)
        args = (commit.agent_id, commit.step, commit.owner, commit.from_node, commit.to_node,
                commit.context, commit.attempts, float(commit.duration), commit.payload)
        try:
            if commit.to_node is not None and commit.waiting is not None:
                return bool(await self._commit_wait(commit, wake_in))
            if commit.to_node is not None and wake_in is None and commit.branches is not None:
                branches = [{"id": branch_id(commit.agent_id, commit.step + 1, i),
                             "node": b.node, "context": b.context}
                            for i, b in enumerate(commit.branches)]
                return bool(await self.pool.fetchval(SQL_COMMIT_FANOUT, *args, branches,
                                                     commit.join_policy, commit.graph_version))
            row = await self.pool.fetchrow(SQL_COMMIT, *args, wake_in, commit.graph_version,
                                           kept_lease(commit))
        except asyncpg.DataError as exc:
            raise _unstorable(commit.agent_id, commit.to_node or commit.from_node, exc) from exc
        return await self._ended(row)

    async def _commit_moves(self, commits: list[Commit]) -> list[bool | Exception]:
        """Plain moves of many agents in one statement (SQL_COMMIT_MOVES). One commit alone,
        a second commit of an agent (one UPDATE cannot move a row twice), and each commit of a
        batch the database refused as a whole (a context jsonb cannot hold, a deadlock) take a
        statement of their own, so that an error reaches only its own caller."""
        batch: dict[str, Commit] = {}
        for commit in commits:
            batch.setdefault(commit.agent_id, commit)
        moved: set[str] | None = None
        if len(batch) > 1:
            rows = list(batch.values())
            with contextlib.suppress(asyncpg.DataError, asyncpg.TransactionRollbackError):
                moved = {r["agent_id"] for r in await self.pool.fetch(
                    SQL_COMMIT_MOVES, [c.agent_id for c in rows], [c.step for c in rows],
                    [c.owner for c in rows], [c.from_node for c in rows],
                    [c.to_node for c in rows], [c.context for c in rows],
                    [c.attempts for c in rows], [float(c.duration) for c in rows],
                    [c.payload for c in rows], [c.graph_version for c in rows],
                    [kept_lease(c) for c in rows])}
        outcomes: list[bool | Exception] = []
        for commit in commits:
            if moved is not None and batch[commit.agent_id] is commit:
                outcomes.append(commit.agent_id in moved)
                continue
            try:
                outcomes.append(await self._save_one(commit))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _ended(self, row: asyncpg.Record) -> bool:
        """After a statement that may have ended an agent: when it failed its parent's join
        (fail fast), cancel the parent's other branches. Whether the statement changed a row."""
        if row["failed_parent"] is not None:
            await self._cancel_children(row["failed_parent"], SIBLING_FAILED)
        return bool(row["moved"])

    async def _cancel_children(self, agent_id: str, reason: str) -> None:
        """Cancel the running branches of the ended ``agent_id`` and theirs, one generation a
        statement. A crash between generations leaves some running to their end (their parent
        has ended: nothing waits for them); cancelling the agent again finishes the job."""
        ids = [agent_id]
        while ids:
            rows = await self.pool.fetch(SQL_CANCEL_CHILDREN, ids, reason)
            ids, reason = [r["agent_id"] for r in rows], PARENT_CANCELLED

    async def _commit_wait(self, commit: Commit, wake_in: float | None) -> int:
        # Lock first, then look for a kept signal in a statement of its own: in one statement
        # the signal lookup would use a snapshot from before the lock wait and could miss a
        # signal committed meanwhile (a lost wake-up).
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(SQL_LOCK_FENCED, commit.agent_id, commit.step,
                                       commit.owner):
                return 0
            moved: int = await conn.fetchval(
                SQL_COMMIT_WAIT, commit.agent_id, commit.step, commit.owner, commit.from_node,
                commit.to_node, commit.context, commit.attempts, float(commit.duration),
                commit.payload, wake_in, commit.waiting, commit.timeout_node,
                commit.graph_version)
            return moved

    @override
    async def record_failure(self, failure: Failure) -> bool:
        return await self._ended(await self.pool.fetchrow(
            SQL_FAILURE, failure.agent_id, failure.step, failure.owner, failure.attempts,
            failure.error, failure.final, float(failure.retry_in)))

    @override
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        await self.soft_pool.execute(SQL_RELEASE, agent_id, step, owner)

    @override
    async def wake_due(self, pool: str, limit: int) -> list[OutboxEntry]:
        rows = await self.pool.fetch(SQL_WAKE, pool, limit)
        return [OutboxEntry(r["agent_id"], r["step"], r["created_at"]) for r in rows]

    @override
    async def signal_agent(self, agent_id: str, name: str, signal_id: str,
                           payload: Any) -> SignalOutcome:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(SQL_SIGNAL_LOCK, agent_id)
                if row is None or not row["start_node"]:  # a cancel tombstone: no agent yet
                    return SignalOutcome.MISSING
                if row["status"] != AgentStatus.RUNNING.value:
                    return SignalOutcome.FINAL
                deliver = row["waiting_signal"] == name
                stored = await conn.fetchval(SQL_SIGNAL, agent_id, name, signal_id, payload,
                                             row["step"] if deliver else None)
        except asyncpg.DataError as exc:
            raise ContextValidationError(
                f"agent {agent_id!r}: the payload of signal {name!r} cannot be stored in "
                f"PostgreSQL jsonb ({' '.join(str(exc).split())}); NaN, Infinity and U+0000 "
                "are not JSON") from exc
        if not stored:
            return SignalOutcome.DUPLICATE
        return SignalOutcome.DELIVERED if deliver else SignalOutcome.KEPT

    @override
    async def resume_agent(self, agent_id: str, node: str, context: dict[str, Any],
                           pool: str = "default") -> bool:
        try:
            moved = await self.pool.fetchval(SQL_RESUME, agent_id, node, context, pool)
        except asyncpg.DataError as exc:
            raise _unstorable(agent_id, node, exc) from exc
        return bool(moved)

    @override
    async def cancel_agent(self, agent_id: str, reason: str, pool: str = "default") -> bool:
        cancelled = await self._ended(await self.pool.fetchrow(SQL_CANCEL, agent_id, reason, pool))
        # Also when it had ended already: a crash may have stopped an earlier cascade.
        await self._cancel_children(agent_id, PARENT_CANCELLED)
        return cancelled

    @override
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        row = await self.pool.fetchrow(SQL_GET, agent_id)
        return None if row is None else _record(row)

    @override
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        rows = await self.pool.fetch(SQL_HISTORY, agent_id)
        return [HistoryRecord(r["agent_id"], r["step"], r["from_node"], r["to_node"],
                              r["attempts"], r["duration"], r["at"], r["kind"]) for r in rows]

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

    async def _delete_outbox(self, calls: list[Sequence[OutboxEntry]]) -> list[Exception | None]:
        entries = [e for entries in calls for e in entries]
        await self.soft_pool.execute(SQL_CLEAR, [e.agent_id for e in entries],
                                     [e.step for e in entries])
        return [None] * len(calls)

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
