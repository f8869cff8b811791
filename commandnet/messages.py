"""The wire format: JSON messages on the bus (never pickle). The bus only says "run step N"."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import MalformedMessageError


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    v: Literal[1] = 1


class StepEvent(_Message):
    """Agent ``agent_id`` should run step ``step`` (the state itself lives in the store)."""

    kind: Literal["step"] = "step"
    agent_id: str = Field(min_length=1)
    step: int = Field(ge=0)
    redo: int = Field(default=0, ge=0)  # >0: a reconciler re-publish, which must pass de-dup

    @property
    def dedup_id(self) -> str:
        """Identifier for bus-side de-duplication (JetStream ``Nats-Msg-Id``)."""
        base = f"{self.agent_id}:{self.step}"
        return f"{base}:r{self.redo}" if self.redo else base


class TriggerCommand(_Message):
    """Start an agent by node name, from a process that need not have the graph's code."""

    kind: Literal["trigger"] = "trigger"
    agent_id: str = Field(min_length=1)
    start_node: str = Field(min_length=1)
    context: dict[str, Any] = Field(default_factory=dict)
    payload: Any = None

    @property
    def dedup_id(self) -> str:
        """Identifier for de-duplication: a repeat of this request, not any trigger of the id
        (a conflicting one must reach a worker, to be refused with a reason)."""
        request = json.dumps([self.start_node, self.context, self.payload],
                             sort_keys=True).encode()
        return f"{self.agent_id}:trigger:{hashlib.sha256(request).hexdigest()[:16]}"


class CancelCommand(_Message):
    """Cancel an agent; a step in flight is discarded at commit."""

    kind: Literal["cancel"] = "cancel"
    agent_id: str = Field(min_length=1)
    reason: str = "cancelled"
    request: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)

    @property
    def dedup_id(self) -> str:
        """Identifier for de-duplication: this request (a retried publish), never a later
        cancel of the same agent."""
        return f"{self.agent_id}:cancel:{self.request}"


class SignalCommand(_Message):
    """Send signal ``name`` to an agent; the same ``signal_id`` is applied once."""

    kind: Literal["signal"] = "signal"
    agent_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    payload: Any = None
    signal_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)

    @property
    def dedup_id(self) -> str:
        """Identifier for de-duplication: this signal."""
        return f"{self.agent_id}:signal:{self.signal_id}"


class ResumeCommand(_Message):
    """Run a failed or cancelled agent again from ``node``, its context patched (RFC 7396)."""

    kind: Literal["resume"] = "resume"
    agent_id: str = Field(min_length=1)
    node: str = Field(min_length=1)
    context_patch: dict[str, Any] = Field(default_factory=dict)
    request: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)

    @property
    def dedup_id(self) -> str:
        """Identifier for de-duplication: this request."""
        return f"{self.agent_id}:resume:{self.request}"


AnyMessage = StepEvent | TriggerCommand | CancelCommand | SignalCommand | ResumeCommand
Message = Annotated[AnyMessage, Field(discriminator="kind")]
_adapter: TypeAdapter[AnyMessage] = TypeAdapter(Message)


def encode(message: AnyMessage) -> bytes:
    """Serialise a message to JSON bytes."""
    return message.model_dump_json().encode()


def decode(data: bytes) -> AnyMessage:
    """Parse JSON bytes; :class:`MalformedMessageError` names what is wrong."""
    try:
        return _adapter.validate_json(data)
    except ValidationError as exc:
        preview = data[:120].decode("utf-8", "replace")
        raise MalformedMessageError(f"malformed message {preview!r}: {exc}") from None
