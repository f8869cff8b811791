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
from .messages import CancelCommand, ResumeCommand, SignalCommand, StepEvent, TriggerCommand
from .node import Directive, Node
from .observer import DeliveryInfo, ErrorInfo, Observer, StatusInfo, TransitionInfo
from .persistence import Persistence
from .policy import RetryPolicy
from .records import AgentRecord, AgentStatus, HistoryRecord, SignalOutcome
from .workflow import BranchResult, FanOut, Sleep, WaitSignal

__version__ = "0.1.0"

__all__ = [  # the public API, in one place
    "AgentNotFoundError", "AgentRecord", "AgentStatus", "BranchResult", "CancelCommand",
    "CommandNetError", "ContextValidationError", "Delivery", "DeliveryInfo", "Directive",
    "Engine", "ErrorInfo", "EventBus", "FanOut", "Graph", "GraphAnalyzer", "GraphError",
    "HistoryRecord", "InvalidTransitionError", "LeaseLostError", "MalformedMessageError",
    "Node", "NodeTimeoutError", "Observer", "Persistence", "ResumeCommand", "RetryPolicy",
    "SignalCommand", "SignalOutcome", "Sleep", "StatusInfo", "StepEvent",
    "StoreUnavailableError", "TransitionInfo", "TriggerCommand", "TriggerConflictError",
    "UnknownNodeError", "WaitSignal", "WorkerDiedError",
]
