"""``commandnet trigger | cancel | signal | resume | status``: act on agents from outside,
without the graph's code.

``trigger``, ``cancel``, ``signal`` and ``resume`` publish a command on the pool's commands
subject; a worker of that pool (which has the code) validates and applies it. ``status`` reads
the agent's latest status from the NATS KV bucket when the bus is NATS (what the workers write
after every transition), otherwise from the store. Connection settings come from flags or the
worker's ``COMMANDNET_*`` variables, so a pod with the worker's environment needs no flags.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from ..adapters.urls import bus_from_url, store_from_url
from ..bus import EventBus
from ..errors import AgentNotFoundError, CommandNetError
from ..messages import AnyMessage, CancelCommand, ResumeCommand, SignalCommand, TriggerCommand
from ..persistence import Persistence
from ..tracing.setup import setup_tracing
from ..worker.logs import redact
from ..worker.settings import ConnectionSettings, mask_url

T = TypeVar("T")
_FINAL = {"succeeded", "failed", "cancelled"}


def _connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags every agent command shares (each overrides its COMMANDNET_* variable)."""
    fn = click.option("--connect-timeout", type=float, default=10.0, show_default=True,
                      help="Give up when the bus or store stays unreachable.")(fn)
    fn = click.option("--bus", "bus_url", metavar="URL",
                      help="nats://host:4222 [COMMANDNET_BUS_URL]")(fn)
    fn = click.option("--pool", help="Worker pool [COMMANDNET_POOL; default: default]")(fn)
    return fn


def _settings(**flags: Any) -> ConnectionSettings:
    # The driver logs every failed (re)connect attempt with a traceback; the command ends with
    # one clear error instead. ``commandnet --log-level INFO|DEBUG`` shows them again.
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for name in ("nats", "commandnet.nats"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return ConnectionSettings(**given)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise click.UsageError("invalid settings:\n  " + "\n  ".join(lines)) from None


def _run(conn: ConnectionSettings, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; a commandnet error becomes a clean message (exit 1), secrets masked."""
    try:
        return asyncio.run(work)
    except CommandNetError as exc:
        raise click.ClickException(redact(str(exc), conn.secrets())) from None


async def reach(kind: str, url: str, connect: Awaitable[T], within: float) -> T:
    """Await ``connect`` for at most ``within`` s; failures name the server, never a secret."""
    try:
        return await asyncio.wait_for(connect, within)
    except TimeoutError:
        raise CommandNetError(f"cannot reach the {kind} at {mask_url(url)} within "
                              f"{within:g}s") from None
    except CommandNetError:
        raise
    except Exception as exc:
        raise CommandNetError(f"cannot reach the {kind} at {mask_url(url)}: "
                              f"{type(exc).__name__}: {exc}") from None


def _shared_bus(conn: ConnectionSettings) -> EventBus:
    """The pool's bus, publish-only: a client never creates or changes streams, consumers or
    buckets. A memory:// bus is refused, since no other process could see it."""
    if urlsplit(conn.bus_url).scheme == "memory":
        raise click.UsageError(
            "--bus memory:// lives inside one process, so no worker would see this command; "
            "give the workers' bus, e.g. --bus nats://127.0.0.1:4222 (or COMMANDNET_BUS_URL)")
    try:
        url, connection = conn.bus_connection()  # credentials and TLS, never in the URL
        return bus_from_url(url, conn.pool, manage=False, **connection)
    except CommandNetError as exc:
        raise click.UsageError(redact(str(exc), conn.secrets())) from None


async def _publish(conn: ConnectionSettings, bus: EventBus,
                   message: AnyMessage, within: float) -> None:
    await reach("bus", conn.bus_url, bus.connect(), within)
    try:
        await asyncio.wait_for(bus.publish(message), within)
    except TimeoutError:
        raise CommandNetError(f"publishing the {message.kind} command for agent "
                              f"{message.agent_id!r} to pool {conn.pool!r} timed out") from None
    except ConnectionError as exc:  # BusPublishError: no stream (no worker yet), server gone
        raise CommandNetError(f"the {message.kind} command for agent {message.agent_id!r} "
                              f"was not published: {exc}") from None
    finally:
        await bus.close()


def parse_json(text: str, option: str = "--context", object_only: bool = True) -> Any:
    """A JSON option: inline, ``@file.json`` or ``-`` (stdin); anything else is an error naming
    the option. ``object_only``: it must be a JSON object (a context or a context patch)."""
    source = option
    if text == "-":
        text, source = sys.stdin.read(), f"{option} - (stdin)"
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            text, source = path.read_text(), f"{option} file {str(path)!r}"
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                     param_hint=f"'{option}'") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{source} is not valid JSON: {exc}",
                                 param_hint=f"'{option}'") from None
    if object_only and not isinstance(value, dict):
        raise click.BadParameter(
            f"{source} must be a JSON object like '{{\"key\": \"value\"}}', "
            f"not a JSON {type(value).__name__}", param_hint=f"'{option}'")
    return value


def parse_context(text: str) -> dict[str, Any]:
    """``--context``: a JSON object, ``@file.json`` or ``-`` (stdin); anything else is an error."""
    value: dict[str, Any] = parse_json(text)
    return value


@click.command()
@click.argument("agent_id")
@click.option("--node", "start_node", required=True, help="Start node name, e.g. AuthCheck.")
@click.option("--context", "context_text", default="{}", show_default=True,
              help="Initial context: a JSON object, @file.json, or - for stdin.")
@click.option("--payload", "payload_text", default=None,
              help="The start node's payload (JSON, @file.json or -), validated as its type.")
@_connection_options
@click.option("--wait", is_flag=True, help="Wait until the agent is final; exit 1 unless it "
                                           "succeeded. Needs the store (--store) or a NATS bus.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.option("--store", "store_url", metavar="URL",
              help="Store to read with --wait when the bus is not NATS [COMMANDNET_STORE_URL]")
def trigger(agent_id: str, start_node: str, context_text: str, payload_text: str | None,
            pool: str | None, bus_url: str | None, connect_timeout: float, wait: bool,
            timeout: float | None, store_url: str | None) -> None:
    """Start agent AGENT_ID at node --node in pool --pool (a worker validates the context)."""
    context = parse_context(context_text)
    payload = None if payload_text is None else parse_json(payload_text, "--payload", False)
    conn = _settings(pool=pool, bus_url=bus_url, store_url=store_url)
    bus = _shared_bus(conn)
    cmd = TriggerCommand(agent_id=agent_id, start_node=start_node, context=context,
                         payload=payload)
    stop_tracing = setup_tracing("commandnet-cli")  # OTEL_*: the trigger span is the root
    try:
        _run(conn, _publish(conn, bus, cmd, connect_timeout))
    finally:
        if stop_tracing is not None:
            stop_tracing()
    click.echo(f"trigger sent: agent {agent_id!r} at node {start_node!r} in pool {conn.pool!r}",
               err=wait)
    if wait:
        status = _run(conn, _wait_final(conn, agent_id, timeout, connect_timeout))
        _show(status, as_json=True)
        if status.get("status") != "succeeded":
            sys.exit(1)


@click.command()
@click.argument("agent_id")
@click.option("--reason", default="cancelled", show_default=True,
              help="Kept as the agent's error.")
@_connection_options
def cancel(agent_id: str, reason: str, pool: str | None, bus_url: str | None,
           connect_timeout: float) -> None:
    """Cancel AGENT_ID: its running step, if any, is discarded at commit."""
    conn = _settings(pool=pool, bus_url=bus_url)
    bus = _shared_bus(conn)
    cmd = CancelCommand(agent_id=agent_id, reason=reason)
    _run(conn, _publish(conn, bus, cmd, connect_timeout))
    click.echo(f"cancel sent: agent {agent_id!r} in pool {conn.pool!r}")


@click.command()
@click.argument("agent_id")
@click.argument("name")
@click.option("--payload", "payload_text", default="null", show_default=True,
              help="The signal's payload: JSON, @file.json or - for stdin (validated by the "
                   "waiting node's payload type).")
@click.option("--id", "signal_id", default=None,
              help="Signal id: sending the same id again is applied once (default: a new id).")
@_connection_options
def signal(agent_id: str, name: str, payload_text: str, signal_id: str | None, pool: str | None,
           bus_url: str | None, connect_timeout: float) -> None:
    """Send signal NAME to AGENT_ID: delivered if it waits for NAME, else kept until it does."""
    payload = parse_json(payload_text, "--payload", object_only=False)
    conn = _settings(pool=pool, bus_url=bus_url)
    cmd = SignalCommand(agent_id=agent_id, name=name, payload=payload)
    if signal_id:
        cmd = cmd.model_copy(update={"signal_id": signal_id})
    _run(conn, _publish(conn, _shared_bus(conn), cmd, connect_timeout))
    click.echo(f"signal {name!r} sent: agent {agent_id!r} in pool {conn.pool!r} "
               f"(id {cmd.signal_id})")


@click.command()
@click.argument("agent_id")
@click.option("--from", "node", required=True, help="The node to run again from.")
@click.option("--context-patch", "patch_text", default="{}", show_default=True,
              help="A JSON merge patch (RFC 7396) for the context: JSON, @file.json or -; "
                   "null deletes a key. The result is validated.")
@_connection_options
def resume(agent_id: str, node: str, patch_text: str, pool: str | None, bus_url: str | None,
           connect_timeout: float) -> None:
    """Run the failed or cancelled AGENT_ID again from node --from (the history keeps all)."""
    patch = parse_json(patch_text, "--context-patch")
    conn = _settings(pool=pool, bus_url=bus_url)
    cmd = ResumeCommand(agent_id=agent_id, node=node, context_patch=patch)
    _run(conn, _publish(conn, _shared_bus(conn), cmd, connect_timeout))
    click.echo(f"resume sent: agent {agent_id!r} from node {node!r} in pool {conn.pool!r}")


@click.command()
@click.argument("agent_id")
@_connection_options
@click.option("--store", "store_url", metavar="URL",
              help="memory://, sqlite:///file.db, postgresql://... [COMMANDNET_STORE_URL]")
@click.option("--source", type=click.Choice(["auto", "kv", "store"]), default="auto",
              show_default=True,
              help="auto: the NATS KV bucket when the bus is NATS, else the store.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(agent_id: str, pool: str | None, bus_url: str | None, connect_timeout: float,
           store_url: str | None, source: str, as_json: bool) -> None:
    """Show the latest status of AGENT_ID (exit 1 when there is no such agent)."""
    conn = _settings(pool=pool, bus_url=bus_url, store_url=store_url)
    _show(_run(conn, fetch_status(conn, agent_id, source, connect_timeout)), as_json)


async def fetch_status(conn: ConnectionSettings, agent_id: str, source: str = "auto",
                       within: float = 10.0) -> dict[str, Any]:
    """The agent's latest status as a dict; AgentNotFoundError names where it looked."""
    if source == "kv" or (source == "auto" and _is_nats(conn.bus_url)):
        return await _status_from_kv(conn, agent_id, within)
    return await _status_from_store(conn, agent_id, within)


def _is_nats(url: str) -> bool:
    return urlsplit(url).scheme in ("nats", "tls")


async def _status_from_kv(conn: ConnectionSettings, agent_id: str,
                          within: float) -> dict[str, Any]:
    if not _is_nats(conn.bus_url):
        raise CommandNetError(f"--source kv needs a NATS bus, not {mask_url(conn.bus_url)}")
    from ..adapters.nats import read_status

    try:
        url, connection = conn.bus_connection()
        found = await asyncio.wait_for(
            read_status(url, conn.pool, agent_id, auth=connection.get("auth")), within)
    except TimeoutError:
        raise CommandNetError(f"cannot reach the bus at {mask_url(conn.bus_url)} within "
                              f"{within:g}s") from None
    if found is None:
        raise AgentNotFoundError(
            f"no agent {agent_id!r} in the status bucket of pool {conn.pool!r} at "
            f"{mask_url(conn.bus_url)}")
    return found


async def _status_from_store(conn: ConnectionSettings, agent_id: str,
                             within: float) -> dict[str, Any]:
    store = _open_store(conn)
    await reach("store", conn.store_url, store.setup(), within)
    try:
        rec = await store.get_agent(agent_id)
    finally:
        await store.close()
    if rec is None:
        raise AgentNotFoundError(f"no agent {agent_id!r} in the store {mask_url(conn.store_url)}")
    return {
        "agent_id": rec.agent_id, "status": rec.status.value, "node": rec.node,
        "step": rec.step, "error": rec.error, "attempts": rec.attempts,
        "start_node": rec.start_node, "lease_owner": rec.lease_owner,
        "waiting": rec.waiting, "wake_at": _iso(rec.wake_at),
        "created_at": _iso(rec.created_at), "updated_at": _iso(rec.updated_at),
    }


def _open_store(conn: ConnectionSettings) -> Persistence:
    parts = urlsplit(conn.store_url)
    if parts.scheme == "memory":
        raise CommandNetError("--store memory:// lives inside one process; give the workers' "
                              "store (sqlite:///... or postgresql://...)")
    if parts.scheme == "sqlite":
        # Reading must not create an empty database where the user mistyped a path.
        probe = store_from_url(conn.store_url)
        path = Path(getattr(probe, "path", ""))
        if str(path) and str(path) != ":memory:" and not path.exists():
            raise CommandNetError(f"no SQLite store at {str(path)!r} "
                                  f"(from {conn.store_url!r}); is --store right?")
        return probe
    url, connection = conn.store_connection()
    store = store_from_url(url, **connection)
    if hasattr(store, "apply_migrations"):  # PostgreSQL: a read must never migrate the schema
        store.apply_migrations = False
    return store


async def _wait_final(conn: ConnectionSettings, agent_id: str, limit: float | None,
                      connect_timeout: float) -> dict[str, Any]:
    """Poll the status until final; a missing agent is fine for a while (not triggered yet)."""
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        try:
            found = await fetch_status(conn, agent_id, "auto", connect_timeout)
            if found.get("status") in _FINAL:
                return found
        except AgentNotFoundError:
            pass
        if deadline is not None and time.monotonic() > deadline:
            raise CommandNetError(f"agent {agent_id!r} is not final after {limit:g}s")
        await asyncio.sleep(0.25)


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _show(found: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(found, default=str, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent {found.get('agent_id', '')}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in found.items():
        if key != "agent_id" and value not in (None, ""):
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    Console().print(table)
