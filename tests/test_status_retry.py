"""The status bucket is written again after a failed write (issue 7, item 6, bus side), against
a real nats-server that is stopped while statuses are buffered and then started again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from commandnet import AgentStatus, StatusInfo
from commandnet.adapters.nats import JetStreamBus, JetStreamStatusObserver, StatusReader
from commandnet.local.nats import NatsServer
from tests.test_nats_bus import eventually

MakeBus = Callable[..., JetStreamBus]


async def test_buffered_statuses_reach_the_bucket_after_the_server_comes_back(
        restartable_nats: NatsServer, make_bus: MakeBus,
        caplog: pytest.LogCaptureFixture) -> None:
    bus = make_bus(url=restartable_nats.url, publish_timeout=1.0)
    await bus.connect()
    observer = JetStreamStatusObserver(bus, flush_interval=0.05, max_backoff=0.5)
    await observer.on_status(StatusInfo("a1", AgentStatus.RUNNING, "Start", 0, None))
    await observer.on_status(StatusInfo("a2", AgentStatus.RUNNING, "Start", 0, None))
    assert await observer.flush()

    await asyncio.to_thread(restartable_nats.stop)
    caplog.set_level(logging.WARNING, "commandnet.nats")
    await observer.on_status(StatusInfo("a1", AgentStatus.RUNNING, "Middle", 1, None))
    await observer.on_status(StatusInfo("a1", AgentStatus.SUCCEEDED, "End", 2, None))
    await observer.on_status(StatusInfo("a2", AgentStatus.FAILED, "Start", 0, "boom"))

    async def failed_twice() -> bool:
        return sum("status write(s) to bucket" in r.getMessage() for r in caplog.records) >= 2

    await eventually(failed_twice, "the writes failing while the server is down")
    assert set(observer._pending) == {"default.a1", "default.a2"}, "a failed write was dropped"
    # A late notification of an older step, buffered during the outage, does not win.
    await observer.on_status(StatusInfo("a1", AgentStatus.RUNNING, "Middle", 1, None))
    assert observer._pending["default.a1"]["step"] == 2

    await asyncio.to_thread(restartable_nats.start)
    async with StatusReader(restartable_nats.url, bucket=bus.status_bucket) as reader:

        async def caught_up() -> bool:
            a1, a2 = await reader.get_status("a1"), await reader.get_status("a2")
            return (a1 is not None and (a1["status"], a1["step"]) == ("succeeded", 2)
                    and a2 is not None and a2["status"] == "failed")

        await eventually(caught_up, "the latest statuses in the bucket after the restart", 60)
    assert observer._pending == {} and observer.dropped == 0
    await observer.close()


async def test_failed_writes_are_bounded_in_time_and_buffer(
        restartable_nats: NatsServer, make_bus: MakeBus) -> None:
    bus = make_bus(url=restartable_nats.url, publish_timeout=0.5)
    await bus.connect()
    observer = JetStreamStatusObserver(bus, flush_interval=0.05, max_backoff=0.2,
                                       max_pending=3, retry_for=1.0)
    await asyncio.to_thread(restartable_nats.stop)
    for index in range(5):  # a full buffer drops its oldest keys
        await observer.on_status(StatusInfo(f"b{index}", AgentStatus.RUNNING, "S", 0, None))
    assert list(observer._pending) == ["default.b2", "default.b3", "default.b4"]
    assert observer.dropped == 2

    async def given_up() -> bool:  # retried for retry_for seconds, then dropped
        return observer.dropped == 5 and not observer._pending

    await eventually(given_up, "the failing statuses dropped after retry_for", 30)
    await observer.close()
