"""Loading user code named on the command line or in settings (``pkg.module:StartNode``), and
describing the graphs it holds as JSON (what workers publish for the operator).

It sits below both :mod:`commandnet.cli` and :mod:`commandnet.worker`, which import it; it
imports only the core.
"""

from .describe import describe_graph, describe_pool, graph_version
from .graphs import GraphLoadError, load_graph

__all__ = ["GraphLoadError", "describe_graph", "describe_pool", "graph_version", "load_graph"]
