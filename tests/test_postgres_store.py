"""PostgreSQL store beyond the shared contract: migrations, races between separate pools (as
between worker processes), statements per transition, an engine end to end, and a server that
is killed mid-run. All against a real server (tests.fixtures.postgres)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from commandnet import Engine, Node
from commandnet.adapters import postgres as pg
from commandnet.adapters.memory import InMemoryEventBus
from commandnet.adapters.postgres import MigrationError, PostgresPersistence, migrations
from commandnet.cli.migrate import migrate
from commandnet.errors import CommandNetError, ContextValidationError, TriggerConflictError
from commandnet.local.postgres import PostgresServer
from commandnet.records import AgentStatus, Commit, LeaseState, NewAgent, OutboxEntry

T = TypeVar("T")
NEWEST = max(m.version for m in migrations())


@pytest.fixture
async def stores(postgres_dsn: str) -> AsyncIterator[list[PostgresPersistence]]:
    """Three stores with pools of their own: three worker processes, as far as the DB knows."""
    made = [PostgresPersistence(postgres_dsn, min_size=1, max_size=8) for _ in range(3)]
    await asyncio.gather(*(s.setup() for s in made))
    yield made
    for store in made:
        await store.close()


# ------------------------------------------------------------------ migrations


async def test_migrations_are_packaged_and_numbered() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "initial" and "CREATE TABLE agents" in found[0].sql


async def test_concurrent_setup_applies_each_migration_once(postgres_dsn: str) -> None:
    workers = [PostgresPersistence(postgres_dsn, min_size=1, max_size=2) for _ in range(6)]
    try:
        await asyncio.gather(*(w.setup() for w in workers))
    finally:
        for w in workers:
            await w.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in migrations()]
        assert await pg.apply_migrations(conn) == []
        tables = {r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"agents", "history", "outbox", "schema_migrations"} <= tables
    finally:
        await conn.close()


async def test_newer_schema_is_refused(postgres_dsn: str) -> None:
    store = PostgresPersistence(postgres_dsn)
    await store.setup()
    await store.pool.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'x')")
    await store.close()
    with pytest.raises(MigrationError, match="999"):
        await PostgresPersistence(postgres_dsn).setup()


async def test_without_migrations_setup_names_the_migrate_command(postgres_dsn: str) -> None:
    with pytest.raises(MigrationError, match="commandnet migrate"):
        await PostgresPersistence(postgres_dsn, apply_migrations=False).setup()
    done = await asyncio.to_thread(CliRunner().invoke, migrate, ["--store", postgres_dsn])
    assert done.exit_code == 0, done.output
    store = PostgresPersistence(postgres_dsn, apply_migrations=False)
    await store.setup()
    assert await store.create_agent(NewAgent("a1", "Start", {}))
    await store.close()


def test_migrate_command_is_idempotent(postgres_dsn: str) -> None:
    first = CliRunner().invoke(migrate, ["--store", postgres_dsn])
    assert first.exit_code == 0, first.output
    assert "applied migration(s) 001" in first.output
    second = CliRunner().invoke(migrate, ["--store", postgres_dsn])
    assert second.exit_code == 0, second.output
    assert f"up to date (version {NEWEST})" in second.output


def test_migrate_command_reports_an_unreachable_server(postgres_server: PostgresServer) -> None:
    from commandnet.local.process import free_port

    url = f"postgresql://commandnet@127.0.0.1:{free_port()}/nothing"
    result = CliRunner().invoke(migrate, ["--store", url, "--connect-timeout", "5"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "127.0.0.1" in result.output


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "nul\u0000byte"])
async def test_contexts_jsonb_cannot_hold_are_refused_clearly(pg_store: PostgresPersistence,
                                                              bad: object) -> None:
    with pytest.raises(ContextValidationError, match=r"'a1'.*'Start'"):
        await pg_store.create_agent(NewAgent("a1", "Start", {"x": bad}))
    assert await pg_store.get_agent("a1") is None
    assert await pg_store.create_agent(NewAgent("a2", "Start", {}))
    assert (await pg_store.load_and_lock_agent("a2", 0, "w", 60.0)).state is LeaseState.GRANTED
    with pytest.raises(ContextValidationError, match=r"'a2'.*'Next'"):
        await pg_store.save_state(Commit("a2", "w", 0, "Start", "Next", {"x": bad}, 1, 0.0))
    rec = await pg_store.get_agent("a2")
    assert rec is not None and (rec.step, rec.lease_owner) == (0, "w")  # nothing changed


class Note(BaseModel):
    text: str = ""


class WriteNul(Node[Note]):
    async def run(self, ctx: Note) -> None:
        ctx.text = "nul\u0000byte"  # valid for pydantic, refused by jsonb


async def test_a_context_the_store_cannot_hold_fails_the_agent(
        pg_store: PostgresPersistence) -> None:
    engine = Engine(pg_store, InMemoryEventBus(), graphs=[WriteNul])
    await engine.start_worker()
    try:
        await engine.trigger_agent("nul", WriteNul, Note())
        rec = await engine.wait_for("nul", timeout=30)
    finally:
        await engine.stop()
    assert rec.status is AgentStatus.FAILED and rec.attempts == 1
    assert "'nul'" in (rec.error or "") and "'WriteNul'" in (rec.error or "")


# ------------------------------------------------------------------ races between processes


async def test_concurrent_triggers_of_one_id(stores: list[PostgresPersistence]) -> None:
    results = await asyncio.gather(*(
        stores[i % 3].create_agent(NewAgent("same", "Start", {"q": 1})) for i in range(30)))
    assert results.count(True) == 1 and results.count(False) == 29
    outcomes = await asyncio.gather(*(
        stores[i % 3].create_agent(NewAgent("race", "Start", {"q": i % 2})) for i in range(10)),
        return_exceptions=True)
    assert sum(o is True for o in outcomes) == 1
    assert sum(isinstance(o, TriggerConflictError) for o in outcomes) == 5, outcomes


async def test_concurrent_leases_across_pools_grant_one(stores: list[PostgresPersistence]) -> None:
    await stores[0].create_agent(NewAgent("a1", "Start", {}))
    for step in range(3):
        leases = await asyncio.gather(*(
            stores[i % 3].load_and_lock_agent("a1", step, f"w{i}", 60.0) for i in range(30)))
        winners = [i for i, lease in enumerate(leases) if lease.state is LeaseState.GRANTED]
        assert len(winners) == 1, [lease.state for lease in leases]
        assert all(lease.state in (LeaseState.GRANTED, LeaseState.BUSY) for lease in leases)
        owner = f"w{winners[0]}"
        commits = await asyncio.gather(*(
            stores[i % 3].save_state(Commit("a1", owner, step, f"N{step}", f"N{step + 1}",
                                            {"i": i}, 1, 0.0)) for i in range(10)))
        assert commits.count(True) == 1
    history = await stores[1].get_history("a1")
    assert [h.step for h in history] == [1, 2, 3]


# ------------------------------------------------------------------ outbox clean-up


async def test_concurrent_outbox_clears_share_deletes(postgres_dsn: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    statements = count_statements(monkeypatch)
    store = PostgresPersistence(postgres_dsn, min_size=1, max_size=4)
    await store.setup()
    try:
        for i in range(60):
            await store.create_agent(NewAgent(f"a{i}", "Start", {}))
        statements.clear()
        await asyncio.gather(*(store.clear_outbox([OutboxEntry(f"a{i}", 0)]) for i in range(60)))
        assert await store.pending_outbox(0.0, 100) == []
        deletes = [s for s in statements if s == pg.SQL_CLEAR]
        assert 1 <= len(deletes) < 60
    finally:
        await store.close()
    with pytest.raises(CommandNetError, match="setup"):
        await store.clear_outbox([OutboxEntry("a1", 0)])  # errors reach every waiting caller


# ------------------------------------------------------------------ an engine on the store


class Trail(BaseModel):
    visited: list[str] = []


class PgFirst(Node[Trail]):
    async def run(self, ctx: Trail) -> type[PgGate]:
        ctx.visited.append("PgFirst")
        return PgGate


GATE = asyncio.Event()


class PgGate(Node[Trail]):
    """Parks every agent until the test opens the gate (the restart happens meanwhile)."""

    async def run(self, ctx: Trail) -> type[PgThird]:
        await GATE.wait()
        ctx.visited.append("PgGate")
        return PgThird


class PgThird(Node[Trail]):
    async def run(self, ctx: Trail) -> type[PgLast]:
        ctx.visited.append("PgThird")
        return PgLast


class PgLast(Node[Trail]):
    async def run(self, ctx: Trail) -> None:
        ctx.visited.append("PgLast")


PATH = ["PgFirst", "PgGate", "PgThird", "PgLast"]


async def eventually(check: Callable[[], Awaitable[T | None]], what: str,
                     timeout: float = 120.0) -> T:
    """Poll ``check`` until it returns something truthy; store errors count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = await check()
            if got:
                return got
            last = got
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")


def count_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the store's pooled connections execute, via asyncpg's query logger."""
    seen: list[str] = []
    original = pg._init_connection

    async def init(conn: Any) -> None:
        await original(conn)
        conn.add_query_logger(lambda record: seen.append(record.query))

    monkeypatch.setattr(pg, "_init_connection", init)
    return seen


async def test_engine_runs_agents_to_the_end(postgres_dsn: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    statements = count_statements(monkeypatch)
    GATE.set()
    store = PostgresPersistence(postgres_dsn, min_size=1, max_size=4)
    engine = Engine(store, InMemoryEventBus(), graphs=[PgFirst], sweep_interval=3600)
    agents = 25
    async with engine:
        await engine.start_worker()
        statements.clear()
        for i in range(agents):
            assert await engine.trigger_agent(f"e{i}", PgFirst, Trail())
        await eventually(lambda: store.pool.fetchval(
            "SELECT count(*) = $1 FROM agents WHERE status = 'succeeded'", agents),
            "every agent succeeded")
        used = [s for s in statements if "count(*) = $1" not in s]
        for i in range(agents):
            rec = await engine.get_agent(f"e{i}")
            assert (rec.status, rec.step, rec.node) == (AgentStatus.SUCCEEDED, 4, "PgLast")
            assert rec.context["visited"] == PATH
            history = await engine.get_history(f"e{i}")
            assert [(h.step, h.from_node) for h in history] == list(
                zip(range(1, 5), PATH, strict=True))
    transitions = agents * len(PATH)
    per = {name: sum(1 for s in used if s == sql) for name, sql in (
        ("create", pg.SQL_CREATE), ("lease", pg.SQL_LEASE), ("commit", pg.SQL_COMMIT),
        ("moves", pg.SQL_COMMIT_MOVES), ("clear_outbox", pg.SQL_CLEAR))}
    print(f"\nstatements for {agents} agents x {len(PATH)} transitions: {per}, "
          f"total {len(used)} ({len(used) / transitions:.2f} per transition)")
    assert per["lease"] == transitions  # the in-memory bus hands nothing over: a lease a step
    # The last step of each agent ends it (a statement of its own); the moves before it that
    # arrived together shared statements (group commit), never more than one each.
    assert per["commit"] >= agents
    assert per["commit"] + per["moves"] <= transitions
    assert per["create"] == agents
    assert per["clear_outbox"] <= transitions  # the engine clears after each publish
    # Nothing else but asyncpg's one-off type introspection on each new connection of each pool.
    others = [s for s in used if s not in {pg.SQL_CREATE, pg.SQL_LEASE, pg.SQL_COMMIT,
                                           pg.SQL_COMMIT_MOVES, pg.SQL_CLEAR}]
    assert len(others) <= 2 * 4 * 4, others


async def test_server_restart_mid_run(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    """Kill the server while every agent is inside a node; bring it back; all agents finish."""
    GATE.clear()
    agents = 20
    store = PostgresPersistence(postgres_dsn, min_size=1, max_size=8)
    engine = Engine(store, InMemoryEventBus(ack_wait=10.0), graphs=[PgFirst], lease_seconds=2.0,
                    sweep_interval=0.5, outbox_grace=1.0, stall_after=5.0)
    async with engine:
        await engine.start_worker()
        for i in range(agents):
            assert await engine.trigger_agent(f"r{i}", PgFirst, Trail())
        await eventually(lambda: store.pool.fetchval(
            "SELECT count(*) = $1 FROM agents WHERE node = 'PgGate' AND lease_owner IS NOT NULL",
            agents), "every agent parked in PgGate")
        await asyncio.to_thread(postgres_server.kill)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await store.get_agent("r0")  # the store's errors reach the caller
        GATE.set()  # every commit now fails: the engine nacks and retries
        await asyncio.sleep(0.5)
        await asyncio.to_thread(postgres_server.start)
        await eventually(lambda: store.pool.fetchval(
            "SELECT count(*) = $1 FROM agents WHERE status = 'succeeded'", agents),
            "every agent succeeded after the restart")
        for i in range(agents):
            rec = await engine.get_agent(f"r{i}")
            assert (rec.status, rec.step) == (AgentStatus.SUCCEEDED, 4), rec
            assert rec.context["visited"] == PATH
            history = await engine.get_history(f"r{i}")
            assert [h.step for h in history] == [1, 2, 3, 4]
            assert [h.from_node for h in history] == PATH
