"""Clients don't configure the bus (issue 7, item 11), against a real nats-server of the test's
own: ``trigger`` and ``cancel`` connect publish-only and create nothing; ``commandnet pools
ensure`` creates the streams, the status bucket and the pool's consumer up front, idempotently,
so a backlog is visible before the first worker starts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from click.testing import CliRunner

from commandnet.adapters.nats import BusPublishError, JetStreamBus
from commandnet.cli.main import cli
from commandnet.errors import CommandNetError
from commandnet.local.nats import NatsServer
from commandnet.messages import TriggerCommand

pytestmark = pytest.mark.usefixtures("no_commandnet_env")


async def _layout(url: str) -> dict[str, Any]:
    """Streams (KV buckets included, as KV_<name>) and each stream's consumers."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        found: dict[str, Any] = {}
        for info in await js.streams_info():
            name = str(info.config.name)
            found[name] = sorted(str(c.name) for c in await js.consumers_info(name))
        return found
    finally:
        await nc.close()


def layout(url: str) -> dict[str, Any]:
    return asyncio.run(_layout(url))


async def _pending(url: str, stream: str, consumer: str) -> int:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
        return int(info.num_pending or 0)
    finally:
        await nc.close()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_clients_create_nothing_and_pools_ensure_creates_the_pool_up_front(
        restartable_nats: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = restartable_nats.url
    assert layout(url) == {}
    for args in (["trigger", "a1", "--node", "Step0"], ["cancel", "a1"]):
        result = invoke(*args, "--pool", "orders", "--bus", url, "--connect-timeout", "5")
        assert result.exit_code == 1, result.output
        assert "stream 'COMMANDNET' does not exist" in result.output, result.output
        assert "commandnet pools ensure --pool orders" in result.output, result.output
        assert "start a worker of pool 'orders'" in result.output
    status = invoke("status", "a1", "--pool", "orders", "--bus", url)
    assert status.exit_code == 1 and "no status bucket" in status.output
    assert layout(url) == {}, "a client created streams, consumers or buckets"

    ensured = invoke("pools", "ensure", "--pool", "orders", "--bus", url)
    assert ensured.exit_code == 0, ensured.output
    assert "consumer 'orders' with 0 message(s) pending" in ensured.output
    assert layout(url) == {"COMMANDNET": ["orders"], "COMMANDNET_DLQ": [],
                           "KV_COMMANDNET_STATUS": [], "KV_COMMANDNET_GRAPHS": []}

    sent = invoke("trigger", "a1", "--node", "Step0", "--pool", "orders", "--bus", url)
    assert sent.exit_code == 0, sent.output
    assert asyncio.run(_pending(url, "COMMANDNET", "orders")) == 1  # visible before any worker

    # Twice is fine: same layout, the backlog kept; settings from the environment work too.
    monkeypatch.setenv("COMMANDNET_BUS_URL", url)
    monkeypatch.setenv("COMMANDNET_POOL", "orders")
    again = invoke("pools", "ensure")
    assert again.exit_code == 0, again.output
    assert "consumer 'orders' with 1 message(s) pending" in again.output
    assert asyncio.run(_pending(url, "COMMANDNET", "orders")) == 1
    assert layout(url) == {"COMMANDNET": ["orders"], "COMMANDNET_DLQ": [],
                           "KV_COMMANDNET_STATUS": [], "KV_COMMANDNET_GRAPHS": []}

    # A mistyped pool's trigger is stored, but nothing makes that pool look served.
    typo = invoke("trigger", "a2", "--node", "Step0", "--pool", "ordrs")
    assert typo.exit_code == 0, typo.output
    assert layout(url)["COMMANDNET"] == ["orders"]


def test_pools_ensure_gives_the_consumer_and_dlq_the_worker_settings(
        restartable_nats: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDNET_ACK_WAIT", "45")
    monkeypatch.setenv("COMMANDNET_DLQ_MAX_BYTES", "2097152")
    result = invoke("pools", "ensure", "--pool", "p1", "--bus", restartable_nats.url)
    assert result.exit_code == 0, result.output

    async def configs() -> tuple[float, int]:
        nc = await nats.connect(restartable_nats.url, connect_timeout=5)
        try:
            js = nc.jetstream()
            consumer = await js.consumer_info("COMMANDNET", "p1")
            dlq = await js.stream_info("COMMANDNET_DLQ")
            return float(consumer.config.ack_wait or 0), int(dlq.config.max_bytes or 0)
        finally:
            await nc.close()

    assert asyncio.run(configs()) == (45.0, 2 * 1024 * 1024)


def test_pools_ensure_errors_are_clear(restartable_nats: NatsServer) -> None:
    memory = invoke("pools", "ensure", "--bus", "memory://")
    assert memory.exit_code == 2 and "needs a NATS bus" in memory.output
    bad = invoke("pools", "ensure", "--pool", "a.b", "--bus", restartable_nats.url)
    assert bad.exit_code == 2 and "pool" in bad.output
    restartable_nats.stop()
    gone = invoke("pools", "ensure", "--bus", restartable_nats.url, "--connect-timeout", "2")
    assert gone.exit_code == 1
    assert f"cannot reach the bus at {restartable_nats.url}" in gone.output


async def test_a_publish_only_bus_never_creates_and_cannot_consume(
        restartable_nats: NatsServer) -> None:
    bus = JetStreamBus(restartable_nats.url, pool="p", manage=False)
    await bus.connect()
    try:
        with pytest.raises(BusPublishError, match="stream 'COMMANDNET' does not exist"):
            await bus.publish(TriggerCommand(agent_id="x", start_node="S", context={}))
        with pytest.raises(CommandNetError, match="publish-only"):
            await bus.subscribe(lambda delivery: asyncio.sleep(0))
        assert await _layout(restartable_nats.url) == {}
        worker_side = JetStreamBus(restartable_nats.url, pool="p")
        await worker_side.connect()  # a managing bus creates the streams and the bucket
        await worker_side.close()
        await bus.publish(TriggerCommand(agent_id="x", start_node="S", context={}))
        assert (await _layout(restartable_nats.url))["COMMANDNET"] == []  # and no consumer
    finally:
        await bus.close()
