"""What callers ask of agents beyond the durable protocol: queries, signals, resume, and the
commands that bring these (and triggers and cancels) over the bus from processes without the
graph's code. A mixin of :class:`~commandnet.engine.Engine`; the protocol lives in the core."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import (
    AgentNotFoundError,
    CommandNetError,
    ContextValidationError,
    UnknownNodeError,
)
from ..graph import NodeClass
from ..messages import AnyMessage, CancelCommand, ResumeCommand, SignalCommand, TriggerCommand
from ..node import payload_type
from ..observer import StatusInfo
from ..records import AgentRecord, AgentStatus, HistoryRecord, NewAgent, OutboxEntry, SignalOutcome

if TYPE_CHECKING:
    from ..bus import EventBus
    from ..graph import Graph
    from ..persistence import Persistence

log = logging.getLogger("commandnet")


class AgentActions:
    """Signals, resume, queries and bus commands, on top of the engine's protocol methods."""

    if TYPE_CHECKING:
        persistence: Persistence
        bus: EventBus
        pool: str
        _final: asyncio.Condition

        _nodes: dict[str, tuple[Graph, NodeClass]]

        async def start(self) -> None: ...
        def register(self, start: NodeClass) -> Graph: ...
        def _resolve(self, name: str) -> tuple[Graph, NodeClass]: ...
        def _version(self, node: str) -> str | None: ...
        def _validate(self, graph: Graph, raw: dict[str, Any], where: str) -> dict[str, Any]: ...
        async def _publish_outbox(self, entries: list[OutboxEntry],
                                  redo: bool = False) -> None: ...
        async def _notify_status(self, info: StatusInfo) -> None: ...
        async def _wake(self) -> None: ...
        async def _notify_parent(self, ended: AgentRecord) -> None: ...

    async def trigger_agent(
        self,
        agent_id: str,
        start_node: NodeClass | str,
        initial_context: BaseModel | dict[str, Any] | None = None,
        payload: Any = None,
    ) -> bool:
        """Start an agent; True when created, False when this same request already exists.

        ``start_node`` is a node class (its graph is registered) or a node name. A name that no
        registered graph has is sent as a trigger command to the workers that have it.
        ``payload`` (JSON, or a model) goes to the start node as ``self.payload``.
        Raises TriggerConflictError (same id, other request) and ContextValidationError.
        """
        await self.start()
        if isinstance(start_node, type):
            self.register(start_node)
            start_node = start_node.node_name
        raw = (initial_context.model_dump(mode="json") if isinstance(initial_context, BaseModel)
               else dict(initial_context or {}))
        payload = json_value(payload)
        if start_node not in self._nodes:
            await self.bus.publish(TriggerCommand(agent_id=agent_id, start_node=start_node,
                                                  context=raw, payload=payload))
            return True
        graph, node_cls = self._resolve(start_node)
        context = self._validate(graph, raw, f"initial context of agent {agent_id!r}")
        validate_payload(node_cls, payload)
        created = await self.persistence.create_agent(
            NewAgent(agent_id, start_node, context, pool=self.pool, payload=payload,
                     graph_version=self._version(start_node)))
        if created:
            await self._publish_outbox([OutboxEntry(agent_id, 0)])
            await self._notify_status(StatusInfo(agent_id, AgentStatus.RUNNING, start_node, 0,
                                                 None))
        return created

    async def cancel_agent(self, agent_id: str, reason: str = "cancelled") -> bool:
        """Cancel a running agent; its in-flight step, if any, is discarded at commit.

        An id not triggered yet is cancelled in advance: its trigger will not run it.
        """
        await self.start()
        cancelled = await self.persistence.cancel_agent(agent_id, reason, self.pool)
        if cancelled:
            rec = await self.persistence.get_agent(agent_id)
            if rec is not None:
                await self._notify_status(StatusInfo(agent_id, rec.status, rec.node, rec.step,
                                                     rec.error))
                await self._notify_parent(rec)
            await self._wake()
        return cancelled

    async def signal(self, agent_id: str, name: str, payload: Any = None,
                     signal_id: str | None = None) -> SignalOutcome:
        """Send signal ``name`` (with a JSON or model ``payload``) to a running agent: delivered
        if it waits for it, otherwise kept until it does. A ``signal_id`` sent again is applied
        once. Raises AgentNotFoundError for an unknown agent, CommandNetError for a final one."""
        await self.start()
        outcome = await self.persistence.signal_agent(
            agent_id, name, signal_id or uuid.uuid4().hex, json_value(payload))
        if outcome is SignalOutcome.MISSING:
            raise AgentNotFoundError(f"signal {name!r} refused: no agent {agent_id!r}")
        if outcome is SignalOutcome.FINAL:
            raise CommandNetError(f"signal {name!r} refused: agent {agent_id!r} has ended")
        return outcome

    async def resume(self, agent_id: str, from_node: NodeClass | str,
                     context_patch: dict[str, Any] | None = None) -> bool:
        """Run a failed or cancelled agent again from a node of its graph, its context changed
        by ``context_patch`` (a JSON merge patch, RFC 7396) and validated. False when the agent
        is not failed or cancelled; the history keeps the whole story."""
        await self.start()
        rec = await self.get_agent(agent_id)
        node = from_node if isinstance(from_node, str) else from_node.node_name
        graph, _ = self._resolve(rec.start_node)
        if node not in graph.nodes:
            raise UnknownNodeError(f"cannot resume agent {agent_id!r} at {node!r}: its graph "
                                   f"has {', '.join(sorted(graph.nodes))}")
        context = self._validate(graph, merge_patch(rec.context, context_patch or {}),
                                 f"patched context of agent {agent_id!r}")
        if not await self.persistence.resume_agent(agent_id, node, context, rec.pool):
            return False
        await self._publish_outbox([OutboxEntry(agent_id, rec.step + 1)])
        await self._notify_status(StatusInfo(agent_id, AgentStatus.RUNNING, node, rec.step + 1,
                                             None))
        return True

    async def get_agent(self, agent_id: str) -> AgentRecord:
        """The agent's current row; AgentNotFoundError when there is none."""
        rec = await self.persistence.get_agent(agent_id)
        if rec is None:
            raise AgentNotFoundError(f"no agent {agent_id!r}")
        return rec

    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        """The agent's committed transitions, in order."""
        return await self.persistence.get_history(agent_id)

    async def wait_for(
        self, agent_id: str, timeout: float | None = None, poll: float = 0.2
    ) -> AgentRecord:
        """Wait until the agent is succeeded, failed or cancelled, and return its row.

        Wakes at once for agents this engine finishes, and polls the store for the rest.
        Raises TimeoutError after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                rec = await self.persistence.get_agent(agent_id)
                if rec is not None and rec.status.is_final:
                    return rec
                async with self._final:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._final.wait(), poll)

    async def _on_command(self, message: AnyMessage) -> None:
        """Apply a command from the bus (a CommandNetError dead-letters it with its reason)."""
        if isinstance(message, TriggerCommand):
            await self._on_trigger(message)
        elif isinstance(message, SignalCommand):
            await self.signal(message.agent_id, message.name, message.payload, message.signal_id)
        elif isinstance(message, ResumeCommand):
            await self.resume(message.agent_id, message.node, message.context_patch)
        elif isinstance(message, CancelCommand):
            await self.cancel_agent(message.agent_id, message.reason)

    async def _on_trigger(self, cmd: TriggerCommand) -> None:
        try:
            graph, node = self._resolve(cmd.start_node)
            context = self._validate(graph, cmd.context, f"initial context of {cmd.agent_id!r}")
            validate_payload(node, cmd.payload)
        except (UnknownNodeError, ContextValidationError) as exc:
            log.error("trigger of agent %r refused: %s", cmd.agent_id, exc)
            agent = NewAgent(cmd.agent_id, cmd.start_node, cmd.context, AgentStatus.FAILED,
                             str(exc), self.pool)
            if await self.persistence.create_agent(agent):
                await self._notify_status(StatusInfo(cmd.agent_id, AgentStatus.FAILED,
                                                     cmd.start_node, 0, str(exc)))
                await self._wake()
            return
        await self.trigger_agent(cmd.agent_id, cmd.start_node, context, cmd.payload)


def validate_payload(node: NodeClass, raw: Any) -> Any:
    """The payload as the node's declared type (the raw JSON when it declares none)."""
    if node not in _PAYLOAD_TYPES:  # read on every step: a walk of the class's MRO
        _PAYLOAD_TYPES[node] = payload_type(node)
    kind = _PAYLOAD_TYPES[node]
    if kind is None:
        return raw
    try:
        return _adapter(kind).validate_python(raw)
    except ValidationError as exc:
        raise ContextValidationError(
            f"payload of node {node.node_name!r} does not validate as {kind!r}: {exc}"
        ) from None


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


_PAYLOAD_TYPES: dict[NodeClass, Any] = {}


def json_value(value: Any) -> Any:
    """A payload as JSON: models are dumped, anything else is taken as it is."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged
