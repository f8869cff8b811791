"""The Persistence contract, run against every store: in-memory (the reference), SQLite and
PostgreSQL (a real server from tests.fixtures.postgres). A store passes when it behaves exactly
like the reference: same return values, fencing, idempotency, conflicts, outbox and stalls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from commandnet.errors import TriggerConflictError
from commandnet.persistence import Persistence
from commandnet.records import (
    AgentStatus,
    Commit,
    Failure,
    LeaseState,
    NewAgent,
    OutboxEntry,
)

LONG = 60.0  # a lease that outlives the test


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Persistence]:
    kind = request.param
    db: Persistence
    if kind == "memory":
        from commandnet.adapters.memory import InMemoryPersistence

        db = InMemoryPersistence()
    elif kind == "sqlite":
        from commandnet.adapters.sqlite import SQLitePersistence

        db = SQLitePersistence(tmp_path / "store.db")
    else:
        from commandnet.adapters.postgres import PostgresPersistence

        db = PostgresPersistence(request.getfixturevalue("postgres_dsn"), min_size=1,
                                 max_size=10)
    await db.setup()
    try:
        yield db
    finally:
        await db.close()


async def created(db: Persistence, agent_id: str = "a1", node: str = "Start",
                  context: dict[str, object] | None = None) -> None:
    assert await db.create_agent(NewAgent(agent_id, node, context or {"n": 0})) is True


async def granted(db: Persistence, agent_id: str, step: int, owner: str,
                  lease: float = LONG) -> None:
    got = await db.load_and_lock_agent(agent_id, step, owner, lease)
    assert got.state is LeaseState.GRANTED, got


def commit(agent_id: str, step: int, owner: str, to_node: str | None,
           context: dict[str, object] | None = None, from_node: str = "Start") -> Commit:
    return Commit(agent_id, owner, step, from_node, to_node, context or {"n": step + 1},
                  attempts=1, duration=0.25)


async def outbox_keys(db: Persistence) -> set[tuple[str, int]]:
    return {(e.agent_id, e.step) for e in await db.pending_outbox(0.0, 1000)}


# ------------------------------------------------------------------ create


async def test_create_stores_step_zero_and_its_event(store: Persistence) -> None:
    await created(store, context={"n": 0, "tags": ["x"], "nested": {"k": 1.5}})
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.node, rec.step, rec.status, rec.start_node) == (
        "Start", 0, AgentStatus.RUNNING, "Start")
    assert rec.context == rec.initial_context == {"n": 0, "tags": ["x"], "nested": {"k": 1.5}}
    assert (rec.attempts, rec.error, rec.lease_owner, rec.lease_until) == (0, None, None, None)
    assert rec.created_at > 0 and rec.updated_at >= rec.created_at
    assert await outbox_keys(store) == {("a1", 0)}
    assert await store.get_history("a1") == []


async def test_create_is_idempotent_and_conflicts_name_both_requests(store: Persistence) -> None:
    await created(store, context={"q": "clean"})
    assert await store.create_agent(NewAgent("a1", "Start", {"q": "clean"})) is False
    with pytest.raises(TriggerConflictError) as other_context:
        await store.create_agent(NewAgent("a1", "Start", {"q": "other"}))
    assert "a1" in str(other_context.value)
    assert "clean" in str(other_context.value) and "other" in str(other_context.value)
    with pytest.raises(TriggerConflictError) as other_node:
        await store.create_agent(NewAgent("a1", "Elsewhere", {"q": "clean"}))
    assert "Start" in str(other_node.value) and "Elsewhere" in str(other_node.value)
    assert await outbox_keys(store) == {("a1", 0)}


async def test_create_final_agent_writes_no_event(store: Persistence) -> None:
    born_dead = NewAgent("bad", "Start", {"x": 1}, status=AgentStatus.FAILED, error="no graph")
    assert await store.create_agent(born_dead) is True
    rec = await store.get_agent("bad")
    assert rec is not None and (rec.status, rec.error) == (AgentStatus.FAILED, "no graph")
    assert await outbox_keys(store) == set()
    assert (await store.load_and_lock_agent("bad", 0, "w", LONG)).state is LeaseState.STALE


async def test_get_agent_missing_and_returns_a_copy(store: Persistence) -> None:
    assert await store.get_agent("nobody") is None
    await created(store, context={"items": [1]})
    rec = await store.get_agent("a1")
    assert rec is not None
    rec.context["items"].append(2)
    again = await store.get_agent("a1")
    assert again is not None and again.context == {"items": [1]}


# ------------------------------------------------------------------ leases


async def test_lease_granted_busy_stale_missing(store: Persistence) -> None:
    await created(store)
    lease = await store.load_and_lock_agent("a1", 0, "w1", 30.0)
    assert lease.state is LeaseState.GRANTED and lease.record is not None
    assert lease.record.context == {"n": 0} and lease.record.node == "Start"
    assert lease.record.lease_owner == "w1"
    assert lease.record.lease_until is not None and lease.record.lease_until > 0

    busy = await store.load_and_lock_agent("a1", 0, "w2", 30.0)
    assert busy.state is LeaseState.BUSY and busy.record is None
    assert 0.0 < busy.retry_after <= 30.0
    again = await store.load_and_lock_agent("a1", 0, "w1", 30.0)
    assert again.state is LeaseState.BUSY  # even its owner: a duplicate delivery never reruns

    assert (await store.load_and_lock_agent("a1", 1, "w2", 30.0)).state is LeaseState.STALE
    assert (await store.load_and_lock_agent("zz", 0, "w2", 30.0)).state is LeaseState.MISSING


async def test_lease_after_commit_is_stale_for_the_old_step(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.save_state(commit("a1", 0, "w1", "Next"))
    assert (await store.load_and_lock_agent("a1", 0, "w2", LONG)).state is LeaseState.STALE
    await granted(store, "a1", 1, "w2")


async def test_expired_lease_is_taken_over_and_fences_the_old_owner(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "slow", lease=0.05)
    await asyncio.sleep(0.3)
    await granted(store, "a1", 0, "fast")
    assert await store.extend_lease("a1", 0, "slow", LONG) is False
    assert await store.save_state(commit("a1", 0, "slow", "Next")) is False
    assert await store.record_failure(Failure("a1", "slow", 0, 1, "boom", final=True)) is False
    assert await store.save_state(commit("a1", 0, "fast", "Next")) is True
    history = await store.get_history("a1")
    assert [(h.step, h.to_node) for h in history] == [(1, "Next")]


async def test_extend_lease_is_fenced(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1", lease=5.0)
    before = await store.get_agent("a1")
    assert await store.extend_lease("a1", 0, "w1", 600.0) is True
    after = await store.get_agent("a1")
    assert before is not None and after is not None
    assert before.lease_until is not None and after.lease_until is not None
    assert after.lease_until > before.lease_until
    assert await store.extend_lease("a1", 0, "w2", 600.0) is False
    assert await store.extend_lease("a1", 1, "w1", 600.0) is False
    assert await store.extend_lease("zz", 0, "w1", 600.0) is False
    assert await store.cancel_agent("a1", "stop") is True
    assert await store.extend_lease("a1", 0, "w1", 600.0) is False


async def test_release_lease_lets_another_worker_in(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    await store.release_lease("a1", 0, "w2")  # not the owner: no effect
    assert (await store.load_and_lock_agent("a1", 0, "w2", LONG)).state is LeaseState.BUSY
    await store.release_lease("a1", 0, "w1")
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.lease_owner, rec.lease_until) == (None, None)
    await granted(store, "a1", 0, "w2")


async def test_concurrent_lease_attempts_grant_exactly_one(store: Persistence) -> None:
    await created(store)
    leases = await asyncio.gather(*(
        store.load_and_lock_agent("a1", 0, f"w{i}", LONG) for i in range(25)))
    states = [lease.state for lease in leases]
    assert states.count(LeaseState.GRANTED) == 1, states
    assert states.count(LeaseState.BUSY) == 24, states


# ------------------------------------------------------------------ commits


async def test_save_state_moves_the_agent_and_writes_history_and_event(
    store: Persistence,
) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.save_state(commit("a1", 0, "w1", "Next", {"n": 1, "s": "é"})) is True
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.node, rec.step, rec.status, rec.context) == (
        "Next", 1, AgentStatus.RUNNING, {"n": 1, "s": "é"})
    assert (rec.lease_owner, rec.lease_until, rec.attempts, rec.error) == (None, None, 0, None)
    assert rec.initial_context == {"n": 0}
    [hist] = await store.get_history("a1")
    assert (hist.agent_id, hist.step, hist.from_node, hist.to_node, hist.attempts) == (
        "a1", 1, "Start", "Next", 1)
    assert hist.duration == pytest.approx(0.25) and hist.at > 0
    # A store whose commit deletes the step's own outbox row lets a bus hand steps over locally.
    own = set() if getattr(store, "commit_clears_outbox", False) else {("a1", 0)}
    assert await outbox_keys(store) == {*own, ("a1", 1)}
    # the same commit again (a duplicate worker, a retried call) changes nothing
    assert await store.save_state(commit("a1", 0, "w1", "Next")) is False
    assert len(await store.get_history("a1")) == 1


async def test_save_state_terminal_succeeds_without_event(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.save_state(commit("a1", 0, "w1", None, {"done": True})) is True
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.node, rec.step, rec.status, rec.context) == (
        "Start", 1, AgentStatus.SUCCEEDED, {"done": True})
    assert [(h.step, h.to_node) for h in await store.get_history("a1")] == [(1, None)]
    own = set() if getattr(store, "commit_clears_outbox", False) else {("a1", 0)}
    assert await outbox_keys(store) == own
    assert (await store.load_and_lock_agent("a1", 1, "w1", LONG)).state is LeaseState.STALE


async def test_save_state_fence_failures_change_nothing(store: Persistence) -> None:
    await created(store)
    assert await store.save_state(commit("a1", 0, "w1", "Next")) is False  # no lease at all
    await granted(store, "a1", 0, "w1")
    assert await store.save_state(commit("a1", 0, "intruder", "Next")) is False
    assert await store.save_state(commit("a1", 1, "w1", "Next")) is False
    assert await store.save_state(commit("zz", 0, "w1", "Next")) is False
    assert await store.cancel_agent("a1", "user asked") is True
    assert await store.save_state(commit("a1", 0, "w1", "Next")) is False  # cancelled in flight
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.step, rec.node, rec.status) == (
        0, "Start", AgentStatus.CANCELLED)
    assert await store.get_history("a1") == []
    assert await outbox_keys(store) == {("a1", 0)}


async def test_history_is_in_step_order(store: Persistence) -> None:
    await created(store)
    path = ["Start", "B", "C", "D"]
    for step, (here, there) in enumerate(zip(path, [*path[1:], None], strict=True)):
        await granted(store, "a1", step, "w")
        assert await store.save_state(commit("a1", step, "w", there, from_node=here))
    history = await store.get_history("a1")
    assert [(h.step, h.from_node, h.to_node) for h in history] == [
        (1, "Start", "B"), (2, "B", "C"), (3, "C", "D"), (4, "D", None)]
    assert [h.at for h in history] == sorted(h.at for h in history)
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.step, rec.node, rec.status) == (4, "D", AgentStatus.SUCCEEDED)
    assert await store.get_history("nobody") == []


# ------------------------------------------------------------------ failures


async def test_record_failure_not_final_waits_for_the_retry_delay(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.record_failure(
        Failure("a1", "w1", 0, attempts=1, error="ValueError: x", final=False, retry_in=30.0))
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.status, rec.attempts, rec.error, rec.lease_owner) == (
        AgentStatus.RUNNING, 1, "ValueError: x", None)
    busy = await store.load_and_lock_agent("a1", 0, "w2", LONG)
    assert busy.state is LeaseState.BUSY and 20.0 < busy.retry_after <= 30.0
    assert await store.record_failure(Failure("a1", "w1", 0, 2, "again", final=False)) is False


async def test_retry_delay_elapses_then_the_step_runs_again(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.record_failure(Failure("a1", "w1", 0, 1, "flaky", False, retry_in=0.05))
    await asyncio.sleep(0.3)
    lease = await store.load_and_lock_agent("a1", 0, "w2", LONG)
    assert lease.state is LeaseState.GRANTED and lease.record is not None
    assert (lease.record.attempts, lease.record.crashes) == (2, 0)  # the second attempt
    assert await store.save_state(commit("a1", 0, "w2", "Next"))
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.attempts, rec.error) == (0, None)


async def test_record_failure_final_fails_the_agent(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.record_failure(Failure("a1", "intruder", 0, 3, "x", final=True)) is False
    assert await store.record_failure(Failure("a1", "w1", 0, 3, "RuntimeError: gone", True))
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.status, rec.attempts, rec.error, rec.lease_owner, rec.lease_until) == (
        AgentStatus.FAILED, 3, "RuntimeError: gone", None, None)
    assert (await store.load_and_lock_agent("a1", 0, "w2", LONG)).state is LeaseState.STALE
    assert await store.cancel_agent("a1", "late") is False
    assert await store.stalled_agents(0.0, 100) == []


# ------------------------------------------------------------------ cancel


async def test_cancel(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.cancel_agent("a1", "operator deleted the CR") is True
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.status, rec.error, rec.lease_owner, rec.lease_until) == (
        AgentStatus.CANCELLED, "operator deleted the CR", None, None)
    assert await store.cancel_agent("a1", "again") is False
    assert (await store.load_and_lock_agent("a1", 0, "w2", LONG)).state is LeaseState.STALE


# ------------------------------------------------------------------ outbox and stalls


async def test_outbox_pending_age_limit_and_clear(store: Persistence) -> None:
    for i in range(5):
        await created(store, f"a{i}")
    assert len(await store.pending_outbox(0.0, 3)) == 3
    assert await store.pending_outbox(3600.0, 100) == []
    pending = await store.pending_outbox(0.0, 100)
    assert {(e.agent_id, e.step) for e in pending} == {(f"a{i}", 0) for i in range(5)}
    assert all(e.created_at > 0 for e in pending)
    await store.clear_outbox([OutboxEntry("a1", 0), OutboxEntry("a3", 0), OutboxEntry("x", 7)])
    assert await outbox_keys(store) == {("a0", 0), ("a2", 0), ("a4", 0)}
    await store.clear_outbox([])
    await store.clear_outbox(await store.pending_outbox(0.0, 100))
    assert await outbox_keys(store) == set()


async def test_stalled_agents_are_running_unleased_and_old(store: Persistence) -> None:
    for name in ("idle", "leased", "done", "cancelled"):
        await created(store, name)
    await granted(store, "leased", 0, "w")
    await granted(store, "done", 0, "w")
    assert await store.save_state(commit("done", 0, "w", None))
    assert await store.cancel_agent("cancelled", "x")
    stalled = await store.stalled_agents(0.0, 100)
    assert [(e.agent_id, e.step) for e in stalled] == [("idle", 0)]
    assert stalled[0].created_at > 0  # the agent's last change
    assert await store.stalled_agents(3600.0, 100) == []
    await granted(store, "idle", 0, "w")
    assert await store.save_state(commit("idle", 0, "w", "Next"))
    assert [(e.agent_id, e.step) for e in await store.stalled_agents(0.0, 100)] == [("idle", 1)]
    assert len(await store.stalled_agents(0.0, 0)) == 0


async def test_stalled_includes_expired_leases(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "dead", lease=0.05)
    await asyncio.sleep(0.3)
    assert [(e.agent_id, e.step) for e in await store.stalled_agents(0.0, 10)] == [("a1", 0)]


# ------------------------------------------------------------------ pools (issue 7)


async def test_every_row_records_its_pool_and_leases_stay_in_it(store: Persistence) -> None:
    assert await store.create_agent(NewAgent("a", "Start", {}, pool="blue"))
    assert await store.create_agent(NewAgent("b", "Begin", {}, pool="green"))
    rec = await store.get_agent("a")
    assert rec is not None and rec.pool == "blue"
    foreign = await store.load_and_lock_agent("a", 0, "w", LONG, "green")
    assert foreign.state is LeaseState.FOREIGN
    after = await store.get_agent("a")
    assert after is not None and (after.attempts, after.lease_owner) == (0, None)  # untouched
    assert (await store.load_and_lock_agent("a", 0, "w", LONG, "blue")).state is \
        LeaseState.GRANTED


async def test_repair_queries_only_see_their_own_pool(store: Persistence) -> None:
    for agent_id, pool in (("a1", "blue"), ("a2", "blue"), ("b1", "green")):
        assert await store.create_agent(NewAgent(agent_id, "Start", {}, pool=pool))
    assert {e.agent_id for e in await store.pending_outbox(0.0, 100, "blue")} == {"a1", "a2"}
    assert {e.agent_id for e in await store.pending_outbox(0.0, 100, "green")} == {"b1"}
    assert {e.agent_id for e in await store.pending_outbox(0.0, 100)} == {"a1", "a2", "b1"}
    assert {e.agent_id for e in await store.stalled_agents(0.0, 100, "green")} == {"b1"}
    assert {e.agent_id for e in await store.stalled_agents(0.0, 100, "blue")} == {"a1", "a2"}


async def test_a_stalled_agent_is_claimed_once_per_period(store: Persistence) -> None:
    for i in range(3):
        await created(store, f"q{i}")
    await asyncio.sleep(0.3)
    first = await store.stalled_agents(0.2, 2, "default")
    assert len(first) == 2  # one sweep is bounded by its limit
    second = await store.stalled_agents(0.2, 100, "default")
    assert [e.agent_id for e in second] == sorted({"q0", "q1", "q2"} - {e.agent_id for e in first})
    assert await store.stalled_agents(0.2, 100, "default") == []  # all re-sent this period
    await asyncio.sleep(0.3)
    assert len(await store.stalled_agents(0.2, 100, "default")) == 3  # the next period


async def test_one_sweeper_per_pool(store: Persistence) -> None:
    first = await store.claim_sweep("blue", "w1", 0.3)
    assert first is not None and first.resynced_until is None and first.now > 0
    assert await store.claim_sweep("blue", "w2", 0.3) is None
    assert await store.claim_sweep("green", "w2", 0.3) is not None  # pools are separate
    assert await store.claim_sweep("blue", "w1", 0.3) is not None  # the holder renews
    await store.mark_resynced("blue", first.now - 5)
    await asyncio.sleep(0.5)
    taken = await store.claim_sweep("blue", "w2", 0.3)  # the holder's turn ran out
    assert taken is not None and taken.resynced_until == pytest.approx(first.now - 5, abs=1e-3)


async def test_changed_agents_pages_in_a_stable_order(store: Persistence) -> None:
    for i in range(7):
        assert await store.create_agent(NewAgent(f"c{i}", "Start", {}, pool="blue"))
    assert await store.create_agent(NewAgent("other", "Start", {}, pool="green"))
    claim = await store.claim_sweep("blue", "w", 10.0)
    assert claim is not None
    seen: list[str] = []
    after = (0.0, "")
    while True:
        page = await store.changed_agents("blue", after, claim.now + 1, 3)
        seen += [r.agent_id for r in page]
        if len(page) < 3:
            break
        after = (page[-1].updated_at, page[-1].agent_id)
    assert sorted(seen) == [f"c{i}" for i in range(7)] and len(seen) == 7
    assert await store.changed_agents("blue", (0.0, ""), claim.now - 3600, 10) == []


# ------------------------------------------------------------------ attempts (issue 7)


async def test_a_lease_counts_an_attempt_and_a_dead_holder_counts_a_crash(
        store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "doomed", lease=0.05)  # the worker dies holding it
    await asyncio.sleep(0.3)
    # That run was not alone: the death may have been a bystander's, no attempt is used up.
    lease = await store.load_and_lock_agent("a1", 0, "w2", 0.05, "default", alone=True)
    assert lease.record is not None and (lease.record.attempts, lease.record.crashes) == (1, 1)
    await asyncio.sleep(0.3)  # w2 was idle and ran the suspect alone, and died: that counts
    lease = await store.load_and_lock_agent("a1", 0, "w3", 0.05, "default", alone=False)
    assert lease.record is not None and (lease.record.attempts, lease.record.crashes) == (2, 2)
    await asyncio.sleep(0.3)  # w3 was busy (not alone) and died: not counted
    lease = await store.load_and_lock_agent("a1", 0, "w3", LONG)
    assert lease.record is not None and (lease.record.attempts, lease.record.crashes) == (2, 3)
    await store.release_lease("a1", 0, "w3")  # handed back while draining: not an attempt
    lease = await store.load_and_lock_agent("a1", 0, "w4", LONG)
    assert lease.record is not None and (lease.record.attempts, lease.record.crashes) == (2, 3)
    assert await store.save_state(commit("a1", 0, "w4", "Next"))
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.attempts, rec.crashes) == (0, 0)


async def test_a_commit_that_keeps_the_lease_leases_the_next_step_to_its_owner(
        store: Persistence) -> None:
    # Sticky execution: the committing worker keeps step 1's lease, attempt counted, and
    # commits step 1 with no lease request of its own; the outbox row stays the recovery.
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.save_state(replace(commit("a1", 0, "w1", "Next"), keep_lease=LONG))
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.step, rec.lease_owner, rec.attempts) == (1, "w1", 1)
    assert ("a1", 1) in await outbox_keys(store)
    assert (await store.load_and_lock_agent("a1", 1, "w2", LONG)).state is LeaseState.BUSY
    assert await store.save_state(commit("a1", 1, "w1", "Last", from_node="Next"))
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.step, rec.lease_owner, rec.attempts) == (2, None, 0)
    assert [h.step for h in await store.get_history("a1")] == [1, 2]


async def test_a_kept_lease_applies_to_plain_moves_only(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.save_state(replace(commit("a1", 0, "w1", "Next"), keep_lease=LONG,
                                          wake_in=60.0))  # a timer parks the agent: no lease
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.lease_owner, rec.attempts) == (None, 0)
    await created(store, "a2")
    await granted(store, "a2", 0, "w1")
    assert await store.save_state(replace(commit("a2", 0, "w1", None), keep_lease=LONG))
    rec = await store.get_agent("a2")
    assert rec is not None and (rec.status, rec.lease_owner) == (AgentStatus.SUCCEEDED, None)


async def test_a_kept_lease_whose_worker_died_is_taken_over_without_using_an_attempt(
        store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "doomed")
    assert await store.save_state(replace(commit("a1", 0, "doomed", "Next"), keep_lease=0.05))
    await asyncio.sleep(0.3)  # it died before committing step 1; another worker takes over
    lease = await store.load_and_lock_agent("a1", 1, "w2", LONG, "default", alone=True)
    assert lease.record is not None and (lease.record.attempts, lease.record.crashes) == (1, 1)
    assert await store.extend_lease("a1", 1, "doomed", LONG) is False
    assert await store.save_state(commit("a1", 1, "doomed", "Last")) is False
    assert await store.save_state(commit("a1", 1, "w2", "Last", from_node="Next"))
    await created(store, "a2")  # a kept lease released unused gives its attempt back
    await granted(store, "a2", 0, "w1")
    assert await store.save_state(replace(commit("a2", 0, "w1", "Next"), keep_lease=LONG))
    await store.release_lease("a2", 1, "w1")
    lease = await store.load_and_lock_agent("a2", 1, "w2", LONG)
    assert lease.record is not None and (lease.record.attempts, lease.record.crashes) == (1, 0)


# ------------------------------------------------------------------ tombstones (issue 7)


async def test_a_cancel_before_the_trigger_leaves_a_tombstone_the_trigger_respects(
        store: Persistence) -> None:
    assert await store.cancel_agent("early", "deleted at once", "blue") is True
    assert await store.cancel_agent("early", "again", "blue") is False
    assert await store.create_agent(NewAgent("early", "Start", {"q": 1}, pool="blue")) is False
    rec = await store.get_agent("early")
    assert rec is not None
    assert (rec.status, rec.start_node, rec.initial_context, rec.error, rec.pool) == (
        AgentStatus.CANCELLED, "Start", {"q": 1}, "deleted at once", "blue")
    assert await outbox_keys(store) == set()  # no event: nothing will run it
    assert await store.create_agent(NewAgent("early", "Start", {"q": 1}, pool="blue")) is False
    with pytest.raises(TriggerConflictError):
        await store.create_agent(NewAgent("early", "Start", {"q": 2}, pool="blue"))
    assert (await store.load_and_lock_agent("early", 0, "w", LONG, "blue")).state is \
        LeaseState.STALE
