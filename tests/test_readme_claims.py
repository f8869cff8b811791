"""Documented defaults agree with the code: the README's worker settings table and RetryPolicy
defaults, ``commandnet worker --help``, and the Observer hooks the README names."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from commandnet import AgentStatus, DeliveryInfo, Engine, Node, Observer, RetryPolicy
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.cli.worker import worker as worker_command
from commandnet.messages import StepEvent
from commandnet.worker import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


pytestmark = pytest.mark.usefixtures("no_commandnet_env")  # defaults only


def worker_table() -> dict[str, str]:
    """``COMMANDNET_X`` -> documented default, from the README's worker settings table."""
    section = README.split("A worker is configured", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(COMMANDNET_\w+)` \| ([^|]+?) \|", section, re.M)
    assert len(rows) >= 10, f"no worker settings table after 'A worker is configured': {rows}"
    return {name: value.strip().strip("`") for name, value in rows}


def same(documented: str, actual: Any) -> bool:
    """Whether a default as written in the docs means the model's default value."""
    if actual is None or actual == []:
        return documented.lower() in {"none", ""}
    if isinstance(actual, bool):
        return documented.lower() == str(actual).lower()
    if isinstance(actual, int | float):
        try:
            return float(documented) == float(actual)
        except ValueError:
            return False
    return documented == str(actual)


def test_readme_worker_table_matches_the_settings_defaults() -> None:
    defaults = WorkerSettings()
    fields = type(defaults).model_fields
    for variable, documented in worker_table().items():
        field = variable.removeprefix("COMMANDNET_").lower()
        assert field in fields, f"README documents {variable}, which is no worker setting"
        actual = getattr(defaults, field)
        assert same(documented, actual), (
            f"README says {variable} defaults to {documented!r}; the model says {actual!r}")


def test_worker_help_names_each_documented_variable_with_the_model_default() -> None:
    result = CliRunner().invoke(worker_command, ["--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    for variable in worker_table():
        assert variable in text, f"`commandnet worker --help` does not mention {variable}"
    defaults = WorkerSettings()
    # Flags document their default as "[COMMANDNET_X; value]" or "[COMMANDNET_X; default: value]"
    # ("[COMMANDNET_STORE_URL; password: ...]" names a variable, not a default).
    shown = re.findall(r"\[(COMMANDNET_\w+); (?:default: )?([^\]:]+)\]", text)
    assert len(shown) >= 10, text
    for variable, documented in shown:
        field = variable.removeprefix("COMMANDNET_").lower()
        if field == "worker_id":  # "host-pid": computed per process
            continue
        assert field in type(defaults).model_fields, f"--help names unknown {variable}"
        actual = getattr(defaults, field)
        assert same(documented.strip(), actual), (
            f"--help says {variable} defaults to {documented!r}; the model says {actual!r}")


def test_worker_help_lists_every_setting() -> None:
    # README: "`commandnet worker --help` lists them all" (env-only secrets included, as
    # "password: COMMANDNET_STORE_PASSWORD" is).
    result = CliRunner().invoke(worker_command, ["--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    missing = [f"COMMANDNET_{field.upper()}" for field in WorkerSettings.model_fields
               if f"COMMANDNET_{field.upper()}" not in text]
    assert missing == [], f"`commandnet worker --help` does not mention {missing}"


def test_readme_retry_policy_defaults() -> None:
    line = README.split("**RetryPolicy** (per node; defaults):", 1)[1].split("\n- ", 1)[0]
    documented = dict(re.findall(r"`(\w+)=([^`]+)`", line))
    assert set(documented) == set(RetryPolicy.model_fields), documented
    policy = RetryPolicy()
    for name, value in documented.items():
        actual = getattr(policy, name)
        if value == "()":
            assert actual == (), name
        else:
            assert float(value) == actual, f"README: {name}={value}; RetryPolicy: {actual!r}"


def test_readme_observer_hooks_exist() -> None:
    line = README.split("**Observer**:", 1)[1].split("\n- ", 1)[0]
    hooks = re.findall(r"`(on_\w+|close)[`(]", line)
    assert {"on_transition", "on_error", "on_status", "on_delivery", "close"} <= set(hooks)
    for hook in hooks:
        assert callable(getattr(Observer, hook, None)), f"Observer has no {hook}"


class Ctx(BaseModel):
    n: int = 0


GATE: asyncio.Event | None = None
STARTED: asyncio.Event | None = None


class Last(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        return None


class Gated(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Last]:
        assert GATE is not None and STARTED is not None
        STARTED.set()
        await GATE.wait()
        return Last


class Fates(Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def on_delivery(self, info: DeliveryInfo) -> None:
        self.seen.append((info.kind, info.outcome))


async def test_on_delivery_reports_each_fate_the_readme_names() -> None:
    # README: on_delivery gets "each received message and its fate: lease granted, stale,
    # busy, missing, or dead-lettered".
    global GATE, STARTED
    GATE, STARTED = asyncio.Event(), asyncio.Event()
    fates = Fates()
    bus = InMemoryEventBus()
    engine = Engine(InMemoryPersistence(), bus, graphs=[Gated], observers=[fates],
                    lease_seconds=1.0)
    await engine.start_worker()

    async def seen(fate: tuple[str, str], what: str) -> None:
        async def poll() -> None:
            while fate not in fates.seen:
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(poll(), 20)
        except TimeoutError:
            raise AssertionError(f"no {fate} within 20s ({what}): {fates.seen}") from None

    try:
        await engine.trigger_agent("a", Gated, Ctx())
        await asyncio.wait_for(STARTED.wait(), 20)
        await seen(("step", "granted"), "the first delivery of step 0")
        await bus.publish(StepEvent(agent_id="a", step=0, redo=1))  # a copy, while it runs
        await seen(("step", "busy"), "the copy of a step whose lease is held")
        GATE.set()
        await seen(("step", "stale"), "the copy redelivered after step 0 committed")
        await bus.publish(StepEvent(agent_id="ghost", step=0))
        await seen(("step", "missing"), "a step of an agent that does not exist")
        await bus.publish_raw(b"not json")
        await seen(("malformed", "dead_letter"), "a message that is not JSON")
        assert (await engine.wait_for("a", timeout=20)).status is AgentStatus.SUCCEEDED
    finally:
        await engine.stop(grace=1)
