"""Loading user code named on the command line or in settings (``pkg.module:StartNode``).

It sits below both :mod:`commandnet.cli` and :mod:`commandnet.worker`, which import it; it
imports only the core.
"""

from .graphs import GraphLoadError, load_graph

__all__ = ["GraphLoadError", "load_graph"]
