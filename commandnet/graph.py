"""Reading a graph out of the return type hints of ``Node.run``."""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import BaseModel

from .errors import GraphError
from .node import AnyNode, Directive, Node, context_type

NodeClass = type[AnyNode]


class _Edge(NamedTuple):
    node: NodeClass
    kind: str  # "" for a plain move, else the directive's label ("sleep", "signal", ...)


@dataclass(frozen=True)
class Graph:
    """A validated graph: its nodes by name, their edges, and the context model they share."""

    start: NodeClass
    nodes: dict[str, NodeClass]
    edges: dict[str, tuple[str, ...]]
    terminal: frozenset[str]
    context: type[BaseModel]
    kinds: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    _names: dict[NodeClass, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._names.update({cls: name for name, cls in self.nodes.items()})

    def allows(self, source: str, target: object) -> bool:
        """Whether node ``source`` declared ``target`` (a node class, a directive, or None)."""
        if target is None:
            return source in self.terminal
        if isinstance(target, Directive):
            return all(self._declared(source, node, type(target).label(i))
                       for i, node in enumerate(target.targets()))
        return self._declared(source, target, "")

    def _declared(self, source: str, target: object, kind: str) -> bool:
        name = self._names.get(target)  # type: ignore[call-overload]
        return name is not None and kind in self.kinds.get((source, name), ())

    def to_dict(self) -> dict[str, list[str]]:
        """The seed's form: ``{'A': ['B', 'C'], 'B': [], 'C': []}`` (terminal edges omitted)."""
        return {name: list(targets) for name, targets in self.edges.items()}

    def to_mermaid(self) -> str:
        """A Mermaid state diagram of the graph, every edge labelled with its kind."""
        from .loading.mermaid import mermaid

        return mermaid(self)


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
        kinds: dict[tuple[str, str], frozenset[str]] = {}
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
            edges[name] = tuple(dict.fromkeys(t.node.node_name for t in targets))
            for edge in targets:
                key = (name, edge.node.node_name)
                kinds[key] = kinds.get(key, frozenset()) | {edge.kind}
            if ends:
                terminal.add(name)
            queue.extend(t.node for t in targets)
        ctx = _shared_context(nodes, problems)
        if problems:
            raise GraphError(problems)
        assert ctx is not None
        return Graph(start, nodes, edges, frozenset(terminal), ctx, kinds)


def _qualname(node: type) -> str:
    return f"{node.__module__}.{node.__qualname__}"


def _edges_of(node: NodeClass, problems: list[str]) -> tuple[list[_Edge], bool]:
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
    targets: list[_Edge] = []
    ends = False
    for item in _flatten(hints["return"]):
        if item is None:
            ends = True
        elif isinstance(item, _Edge):
            targets.append(item)
        else:
            problems.append(f"{node.__name__}.run return hint: {item[1]}")
    return targets, ends


def _flatten(hint: Any, inside_type: bool = False,
             kind: str = "") -> Iterator[_Edge | tuple[str, str] | None]:
    """Yield edges, None (finish), or ("bad", reason) for each member of a hint."""
    origin = typing.get_origin(hint)
    if hint is None or hint is type(None):
        yield None
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            yield from _flatten(arg, inside_type)
    elif origin is type:
        (arg,) = typing.get_args(hint) or (Any,)
        yield from _flatten(arg, inside_type=True, kind=kind)
    elif isinstance(origin, type) and issubclass(origin, Directive) and not kind:
        for i, arg in enumerate(typing.get_args(hint)):
            yield from _flatten(arg, True, origin.label(i))
    elif isinstance(hint, type) and issubclass(hint, Node):
        if inside_type:
            yield _Edge(hint, kind)
        else:
            yield ("bad", f"`{hint.__name__}` is an instance hint; return the class, "
                          f"hinted `type[{hint.__name__}]`")
    else:
        yield ("bad", f"{hint!r} is not a Node class (expected type[SomeNode], None or a "
                      "directive such as Sleep[SomeNode])")


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
