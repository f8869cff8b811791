"""Admission: an Agent checked against its pool's published graph, without the graph's code.

The graph document comes from the workers (:func:`commandnet.loading.describe_pool`): node
names, edges, the context model's JSON schema and each node's payload schema. A pool with
no published graph is admitted, and the worker decides (the Agent then ends ``Failed`` with
the reason).

The context is checked against the JSON schema, which is what Pydantic's strict JSON mode
accepts: a value the worker would coerce (``"1"`` for an integer field) is refused here.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .resource import MAX_CONTEXT_BYTES


class Refused(Exception):
    """The Agent is refused; ``reason`` is CamelCase (metrics, logs)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def context_size(context: Any) -> int:
    """Bytes of the context (or a payload) as compact JSON (what the bus and the store
    carry)."""
    return len(json.dumps(context, separators=(",", ":")).encode())


def check_size(context: Any, where: str = "spec.context", reason: str = "ContextTooLarge"
               ) -> None:
    """Refuse a context (or the JSON value at ``where``) over :data:`MAX_CONTEXT_BYTES`."""
    size = context_size(context)
    if size > MAX_CONTEXT_BYTES:
        raise Refused(reason, f"{where} is {size} bytes as JSON; the limit is "
                              f"{MAX_CONTEXT_BYTES}")


def check_agent(spec: dict[str, Any], graph: dict[str, Any] | None) -> None:
    """Refuse (:class:`Refused`) an Agent spec its pool's graph cannot run."""
    context = spec.get("context") or {}
    check_size(context)
    check_size(spec.get("payload"), "spec.payload", "PayloadTooLarge")
    for i, entry in enumerate(spec.get("signals") or []):
        check_size(entry.get("payload"), f"spec.signals[{i}].payload", "PayloadTooLarge")
    if graph is None:
        return
    pool = spec.get("pool", "default")
    node = spec.get("startNode")
    index = graph.get("nodes", {}).get(node)
    if index is None:
        known = ", ".join(sorted(graph.get("nodes", {}))) or "none"
        raise Refused("UnknownNode",
                      f"spec.startNode: pool {pool!r} has no node {node!r} (graph version "
                      f"{str(graph.get('version', '?'))[:12]}); its nodes are: {known}")
    entry = graph["graphs"][index]
    schema = entry.get("context") or {}
    error = best_match(Draft202012Validator(schema).iter_errors(context))
    if error is not None:
        where = ".".join(["spec", "context", *(str(p) for p in error.absolute_path)])
        raise Refused("InvalidContext",
                      f"{where}: {error.message} (the context of node {node!r} must validate "
                      f"as {entry.get('context_model', 'the graph context')})")
    payloads = entry.get("payloads")
    if payloads is None:
        return  # a graph document from before payload schemas: the worker checks
    payload_schema = payloads.get(node)
    payload = spec.get("payload")
    if payload_schema is None:
        return  # the node declares no payload type: it gets the JSON as it is
    error = best_match(Draft202012Validator(payload_schema).iter_errors(payload))
    if error is not None:
        where = "".join(["spec.payload", *(f".{p}" if isinstance(p, str) else f"[{p}]"
                                           for p in error.absolute_path)])
        kind = payload_schema.get("title", "its payload type")
        raise Refused("InvalidPayload",
                      f"{where}: {error.message} (the payload of node {node!r} must validate "
                      f"as {kind})")
