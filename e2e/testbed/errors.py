"""The test bed's errors: one base class, so callers can catch "the bed failed" in one place."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """The local test bed could not be started, or stopped being healthy."""


class ToolsMissingError(ClusterError):
    """A binary or package the test bed needs is not there (the message names the fix)."""


class PortInUseError(ClusterError):
    """A port a component wanted is taken by another process."""
