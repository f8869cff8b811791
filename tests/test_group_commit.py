"""Group commit on PostgreSQL: plain moves that arrive together share one statement, and every
row of it is still fenced on its own (a real server, tests.fixtures.postgres)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from commandnet.adapters import postgres as pg
from commandnet.adapters.batching import Batcher
from commandnet.adapters.postgres import PostgresPersistence
from commandnet.errors import ContextValidationError
from commandnet.records import Commit, LeaseState, NewAgent

from .test_postgres_store import count_statements


@pytest.fixture
async def counted(postgres_dsn: str,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[PostgresPersistence,
                                                                          list[str]]]:
    statements = count_statements(monkeypatch)
    store = PostgresPersistence(postgres_dsn, min_size=1, max_size=4)
    await store.setup()
    yield store, statements
    await store.close()


async def leased(store: PostgresPersistence, prefix: str, n: int,
                 owner: str = "w1") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for agent in ids:
        await store.create_agent(NewAgent(agent, "Start", {"n": 0}))
        lease = await store.load_and_lock_agent(agent, 0, owner, 30)
        assert lease.state is LeaseState.GRANTED
    return ids


def move(agent: str, *, owner: str = "w1", step: int = 0, context: Any = None,
         keep: float | None = None) -> Commit:
    return Commit(agent, owner, step, "Start", "Next", context or {"n": 1}, 1, 0.01,
                  keep_lease=keep)


async def test_moves_arriving_together_share_statements(
        counted: tuple[PostgresPersistence, list[str]]) -> None:
    store, statements = counted
    ids = await leased(store, "g", 100)
    statements.clear()
    assert await asyncio.gather(*(store.save_state(move(a)) for a in ids)) == [True] * 100
    batched = [s for s in statements if s == pg.SQL_COMMIT_MOVES]
    assert 1 <= len(batched) <= 10, len(batched)
    assert not [s for s in statements if s == pg.SQL_COMMIT]
    for agent in ids:
        rec = await store.get_agent(agent)
        assert rec is not None
        assert (rec.step, rec.node, rec.context, rec.lease_owner, rec.attempts) == (
            1, "Next", {"n": 1}, None, 0)
        assert [(h.step, h.from_node, h.to_node) for h in await store.get_history(agent)] == [
            (1, "Start", "Next")]
    pending = await store.pending_outbox(0.0, 1000)
    assert sorted((e.agent_id, e.step) for e in pending) == sorted((a, 1) for a in ids)


async def test_each_row_of_a_batch_is_fenced_on_its_own(
        counted: tuple[PostgresPersistence, list[str]]) -> None:
    store, statements = counted
    a, b, c, d = await leased(store, "f", 4)
    statements.clear()
    results = await asyncio.gather(
        store.save_state(move(a)),
        store.save_state(move(b, owner="w2")),  # not the lease holder
        store.save_state(move(c, step=5)),  # not the agent's step
        store.save_state(move(d, keep=30.0)),  # keeps the next step's lease
        store.save_state(move(a)),  # the same step again: one UPDATE cannot move a row twice
    )
    assert list(results) == [True, False, False, True, False]
    assert pg.SQL_COMMIT_MOVES in statements
    for agent, step in ((a, 1), (b, 0), (c, 0), (d, 1)):
        rec = await store.get_agent(agent)
        assert rec is not None and rec.step == step, (agent, rec)
        assert len(await store.get_history(agent)) == step
    kept = await store.get_agent(d)
    assert kept is not None and (kept.lease_owner, kept.attempts) == ("w1", 1)
    assert kept.lease_until is not None


async def test_a_commit_the_store_cannot_hold_fails_alone(
        counted: tuple[PostgresPersistence, list[str]]) -> None:
    store, statements = counted
    ids = await leased(store, "n", 6)
    commits = [move(a) for a in ids]
    commits[2] = move(ids[2], context={"x": float("nan")})
    statements.clear()
    results = await asyncio.gather(*(store.save_state(c) for c in commits),
                                   return_exceptions=True)
    assert isinstance(results[2], ContextValidationError), results
    assert "n2" in str(results[2]) and "NaN" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [True] * 5
    assert pg.SQL_COMMIT_MOVES in statements  # tried together first, then one by one
    rec = await store.get_agent(ids[2])
    assert rec is not None and (rec.step, rec.lease_owner) == (0, "w1")


async def test_a_cancelled_caller_leaves_the_others_committed(
        counted: tuple[PostgresPersistence, list[str]]) -> None:
    store, _ = counted
    ids = await leased(store, "c", 8)
    tasks = [asyncio.create_task(store.save_state(move(a))) for a in ids]
    await asyncio.sleep(0)  # every call is waiting for its statement
    tasks[3].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 3] == [True] * 7
    for agent in ids:  # the cancelled caller's change is all there or not at all
        rec = await store.get_agent(agent)
        assert rec is not None and rec.step in (0, 1)
        assert len(await store.get_history(agent)) == rec.step


async def test_a_call_arriving_as_a_flush_ends_starts_the_next() -> None:
    """The flush task leaves the running set before any other call runs, else a call made
    right after the last one returned would wait for ever."""
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(flush)
    assert await batcher.submit(1) == 10
    async with asyncio.timeout(5):  # in this task: asyncio.wait_for would start a new one later
        assert await batcher.submit(2) == 20
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3, 8))) == [
        30, 40, 50, 60, 70]
    assert batches == [[1], [2], [3, 4, 5, 6, 7]]


async def test_a_flush_that_raises_reaches_every_caller_and_outcomes_reach_their_own() -> None:
    async def flush(items: list[int]) -> list[int | Exception]:
        if 0 in items:
            raise ConnectionError("server went away")
        return [ValueError(f"bad {i}") if i % 2 else i for i in items]

    batcher: Batcher[int, int] = Batcher(flush, limit=3)
    failed = await asyncio.gather(*(batcher.submit(i) for i in (0, 2, 4)),
                                  return_exceptions=True)
    assert [type(r) for r in failed] == [ConnectionError] * 3
    mixed = await asyncio.gather(*(batcher.submit(i) for i in (2, 3, 4, 6, 7)),
                                 return_exceptions=True)
    assert mixed[0] == 2 and mixed[2] == 4 and mixed[3] == 6
    assert str(mixed[1]) == "bad 3" and str(mixed[4]) == "bad 7"
