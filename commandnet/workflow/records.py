"""Records of the workflow features that stores implement (re-exported by
:mod:`commandnet.records`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class SignalOutcome(enum.StrEnum):
    """What :meth:`Persistence.signal_agent` did with a signal."""

    DELIVERED = "delivered"  # the agent waited for it: it is due now, with the payload
    KEPT = "kept"  # stored until the agent waits for that name
    DUPLICATE = "duplicate"  # this signal id was received before: nothing changed
    MISSING = "missing"  # no such agent (nothing stored)
    FINAL = "final"  # the agent has ended (nothing stored)


@dataclass(frozen=True)
class Branch:
    """One branch of a fan-out: a sub-agent that starts at ``node`` with ``context`` (JSON)."""

    node: str
    context: dict[str, Any]


# The reasons given to branches cancelled with their parent, or by a failed sibling.
PARENT_CANCELLED = "cancelled: its parent was cancelled"
SIBLING_FAILED = "cancelled: a sibling branch failed (fail fast)"


def branch_id(parent_id: str, step: int, index: int) -> str:
    """The id of branch ``index`` of the fan-out that moved ``parent_id`` to ``step``: stable,
    so a retried commit creates the same branches."""
    return f"{parent_id}/{step}/{index}"
