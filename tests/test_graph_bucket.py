"""Each pool's graph in the NATS KV graph bucket: described, published by workers, watched.

``describe_pool`` is checked on its own (deterministic, in another process too; the version
follows nodes, edges and the context schema); the rest runs against the real nats-server of
the session fixture (and a server of the test's own for the restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Union

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType
from pydantic import BaseModel, ConfigDict

from commandnet import GraphAnalyzer, Node
from commandnet.adapters.nats import JetStreamBus
from commandnet.adapters.nats_graphs import DEFAULT_GRAPH_BUCKET, GraphCatalog, publish_graph
from commandnet.loading import describe_pool
from commandnet.local.nats import NatsServer
from commandnet.worker import Worker, WorkerSettings
from tests.fixtures.nats import JetStreamNames

WAIT = 15.0

# ------------------------------------------------------------------------ test graphs


class Order(BaseModel):
    sku: str
    qty: int = 1


class OrderV2(BaseModel):  # one field more: another context schema
    sku: str
    qty: int = 1
    note: str = ""


class Ship(Node[Order], name="ship"):
    async def run(self, ctx: Order) -> None:
        return None


class Charge(Node[Order], name="charge"):
    async def run(self, ctx: Order) -> type[Ship] | None:
        return Ship


class Refund(Node[Order], name="refund"):
    async def run(self, ctx: Order) -> None:
        return None


class ChargeOrRefund(Node[Order], name="charge"):  # the same node, one edge more
    async def run(self, ctx: Order) -> Union[type[Refund], type[Ship], None]:  # noqa: UP007
        return Ship


class ShipV2(Node[OrderV2], name="ship"):
    async def run(self, ctx: OrderV2) -> None:
        return None


class ChargeV2(Node[OrderV2], name="charge"):
    async def run(self, ctx: OrderV2) -> type[ShipV2] | None:
        return ShipV2


class Other(BaseModel):
    n: int = 0


class Tally(Node[Other], name="tally"):
    async def run(self, ctx: Other) -> None:
        return None


class Opaque:
    """Not a Pydantic type: a context holding it has no JSON schema."""


class Odd(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: Opaque | None = None


class OddStart(Node[Odd]):
    async def run(self, ctx: Odd) -> None:
        return None


def doc_of(pool: str, *starts: type[Node[Any]]) -> dict[str, Any]:
    return describe_pool(pool, [GraphAnalyzer.validate(s) for s in starts])


# ------------------------------------------------------------------------ describe_pool


def test_describe_pool_lists_nodes_edges_terminals_and_the_context_schema() -> None:
    doc = doc_of("orders", ChargeOrRefund, Tally)
    assert json.loads(json.dumps(doc)) == doc  # JSON-able as it is
    assert doc["pool"] == "orders"
    first, second = doc["graphs"]
    assert first["start"] == "charge" and first["context_model"] == "Order"
    assert first["nodes"] == ["charge", "refund", "ship"]
    assert first["edges"] == {"charge": ["refund", "ship"], "refund": [], "ship": []}
    assert first["terminal"] == ["charge", "refund", "ship"]
    assert first["context"] == Order.model_json_schema()
    assert first["context"]["required"] == ["sku"]
    assert second["start"] == "tally" and second["context_model"] == "Other"
    assert doc["nodes"] == {"charge": 0, "refund": 0, "ship": 0, "tally": 1}
    assert len(doc["version"]) == 64 and int(doc["version"], 16) >= 0


def test_describe_pool_is_deterministic_across_processes() -> None:
    doc = doc_of("orders", Charge)
    assert doc_of("orders", Charge) == doc
    code = ("import json; from commandnet import GraphAnalyzer; "
            "from commandnet.loading import describe_pool; "
            "from tests.test_graph_bucket import Charge; "
            "print(json.dumps(describe_pool('orders', [GraphAnalyzer.validate(Charge)])))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another set/dict iteration order
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=60)
    other = json.loads(out.stdout)
    assert other == doc and other["version"] == doc["version"]


def test_the_version_changes_with_nodes_edges_and_the_context_schema() -> None:
    base = doc_of("orders", Charge)["version"]
    assert doc_of("orders", ChargeOrRefund)["version"] != base  # one edge and node more
    assert doc_of("orders", ChargeV2)["version"] != base  # another context schema
    assert doc_of("orders", Charge, Tally)["version"] != base  # one graph more
    assert doc_of("other", Charge)["version"] != base  # the pool is part of it
    assert doc_of("orders", Charge)["version"] == base


# ------------------------------------------------------------------------ helpers


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str,
                     timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url, connect_timeout=5)
    yield nc
    await nc.close()


@pytest.fixture
def graph_bucket(jetstream_names: JetStreamNames) -> str:
    return f"{jetstream_names.stream}_GRAPHS"  # as a JetStreamBus with that stream names it


@pytest.fixture(autouse=True)
async def _delete_graph_bucket(nats_url: str, graph_bucket: str) -> AsyncIterator[None]:
    yield
    nc = await nats.connect(nats_url, connect_timeout=5)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await nc.jetstream().delete_key_value(graph_bucket)
    await nc.close()


async def stored(nc: NatsClient, bucket: str, pool: str) -> tuple[dict[str, Any], int]:
    entry = await (await nc.jetstream().key_value(bucket)).get(pool)
    return json.loads(entry.value or b""), int(entry.revision or 0)


# ------------------------------------------------------------------------ publish_graph


async def test_publish_graph_creates_the_bucket_and_writes_only_a_new_version(
        client: NatsClient, graph_bucket: str) -> None:
    js = client.jetstream()
    with pytest.raises(nats.js.errors.BucketNotFoundError):
        await js.key_value(graph_bucket)
    doc = doc_of("orders", Charge)
    assert await publish_graph(js, doc, bucket=graph_bucket) is True
    assert await stored(client, graph_bucket, "orders") == (doc, 1)
    status = await (await js.key_value(graph_bucket)).status()
    assert status.history == 1  # only the latest document matters
    assert status.stream_info.config.storage == StorageType.FILE
    assert await publish_graph(js, doc_of("orders", Charge), bucket=graph_bucket) is False
    assert (await stored(client, graph_bucket, "orders"))[1] == 1
    changed = doc_of("orders", ChargeV2)
    assert await publish_graph(js, changed, bucket=graph_bucket) is True
    assert await stored(client, graph_bucket, "orders") == (changed, 2)


async def test_replicas_starting_at_once_write_the_graph_once(
        client: NatsClient, graph_bucket: str) -> None:
    js = client.jetstream()
    doc = doc_of("orders", Charge)
    written = await asyncio.gather(*(publish_graph(js, doc, bucket=graph_bucket)
                                     for _ in range(20)))
    assert written.count(True) == 1
    assert (await stored(client, graph_bucket, "orders"))[1] == 1


# ------------------------------------------------------------------------ the worker


@pytest.fixture
def worker_env(no_commandnet_env: None) -> Iterator[None]:
    yield
    logging.getLogger().handlers.clear()


async def run_worker_once(nats_url: str, make_bus: Callable[..., JetStreamBus], pool: str,
                          graph: str) -> Worker:
    """Start a worker of ``pool`` (memory store, real NATS), wait until it consumes, stop it."""
    settings = WorkerSettings(graph=[graph], store_url="memory://", bus_url=nats_url,
                              pool=pool, http_host="127.0.0.1", http_port=0)
    worker = Worker(settings, bus=make_bus(pool=pool))
    running = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.consuming or running.done(), "the worker consuming")
        assert worker.consuming, running.result()
        worker.request_stop("test")
        assert await asyncio.wait_for(running, WAIT) == 0
    finally:
        running.cancel()
    return worker


async def test_a_worker_publishes_its_graph_and_a_restart_does_not_rewrite_it(
        worker_env: None, nats_url: str, make_bus: Callable[..., JetStreamBus],
        client: NatsClient, graph_bucket: str) -> None:
    first = await run_worker_once(nats_url, make_bus, "shop", "tests.test_graph_bucket:Charge")
    assert first.bus.graph_bucket == graph_bucket  # type: ignore[attr-defined]
    doc, revision = await stored(client, graph_bucket, "shop")
    assert doc == doc_of("shop", Charge)
    assert doc["graphs"][0]["nodes"] == ["charge", "ship"]
    await run_worker_once(nats_url, make_bus, "shop", "tests.test_graph_bucket:Charge")
    assert await stored(client, graph_bucket, "shop") == (doc, revision)  # not rewritten
    await run_worker_once(nats_url, make_bus, "shop", "tests.test_graph_bucket:ChargeV2")
    changed, later = await stored(client, graph_bucket, "shop")
    assert later > revision and changed == doc_of("shop", ChargeV2)


async def test_a_graph_that_cannot_be_published_is_a_warning_not_a_stop(
        worker_env: None, nats_url: str, make_bus: Callable[..., JetStreamBus],
        client: NatsClient, graph_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="commandnet.worker"):
        await run_worker_once(nats_url, make_bus, "odd", "tests.test_graph_bucket:OddStart")
    assert any("graph of pool 'odd' not published" in r.getMessage() for r in caplog.records)
    kv = await client.jetstream().key_value(graph_bucket)  # the bus created the bucket
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("odd")


async def test_a_managing_bus_creates_the_graph_bucket(
        make_bus: Callable[..., JetStreamBus], client: NatsClient, graph_bucket: str) -> None:
    # Workers and `commandnet pools ensure` connect a managing bus: it creates the bucket.
    bus = make_bus(pool="ensure")
    await bus.connect()
    kv = await client.jetstream().key_value(graph_bucket)
    assert (await kv.status()).bucket == graph_bucket
    assert JetStreamBus("nats://127.0.0.1:1").graph_bucket == DEFAULT_GRAPH_BUCKET


# ------------------------------------------------------------------------ GraphCatalog


async def test_the_catalog_sees_a_published_graph_its_update_and_its_deletion(
        client: NatsClient, graph_bucket: str) -> None:
    catalog = GraphCatalog(client, bucket=graph_bucket)
    await catalog.start()
    try:
        await asyncio.sleep(0.5)  # no bucket yet: no graphs, and the watch keeps trying
        assert catalog.get("orders") is None and catalog.graphs == {}
        assert not catalog.synced.is_set()
        doc = doc_of("orders", Charge)
        await publish_graph(client.jetstream(), doc, bucket=graph_bucket)
        await eventually(lambda: catalog.get("orders") == doc, "the catalog has the graph")
        await catalog.synced.wait()
        changed = doc_of("orders", ChargeV2)
        await publish_graph(client.jetstream(), changed, bucket=graph_bucket)
        await eventually(lambda: catalog.get("orders") == changed, "the catalog has the update")
        assert catalog.revisions["orders"] == 2
        await (await client.jetstream().key_value(graph_bucket)).delete("orders")
        await eventually(lambda: catalog.get("orders") is None, "the graph deleted")
    finally:
        await catalog.stop()
    assert client.is_connected  # the shared connection stays open


async def test_the_catalog_replays_what_is_published_already(
        client: NatsClient, graph_bucket: str) -> None:
    docs = {pool: doc_of(pool, Charge) for pool in ("a", "b")}
    for doc in docs.values():
        await publish_graph(client.jetstream(), doc, bucket=graph_bucket)
    catalog = GraphCatalog(client, bucket=graph_bucket)
    await catalog.start()
    try:
        await asyncio.wait_for(catalog.synced.wait(), WAIT)
        assert catalog.graphs == docs
    finally:
        await catalog.stop()


async def test_the_catalog_follows_the_bucket_across_a_server_restart(
        restartable_nats: NatsServer) -> None:
    bucket = DEFAULT_GRAPH_BUCKET
    nc = await nats.connect(restartable_nats.url, connect_timeout=5, reconnect_time_wait=0.2,
                            max_reconnect_attempts=-1)
    catalog = GraphCatalog(nc)
    try:
        await publish_graph(nc.jetstream(), doc_of("orders", Charge), bucket=bucket)
        await catalog.start()
        await asyncio.wait_for(catalog.synced.wait(), WAIT)
        await asyncio.to_thread(restartable_nats.restart)
        await eventually(lambda: int(nc.stats["reconnects"]) >= 1 and nc.is_connected,
                         "the client reconnected")
        changed = doc_of("orders", ChargeV2)

        async def published() -> bool:  # JetStream may need a moment after the restart
            try:
                await publish_graph(nc.jetstream(), changed, bucket=bucket)
            except Exception:
                return False
            return True

        await eventually(published, "published after the restart")
        await eventually(lambda: catalog.get("orders") == changed,
                         "the catalog saw the update made after the restart")
    finally:
        await catalog.stop()
        await nc.close()
