"""The observer that names what each step's span did: node, attempt, outcome, error."""

from __future__ import annotations

from opentelemetry.trace import Status, StatusCode

from ..observer import DeliveryInfo, ErrorInfo, Observer, TransitionInfo
from .spans import ATTEMPT, NEXT_NODE, NODE, current_handling


class TracingObserver(Observer):
    """Adds node, attempt and outcome to the span of the delivery being handled.

    Spans come from the bus (the JetStream bus starts one per delivery when tracing is
    active); this observer runs in the same task, after the commit, and only fills them in.
    Outcomes: ``transition`` (committed, next node queued), ``succeeded`` (committed, agent
    done), ``retry`` and ``failed`` (the attempt raised), or the lease's answer when the step
    did not run: ``stale``, ``busy``, ``missing``, ``foreign``; commands: ``handled`` or
    ``dead_letter``. A delivery settled with no such word (a commit refused by the fence, a
    step handed back at drain) shows how it was settled: ``ack`` or ``nack``.
    """

    async def on_delivery(self, info: DeliveryInfo) -> None:
        handling = current_handling()
        if handling is not None and info.outcome != "granted":
            handling.set_outcome(info.outcome)

    async def on_step(self, info: TransitionInfo) -> None:
        handling = current_handling(info.agent_id)
        if handling is None:
            return
        span = handling.span
        span.update_name(f"step {info.from_node}")
        span.set_attributes({NODE: info.from_node, ATTEMPT: info.attempts})
        if info.to_node is not None:
            span.set_attribute(NEXT_NODE, info.to_node)
        handling.set_outcome("succeeded" if info.to_node is None else "transition")

    async def on_step_error(self, info: ErrorInfo) -> None:
        handling = current_handling(info.agent_id)
        if handling is None:
            return
        span = handling.span
        span.update_name(f"step {info.node}")
        span.set_attributes({NODE: info.node, ATTEMPT: info.attempt})
        span.record_exception(info.error)
        span.set_status(Status(StatusCode.ERROR, f"{type(info.error).__name__}: {info.error}"))
        handling.set_outcome("failed" if info.final else "retry")
