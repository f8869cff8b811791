"""The error every store raises for a trigger that reuses an agent id with another request."""

from __future__ import annotations

import json
from typing import Any

from ..errors import TriggerConflictError


def trigger_conflict(agent_id: str, old: tuple[str, Any],
                     new: tuple[str, Any]) -> TriggerConflictError:
    """The error for ``agent_id`` whose stored (start node, context) differs from ``new``."""
    return TriggerConflictError(
        f"agent {agent_id!r} exists with start node {old[0]!r} and context "
        f"{json.dumps(old[1], sort_keys=True)}; the new trigger asks for {new[0]!r} with "
        f"{json.dumps(new[1], sort_keys=True)}")
