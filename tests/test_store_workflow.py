"""The workflow part of the Persistence contract (payloads, timers, signals, resume), run against
every store like tests/test_store_contract.py: the in-memory store is the reference."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from commandnet.persistence import Persistence
from commandnet.records import (
    AgentStatus,
    Branch,
    Failure,
    LeaseState,
    NewAgent,
    SignalOutcome,
    branch_id,
)
from tests.test_store_contract import LONG, commit, created, granted, outbox_keys, store

__all__ = ["store"]  # the parametrised fixture (memory, sqlite, postgres)


async def at_step_one(db: Persistence, agent_id: str = "a1", **park: object) -> None:
    """Create an agent and commit its first step to Next, parking as ``park`` says."""
    await created(db, agent_id)
    await granted(db, agent_id, 0, "w1")
    base = commit(agent_id, 0, "w1", "Next")
    assert await db.save_state(dataclasses.replace(base, **park)) is True  # type: ignore[arg-type]


async def test_a_trigger_payload_is_stored_and_a_commit_hands_its_payload_on(
        store: Persistence) -> None:
    assert await store.create_agent(NewAgent("a1", "Start", {"n": 0},
                                             payload={"order": 7, "items": ["x"]}))
    lease = await store.load_and_lock_agent("a1", 0, "w1", LONG)
    assert lease.record is not None and lease.record.payload == {"order": 7, "items": ["x"]}
    base = commit("a1", 0, "w1", "Next")
    assert await store.save_state(dataclasses.replace(base, payload={"from": "Start"}))
    rec = await store.get_agent("a1")
    assert rec is not None and rec.payload == {"from": "Start"} and not rec.parked
    await granted(store, "a1", 1, "w1")
    assert await store.save_state(commit("a1", 1, "w1", None, from_node="Next"))
    rec = await store.get_agent("a1")
    assert rec is not None and rec.payload is None


async def test_a_timer_parks_the_agent_with_no_event_and_wakes_it_when_due(
        store: Persistence) -> None:
    await at_step_one(store, wake_in=0.4)
    rec = await store.get_agent("a1")
    assert rec is not None and rec.parked and rec.wake_at is not None and rec.waiting is None
    assert rec.wake_at >= rec.updated_at + 0.3
    assert ("a1", 1) not in await outbox_keys(store)  # step 1's event is not written yet
    assert (await store.load_and_lock_agent("a1", 1, "w1", LONG)).state is LeaseState.STALE
    assert await store.stalled_agents(0.0, 10) == []  # parked is not stalled
    assert await store.wake_due("default", 10) == []  # not due yet
    await asyncio.sleep(0.5)
    assert await store.wake_due("other-pool", 10) == []
    woken = await store.wake_due("default", 10)
    assert [(e.agent_id, e.step) for e in woken] == [("a1", 1)]
    assert ("a1", 1) in await outbox_keys(store)
    assert await store.wake_due("default", 10) == []  # woken once
    rec = await store.get_agent("a1")
    assert rec is not None and not rec.parked and (rec.node, rec.step) == ("Next", 1)
    await granted(store, "a1", 1, "w1")


async def test_wake_due_takes_the_oldest_first_and_respects_the_limit(
        store: Persistence) -> None:
    for i, delay in enumerate([0.2, 0.0, 0.1]):
        await at_step_one(store, f"t{i}", wake_in=delay)
    await asyncio.sleep(0.3)
    first = await store.wake_due("default", 2)
    assert [e.agent_id for e in first] == ["t1", "t2"]
    assert [e.agent_id for e in await store.wake_due("default", 2)] == ["t0"]


async def test_concurrent_wakers_wake_each_agent_once(store: Persistence) -> None:
    for i in range(20):
        await at_step_one(store, f"c{i}", wake_in=0.0)
    batches = await asyncio.gather(*(store.wake_due("default", 7) for _ in range(6)))
    woken = [e.agent_id for batch in batches for e in batch]
    assert sorted(woken) == sorted(f"c{i}" for i in range(20))


async def test_a_signal_delivered_to_a_waiting_agent_makes_it_due_with_the_payload(
        store: Persistence) -> None:
    await at_step_one(store, waiting="approval")
    rec = await store.get_agent("a1")
    assert rec is not None and rec.parked and rec.waiting == "approval" and rec.wake_at is None
    assert await store.wake_due("default", 10) == []
    assert await store.signal_agent("a1", "other", "s0", {"x": 0}) is SignalOutcome.KEPT
    assert await store.signal_agent("a1", "approval", "s1", {"ok": True}) \
        is SignalOutcome.DELIVERED
    assert await store.signal_agent("a1", "approval", "s1", {"ok": True}) \
        is SignalOutcome.DUPLICATE
    woken = await store.wake_due("default", 10)
    assert [(e.agent_id, e.step) for e in woken] == [("a1", 1)]
    lease = await store.load_and_lock_agent("a1", 1, "w1", LONG)
    assert lease.state is LeaseState.GRANTED and lease.record is not None
    assert lease.record.payload == {"ok": True} and lease.record.node == "Next"


async def test_a_signal_that_comes_before_the_wait_is_kept_and_consumed_once(
        store: Persistence) -> None:
    await created(store)
    assert await store.signal_agent("a1", "approval", "early-1", {"n": 1}) is SignalOutcome.KEPT
    await asyncio.sleep(0.01)
    assert await store.signal_agent("a1", "approval", "early-2", {"n": 2}) is SignalOutcome.KEPT
    await granted(store, "a1", 0, "w1")
    base = commit("a1", 0, "w1", "Next")
    assert await store.save_state(dataclasses.replace(base, waiting="approval", wake_in=60.0,
                                                      timeout_node="Expired"))
    rec = await store.get_agent("a1")
    assert rec is not None and rec.waiting is None and rec.payload == {"n": 1}  # oldest first
    assert [e.step for e in await store.wake_due("default", 10)] == [1]  # due at once
    await granted(store, "a1", 1, "w1")
    again = commit("a1", 1, "w1", "Next", from_node="Next")
    assert await store.save_state(dataclasses.replace(again, waiting="approval"))
    rec = await store.get_agent("a1")
    assert rec is not None and rec.payload == {"n": 2} and not rec.waiting
    await asyncio.sleep(0.01)
    assert [e.step for e in await store.wake_due("default", 10)] == [2]
    await granted(store, "a1", 2, "w1")
    third = commit("a1", 2, "w1", "Next", from_node="Next")
    assert await store.save_state(dataclasses.replace(third, waiting="approval"))
    rec = await store.get_agent("a1")
    assert rec is not None and rec.waiting == "approval"  # both kept signals are used up


async def test_a_signal_wait_that_runs_out_moves_to_its_timeout_node_in_the_history(
        store: Persistence) -> None:
    await at_step_one(store, waiting="approval", wake_in=0.2, timeout_node="Expired")
    rec = await store.get_agent("a1")
    assert rec is not None and rec.waiting == "approval" and rec.wake_at is not None
    await asyncio.sleep(0.3)
    assert [(e.agent_id, e.step) for e in await store.wake_due("default", 10)] == [("a1", 2)]
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.node, rec.step, rec.payload, rec.parked) == (
        "Expired", 2, None, False)
    history = await store.get_history("a1")
    assert [(h.step, h.from_node, h.to_node, h.kind) for h in history] == [
        (1, "Start", "Next", "step"), (2, "Next", "Expired", "timeout")]
    # A signal after the timeout is only kept: the wait is over.
    assert await store.signal_agent("a1", "approval", "late", {}) is SignalOutcome.KEPT
    await granted(store, "a1", 2, "w1")


async def test_signals_to_missing_or_final_agents_are_refused(store: Persistence) -> None:
    assert await store.signal_agent("ghost", "x", "s", None) is SignalOutcome.MISSING
    await created(store)
    assert await store.cancel_agent("a1", "stop")
    assert await store.signal_agent("a1", "x", "s", None) is SignalOutcome.FINAL
    assert await store.cancel_agent("tomb", "before trigger")  # a tombstone is no agent
    assert await store.signal_agent("tomb", "x", "s", None) is SignalOutcome.MISSING


async def test_cancelling_a_parked_agent_unparks_it_for_good(store: Persistence) -> None:
    await at_step_one(store, "timer", wake_in=0.0)
    await at_step_one(store, "waiter", waiting="go", wake_in=0.0, timeout_node="Late")
    assert await store.cancel_agent("timer", "stop") and await store.cancel_agent("waiter", "x")
    assert await store.wake_due("default", 10) == []
    for agent_id in ("timer", "waiter"):
        rec = await store.get_agent(agent_id)
        assert rec is not None and rec.status is AgentStatus.CANCELLED and not rec.parked


async def test_resume_runs_a_failed_agent_again_from_a_chosen_node(store: Persistence) -> None:
    await created(store)
    await granted(store, "a1", 0, "w1")
    assert await store.record_failure(Failure("a1", "w1", 0, 1, "boom", final=True))
    assert await store.resume_agent("a1", "Retry", {"n": 5}, pool="other") is False
    assert await store.resume_agent("a1", "Retry", {"n": 5}) is True
    assert await store.resume_agent("a1", "Retry", {"n": 5}) is False  # running again
    rec = await store.get_agent("a1")
    assert rec is not None
    assert (rec.status, rec.node, rec.step, rec.context, rec.error, rec.attempts) == (
        AgentStatus.RUNNING, "Retry", 1, {"n": 5}, None, 0)
    assert ("a1", 1) in await outbox_keys(store)
    history = await store.get_history("a1")
    assert [(h.step, h.from_node, h.to_node, h.kind) for h in history] == [
        (1, "Start", "Retry", "resume")]
    await granted(store, "a1", 1, "w1")  # no retry delay left over from the failure


async def test_resume_a_cancelled_agent_but_not_a_running_one_or_a_tombstone(
        store: Persistence) -> None:
    await at_step_one(store, waiting="go")
    assert await store.resume_agent("a1", "Start", {"n": 0}) is False
    assert await store.cancel_agent("a1", "stop")
    assert await store.resume_agent("a1", "Next", {"n": 9}) is True
    rec = await store.get_agent("a1")
    assert rec is not None and (rec.status, rec.step, rec.parked) == (
        AgentStatus.RUNNING, 2, False)
    assert await store.cancel_agent("tomb", "early")
    assert await store.resume_agent("tomb", "Start", {}) is False


@pytest.mark.parametrize("park", [{"wake_in": 30.0}, {"waiting": "go"}])
async def test_changed_agents_and_records_show_parking(store: Persistence,
                                                     park: dict[str, object]) -> None:
    await at_step_one(store, **park)
    [rec] = await store.changed_agents("default", (0.0, ""), 1e12, 10)
    assert rec.parked and rec.waiting == park.get("waiting")
    assert (rec.wake_at is not None) == ("wake_in" in park)


# ------------------------------------------------------------------ fan-out and join


async def fanned_out(db: Persistence, n: int, policy: str = "fail_fast",
                     agent_id: str = "p") -> list[str]:
    """Create ``agent_id`` and commit its step 0 as a fan-out of ``n`` branches to Join."""
    await created(db, agent_id)
    await granted(db, agent_id, 0, "w1")
    base = commit(agent_id, 0, "w1", "Join")
    branches = tuple(Branch("Work", {"n": i}) for i in range(n))
    assert await db.save_state(dataclasses.replace(base, branches=branches, join_policy=policy))
    return [branch_id(agent_id, 1, i) for i in range(n)]


async def finish(db: Persistence, agent_id: str, context: dict[str, object]) -> None:
    await granted(db, agent_id, 0, "w2")
    assert await db.save_state(commit(agent_id, 0, "w2", None, context, from_node="Work"))


async def test_a_fan_out_creates_its_branches_and_parks_the_join(store: Persistence) -> None:
    ids = await fanned_out(store, 3)
    parent = await store.get_agent("p")
    assert parent is not None and (parent.node, parent.step, parent.joining) == ("Join", 1, 3)
    assert parent.parked and ("p", 1) not in await outbox_keys(store)
    assert (await store.load_and_lock_agent("p", 1, "w1", LONG)).state is LeaseState.STALE
    for i, agent_id in enumerate(ids):
        rec = await store.get_agent(agent_id)
        assert rec is not None and (rec.node, rec.step, rec.status, rec.parent_id, rec.pool) == (
            "Work", 0, AgentStatus.RUNNING, "p", "default")
        assert rec.context == rec.initial_context == {"n": i}
    assert {(a, 0) for a in ids} <= await outbox_keys(store)
    assert await store.stalled_agents(0.0, 10) != []  # the branches may be; the parent is not
    assert "p" not in [e.agent_id for e in await store.stalled_agents(0.0, 10)]


async def test_the_join_runs_once_all_branches_ended_with_their_results_in_order(
        store: Persistence) -> None:
    ids = await fanned_out(store, 3, policy="collect")
    await finish(store, ids[2], {"n": 20})
    await granted(store, ids[0], 0, "w2")
    assert await store.record_failure(Failure(ids[0], "w2", 0, 1, "boom", final=True))
    assert (await store.get_agent("p")).joining == 1  # type: ignore[union-attr]
    assert await store.wake_due("default", 10) == []
    await finish(store, ids[1], {"n": 10})
    parent = await store.get_agent("p")
    assert parent is not None and parent.joining is None and parent.status is AgentStatus.RUNNING
    assert [(e.agent_id, e.step) for e in await store.wake_due("default", 10)] == [("p", 1)]
    lease = await store.load_and_lock_agent("p", 1, "w1", LONG)
    assert lease.state is LeaseState.GRANTED and lease.record is not None
    assert lease.record.payload == [
        {"agent_id": ids[0], "status": "failed", "node": "Work", "context": {"n": 0},
         "error": "boom"},
        {"agent_id": ids[1], "status": "succeeded", "node": "Work", "context": {"n": 10},
         "error": None},
        {"agent_id": ids[2], "status": "succeeded", "node": "Work", "context": {"n": 20},
         "error": None}]
    assert await store.save_state(commit("p", 1, "w1", None, from_node="Join"))


async def test_fail_fast_fails_the_parent_naming_the_branch_and_cancels_the_rest(
        store: Persistence) -> None:
    ids = await fanned_out(store, 3)
    await finish(store, ids[1], {"n": 1})
    await granted(store, ids[0], 0, "w2")
    assert await store.record_failure(Failure(ids[0], "w2", 0, 1, "card declined", final=True))
    parent = await store.get_agent("p")
    assert parent is not None and parent.status is AgentStatus.FAILED and not parent.parked
    assert ids[0] in (parent.error or "") and "card declined" in (parent.error or "")
    sibling = await store.get_agent(ids[2])
    assert sibling is not None and sibling.status is AgentStatus.CANCELLED
    done = await store.get_agent(ids[1])
    assert done is not None and done.status is AgentStatus.SUCCEEDED
    assert await store.wake_due("default", 10) == []


async def test_a_cancelled_branch_counts_as_failed_under_fail_fast(store: Persistence) -> None:
    ids = await fanned_out(store, 2)
    assert await store.cancel_agent(ids[0], "not needed")
    parent = await store.get_agent("p")
    assert parent is not None and parent.status is AgentStatus.FAILED
    assert "cancelled" in (parent.error or "")


async def test_cancelling_a_parent_cancels_its_branches_and_theirs(store: Persistence) -> None:
    ids = await fanned_out(store, 2)
    # Branch 0 fans out again: a grandchild.
    await granted(store, ids[0], 0, "w2")
    base = commit(ids[0], 0, "w2", "Join", from_node="Work")
    assert await store.save_state(dataclasses.replace(base, branches=(Branch("Work", {}),)))
    grandchild = branch_id(ids[0], 1, 0)
    assert await store.cancel_agent("p", "stop everything")
    for agent_id in (*ids, grandchild):
        rec = await store.get_agent(agent_id)
        assert rec is not None and rec.status is AgentStatus.CANCELLED, agent_id
    parent = await store.get_agent("p")
    assert parent is not None and parent.status is AgentStatus.CANCELLED
    assert parent.error == "stop everything"


async def test_an_empty_fan_out_joins_at_once(store: Persistence) -> None:
    await fanned_out(store, 0)
    assert [e.step for e in await store.wake_due("default", 10)] == [1]
    lease = await store.load_and_lock_agent("p", 1, "w1", LONG)
    assert lease.record is not None and lease.record.payload == []


async def test_a_thousand_branches(store: Persistence) -> None:
    ids = await fanned_out(store, 1000, policy="collect")
    assert len({e.agent_id for e in await store.pending_outbox(0.0, 5000)} & set(ids)) == 1000
    for agent_id in ids[:999]:
        await finish(store, agent_id, {"n": 1})
    assert (await store.get_agent("p")).joining == 1  # type: ignore[union-attr]
    await finish(store, ids[999], {"n": 1})
    assert [e.agent_id for e in await store.wake_due("default", 10)] == ["p"]
    lease = await store.load_and_lock_agent("p", 1, "w1", LONG)
    assert lease.record is not None and len(lease.record.payload) == 1000
    assert [r["agent_id"] for r in lease.record.payload] == ids


async def test_branches_ending_at_once_count_the_join_down_exactly_to_zero(
        store: Persistence) -> None:
    ids = await fanned_out(store, 40, policy="collect")
    await asyncio.gather(*(finish(store, agent_id, {"n": i}) for i, agent_id in enumerate(ids)))
    parent = await store.get_agent("p")
    assert parent is not None and parent.joining is None and parent.status is AgentStatus.RUNNING
    assert [e.agent_id for e in await store.wake_due("default", 10)] == ["p"]
    lease = await store.load_and_lock_agent("p", 1, "w1", LONG)
    assert lease.record is not None
    assert [r["context"] for r in lease.record.payload] == [{"n": i} for i in range(40)]


async def test_a_branch_failing_while_its_siblings_commit_fails_the_parent_once(
        store: Persistence) -> None:
    ids = await fanned_out(store, 30)
    for agent_id in ids:
        await granted(store, agent_id, 0, "w2")

    async def end(i: int, agent_id: str) -> None:
        if i == 7:
            await store.record_failure(Failure(agent_id, "w2", 0, 1, "boom", final=True))
        else:  # a sibling cancelled first finds its lease gone: its commit is refused
            await store.save_state(commit(agent_id, 0, "w2", None, {"n": i}, from_node="Work"))

    await asyncio.gather(*(end(i, agent_id) for i, agent_id in enumerate(ids)))
    parent = await store.get_agent("p")
    assert parent is not None and parent.status is AgentStatus.FAILED and ids[7] in parent.error
    statuses = {(await store.get_agent(a)).status for a in ids}  # type: ignore[union-attr]
    assert AgentStatus.RUNNING not in statuses
    assert await store.wake_due("default", 10) == []


# ------------------------------------------------------------------ safe deploys


async def test_the_graph_version_is_kept_from_the_trigger_and_each_commit(
        store: Persistence) -> None:
    assert await store.create_agent(NewAgent("a1", "Start", {}, graph_version="v1"))
    assert (await store.get_agent("a1")).graph_version == "v1"  # type: ignore[union-attr]
    await granted(store, "a1", 0, "w1")
    base = commit("a1", 0, "w1", "Join")
    branches = (Branch("Work", {}),)
    assert await store.save_state(dataclasses.replace(base, graph_version="v2",
                                                      branches=branches))
    for agent_id in ("a1", branch_id("a1", 1, 0)):
        assert (await store.get_agent(agent_id)).graph_version == "v2"  # type: ignore[union-attr]
    await finish(store, branch_id("a1", 1, 0), {})  # a commit with no version keeps the old
    branch = await store.get_agent(branch_id("a1", 1, 0))
    assert branch is not None and branch.graph_version == "v2"
    for park in ({"wake_in": 0.0}, {"waiting": "go"}):
        rec = await store.get_agent("a1")
        assert rec is not None
        if rec.parked:
            await store.wake_due("default", 10)
        await granted(store, "a1", rec.step, "w1")
        version = f"v{rec.step + 3}"
        step = dataclasses.replace(commit("a1", rec.step, "w1", "Next"), graph_version=version,
                                   **park)  # type: ignore[arg-type]
        assert await store.save_state(step)
        assert (await store.get_agent("a1")).graph_version == version  # type: ignore[union-attr]
