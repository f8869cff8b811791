"""Tracing tests: a graph with one flaky node, and a runner for commandnet processes whose
spans go to the OpenTelemetry SDK's in-memory exporter and are written out at exit.

``python -m tests.graphs.traced SPANS.jsonl worker ARGS...`` runs ``commandnet worker ARGS``
(any command works); ``python -m tests.graphs.traced SPANS.jsonl api STORE BUS POOL ID...``
triggers agents at ``Hop0`` through ``Engine.trigger_agent`` (the API). Every finished span is
one JSON line: name, kind, ids, parent id, attributes, links, status, and the process id.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from commandnet import Node, RetryPolicy

DELAY = float(os.environ.get("TRACED_DELAY", "0.02"))


class Hops(BaseModel):
    key: str = ""
    visited: list[str] = []


async def _hop(node: Node[Hops], ctx: Hops) -> None:
    await asyncio.sleep(DELAY)  # long enough for two workers to share the agents
    ctx.visited.append(node.node_name)


class Hop0(Node[Hops]):
    async def run(self, ctx: Hops) -> type[Hop1]:
        await _hop(self, ctx)
        return Hop1


class Hop1(Node[Hops]):
    async def run(self, ctx: Hops) -> type[Flaky]:
        await _hop(self, ctx)
        return Flaky


class Flaky(Node[Hops], retry=RetryPolicy(max_attempts=3, initial_interval=0.05, jitter=0)):
    """Fails its first attempt for each ``key`` (a marker file in ``$TRACED_MARKERS``)."""

    async def run(self, ctx: Hops) -> type[Hop2]:
        marker = Path(os.environ["TRACED_MARKERS"]) / ctx.key
        if not marker.exists():
            marker.touch()
            raise RuntimeError(f"first attempt of {ctx.key} fails on purpose")
        await _hop(self, ctx)
        return Hop2


class Hop2(Node[Hops]):
    async def run(self, ctx: Hops) -> None:
        await _hop(self, ctx)
        return None


def _record(span: Any) -> dict[str, Any]:
    ctx = span.get_span_context()
    return {
        "name": span.name, "kind": span.kind.name, "pid": os.getpid(),
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "status": span.status.status_code.name,
        "service": span.resource.attributes.get("service.name"),
    }


def _install(path: str) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    def dump() -> None:
        with open(path, "a") as out:
            for span in exporter.get_finished_spans():
                out.write(json.dumps(_record(span), default=str) + "\n")

    atexit.register(dump)


async def _api(store_url: str, bus_url: str, pool: str, ids: list[str]) -> None:
    from commandnet import Engine
    from commandnet.adapters.urls import bus_from_url, store_from_url

    store = store_from_url(store_url)
    if hasattr(store, "apply_migrations"):
        store.apply_migrations = False
    engine = Engine(store, bus_from_url(bus_url, pool))
    await engine.start()
    try:
        for agent_id in ids:
            await engine.trigger_agent(agent_id, Hop0, Hops(key=agent_id))
    finally:
        await engine.stop()


def main(argv: list[str]) -> None:
    _install(argv[0])
    if argv[1] == "api":
        asyncio.run(_api(argv[2], argv[3], argv[4], argv[5:]))
        return
    from commandnet.cli.main import cli

    cli(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
