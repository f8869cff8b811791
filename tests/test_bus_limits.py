"""JetStream limits (issue 7, item 10), against a real nats-server: the dead-letter stream is
bounded in size and age (configurable, also through the worker settings), and nothing the engine
decides (a nack, a message waiting for a free slot) uses up ``max_deliver``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from commandnet.adapters.nats import JetStreamBus
from commandnet.bus import Delivery
from commandnet.messages import StepEvent, decode
from commandnet.worker import Worker, load_settings
from tests.test_nats_bus import WAIT, Inbox, eventually, stream_messages

MakeBus = Callable[..., JetStreamBus]
MiB = 1024 * 1024


async def test_a_message_nacked_past_max_deliver_is_still_delivered_never_dead_lettered(
        make_bus: MakeBus) -> None:
    bus = make_bus(max_deliver=4, ack_wait=30.0)
    assert bus.renew_after == 2
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="busy", step=3))
    counts = []
    for attempt in range(12):  # three times max_deliver: a lease held by a 45-minute step
        delivery = await inbox.get(f"delivery {attempt + 1} after a nack")
        assert decode(delivery.data).dedup_id == "busy:3"
        counts.append(delivery.deliveries)
        await delivery.nack(0.01)
    last = await inbox.get("the delivery after 12 nacks")
    assert decode(last.data).dedup_id == "busy:3"
    # Renewed copies start again at delivery 1 and never get near max_deliver.
    assert max(counts) <= bus.renew_after < bus.max_deliver, counts
    assert counts[:4] == [1, 2, 1, 2], counts
    await last.ack()

    async def drained() -> bool:
        return await stream_messages(bus) == 0 and await bus.lag() == 0

    await eventually(drained, "no copy left behind in the work stream")
    await asyncio.sleep(1.0)  # a max-deliveries advisory would move it within this
    assert await bus.dead_letters() == []
    assert inbox.queue.empty(), "a renewed message was delivered twice"


async def test_a_retried_renewal_is_stored_once(make_bus: MakeBus) -> None:
    # The renewal's publish went through but its ack was lost: the old message comes back and
    # is renewed again, under the same de-dup id, so the stream holds one copy.
    bus = make_bus(max_deliver=2, ack_wait=30.0)
    await bus.connect()
    await bus.ensure_consumer()
    await bus.publish(StepEvent(agent_id="lost-ack", step=0))
    psub = await bus.jetstream().pull_subscribe_bind(bus.consumer, stream=bus.stream)
    (msg,) = await psub.fetch(1, timeout=WAIT)
    assert msg.metadata.num_delivered == 1 == bus.renew_after
    js = bus.jetstream()
    renewed_id = f"lost-ack:0#renewed@{msg.metadata.sequence.stream}"
    for _ in range(2):  # the same renewal twice, as after a lost ack
        await js.publish(msg.subject, msg.data, headers={"Nats-Msg-Id": renewed_id})
    await bus._retry_later(msg, None)

    async def one_copy() -> bool:  # the original acknowledged, the renewal stored once
        return await stream_messages(bus) == 1

    await eventually(one_copy, "one renewed copy and no original")
    (copy,) = await psub.fetch(1, timeout=WAIT)
    assert copy.data == msg.data and copy.metadata.num_delivered == 1
    assert copy.headers is not None and copy.headers["Nats-Msg-Id"] == renewed_id
    await copy.ack()
    await psub.unsubscribe()


async def test_messages_waiting_for_a_free_slot_are_not_redelivered(make_bus: MakeBus) -> None:
    # The engine blocks the handler while all its slots are busy; the rest of the fetched batch
    # waits longer than ack_wait, and must not be redelivered (a delivery counted, a duplicate).
    bus = make_bus(ack_wait=1.0, fetch_batch=8)
    await bus.connect()
    for index in range(3):
        await bus.publish(StepEvent(agent_id=f"wait{index}", step=0))
    seen: list[tuple[str, int]] = []

    async def full_engine(delivery: Delivery) -> None:
        seen.append((decode(delivery.data).dedup_id, delivery.deliveries))
        await asyncio.sleep(2.5)  # 2.5 x ack_wait before the slot frees
        await delivery.ack()

    await bus.subscribe(full_engine)

    async def all_handled() -> bool:
        return len(seen) >= 3 and await bus.lag() == 0

    await eventually(all_handled, "the three messages handled", timeout=60)
    await asyncio.sleep(2.0)  # a redelivery of a waiting message would show up by now
    assert sorted(seen) == [("wait0:0", 1), ("wait1:0", 1), ("wait2:0", 1)]


async def test_dead_letter_stream_is_bounded_by_size_and_age(make_bus: MakeBus) -> None:
    default = make_bus()
    await default.connect()
    config = (await default.jetstream().stream_info(default.dlq_stream)).config
    assert (config.max_bytes, config.max_age) == (256 * MiB, 14 * 24 * 3600.0)
    assert config.retention == RetentionPolicy.LIMITS and config.storage == StorageType.FILE

    # Configured limits; an existing unbounded DLQ (an older version's) is updated to them.
    await default.jetstream().delete_stream(default.dlq_stream)
    await default.jetstream().add_stream(StreamConfig(
        name=default.dlq_stream, subjects=[f"{default.prefix}.dlq.*.*"],
        storage=StorageType.FILE))
    bus = make_bus(dlq_max_bytes=4096, dlq_max_age=3600.0)
    await bus.connect()
    config = (await bus.jetstream().stream_info(bus.dlq_stream)).config
    assert (config.max_bytes, config.max_age) == (4096, 3600.0)

    # Full: the oldest dead letters go, the newest stay.
    for seq in range(40):
        await bus._store_dead_letter(b"x" * 200, bus.events_subject, seq + 1, 1, f"poison {seq}")
    info = await bus.jetstream().stream_info(bus.dlq_stream)
    assert 0 < info.state.bytes <= 4096 and info.state.messages < 40
    letters = await bus.dead_letters()
    assert letters[-1][1]["Commandnet-Reason"] == "poison 39"
    assert all(h["Commandnet-Reason"] != "poison 0" for _, h in letters)


async def test_dead_letters_expire_after_dlq_max_age(make_bus: MakeBus) -> None:
    bus = make_bus(dlq_max_age=1.0)
    await bus.connect()
    await bus._store_dead_letter(b"old", bus.events_subject, 1, 1, "expires")
    assert len(await bus.dead_letters()) == 1
    started = time.monotonic()

    async def expired() -> bool:
        return await bus.dead_letters() == []

    await eventually(expired, "the dead letter dropped after dlq_max_age")
    assert time.monotonic() - started < WAIT


def test_dlq_limits_come_from_the_worker_settings(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("COMMANDNET_DLQ_MAX_BYTES", "1048576")
    monkeypatch.setenv("COMMANDNET_DLQ_MAX_AGE", "7200")
    settings = load_settings(graph=["tests.graphs.linear:Step0"], bus_url="nats://127.0.0.1:1",
                             store_url=f"sqlite:///{tmp_path / 'cn.db'}")
    assert (settings.dlq_max_bytes, settings.dlq_max_age) == (MiB, 7200.0)
    bus = Worker(settings).bus
    assert isinstance(bus, JetStreamBus)
    assert (bus.dlq_max_bytes, bus.dlq_max_age, bus.manage) == (MiB, 7200.0, True)
    monkeypatch.setenv("COMMANDNET_DLQ_MAX_BYTES", "-1")
    with pytest.raises(ValueError, match="dlq_max_bytes"):
        load_settings(graph=["tests.graphs.linear:Step0"])
