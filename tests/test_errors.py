"""Every error class the README lists is exported, is a CommandNetError, and is raised by the
real code where it says (in-memory store and bus; the engine's own errors reach observers)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import commandnet
from commandnet import (
    AgentNotFoundError,
    AgentStatus,
    CommandNetError,
    Engine,
    InvalidTransitionError,
    MalformedMessageError,
    Node,
    NodeTimeoutError,
    Observer,
    RetryPolicy,
    UnknownNodeError,
)
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.errors import LeaseLostError
from commandnet.messages import decode

ROOT = Path(__file__).resolve().parents[1]
ONCE = RetryPolicy(max_attempts=1, initial_interval=0.01, jitter=0, timeout=5)


class Ctx(BaseModel):
    n: int = 0


class Errors(Observer):
    """The exceptions passed to ``on_error`` (the seed's signature), per agent."""

    def __init__(self) -> None:
        self.seen: dict[str, list[BaseException]] = {}

    async def on_error(self, agent_id: str, node: str, error: BaseException) -> None:
        self.seen.setdefault(agent_id, []).append(error)


def test_readme_errors_are_exported_command_net_errors() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Errors**", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"`(\w+Error)`", section)
    assert "CommandNetError" in names and len(names) >= 10, names
    for name in names:
        cls = getattr(commandnet, name, None)
        assert isinstance(cls, type), f"README lists {name}; `from commandnet import` lacks it"
        assert issubclass(cls, CommandNetError), name
        assert name in commandnet.__all__, name


async def test_get_agent_of_an_unknown_id_raises_agent_not_found() -> None:
    engine = Engine(InMemoryPersistence(), InMemoryEventBus())
    try:
        with pytest.raises(AgentNotFoundError, match="'nobody'"):
            await engine.get_agent("nobody")
    finally:
        await engine.stop()


def test_malformed_bytes_raise_malformed_message() -> None:
    with pytest.raises(MalformedMessageError, match="malformed message"):
        decode(b"\xff not json")
    with pytest.raises(MalformedMessageError, match="launch-missiles"):
        decode(b'{"kind": "launch-missiles"}')
    with pytest.raises(MalformedMessageError, match="step"):
        decode(b'{"kind": "step", "agent_id": "x", "step": "three"}')


class Finish(Node[Ctx], retry=ONCE):
    async def run(self, ctx: Ctx) -> None:
        return None


class OtherFinish(Node[Ctx], name="Finish", retry=ONCE):  # another class, the same name
    async def run(self, ctx: Ctx) -> None:
        return None


class Begin(Node[Ctx], retry=ONCE):
    async def run(self, ctx: Ctx) -> type[OtherFinish]:
        return OtherFinish


def test_one_node_name_in_two_registered_graphs_raises_unknown_node() -> None:
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), graphs=[Finish])
    with pytest.raises(UnknownNodeError, match=r"'Finish'.*two registered graphs"):
        engine.register(Begin)


class Sneaky(Node[Ctx], retry=ONCE):
    async def run(self, ctx: Ctx) -> type[Finish]:
        return Sneaky  # type: ignore[return-value]


class Sleepy(Node[Ctx], retry=RetryPolicy(max_attempts=1, timeout=0.05)):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(30)


@pytest.mark.parametrize(("node", "error", "message"), [
    (Sneaky, InvalidTransitionError, "node 'Sneaky' returned Sneaky"),
    (Sleepy, NodeTimeoutError, "node 'Sleepy' timed out after 0.05s"),
])
async def test_node_errors_reach_observers_as_their_class(
    node: type[Node[Ctx]], error: type[CommandNetError], message: str
) -> None:
    errors = Errors()
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), observers=[errors])
    await engine.start_worker()
    try:
        await engine.trigger_agent("a1", node, Ctx())
        rec = await engine.wait_for("a1", timeout=20)
    finally:
        await engine.stop(grace=1)
    assert rec.status is AgentStatus.FAILED and message in (rec.error or "")
    assert [type(e) for e in errors.seen["a1"]] == [error], errors.seen
    assert message in str(errors.seen["a1"][0])


STARTED: asyncio.Event | None = None
INTERRUPTED: asyncio.Event | None = None


class Held(Node[Ctx], retry=RetryPolicy(max_attempts=3, timeout=60)):
    async def run(self, ctx: Ctx) -> None:
        assert STARTED is not None and INTERRUPTED is not None
        STARTED.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            INTERRUPTED.set()
            raise


class FailureLog(InMemoryPersistence):
    """The in-memory store, keeping every failure the engine offers it (fenced or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: list[Any] = []

    async def record_failure(self, failure: Any) -> bool:
        self.offered.append(failure)
        return await super().record_failure(failure)


async def test_a_lost_lease_stops_the_node_with_lease_lost() -> None:
    global STARTED, INTERRUPTED
    STARTED, INTERRUPTED = asyncio.Event(), asyncio.Event()
    store = FailureLog()
    engine = Engine(store, InMemoryEventBus(), graphs=[Held], lease_seconds=0.3)
    await engine.start_worker()
    try:
        await engine.trigger_agent("held", Held, Ctx())
        await asyncio.wait_for(STARTED.wait(), 20)
        assert await engine.cancel_agent("held", "user asked")  # the lease is gone with it
        # The heartbeat (every lease_seconds / 3) finds the lease lost and stops the node.
        await asyncio.wait_for(INTERRUPTED.wait(), 20)

        async def offered() -> None:
            while not store.offered:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(offered(), 20)
    finally:
        await engine.stop(grace=1)
    [failure] = store.offered
    assert failure.error.startswith("agent 'held' step 0: lease lost"), failure.error
    assert issubclass(LeaseLostError, CommandNetError)
    rec = await engine.get_agent("held")
    assert (rec.status, rec.step, rec.error) == (AgentStatus.CANCELLED, 0, "user asked")
    assert await engine.get_history("held") == []
