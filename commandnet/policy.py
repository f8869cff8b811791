"""Per-node retry policy: how often and how patiently a failing node is run again."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field


class RetryPolicy(BaseModel):
    """Retry and timeout settings of one node (defaults: 3 attempts, 1 s doubling to 60 s, 300 s).

    An attempt that raises or times out is retried after a backoff of
    ``initial_interval * multiplier ** (attempt - 1)``, capped at ``max_interval`` and spread by
    ``jitter`` (a fraction, 0.1 = +/-10 %). Exceptions listed in ``non_retryable`` fail the agent
    at once. ``timeout=None`` lets a node run for as long as it likes (its lease is kept alive).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    max_attempts: int = Field(default=3, ge=1)
    initial_interval: float = Field(default=1.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_interval: float = Field(default=60.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    non_retryable: tuple[type[BaseException], ...] = ()
    timeout: float | None = Field(default=300.0, gt=0)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt + 1`` (``attempt`` counts from 1)."""
        growth = self.multiplier ** max(attempt - 1, 0)
        base = min(self.initial_interval * growth, self.max_interval)
        spread = base * self.jitter
        return max(0.0, base + random.uniform(-spread, spread))

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        """Whether a failure of attempt number ``attempt`` earns another attempt."""
        return attempt < self.max_attempts and not isinstance(error, self.non_retryable)
