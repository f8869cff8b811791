"""Group commit: calls that arrive while earlier ones are being written share the next statement.

Every worker commits one transition and clears one outbox row per step; under load these become
one statement (one transaction, one WAL flush) for many agents instead of a round trip each. A
caller returns once the statement holding its change has committed, or gets its own error,
exactly as with a statement of its own. At low load nothing waits: a statement starts at once
while fewer than ``concurrency`` are running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``flush`` on the items submitted meanwhile: at most ``concurrency`` flushes at a
    time, of at most ``limit`` items each. ``flush`` returns one outcome per item, in order: its
    result, or the exception its caller gets; what ``flush`` raises goes to every caller."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R | Exception]]], *,
                 concurrency: int = 1, limit: int = 128, name: str = "commandnet-batch") -> None:
        self._flush = flush
        self._concurrency, self._limit, self._name = concurrency, limit, name
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A caller cancelled while waiting must not leave an unretrieved error behind.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append((item, done))
        if len(self._tasks) < self._concurrency:
            # A task of its own: cancelling one caller never cancels the others' statement.
            self._tasks.add(asyncio.create_task(self._drain(), name=self._name))
        return await done

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = [(item, f) for item, f in self._waiting[:self._limit] if not f.done()]
                del self._waiting[:self._limit]
                if not batch:
                    continue
                try:
                    outcomes = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    outcomes = [exc] * len(batch)
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
                batch = []
        finally:
            # Out of the set before any other call runs: a call arriving now starts a flush.
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
            # Cancelled (the loop is shutting down): no caller may wait for ever.
            for _, done in [*batch, *(self._waiting if not self._tasks else [])]:
                if not done.done():
                    done.cancel()
            if not self._tasks:
                self._waiting = []
