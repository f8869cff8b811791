"""In-memory store and bus: the reference implementation of the protocol, for tests.

Both are safe to share between several engines in one event loop, which is how tests simulate
several workers (and crashes of some of them). Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from typing_extensions import override

from ..bus import Delivery, EventBus, Handler
from ..leasing.kept import kept_lease
from ..messages import AnyMessage, encode
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
)
from ..workflow.records import PARENT_CANCELLED, SIBLING_FAILED, branch_id
from .conflict import trigger_conflict

Clock = Callable[[], float]


def replace(rec: AgentRecord, **changes: Any) -> AgentRecord:
    """``dataclasses.replace`` without its cost (a frozen dataclass's ``__init__`` sets fields one
    by one): it runs twice per transition."""
    new = object.__new__(AgentRecord)
    new.__dict__.update(rec.__dict__, **changes)
    return new


@dataclass
class _Signal:
    signal_id: str
    name: str
    payload: Any
    created_at: float
    consumed_step: int | None = None


class InMemoryPersistence(Persistence):
    """Dict-backed store; each method is atomic because it never awaits while changing state."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.agents: dict[str, AgentRecord] = {}
        self.history: dict[str, list[HistoryRecord]] = {}
        self.outbox: dict[tuple[str, int], OutboxEntry] = {}
        self.republished: dict[str, float] = {}
        self.solo: dict[str, bool] = {}  # the current lease runs alone (see load_and_lock_agent)
        self.sweeps: dict[str, tuple[str, float, float | None]] = {}  # owner, until, resynced
        self.signals: dict[str, dict[str, _Signal]] = {}  # agent id -> signal id -> signal
        self.timeout_nodes: dict[str, str | None] = {}  # a signal wait's node when it runs out
        self.joins: dict[str, tuple[int, int, str]] = {}  # join agent -> step, branches, policy

    @override
    async def create_agent(self, agent: NewAgent) -> bool:
        now = self.clock()
        old = self.agents.get(agent.agent_id)
        if old is not None and not old.start_node:  # a cancel came first: fill in, stay cancelled
            self.agents[agent.agent_id] = replace(
                old, node=agent.start_node, start_node=agent.start_node,
                context=copy.deepcopy(agent.context), initial_context=copy.deepcopy(agent.context))
            return False
        if old is not None:
            if old.start_node == agent.start_node and old.initial_context == agent.context:
                return False
            raise trigger_conflict(
                agent.agent_id, (old.start_node, old.initial_context),
                (agent.start_node, agent.context))
        self.agents[agent.agent_id] = AgentRecord(
            agent_id=agent.agent_id, node=agent.start_node, step=0, status=agent.status,
            context=copy.deepcopy(agent.context), start_node=agent.start_node,
            initial_context=copy.deepcopy(agent.context), error=agent.error,
            created_at=now, updated_at=now, pool=agent.pool, payload=copy.deepcopy(agent.payload),
            graph_version=agent.graph_version,
        )
        self.history[agent.agent_id] = []
        if agent.status is AgentStatus.RUNNING:
            self.outbox[(agent.agent_id, 0)] = OutboxEntry(agent.agent_id, 0, now)
        return True

    @override
    async def load_and_lock_agent(
        self, agent_id: str, step: int, owner: str, lease_seconds: float, pool: str = "default",
        alone: bool = False,
    ) -> Lease:
        now = self.clock()
        rec = self.agents.get(agent_id)
        if rec is None:
            return Lease(LeaseState.MISSING)
        if rec.pool != pool:
            return Lease(LeaseState.FOREIGN)
        if rec.status is not AgentStatus.RUNNING or rec.step != step or rec.parked:
            return Lease(LeaseState.STALE)
        if rec.lease_until is not None and rec.lease_until > now:
            return Lease(LeaseState.BUSY, retry_after=rec.lease_until - now)
        died = rec.lease_owner is not None
        rec = replace(rec, lease_owner=owner, lease_until=now + lease_seconds,
                      attempts=rec.attempts + 1 - (died and not self.solo.get(agent_id, False)),
                      crashes=rec.crashes + died)
        self.solo[agent_id] = alone and rec.crashes > 0
        step_, size, _ = self.joins.get(agent_id, (-1, 0, ""))
        if step_ == step:  # a fan-out's join: its payload is the branches' results
            rec = replace(rec, payload=[self._result(branch_id(agent_id, step, i))
                                        for i in range(size)])
        self.agents[agent_id] = rec
        return Lease(LeaseState.GRANTED, rec)  # the engine only reads the context

    def _fenced(self, agent_id: str, step: int, owner: str) -> AgentRecord | None:
        rec = self.agents.get(agent_id)
        if (
            rec is None
            or rec.status is not AgentStatus.RUNNING
            or rec.step != step
            or rec.lease_owner != owner
        ):
            return None
        return rec

    @override
    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        rec = self._fenced(agent_id, step, owner)
        if rec is None:
            return False
        self.agents[agent_id] = replace(rec, lease_until=self.clock() + lease_seconds)
        return True

    @override
    async def save_state(self, commit: Commit) -> bool:
        rec = self._fenced(commit.agent_id, commit.step, commit.owner)
        if rec is None:
            return False
        now = self.clock()
        done = commit.to_node is None
        keep = kept_lease(commit)  # the next step's lease, kept by the committing worker
        park: dict[str, Any] = {"payload": copy.deepcopy(commit.payload), "wake_at": None,
                                "graph_version": commit.graph_version or rec.graph_version}
        if not done and commit.waiting is not None:
            kept = self._kept(commit.agent_id, commit.waiting)
            if kept is not None:  # the signal came first: consume it, due at once
                kept.consumed_step = commit.step + 1
                park.update(payload=copy.deepcopy(kept.payload), wake_at=now)
            else:
                park.update(waiting=commit.waiting, wake_at=None if commit.wake_in is None
                            else now + commit.wake_in)
                self.timeout_nodes[commit.agent_id] = commit.timeout_node
        elif not done and commit.wake_in is not None:
            park["wake_at"] = now + commit.wake_in
        elif not done and commit.branches is not None:
            park.update(joining=len(commit.branches) or None,
                        wake_at=None if commit.branches else now)
            self.joins[commit.agent_id] = (commit.step + 1, len(commit.branches),
                                           commit.join_policy)
            for i, branch in enumerate(commit.branches):
                self._create_branch(rec, commit.step + 1, i, branch, now, park["graph_version"])
        self.agents[commit.agent_id] = replace(
            rec, node=commit.to_node or rec.node, step=commit.step + 1,
            status=AgentStatus.SUCCEEDED if done else AgentStatus.RUNNING,
            context=commit.context, attempts=0 if keep is None else 1, crashes=0, error=None,
            lease_owner=None if keep is None else commit.owner,
            lease_until=None if keep is None else now + keep, updated_at=now, **park,
        )
        self.solo[commit.agent_id] = False
        self.history[commit.agent_id].append(HistoryRecord(
            commit.agent_id, commit.step + 1, commit.from_node, commit.to_node,
            commit.attempts, commit.duration, now,
        ))
        if not done and not self.agents[commit.agent_id].parked:
            key = (commit.agent_id, commit.step + 1)
            self.outbox[key] = OutboxEntry(commit.agent_id, commit.step + 1, now)
        if done:
            self._branch_ended(commit.agent_id)
        return True

    def _create_branch(self, parent: AgentRecord, step: int, index: int, branch: Branch,
                       now: float, version: str | None) -> None:
        agent_id = branch_id(parent.agent_id, step, index)
        self.agents[agent_id] = AgentRecord(
            agent_id=agent_id, node=branch.node, step=0, status=AgentStatus.RUNNING,
            context=copy.deepcopy(branch.context), start_node=branch.node,
            initial_context=copy.deepcopy(branch.context), created_at=now, updated_at=now,
            pool=parent.pool, parent_id=parent.agent_id, graph_version=version)
        self.history[agent_id] = []
        self.outbox[(agent_id, 0)] = OutboxEntry(agent_id, 0, now)

    def _result(self, agent_id: str) -> dict[str, Any]:
        rec = self.agents[agent_id]
        return {"agent_id": agent_id, "status": rec.status.value, "node": rec.node,
                "context": copy.deepcopy(rec.context), "error": rec.error}

    def _branch_ended(self, agent_id: str) -> None:
        """Count an ended branch down at its parent's join (fail fast: fail the parent)."""
        rec = self.agents[agent_id]
        parent = self.agents.get(rec.parent_id or "")
        if parent is None or parent.status is not AgentStatus.RUNNING or parent.joining is None:
            return
        step, _, policy = self.joins[parent.agent_id]
        if parent.step != step or not agent_id.startswith(f"{parent.agent_id}/{step}/"):
            return
        now = self.clock()
        if rec.status is not AgentStatus.SUCCEEDED and policy == "fail_fast":
            self.agents[parent.agent_id] = replace(
                parent, status=AgentStatus.FAILED, joining=None, updated_at=now,
                error=f"branch {agent_id!r} {rec.status.value}: {rec.error}")
            for other in list(self.agents.values()):
                if other.parent_id == parent.agent_id and other.status is AgentStatus.RUNNING:
                    self._cancel(other, SIBLING_FAILED)
            return
        left = parent.joining - 1
        self.agents[parent.agent_id] = replace(
            parent, joining=left or None, wake_at=now if not left else None, updated_at=now)

    def _cancel(self, rec: AgentRecord, reason: str) -> None:
        """Cancel a running agent and its running branches, then count it ended."""
        self.agents[rec.agent_id] = replace(
            rec, status=AgentStatus.CANCELLED, error=reason, lease_owner=None,
            lease_until=None, wake_at=None, waiting=None, joining=None, updated_at=self.clock())
        self.timeout_nodes.pop(rec.agent_id, None)
        for child in list(self.agents.values()):
            if child.parent_id == rec.agent_id and child.status is AgentStatus.RUNNING:
                self._cancel(child, PARENT_CANCELLED)
        self._branch_ended(rec.agent_id)

    def _kept(self, agent_id: str, name: str) -> _Signal | None:
        """The oldest signal of ``name`` kept for the agent and not consumed yet."""
        kept = [s for s in self.signals.get(agent_id, {}).values()
                if s.name == name and s.consumed_step is None]
        return min(kept, key=lambda s: (s.created_at, s.signal_id), default=None)

    @override
    async def wake_due(self, pool: str, limit: int) -> list[OutboxEntry]:
        now = self.clock()
        due = sorted((r for r in self.agents.values()
                      if r.pool == pool and r.status is AgentStatus.RUNNING
                      and r.wake_at is not None and r.wake_at <= now),
                     key=lambda r: r.wake_at or 0.0)[:limit]
        woken = []
        for rec in due:
            if rec.waiting is not None:  # the wait ran out: move on to the timeout node
                to = self.timeout_nodes.get(rec.agent_id) or rec.node
                self.history[rec.agent_id].append(HistoryRecord(
                    rec.agent_id, rec.step + 1, rec.node, to, 0, 0.0, now, "timeout"))
                rec = replace(rec, node=to, step=rec.step + 1, payload=None, attempts=0)
            self.agents[rec.agent_id] = replace(rec, wake_at=None, waiting=None, updated_at=now)
            self.timeout_nodes.pop(rec.agent_id, None)
            entry = OutboxEntry(rec.agent_id, rec.step, now)
            self.outbox[(rec.agent_id, rec.step)] = entry
            woken.append(entry)
        return woken

    @override
    async def signal_agent(self, agent_id: str, name: str, signal_id: str,
                           payload: Any) -> SignalOutcome:
        rec = self.agents.get(agent_id)
        if rec is None or not rec.start_node:
            return SignalOutcome.MISSING
        if rec.status is not AgentStatus.RUNNING:
            return SignalOutcome.FINAL
        signals = self.signals.setdefault(agent_id, {})
        if signal_id in signals:
            return SignalOutcome.DUPLICATE
        now = self.clock()
        signals[signal_id] = signal = _Signal(signal_id, name, copy.deepcopy(payload), now)
        if rec.waiting != name:
            return SignalOutcome.KEPT
        signal.consumed_step = rec.step
        self.agents[agent_id] = replace(rec, payload=copy.deepcopy(payload), waiting=None,
                                        wake_at=now, updated_at=now)
        self.timeout_nodes.pop(agent_id, None)
        return SignalOutcome.DELIVERED

    @override
    async def resume_agent(self, agent_id: str, node: str, context: dict[str, Any],
                           pool: str = "default") -> bool:
        rec = self.agents.get(agent_id)
        if (rec is None or rec.pool != pool or not rec.start_node
                or rec.status not in (AgentStatus.FAILED, AgentStatus.CANCELLED)):
            return False
        now = self.clock()
        step = rec.step + 1
        self.agents[agent_id] = replace(
            rec, status=AgentStatus.RUNNING, node=node, step=step, context=copy.deepcopy(context),
            payload=None, error=None, attempts=0, crashes=0, lease_owner=None, lease_until=None,
            wake_at=None, waiting=None, updated_at=now)
        self.republished.pop(agent_id, None)
        self.history[agent_id].append(HistoryRecord(agent_id, step, rec.node, node, 0, 0.0, now,
                                                    "resume"))
        self.outbox[(agent_id, step)] = OutboxEntry(agent_id, step, now)
        return True

    @override
    async def record_failure(self, failure: Failure) -> bool:
        rec = self._fenced(failure.agent_id, failure.step, failure.owner)
        if rec is None:
            return False
        now = self.clock()
        self.agents[failure.agent_id] = replace(
            rec, attempts=failure.attempts, error=failure.error, lease_owner=None,
            lease_until=None if failure.final else now + failure.retry_in,
            status=AgentStatus.FAILED if failure.final else AgentStatus.RUNNING, updated_at=now,
        )
        if failure.final:
            self._branch_ended(failure.agent_id)
        return True

    @override
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        rec = self._fenced(agent_id, step, owner)
        if rec is not None:
            self.agents[agent_id] = replace(rec, lease_owner=None, lease_until=None,
                                            attempts=max(rec.attempts - 1, 0))

    @override
    async def cancel_agent(self, agent_id: str, reason: str, pool: str = "default") -> bool:
        rec = self.agents.get(agent_id)
        if rec is None:
            now = self.clock()
            self.agents[agent_id] = AgentRecord(
                agent_id=agent_id, node="", step=0, status=AgentStatus.CANCELLED, context={},
                start_node="", initial_context={}, error=reason, created_at=now,
                updated_at=now, pool=pool)
            self.history[agent_id] = []
            return True
        if rec.status is not AgentStatus.RUNNING:
            return False
        self._cancel(rec, reason)
        return True

    @override
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        rec = self.agents.get(agent_id)
        return None if rec is None else replace(rec, context=copy.deepcopy(rec.context))

    @override
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        return list(self.history.get(agent_id, []))

    @override
    async def pending_outbox(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        cutoff = self.clock() - older_than
        return sorted((e for e in self.outbox.values() if e.created_at <= cutoff and (
            pool is None or self.agents[e.agent_id].pool == pool)),
            key=lambda e: e.created_at)[:limit]

    @override
    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        for entry in entries:
            self.outbox.pop((entry.agent_id, entry.step), None)

    @override
    async def stalled_agents(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        now = self.clock()
        cutoff = now - older_than
        found = sorted((
            r for r in self.agents.values()
            if r.status is AgentStatus.RUNNING and (pool is None or r.pool == pool)
            and not r.parked and (r.lease_until is None or r.lease_until <= now)
            and max(r.updated_at, self.republished.get(r.agent_id, 0.0)) <= cutoff
        ), key=lambda r: r.updated_at)[:limit]
        for r in found:
            self.republished[r.agent_id] = now
        return [OutboxEntry(r.agent_id, r.step, r.updated_at) for r in found]

    @override
    async def claim_sweep(self, pool: str, owner: str, seconds: float) -> SweepClaim | None:
        now = self.clock()
        holder, until, resynced = self.sweeps.get(pool, (owner, 0.0, None))
        if holder != owner and until > now:
            return None
        self.sweeps[pool] = (owner, now + seconds, resynced)
        return SweepClaim(now, resynced)

    @override
    async def mark_resynced(self, pool: str, until: float) -> None:
        holder, lease, _ = self.sweeps.get(pool, ("", 0.0, None))
        self.sweeps[pool] = (holder, lease, until)

    @override
    async def changed_agents(
        self, pool: str, after: tuple[float, str], until: float, limit: int
    ) -> list[AgentRecord]:
        found = sorted((r for r in self.agents.values() if r.pool == pool
                        and (r.updated_at, r.agent_id) > after and r.updated_at <= until),
                       key=lambda r: (r.updated_at, r.agent_id))
        return [replace(r, context=copy.deepcopy(r.context)) for r in found[:limit]]


class _MemoryDelivery(Delivery):
    def __init__(self, bus: InMemoryEventBus, data: bytes, deliveries: int) -> None:
        self.bus, self.data, self.deliveries = bus, data, deliveries
        self.settled = False
        self.expires = 0.0

    def _arm(self) -> None:
        self.expires = asyncio.get_running_loop().time() + self.bus.ack_wait
        self.bus._watch(self.expires)

    def _expire(self) -> None:
        if not self.settled:
            self._settle()
            self.bus._enqueue(self.data, self.deliveries + 1)

    def _settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        self.bus._inflight.discard(self)
        return True

    @override
    async def ack(self) -> None:
        self._settle()

    @override
    async def nack(self, delay: float) -> None:
        if self._settle():
            self.bus._enqueue(self.data, self.deliveries + 1, delay)

    @override
    async def in_progress(self) -> None:
        if not self.settled:
            self._arm()

    @override
    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            self.bus.dead_letters.append((self.data, reason))


class InMemoryEventBus(EventBus):
    """A queue with at-least-once delivery, ack-wait redelivery, nack delays and de-duplication.

    ``ack_wait`` is how long an unsettled delivery waits before it is redelivered (as JetStream
    does); ``dedup_window`` how long a ``dedup_id`` is remembered.
    """

    durable = False

    def __init__(self, ack_wait: float = 30.0, dedup_window: float = 120.0,
                 pool: str = "default") -> None:
        self.pool = pool
        self.ack_wait = ack_wait
        self.dedup_window = dedup_window
        self.dead_letters: list[tuple[bytes, str]] = []
        self.published = 0
        self._queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()
        self._seen: dict[str, float] = {}
        self._seen_order: deque[tuple[float, str]] = deque()  # to forget ids in O(1) each
        self._inflight: set[_MemoryDelivery] = set()
        self._task: asyncio.Task[None] | None = None
        # One timer for the whole bus, due at the earliest ack-wait expiry (a timer per delivery
        # costs more than the rest of the bus on every message).
        self._reaper: asyncio.TimerHandle | None = None

    def _watch(self, expires: float) -> None:
        if self._reaper is None or self._reaper.when() > expires:
            if self._reaper is not None:
                self._reaper.cancel()
            self._reaper = asyncio.get_running_loop().call_at(expires, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = asyncio.get_running_loop().time()
        for delivery in [d for d in self._inflight if d.expires <= now]:
            delivery._expire()
        if self._inflight:
            self._watch(min(d.expires for d in self._inflight))

    @override
    async def publish(self, message: AnyMessage) -> None:
        now = time.monotonic()
        while self._seen_order and now - self._seen_order[0][0] >= self.dedup_window:
            at, old = self._seen_order.popleft()
            if self._seen.get(old) == at:
                del self._seen[old]
        key = message.dedup_id
        seen = self._seen.get(key)
        if seen is not None and now - seen < self.dedup_window:
            return
        self._seen[key] = now
        self._seen_order.append((now, key))
        self.published += 1
        self._enqueue(encode(message), 1)

    async def publish_raw(self, data: bytes) -> None:
        """Put arbitrary bytes on the bus (to test poison messages)."""
        self._enqueue(data, 1)

    def _enqueue(self, data: bytes, deliveries: int, delay: float = 0.0) -> None:
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, (data, deliveries))
        else:
            self._queue.put_nowait((data, deliveries))



    @override
    async def subscribe(self, handler: Handler) -> None:
        if self._task is not None:
            raise RuntimeError("InMemoryEventBus supports one subscriber at a time")
        self._task = asyncio.create_task(self._pump(handler), name="commandnet-memory-bus")

    async def _pump(self, handler: Handler) -> None:
        while True:
            data, deliveries = await self._queue.get()
            delivery = _MemoryDelivery(self, data, deliveries)
            self._inflight.add(delivery)
            delivery._arm()
            await handler(delivery)

    @override
    async def unsubscribe(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @override
    async def close(self) -> None:
        await self.unsubscribe()
