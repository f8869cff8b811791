"""Safe deploys: an agent at a node the new graph lacks waits for a worker that still has it.

During a rolling upgrade old and new workers consume the same pool. Each agent records the
version of the graph that ran its last step; a worker leased a step at a node it does not know
hands the step back (the lease released, the message redelivered later, to any worker of the
pool) until ``node_grace`` seconds after the agent reached the node, then fails the agent with
:class:`NodeRemovedError` naming the node and both versions. Node names, not class names, are
the graph's identity: ``class Renamed(Node[Ctx], name="Old")`` keeps agents at ``Old`` running.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

from ..errors import UnknownNodeError
from ..loading.describe import describe_graph, graph_version

if TYPE_CHECKING:
    from ..bus import Delivery
    from ..graph import Graph, NodeClass
    from ..persistence import Persistence
    from ..records import AgentRecord

log = logging.getLogger("commandnet")
_VERSIONS: dict[NodeClass, str] = {}  # by start node: a graph's version never changes


class NodeRemovedError(UnknownNodeError):
    """An agent is at a node the deployed graphs no longer have, and no worker that has it
    took the step within ``node_grace`` seconds."""


def version_of(graph: Graph) -> str:
    """The graph's version: the SHA-256 of its description (nodes, edges, context schema)."""
    if graph.start not in _VERSIONS:
        _VERSIONS[graph.start] = graph_version(describe_graph(graph))
    return _VERSIONS[graph.start]


class SafeDeploys:
    """The engine's part of safe deploys (a mixin of :class:`~commandnet.engine.Engine`)."""

    if TYPE_CHECKING:
        persistence: Persistence
        owner: str
        lease_seconds: float
        node_grace: float
        _nodes: dict[str, tuple[Graph, NodeClass]]
        _graphs: dict[NodeClass, Graph]

    def _version(self, node: str) -> str | None:
        """The version of this worker's graph that has ``node`` (None: no graph has it)."""
        found = self._nodes.get(node)
        return None if found is None else version_of(found[0])

    async def _node_missing(self, rec: AgentRecord, delivery: Delivery) -> bool:
        """Hand the step back (True) while another worker may still have the node; after
        ``node_grace`` raise NodeRemovedError, which fails the agent."""
        waited = time.time() - rec.updated_at
        if waited < self.node_grace:
            await self.persistence.release_lease(rec.agent_id, rec.step, self.owner)
            log.warning("agent %r is at node %r, which this worker's graphs lack (graph "
                        "version %s here, %s there): handing the step back for a worker that "
                        "has it (%.0fs of node_grace %gs)", rec.agent_id, rec.node,
                        self._mine(), _short(rec.graph_version), waited, self.node_grace)
            # Jittered: a fixed delay that is a multiple of the pull loop's period lets this
            # worker's fetch be the one waiting each time the message comes back (seen in CI: a
            # step handed back 24 times in a row while an idle worker with the node waited).
            await delivery.nack(min(self.lease_seconds, 5.0) * random.uniform(0.3, 1.0))
            return True
        raise NodeRemovedError(
            f"node {rec.node!r} was removed: agent {rec.agent_id!r} reached it under graph "
            f"version {_short(rec.graph_version)}, and in {self.node_grace:g}s (node_grace) no "
            f"worker with the node took the step; this worker runs version {self._mine()}")

    def _mine(self) -> str:
        return ", ".join(sorted(_short(version_of(g)) for g in self._graphs.values())) or "none"


def _short(version: str | None) -> str:
    return "unknown" if version is None else version[:12]
