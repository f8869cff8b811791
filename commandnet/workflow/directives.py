"""Durable timers, signal waits and fan-out with a join, as directives a node returns.

A parked agent holds no message, no lease and no worker slot: the store keeps it with its due
time (found through an index by every worker's wake loop), the signal name it waits for, or the
number of its branches still running.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, TypeVarTuple

from pydantic import BaseModel

from ..node import AnyNode, Directive
from .records import Branch

T = TypeVar("T", bound=AnyNode)
Ts = TypeVarTuple("Ts")
CtxT = TypeVar("CtxT", bound=BaseModel)
JoinPolicy = Literal["fail_fast", "collect"]


def _seconds(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


class Sleep(Directive[T], Generic[T]):
    """Move to ``to`` after ``seconds``, or at ``until`` (an aware datetime): ``Sleep[Next]``.

    The delay is counted on the store's clock from the commit; ``until`` is turned into a delay
    on this worker's clock, so keep clocks in sync (NTP) for absolute times.
    """

    labels = ("sleep",)

    def __init__(self, to: type[T], *, seconds: float | None = None,
                 until: datetime | None = None) -> None:
        if (seconds is None) == (until is None):
            raise ValueError("Sleep needs exactly one of seconds= or until=")
        if until is not None:
            if until.tzinfo is None:
                raise ValueError("Sleep(until=...) needs an aware datetime (with a tzinfo)")
            seconds = max(until.timestamp() - time.time(), 0.0)
        assert seconds is not None
        self.to, self.seconds = to, _seconds(seconds, "Sleep(seconds=...)")

    def targets(self) -> tuple[type[AnyNode], ...]:
        return (self.to,)

    def commit_fields(self) -> dict[str, Any]:
        return {"wake_in": self.seconds}


class WaitSignal(Directive[*Ts], Generic[*Ts]):
    """Wait for the signal ``name``, then run ``to`` with its payload: ``WaitSignal[Next]``.

    With ``timeout`` (seconds), a wait that runs out moves to ``on_timeout`` instead, hinted
    ``WaitSignal[Next, TimedOut]``; without ``on_timeout`` it runs ``to`` with payload None. A
    signal sent before the wait began is kept and consumed at once, oldest first.
    """

    labels = ("signal", "timeout")

    def __init__(self, name: str, to: type[AnyNode], *, timeout: float | None = None,
                 on_timeout: type[AnyNode] | None = None) -> None:
        if not name:
            raise ValueError("WaitSignal needs a signal name")
        if on_timeout is not None and timeout is None:
            raise ValueError("WaitSignal(on_timeout=...) needs timeout=")
        self.name, self.to, self.on_timeout = name, to, on_timeout
        self.timeout = None if timeout is None else _seconds(timeout, "WaitSignal(timeout=...)")

    def targets(self) -> tuple[type[AnyNode], ...]:
        return (self.to,) if self.on_timeout is None else (self.to, self.on_timeout)

    def commit_fields(self) -> dict[str, Any]:
        if self.timeout is None:
            return {"waiting": self.name}
        return {"waiting": self.name, "wake_in": self.timeout,
                "timeout_node": (self.on_timeout or self.to).node_name}


class BranchResult(BaseModel, Generic[CtxT]):
    """How one branch ended, as a join node receives it: ``Node[Ctx, list[BranchResult[Ctx]]]``
    gets one per branch, in the order the fan-out listed them."""

    agent_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    node: str  # the node it ended at
    context: CtxT  # its context when it ended
    error: str | None = None


class FanOut(Directive[*Ts], Generic[*Ts]):
    """Run ``branches`` in parallel as sub-agents, then the ``join`` node once, with their results
    as its payload: ``FanOut[Join, BranchStart]`` (several branch start nodes may follow).

    Each branch is ``(start node, context)``, a node of this graph with a context of its model;
    it may run on any worker of the pool. ``policy="fail_fast"`` (default): the first branch
    that fails or is cancelled fails this agent, naming it, and cancels the other branches;
    ``"collect"``: the join runs after every branch has ended, failures included, and decides.
    Merging is the join node's: it receives each branch's final context, typed.
    """

    labels = ("join", "branch")

    def __init__(self, join: type[AnyNode],
                 branches: Iterable[tuple[type[AnyNode], BaseModel]], *,
                 policy: JoinPolicy = "fail_fast") -> None:
        if policy not in ("fail_fast", "collect"):
            raise ValueError(f"FanOut policy must be 'fail_fast' or 'collect', not {policy!r}")
        self.join, self.branches, self.policy = join, list(branches), policy
        for node, context in self.branches:
            if not isinstance(context, BaseModel):
                raise TypeError(f"FanOut branch at {node.__name__}: the context must be a "
                                f"model instance, not {type(context).__name__}")

    def targets(self) -> tuple[type[AnyNode], ...]:
        return (self.join, *dict.fromkeys(node for node, _ in self.branches))

    def commit_fields(self) -> dict[str, Any]:
        return {"join_policy": self.policy, "branches": tuple(
            Branch(node.node_name, context.model_dump(mode="json"))
            for node, context in self.branches)}
