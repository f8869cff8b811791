"""commandnet: typed, durable state machines. Nodes are classes; return hints are the graph."""

from .bus import Delivery, EventBus
from .engine import Engine
from .errors import (
    AgentNotFoundError,
    CommandNetError,
    ContextValidationError,
    GraphError,
    InvalidTransitionError,
    LeaseLostError,
    MalformedMessageError,
    NodeTimeoutError,
    StoreUnavailableError,
    TriggerConflictError,
    UnknownNodeError,
    WorkerDiedError,
)
from .graph import Graph, GraphAnalyzer
from .messages import CancelCommand, StepEvent, TriggerCommand
from .node import Node
from .observer import DeliveryInfo, ErrorInfo, Observer, StatusInfo, TransitionInfo
from .persistence import Persistence
from .policy import RetryPolicy
from .records import AgentRecord, AgentStatus, HistoryRecord

__version__ = "0.1.0"

__all__ = [  # the public API, in one place
    "AgentNotFoundError", "AgentRecord", "AgentStatus", "CancelCommand", "CommandNetError",
    "ContextValidationError", "Delivery", "DeliveryInfo", "Engine", "ErrorInfo", "EventBus",
    "Graph", "GraphAnalyzer", "GraphError", "HistoryRecord", "InvalidTransitionError",
    "LeaseLostError", "MalformedMessageError", "Node", "NodeTimeoutError", "Observer",
    "Persistence", "RetryPolicy", "StatusInfo", "StepEvent", "StoreUnavailableError",
    "TransitionInfo", "TriggerCommand", "TriggerConflictError", "UnknownNodeError",
    "WorkerDiedError",
]
