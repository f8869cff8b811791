"""The exceptions a user may catch. Every message names the node, hint, agent or field at fault."""

from __future__ import annotations


class CommandNetError(Exception):
    """Base class of every error commandnet raises on purpose."""


class GraphError(CommandNetError):
    """A graph cannot be built: it lists every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid graph:\n  - " + "\n  - ".join(self.problems))


class UnknownNodeError(CommandNetError):
    """A node name is not part of any graph this engine knows (code changed under an agent?)."""


class InvalidTransitionError(CommandNetError):
    """A node returned something its `run` return hint does not declare."""


class ContextValidationError(CommandNetError):
    """A context does not validate against the graph's context model."""


class TriggerConflictError(CommandNetError):
    """An agent id already exists with a different start node or initial context."""


class AgentNotFoundError(CommandNetError):
    """No agent has this id."""


class MalformedMessageError(CommandNetError):
    """A message on the bus is not JSON or does not fit any known message schema."""


class NodeTimeoutError(CommandNetError):
    """A node's `run` took longer than its retry policy's timeout."""


class LeaseLostError(CommandNetError):
    """A worker lost its lease while a node ran (cancelled, or taken over); its result is void."""


class WorkerDiedError(CommandNetError):
    """A step's attempts ran out because its workers died holding it (OOM kill, os._exit)."""


class StoreUnavailableError(CommandNetError):
    """The store cannot answer now (a lock held too long, a connection lost): try again."""
