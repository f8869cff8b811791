"""A pool's graphs as a JSON document, for a process without the graph's code (the operator).

Workers publish it to the graph bucket at start (:mod:`commandnet.adapters.nats_graphs`); the
operator validates Agents against it: their ``startNode`` must be a node of the pool's graphs
and their ``context`` must validate against that graph's context JSON schema.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import TypeAdapter
from pydantic.errors import PydanticUserError

from ..graph import Graph
from ..node import payload_type


def describe_graph(graph: Graph) -> dict[str, Any]:
    """One graph: start node, nodes, edges, terminal nodes, the context model's schema and
    ``payloads``: the JSON schema of each node that declares a payload (``Node[Ctx, P]``)."""
    doc = {
        "start": graph.start.node_name,
        "nodes": sorted(graph.nodes),
        "edges": {name: sorted(graph.edges[name]) for name in sorted(graph.edges)},
        "terminal": sorted(graph.terminal),
        "context": graph.context.model_json_schema(),
        "context_model": graph.context.__name__,
    }
    payloads = {name: schema for name in sorted(graph.nodes)
                if (schema := payload_schema(graph.nodes[name])) is not None}
    if payloads:  # absent when no node takes one: documents of such graphs are as they were
        doc["payloads"] = payloads
    return doc


def payload_schema(node: Any) -> dict[str, Any] | None:
    """The JSON schema of the payload ``node`` declares, None when it declares none (or one
    that has no JSON schema: the worker still validates it)."""
    kind = payload_type(node)
    if kind is None:
        return None
    try:
        return TypeAdapter(kind).json_schema()
    except (PydanticUserError, TypeError, ValueError):
        return None


def describe_pool(pool: str, graphs: list[Graph]) -> dict[str, Any]:
    """The JSON-able document of ``pool``'s ``graphs``.

    ``{"pool", "version", "graphs": [describe_graph(...)], "nodes": {node: index in graphs}}``.
    ``version`` is the SHA-256 (hex) of the canonical JSON (sorted keys, no spaces) of
    everything else, so it is the same in every process and changes with any node, edge,
    terminal node or context schema. A node in several graphs maps to the first, as the
    engine resolves it.
    """
    nodes: dict[str, int] = {}
    for index, graph in enumerate(graphs):
        for name in sorted(graph.nodes):
            nodes.setdefault(name, index)
    doc: dict[str, Any] = {"pool": pool, "graphs": [describe_graph(g) for g in graphs],
                           "nodes": dict(sorted(nodes.items()))}
    return {**doc, "version": graph_version(doc)}


def graph_version(doc: dict[str, Any]) -> str:
    """The SHA-256 (hex) of ``doc``'s canonical JSON, its own ``version`` left out."""
    body = {key: value for key, value in doc.items() if key != "version"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
