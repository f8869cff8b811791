"""Workflow directives: what a node returns to wait (a durable timer, a signal) or to fan out
into parallel branches and join them, instead of moving at once. They live outside the core:
the engine applies any :class:`~commandnet.node.Directive` through ``targets()`` and
``commit_fields()``, and the store parks the agent."""

from .directives import BranchResult, FanOut, Sleep, WaitSignal

__all__ = ["BranchResult", "FanOut", "Sleep", "WaitSignal"]
