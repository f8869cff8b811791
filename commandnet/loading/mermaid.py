"""A graph as a Mermaid state diagram: plain moves unlabelled, a directive's edges labelled
with their kind (``sleep``, ``signal``, ``timeout``), final nodes leading to ``[*]``."""

from __future__ import annotations

from ..graph import Graph


def mermaid(graph: Graph) -> str:
    """The ``stateDiagram-v2`` text of ``graph``."""
    lines = ["stateDiagram-v2", f"    [*] --> {graph.start.node_name}"]
    for name, targets in graph.edges.items():
        lines += [f"    {name} --> {target}" + (f": {kind}" if kind else "")
                  for target in targets for kind in sorted(graph.kinds[(name, target)])]
        if name in graph.terminal:
            lines.append(f"    {name} --> [*]")
    return "\n".join(lines)
