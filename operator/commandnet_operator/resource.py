"""The ``Agent`` custom resource, as Pydantic models: the one source of ``crds/`` (see
:mod:`.crd`) and the shapes the operator reads and writes.

Field names are the resource's (camelCase); descriptions become ``kubectl explain`` text.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "commandnet.io"
VERSION = "v1alpha1"
KIND = "Agent"
PLURAL = "agents"
SINGULAR = "agent"
SHORT_NAMES = ["ag"]
CATEGORIES = ["commandnet", "all"]
API_VERSION = f"{GROUP}/{VERSION}"

#: The context's size limit, JSON-encoded: the webhook refuses more, and so does the operator
#: should the webhook be bypassed (etcd's object limit is about 1.5 MiB for the whole object).
MAX_CONTEXT_BYTES = 64 * 1024
#: Object keys at the context's top level (the schema's own limit, checked by the API server).
MAX_CONTEXT_PROPERTIES = 512
#: Transitions kept in ``status.history``: status stays small (the store has them all).
HISTORY_LIMIT = 10
#: ``status.error`` is cut to this many characters (the store keeps the whole error).
ERROR_LIMIT = 2048
POOL_PATTERN = r"^[A-Za-z0-9_-]+$"
#: Entries ``spec.signals`` and ``spec.resumes`` may hold (each list may only grow).
MAX_SIGNALS = 100
MAX_RESUMES = 20
#: An entry's id: what makes a resent signal or resume harmless (a DNS label's alphabet).
ENTRY_ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Signal(_Model):
    """A signal for the agent, sent by the operator once the agent runs: a node waiting for
    its name receives its payload (a signal sent before the wait is kept until then)."""

    id: str = Field(
        min_length=1, max_length=63, pattern=ENTRY_ID_PATTERN,
        description="Unique in spec.signals: the signal's id, so a resent signal is applied "
                    "once.")
    name: str = Field(min_length=1, max_length=253,
                      description="The signal's name, as the waiting node names it.")
    payload: dict[str, Any] | None = Field(
        default=None,
        description="A JSON object: the payload the node that receives the signal gets "
                    "(validated by its declared type, Node[Ctx, Payload]). At most "
                    f"{MAX_CONTEXT_BYTES // 1024} KiB as JSON.")


class Resume(_Model):
    """A request to run a Failed or Cancelled agent again from a node of its graph. Sent only
    when the Agent is Failed or Cancelled; otherwise refused (condition Resumed=False)."""

    id: str = Field(min_length=1, max_length=63, pattern=ENTRY_ID_PATTERN,
                    description="Unique in spec.resumes: the request's id.")
    fromNode: str = Field(min_length=1, max_length=253,
                          description="The node to run again from: a node of the agent's graph.")
    contextPatch: dict[str, Any] | None = Field(
        default=None,
        description="A JSON merge patch (RFC 7396) applied to the agent's context before it "
                    "runs again; the result must validate as the graph's context model.")


class AgentSpec(_Model):
    """What to run: a start node of a pool's graph, the context it starts with, and, added
    later, signals for it and requests to resume it. Immutable after creation except that
    signals and resumes may grow: delete the Agent (which cancels it) and create another."""

    startNode: str = Field(
        min_length=1, max_length=253,
        description="Name of the node the agent starts at: a node of the pool's graph (its "
                    "class name, or the name the class sets). The admission webhook refuses a "
                    "name the pool's published graph lacks, listing the nodes it has.")
    pool: str = Field(
        default="default", min_length=1, max_length=63, pattern=POOL_PATTERN,
        description="Worker pool that runs the agent: workers started with COMMANDNET_POOL "
                    "set to this name (one graph per pool). Default: default.")
    context: dict[str, Any] = Field(
        default_factory=dict, max_length=MAX_CONTEXT_PROPERTIES,
        description="Initial context: a JSON object that must validate as the graph's "
                    "Pydantic context model (the webhook checks it against the pool's published "
                    "JSON schema and names the field at fault). At most "
                    f"{MAX_CONTEXT_PROPERTIES} top-level keys and {MAX_CONTEXT_BYTES // 1024} "
                    "KiB as JSON.")
    payload: dict[str, Any] | None = Field(
        default=None,
        description="A JSON object: the payload of the start node (Node[Ctx, Payload]), sent "
                    "with the trigger. The webhook checks it against the node's published "
                    "payload schema and names the field at fault. At most "
                    f"{MAX_CONTEXT_BYTES // 1024} KiB as JSON.")
    ttlSecondsAfterFinished: int | None = Field(
        default=None, ge=0,
        description="Seconds after the agent finishes (Succeeded, Failed or Cancelled) when the "
                    "operator deletes this Agent, as for Jobs. Unset: the Agent is kept. Its "
                    "history stays in the store either way.")
    signals: list[Signal] = Field(
        default=[], max_length=MAX_SIGNALS,
        description="Signals for the agent, sent in order once it runs. Append only (kubectl "
                    "patch --type=json, op add, path /spec/signals/-): an entry is never "
                    "changed or removed.")
    resumes: list[Resume] = Field(
        default=[], max_length=MAX_RESUMES,
        description="Requests to resume the agent from a node, handled in order: sent when the "
                    "Agent is Failed or Cancelled, refused otherwise (condition Resumed). "
                    "Append only, like signals.")


class Phase(StrEnum):
    """The human column; conditions are the machine-readable truth."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        """Whether the agent will not run again."""
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


class Condition(_Model):
    """One aspect of the agent's state, as Kubernetes conditions are (keyed by type)."""

    type: str = Field(description="Triggered, Running, Complete, Failed, Signalled, Resumed or "
                                  "BusAvailable.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="Why, in CamelCase (for example TriggerSent, UnknownNode, "
                                    "InvalidContext, NodeFailed, WorkerDied, BusUnavailable, "
                                    "SignalSent, ResumeSent, NotFinished).")
    message: str = Field(default="", description="Why, for people.")
    lastTransitionTime: datetime = Field(description="When status last changed.")
    observedGeneration: int | None = Field(default=None,
                                           description="The spec generation it describes.")


class Transition(_Model):
    """One step the operator saw the agent take."""

    step: int = Field(ge=0, description="The step the agent reached (1 after its first node).")
    node: str = Field(description="The node the agent is at after the step (for the last "
                                  "step of a finished agent, the node it finished in).")
    phase: Phase = Field(description="The phase after the step.")
    time: datetime = Field(description="When the worker recorded it.")


class AgentStatus(_Model):
    """What the agent is doing, written by the operator from the workers' status bucket."""

    phase: Phase | None = Field(default=None, description="Pending, Running, Succeeded, Failed "
                                                          "or Cancelled.")
    agentId: str | None = Field(default=None,
                                description="The agent's id in the store and on the bus "
                                            "(namespace/name/uid); `commandnet status` takes it.")
    currentNode: str | None = Field(default=None,
                                    description="The node the agent is at, or finished in.")
    step: int | None = Field(default=None, ge=0,
                             description="Transitions committed so far.")
    observedGeneration: int | None = Field(default=None,
                                           description="The spec generation this status is of.")
    startTime: datetime | None = Field(default=None,
                                       description="When the operator sent the trigger.")
    traceId: str | None = Field(
        default=None, pattern="^[0-9a-f]{32}$",
        description="The OpenTelemetry trace of the agent (when tracing is on): its trigger "
                    "span is the root, every step a span in it. Look it up in Jaeger/Tempo.")
    completionTime: datetime | None = Field(default=None, description="When the agent finished.")
    error: str | None = Field(default=None,
                              description=f"The failure, cut to {ERROR_LIMIT} characters.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="Machine-readable state, keyed by type.")
    signalsSent: int | None = Field(
        default=None, ge=0,
        description="How many spec.signals entries the operator has handled (sent, or refused "
                    "because the agent had finished): the next one to send is this index.")
    resumesHandled: int | None = Field(
        default=None, ge=0,
        description="How many spec.resumes entries the operator has handled (sent or refused).")
    history: list[Transition] = Field(
        default_factory=list, max_length=HISTORY_LIMIT,
        description=f"The last {HISTORY_LIMIT} transitions seen (the store keeps them all).")


class Agent(_Model):
    """A durable agent run by a commandnet worker pool."""

    apiVersion: Literal["commandnet.io/v1alpha1"] = "commandnet.io/v1alpha1"  # API_VERSION
    kind: Literal["Agent"] = "Agent"  # KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: AgentSpec
    status: AgentStatus | None = None


def agent_id(namespace: str, name: str, uid: str) -> str:
    """The store's and the bus's id of an Agent: unique even when a name is reused."""
    return f"{namespace}/{name}/{uid}"
