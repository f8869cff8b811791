"""What the store holds about an agent, and what the engine asks it to change."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# The workflow's records, re-exported for stores.
from .workflow.records import Branch as Branch
from .workflow.records import SignalOutcome as SignalOutcome
from .workflow.records import branch_id as branch_id


class AgentStatus(enum.StrEnum):
    """Lifecycle of an agent; only ``running`` agents are ever leased."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether the agent will never run again."""
        return self is not AgentStatus.RUNNING


@dataclass(frozen=True)
class AgentRecord:
    """One agent row. ``step`` counts committed transitions; ``node`` runs (or ran last)."""

    agent_id: str
    node: str
    step: int
    status: AgentStatus
    context: dict[str, Any]
    start_node: str
    initial_context: dict[str, Any]
    attempts: int = 0  # attempts of this step started (counted when the lease is taken)
    error: str | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    pool: str = "default"
    crashes: int = 0  # attempts of this step whose worker died holding the lease
    payload: Any = None  # JSON given to this step's node (a trigger's or a signal's)
    wake_at: float | None = None  # parked (a timer, a signal wait's timeout) until then
    waiting: str | None = None  # parked until the signal of this name arrives
    parent_id: str | None = None  # a fan-out branch: the agent that joins it
    joining: int | None = None  # a fan-out's join: parked until this many branches have ended
    graph_version: str | None = None  # of the graph that triggered it or ran its last step

    @property
    def parked(self) -> bool:
        """Whether the agent waits for a time, a signal or branches (no event, lease, slot)."""
        return self.wake_at is not None or self.waiting is not None or self.joining is not None


@dataclass(frozen=True)
class HistoryRecord:
    """One committed transition: the agent moved from ``step - 1`` to ``step``."""

    agent_id: str
    step: int
    from_node: str
    to_node: str | None
    attempts: int
    duration: float
    at: float
    kind: str = "step"  # step (a node ran), timeout (a signal wait ran out), resume


@dataclass(frozen=True)
class NewAgent:
    """A trigger request, stored with the first step event in one transaction.

    An id whose row is a cancel tombstone (a cancel that overtook its trigger) takes the
    request's start node and context but stays cancelled, and no event is written.
    """

    agent_id: str
    start_node: str
    context: dict[str, Any]
    status: AgentStatus = AgentStatus.RUNNING
    error: str | None = None
    pool: str = "default"
    payload: Any = None
    graph_version: str | None = None


class LeaseState(enum.StrEnum):
    """Outcome of :meth:`Persistence.load_and_lock_agent`."""

    GRANTED = "granted"  # the caller holds the lease and must run the step
    STALE = "stale"  # the step is past or the agent is final: acknowledge and drop
    BUSY = "busy"  # another worker holds a live lease, or a retry waits: try after retry_after
    MISSING = "missing"  # no such agent: drop (a trigger that was never committed)
    FOREIGN = "foreign"  # the agent belongs to another pool: leave it to that pool


@dataclass(frozen=True)
class Lease:
    """The answer to a lease request; ``record`` is set when granted."""

    state: LeaseState
    record: AgentRecord | None = None
    retry_after: float = 0.0


@dataclass(frozen=True)
class Commit:
    """A transition to commit, fenced by ``owner`` holding the lease on ``step``.

    ``to_node=None`` ends the agent as succeeded (``node`` stays the last node that ran);
    otherwise the agent moves to ``to_node`` at ``step + 1`` and the step event for it is
    written to the outbox in the same transaction, unless the agent parks: ``wake_in`` (a
    timer: due ``wake_in`` s later on the store's clock) or ``waiting`` (a signal name; a kept
    signal of that name is consumed at once and makes the agent due now, otherwise it waits,
    until ``wake_in`` if set, then moves to ``timeout_node``), or fans out: each of ``branches``
    becomes a sub-agent of the same pool (id ``branch_id(agent_id, step + 1, i)``, this agent its
    ``parent_id``, its step 0 event in the outbox) and the agent parks at ``to_node`` (the join)
    with ``joining`` = their number. A branch that ends counts down its parent's ``joining`` in
    the transaction that ends it; at 0 the parent is due. ``join_policy`` ``fail_fast``: a branch
    that fails or is cancelled fails the parent at once, naming it, and cancels its siblings;
    ``collect``: the join runs when all have ended. Leasing the join step gives it the branches'
    results as its payload, in branch order: ``{agent_id, status, node, context, error}``.
    ``payload`` goes to ``to_node``. ``keep_lease`` (seconds; a plain move only): ``owner``
    keeps the lease of ``step + 1`` for that long, its attempt counted as a lease would, so the
    worker runs the next step without leasing it (sticky execution; its outbox event stays the
    recovery should the worker die).
    """

    agent_id: str
    owner: str
    step: int
    from_node: str
    to_node: str | None
    context: dict[str, Any]
    attempts: int
    duration: float
    payload: Any = None
    wake_in: float | None = None
    waiting: str | None = None
    timeout_node: str | None = None
    branches: tuple[Branch, ...] | None = None  # None: no fan-out; () joins at once
    join_policy: str = "fail_fast"
    graph_version: str | None = None  # of the graph that ran the step (None: keep the stored)
    keep_lease: float | None = None  # see commandnet.leasing.kept.kept_lease

    @property
    def plain(self) -> bool:
        """A move to a next step that runs at once: nothing parks, fans out or ends."""
        return (self.to_node is not None and self.wake_in is None and self.waiting is None
                and self.branches is None)


@dataclass(frozen=True)
class Failure:
    """A failed attempt of ``step``, fenced like a commit.

    ``final`` marks the agent failed; otherwise ``attempts`` is stored and the lease is released
    for ``retry_in`` seconds (on the store's clock), so no worker runs the step before its backoff
    is over.
    """

    agent_id: str
    owner: str
    step: int
    attempts: int
    error: str
    final: bool
    retry_in: float = 0.0


@dataclass(frozen=True)
class OutboxEntry:
    """A step event committed but perhaps not yet published."""

    agent_id: str
    step: int
    created_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class SweepClaim:
    """The pool's repair turn (one sweeper per pool at a time), on the store's clock."""

    now: float
    resynced_until: float | None  # the status resync has covered changes up to here

