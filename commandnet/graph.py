"""Reading a graph out of the return type hints of ``Node.run``."""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .errors import GraphError
from .node import Node, context_type

NodeClass = type[Node[Any]]


@dataclass(frozen=True)
class Graph:
    """A validated graph: its nodes by name, their edges, and the context model they share."""

    start: NodeClass
    nodes: dict[str, NodeClass]
    edges: dict[str, tuple[str, ...]]
    terminal: frozenset[str]
    context: type[BaseModel]
    _names: dict[NodeClass, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._names.update({cls: name for name, cls in self.nodes.items()})

    def allows(self, source: str, target: object) -> bool:
        """Whether node ``source`` declared ``target`` (a node class, or None to finish)."""
        if target is None:
            return source in self.terminal
        name = self._names.get(target)  # type: ignore[call-overload]
        return name is not None and name in self.edges[source]

    def to_dict(self) -> dict[str, list[str]]:
        """The seed's form: ``{'A': ['B', 'C'], 'B': [], 'C': []}`` (terminal edges omitted)."""
        return {name: list(targets) for name, targets in self.edges.items()}

    def to_mermaid(self) -> str:
        """A Mermaid state diagram of the graph."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.start.node_name}"]
        for name, targets in self.edges.items():
            lines += [f"    {name} --> {target}" for target in targets]
            if name in self.terminal:
                lines.append(f"    {name} --> [*]")
        return "\n".join(lines)


class GraphAnalyzer:
    """Builds and checks graphs from a start node (all methods are static)."""

    @staticmethod
    def build_graph(start: NodeClass) -> dict[str, list[str]]:
        """The adjacency dict of the graph reachable from ``start``; raises :class:`GraphError`."""
        return GraphAnalyzer.validate(start).to_dict()

    @staticmethod
    def mermaid(start: NodeClass) -> str:
        """A Mermaid state diagram of the graph reachable from ``start``."""
        return GraphAnalyzer.validate(start).to_mermaid()

    @staticmethod
    def validate(start: NodeClass) -> Graph:
        """Analyse the graph from ``start``; every problem found is listed in one GraphError."""
        if not (isinstance(start, type) and issubclass(start, Node)):
            raise GraphError([f"start {start!r} is not a Node subclass"])
        problems: list[str] = []
        nodes: dict[str, NodeClass] = {}
        edges: dict[str, tuple[str, ...]] = {}
        terminal: set[str] = set()
        queue: list[NodeClass] = [start]
        while queue:
            node = queue.pop(0)
            name = node.node_name
            if name in nodes:
                if nodes[name] is not node:
                    problems.append(
                        f"two nodes are named {name!r}: {_qualname(nodes[name])} and "
                        f"{_qualname(node)}; give one a stable name with `name=...`"
                    )
                continue
            nodes[name] = node
            targets, ends = _edges_of(node, problems)
            edges[name] = tuple(dict.fromkeys(t.node_name for t in targets))
            if ends:
                terminal.add(name)
            queue.extend(targets)
        ctx = _shared_context(nodes, problems)
        if problems:
            raise GraphError(problems)
        assert ctx is not None
        return Graph(start, nodes, edges, frozenset(terminal), ctx)


def _qualname(node: type) -> str:
    return f"{node.__module__}.{node.__qualname__}"


def _edges_of(node: NodeClass, problems: list[str]) -> tuple[list[NodeClass], bool]:
    """The node classes (and whether None) that ``node.run``'s return hint declares."""
    run = node.__dict__.get("run") or getattr(node, "run", None)
    if run is None or run is Node.run:
        problems.append(f"{node.__name__} does not implement `async def run(self, ctx)`")
        return [], False
    if not inspect.iscoroutinefunction(run):
        problems.append(f"{node.__name__}.run must be `async def`")
    if "return" not in getattr(run, "__annotations__", {}):
        problems.append(f"{node.__name__}.run has no return hint (use `-> None` for a final node)")
        return [], False
    try:
        hints = typing.get_type_hints(run, localns=_sibling_nodes(node))
    except Exception as exc:  # NameError, TypeError, SyntaxError from user annotations
        raw = run.__annotations__.get("return")
        problems.append(f"{node.__name__}.run return hint {raw!r} cannot be resolved: {exc}")
        return [], False
    targets: list[NodeClass] = []
    ends = False
    for item in _flatten(hints["return"]):
        if item is None:
            ends = True
        elif isinstance(item, tuple):
            problems.append(f"{node.__name__}.run return hint: {item[1]}")
        else:
            targets.append(item)
    return targets, ends


def _flatten(hint: Any, inside_type: bool = False) -> Iterator[NodeClass | tuple[str, str] | None]:
    """Yield node classes, None (finish), or ("bad", reason) for each member of a hint."""
    origin = typing.get_origin(hint)
    if hint is None or hint is type(None):
        yield None
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            yield from _flatten(arg, inside_type)
    elif origin is type:
        (arg,) = typing.get_args(hint) or (Any,)
        yield from _flatten(arg, inside_type=True)
    elif isinstance(hint, type) and issubclass(hint, Node):
        if inside_type:
            yield hint
        else:
            yield ("bad", f"`{hint.__name__}` is an instance hint; return the class, "
                          f"hinted `type[{hint.__name__}]`")
    else:
        yield ("bad", f"{hint!r} is not a Node class (expected type[SomeNode] or None)")


def _sibling_nodes(node: NodeClass) -> dict[str, Any]:
    """Node classes of the same module by name, so string hints to local classes resolve."""
    found: dict[str, Any] = {}
    pending = list(Node.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ == node.__module__:
            found.setdefault(cls.__name__, cls)
    module = sys.modules.get(node.__module__)
    return {**found, **(vars(module) if module else {})}


def _shared_context(nodes: dict[str, NodeClass], problems: list[str]) -> type[BaseModel] | None:
    """The one context model all nodes declare; a problem when they differ or none is given."""
    seen: dict[type[BaseModel], list[str]] = {}
    for name, node in nodes.items():
        ctx = context_type(node) or _ctx_from_run(node)
        if ctx is None:
            problems.append(f"{name} declares no context model (subclass Node[YourContext])")
        else:
            seen.setdefault(ctx, []).append(name)
    if len(seen) > 1:
        parts = "; ".join(f"{c.__name__}: {', '.join(n)}" for c, n in seen.items())
        problems.append(f"nodes declare different context models ({parts})")
    return next(iter(seen)) if len(seen) == 1 else None


def _ctx_from_run(node: NodeClass) -> type[BaseModel] | None:
    try:
        hints = typing.get_type_hints(node.run, localns=_sibling_nodes(node))
    except Exception:
        return None
    ctx = hints.get("ctx")
    return ctx if isinstance(ctx, type) and issubclass(ctx, BaseModel) else None
