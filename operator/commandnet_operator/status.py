"""From the workers' status bucket to the Agent's status: phases, conditions, history.

Pure functions over plain dicts (the resource's JSON), so the rules are tested without a
cluster. The operator merges each bucket value into the status the Agent holds and patches
only what changed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from commandnet.tracing import trace_id_of

from .resource import ERROR_LIMIT, HISTORY_LIMIT, Phase

#: Condition types, in the order they are listed.
TRIGGERED, RUNNING, COMPLETE, FAILED, SIGNALLED, RESUMED, BUS = (
    "Triggered", "Running", "Complete", "Failed", "Signalled", "Resumed", "BusAvailable")
_ORDER = {kind: i for i, kind in enumerate((TRIGGERED, RUNNING, COMPLETE, FAILED, SIGNALLED,
                                            RESUMED, BUS))}


def now() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return _kube_time(datetime.now(UTC))


def _kube_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_of(value: dict[str, Any]) -> str:
    raw = value.get("updated_at")
    try:
        return _kube_time(datetime.fromisoformat(str(raw)))
    except ValueError:
        return now()


def set_condition(conditions: list[dict[str, Any]], kind: str, status: str, reason: str,
                  message: str = "", generation: int | None = None,
                  at: str | None = None) -> list[dict[str, Any]]:
    """``conditions`` with ``kind`` set; its time moves only when its status changes."""
    old = next((c for c in conditions if c.get("type") == kind), None)
    when = at or now()
    if old is not None and old.get("status") == status:
        when = str(old.get("lastTransitionTime", when))
    new: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": when}
    if generation is not None:
        new["observedGeneration"] = generation
    rest = [c for c in conditions if c.get("type") != kind]
    return sorted([*rest, new], key=lambda c: _ORDER.get(str(c.get("type")), len(_ORDER)))


def phase_of(value: dict[str, Any]) -> Phase:
    """The Agent phase of a bucket value (``status``: running/succeeded/failed/cancelled)."""
    return Phase(str(value.get("status", "running")).capitalize())


def merge(status: dict[str, Any], value: dict[str, Any], generation: int | None
          ) -> dict[str, Any]:
    """The Agent status after bucket value ``value``; ``status`` when it says nothing new.

    A value older than what the status shows (an earlier step, or running after finished)
    is ignored: the bucket never moves back, and neither does the Agent. A finished agent
    moves on only at a later step: it was resumed (the resume is a step of its own).
    """
    phase = phase_of(value)
    step = int(value.get("step", 0))
    node = str(value.get("node") or "")
    shown = Phase(status["phase"]) if status.get("phase") else Phase.PENDING
    shown_step = int(status.get("step") or 0)
    resumed = shown.finished and step > shown_step
    if (shown.finished and not resumed) or (step, phase.finished) < (shown_step, False):
        return status
    # The trace the workers record with the status (tracing on) is the agent's real one: it
    # replaces the id the operator took from its own trigger span (docs/tracing.md).
    trace_id = trace_id_of(value.get("trace"))
    if (phase, step, node) == (shown, shown_step, status.get("currentNode")) and (
            trace_id is None or trace_id == status.get("traceId")):
        return status
    at = _time_of(value)
    new = dict(status)
    new.update(phase=phase.value, currentNode=node, step=step)
    if trace_id is not None:
        new["traceId"] = trace_id
    if generation is not None:
        new["observedGeneration"] = generation
    conditions = list(status.get("conditions") or [])
    if resumed:  # the story goes on: the last ending is history (the store keeps it)
        new.update(completionTime=None, error=None)
        message = f"resumed at node {node}, step {step}"
        if any(c.get("type") == FAILED for c in conditions):
            conditions = set_condition(conditions, FAILED, "False", "Resumed", message,
                                       generation, at)
        conditions = set_condition(conditions, RESUMED, "True", "Resumed", message, generation,
                                   at)
    history = list(status.get("history") or [])
    if not history or history[-1].get("step") != step or history[-1].get("phase") != phase:
        history.append({"step": step, "node": node, "phase": phase.value, "time": at})
    new["history"] = history[-HISTORY_LIMIT:]
    if phase is Phase.RUNNING:
        conditions = set_condition(conditions, RUNNING, "True", "NodeRunning",
                                   f"at node {node}, step {step}", generation, at)
    else:
        reason = str(value.get("reason") or _default_reason(phase))
        error = str(value.get("error") or "")
        message = _cut(error) if error else f"finished at node {node} after {step} step(s)"
        conditions = set_condition(conditions, RUNNING, "False", reason, message, generation,
                                   at)
        if phase is Phase.SUCCEEDED:
            conditions = set_condition(conditions, COMPLETE, "True", "Succeeded", message,
                                       generation, at)
        else:
            conditions = set_condition(conditions, FAILED, "True", reason, message, generation,
                                       at)
            new["error"] = _cut(error) if error else reason
        new["completionTime"] = at
    new["conditions"] = conditions
    return new


def _default_reason(phase: Phase) -> str:
    return {Phase.SUCCEEDED: "Succeeded", Phase.CANCELLED: "Cancelled"}.get(phase, "NodeFailed")


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"


def with_bus(status: dict[str, Any], available: bool, detail: str = "") -> dict[str, Any]:
    """``status`` with the BusAvailable condition set. A finished Agent is not marked down (it
    no longer needs the bus), but a False left from an outage is cleared: with local handoff
    an Agent can finish while the operator's link to NATS is still down."""
    phase = status.get("phase")
    if not available and phase and Phase(phase).finished:
        return status
    if available:
        known = any(c.get("type") == BUS for c in status.get("conditions") or [])
        if not known:
            return status  # nothing to clear: the bus was never reported down
        reason, message = "BusReconnected", "NATS is reachable again"
    else:
        reason, message = "BusUnavailable", detail or "NATS is unreachable; retrying"
    conditions = set_condition(list(status.get("conditions") or []), BUS,
                               "True" if available else "False", reason, message)
    if conditions == status.get("conditions"):
        return status
    return {**status, "conditions": conditions}


def bus_shown_down(status: dict[str, Any]) -> bool:
    """Whether ``status`` shows BusAvailable=False: its follower must stay until the link is
    back to clear it, even if the Agent finished meanwhile (with local handoff a worker can
    finish it during the outage)."""
    return any(c.get("type") == BUS and c.get("status") == "False"
               for c in status.get("conditions") or [])


def changed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The top-level fields of ``new`` that differ from ``old`` (a merge patch's body)."""
    return {key: value for key, value in new.items() if old.get(key) != value}
