"""Durable timers: ``Sleep[Next]`` parks the agent in the store until it is due.

The worker is stopped while the agent sleeps; a new worker on the same SQLite file wakes it.
Run: python examples/workflows/timers.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from commandnet import Engine, Node, Sleep
from commandnet.adapters.memory import InMemoryEventBus
from commandnet.adapters.sqlite import SQLitePersistence


class Reminder(BaseModel):
    text: str
    log: list[str] = []


class Schedule(Node[Reminder]):
    async def run(self, ctx: Reminder) -> Sleep[Remind]:
        ctx.log.append(f"scheduled at {time.strftime('%H:%M:%S')}")
        return Sleep(Remind, seconds=0.3)  # or Sleep(Remind, until=an_aware_datetime)


class Remind(Node[Reminder]):
    async def run(self, ctx: Reminder) -> None:
        ctx.log.append(f"reminded: {ctx.text}")


def worker(db: Path) -> Engine:
    # wake_interval: how often this worker looks for due agents (default 0.5 s)
    return Engine(SQLitePersistence(db), InMemoryEventBus(), graphs=[Schedule],
                  wake_interval=0.05)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "timers.db"
        first = worker(db)
        await first.start_worker()
        started = time.monotonic()
        await first.trigger_agent("reminder-1", Schedule, Reminder(text="stand up"))
        for _ in range(500):  # until the first step has committed the timer
            if (await first.get_agent("reminder-1")).parked:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the step's worker task ends just after its commit
        rec = await first.get_agent("reminder-1")
        print(f"parked: node={rec.node} step={rec.step} due={rec.wake_at is not None} "
              f"steps in flight={first.in_flight}")
        await first.stop()  # the worker goes away; the timer stays in the store

        second = worker(db)  # another process, or the same one restarted
        await second.start_worker()
        done = await second.wait_for("reminder-1", timeout=10)
        slept = time.monotonic() - started
        print(f"reminder-1: {done.status.value} after {'>=' if slept >= 0.3 else '<'}0.3 s")
        print(f"log: {done.context['log'][-1]}")
        for h in await second.get_history("reminder-1"):
            print(f"  step {h.step}: {h.from_node} -> {h.to_node} ({h.kind})")
        await second.stop()


if __name__ == "__main__":
    asyncio.run(main())
