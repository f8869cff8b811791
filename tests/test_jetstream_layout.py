"""The README's JetStream layout is what a JetStreamBus with default names creates.

On a nats-server of the test's own (``restartable_nats``), so the default names (``COMMANDNET``,
``COMMANDNET_DLQ``, ``COMMANDNET_STATUS``, ``COMMANDNET_GRAPHS``) meet no other test; everything
is deleted afterwards.
"""

from __future__ import annotations

import contextlib

import nats
from nats.js.api import AckPolicy, RetentionPolicy, StorageType

from commandnet.adapters.nats import JetStreamBus
from commandnet.local.nats import NatsServer
from commandnet.messages import StepEvent

DEFAULT_STREAMS = ("COMMANDNET", "COMMANDNET_DLQ", "KV_COMMANDNET_STATUS",
                   "KV_COMMANDNET_GRAPHS")


async def test_default_layout_streams_bucket_and_consumer(restartable_nats: NatsServer) -> None:
    bus = JetStreamBus(restartable_nats.url)  # every name left at its default
    nc = await nats.connect(restartable_nats.url)
    js = nc.jetstream()
    try:
        await bus.connect()
        await bus.ensure_consumer()  # what subscribe() does for a worker of the pool
        assert (bus.stream, bus.dlq_stream, bus.status_bucket, bus.pool) == (
            "COMMANDNET", "COMMANDNET_DLQ", "COMMANDNET_STATUS", "default")

        work = (await js.stream_info("COMMANDNET")).config
        assert set(work.subjects or []) == {"commandnet.*.events", "commandnet.*.commands"}
        assert work.storage == StorageType.FILE
        assert work.retention == RetentionPolicy.WORK_QUEUE
        assert work.duplicate_window == 120.0  # the 2-minute de-duplication window

        dlq = (await js.stream_info("COMMANDNET_DLQ")).config
        assert dlq.storage == StorageType.FILE
        assert dlq.retention == RetentionPolicy.LIMITS  # dead letters are kept, not consumed

        kv = await js.key_value("COMMANDNET_STATUS")  # the status bucket exists
        assert (await kv.status()).bucket == "COMMANDNET_STATUS"
        graphs = await js.key_value("COMMANDNET_GRAPHS")  # and the pools' graph bucket
        assert (await graphs.status()).bucket == "COMMANDNET_GRAPHS"

        consumer = (await js.consumer_info("COMMANDNET", "default")).config
        assert consumer.durable_name == "default"  # one durable consumer per pool
        assert set(consumer.filter_subjects or [consumer.filter_subject]) == {
            "commandnet.default.events", "commandnet.default.commands"}
        assert consumer.ack_policy == AckPolicy.EXPLICIT
        assert consumer.max_ack_pending is not None and 0 < consumer.max_ack_pending <= 10_000
        assert consumer.max_deliver is not None and consumer.max_deliver > 0
        # No BackOff: with one, nats-server ignores nak delays from the second redelivery on.
        assert not consumer.backoff, consumer.backoff

        # De-duplication on agent:step: the same step published twice is stored once.
        await bus.publish(StepEvent(agent_id="agent-1", step=0))
        await bus.publish(StepEvent(agent_id="agent-1", step=0))
        assert (await js.stream_info("COMMANDNET")).state.messages == 1
        stored = await js.get_msg("COMMANDNET", seq=1)
        assert stored.subject == "commandnet.default.events"
        assert (stored.headers or {}).get("Nats-Msg-Id") == "agent-1:0"
    finally:
        await bus.close()
        for name in DEFAULT_STREAMS:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        left = [s.config.name for s in await js.streams_info()]
        await nc.close()
    assert left == [], f"streams left behind: {left}"
