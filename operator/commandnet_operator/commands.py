"""Signals and resumes through the Agent: which ``spec.signals`` and ``spec.resumes`` entries
are due, and what each becomes (a command to send, or a refusal the status explains).

Both lists only grow (CEL in the CRD: the old list is a prefix of the new one), so the
operator's progress is two counts in the status: ``status.signalsSent`` and
``status.resumesHandled``. An entry is handled once, in order: sent, or refused with a
CamelCase reason in condition ``Signalled`` or ``Resumed`` (and an Event). Sending is
at-least-once (the operator may die between the publish and the status patch): a signal's id
makes a resent signal a no-op in the store, and a resume's id is its de-duplication id on the
bus (JetStream drops a repeat within its duplicate window).

Pure functions over plain dicts (the resource's JSON), as :mod:`.status` is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from commandnet.messages import ResumeCommand, SignalCommand

from .admission import context_size
from .resource import MAX_CONTEXT_BYTES, Phase
from .status import RESUMED, SIGNALLED, set_condition

#: Seconds to wait for the workers to apply a resume that was sent (the status bucket shows the
#: agent running again) before saying it was not applied (the worker refused it: the reason is
#: in its log and dead-letter stream).
RESUME_TIMEOUT = 120.0


@dataclass(frozen=True)
class Decision:
    """What to do with one entry: send ``command``, or refuse it (``command`` None)."""

    kind: str  # "signal" or "resume"
    entry: Mapping[str, Any]
    command: SignalCommand | ResumeCommand | None
    reason: str
    message: str

    @property
    def event(self) -> tuple[str, str, str]:
        """The Event to post once handled: (type, reason, message)."""
        if self.command is not None:
            return "Normal", self.reason, self.message
        return "Warning", f"{self.kind.capitalize()}Refused", f"{self.reason}: {self.message}"


def _count(status: Mapping[str, Any], key: str) -> int:
    return int(status.get(key) or 0)


def _entries(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return list(spec.get(key) or [])


def due(spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether some entry of spec.signals or spec.resumes is not handled yet."""
    return (len(_entries(spec, "signals")) > _count(status, "signalsSent")
            or len(_entries(spec, "resumes")) > _count(status, "resumesHandled"))


def resume_in_flight(status: Mapping[str, Any]) -> bool:
    """Whether a resume was sent and the workers have not shown the agent running again."""
    return any(c.get("type") == RESUMED and c.get("status") == "Unknown"
               for c in status.get("conditions") or [])


def resume_overdue(status: Mapping[str, Any], now: datetime | None = None) -> bool:
    """Whether the resume in flight was sent more than :data:`RESUME_TIMEOUT` seconds ago."""
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == RESUMED), None)
    if cond is None or cond.get("status") != "Unknown":
        return False
    try:
        sent = datetime.fromisoformat(str(cond.get("lastTransitionTime")).replace("Z", "+00:00"))
    except ValueError:
        return False
    return ((now or datetime.now(UTC)) - sent).total_seconds() > RESUME_TIMEOUT


def not_applied(status: dict[str, Any], generation: int | None) -> dict[str, Any]:
    """``status`` after a resume that the workers did not apply in time."""
    conditions = set_condition(
        list(status.get("conditions") or []), RESUMED, "False", "ResumeNotApplied",
        f"the workers did not resume the agent within {RESUME_TIMEOUT:g}s: a worker refused "
        "the resume (see its log: a context patch the context model refuses, or a node the "
        "agent's graph lacks)", generation)
    return {**status, "conditions": conditions}


def decide(spec: Mapping[str, Any], status: Mapping[str, Any], agent_id: str,
           graph: Mapping[str, Any] | None) -> Decision | None:
    """The next entry to handle and what to do with it; None when none is due now.

    Resumes come first (a resume then a signal, appended together to a failed agent, resume
    it and then signal it). While a resume is in flight nothing is decided: the phase the
    status shows is about to change. Signals wait until the agent runs (a signal sent before
    the worker has created the agent would find no agent).
    """
    if resume_in_flight(status):
        return None
    phase = Phase(status["phase"]) if status.get("phase") else None
    resumes, handled = _entries(spec, "resumes"), _count(status, "resumesHandled")
    if handled < len(resumes):
        return _decide_resume(resumes[handled], phase, agent_id, graph)
    signals, sent = _entries(spec, "signals"), _count(status, "signalsSent")
    if sent < len(signals):
        return _decide_signal(signals[sent], phase, agent_id)
    return None


def _decide_resume(entry: Mapping[str, Any], phase: Phase | None, agent_id: str,
                   graph: Mapping[str, Any] | None) -> Decision:
    rid, node = str(entry["id"]), str(entry["fromNode"])
    patch = dict(entry.get("contextPatch") or {})
    what = f"resume {rid} at node {node}"
    if phase not in (Phase.FAILED, Phase.CANCELLED):
        shown = phase.value if phase is not None else "not started"
        return Decision("resume", entry, None, "NotFinished",
                        f"{what} not sent: the agent is {shown}; only a Failed or Cancelled "
                        "agent can be resumed (append another entry when it is)")
    nodes = _graph_nodes(graph)
    if nodes is not None and node not in nodes:
        return Decision("resume", entry, None, "UnknownNode",
                        f"{what} not sent: the pool's graph has no node {node!r}; its nodes "
                        f"are: {', '.join(sorted(nodes)) or 'none'}")
    size = context_size(patch)
    if size > MAX_CONTEXT_BYTES:
        return Decision("resume", entry, None, "ContextTooLarge",
                        f"{what} not sent: its contextPatch is {size} bytes as JSON; the limit "
                        f"is {MAX_CONTEXT_BYTES}")
    command = ResumeCommand(agent_id=agent_id, node=node, context_patch=patch, request=rid)
    return Decision("resume", entry, command, "ResumeSent", f"{what} sent")


def _decide_signal(entry: Mapping[str, Any], phase: Phase | None,
                   agent_id: str) -> Decision | None:
    sid, name = str(entry["id"]), str(entry["name"])
    what = f"signal {name!r} (id {sid})"
    if phase is None or phase is Phase.PENDING:
        return None  # sent once the workers have the agent
    if phase.finished:
        return Decision("signal", entry, None, "AgentFinished",
                        f"{what} not sent: the agent is {phase.value}")
    payload = entry.get("payload")
    size = context_size(payload)
    if size > MAX_CONTEXT_BYTES:
        return Decision("signal", entry, None, "PayloadTooLarge",
                        f"{what} not sent: its payload is {size} bytes as JSON; the limit is "
                        f"{MAX_CONTEXT_BYTES}")
    command = SignalCommand(agent_id=agent_id, name=name, payload=payload, signal_id=sid)
    return Decision("signal", entry, command, "SignalSent", f"{what} sent")


def _graph_nodes(graph: Mapping[str, Any] | None) -> set[str] | None:
    if graph is None:
        return None
    return set(graph.get("nodes") or {})


def handled(status: Mapping[str, Any], decision: Decision,
            generation: int | None) -> dict[str, Any]:
    """``status`` after ``decision``'s entry was sent (or refused): one more counted, and
    its condition says so (a resume sent is ``Unknown`` until the workers apply it)."""
    new = dict(status)
    conditions = list(status.get("conditions") or [])
    if decision.kind == "signal":
        new["signalsSent"] = _count(status, "signalsSent") + 1
        state = "True" if decision.command is not None else "False"
        new["conditions"] = set_condition(conditions, SIGNALLED, state, decision.reason,
                                          decision.message, generation)
    else:
        new["resumesHandled"] = _count(status, "resumesHandled") + 1
        state = "Unknown" if decision.command is not None else "False"
        if state == "Unknown":  # a new transition each time: its time starts the timeout
            conditions = [c for c in conditions if c.get("type") != RESUMED]
        new["conditions"] = set_condition(conditions, RESUMED, state, decision.reason,
                                          decision.message, generation)
    return new
