"""Each pool's graph in a NATS KV bucket: workers publish it at start, the operator reads it.

The bucket (``COMMANDNET_GRAPHS`` by default; a :class:`~.nats.JetStreamBus` names it
``<stream>_GRAPHS``) has one key per pool, the pool's name, whose value is the JSON document of
:func:`commandnet.loading.describe_pool`: nodes, edges, terminal nodes, the context's JSON
schema, and a ``version`` hash. History 1 (only the latest document matters), file storage.

A worker writes the document only when the stored ``version`` differs (compare-and-set on the
key's revision), so twenty replicas starting at once write it once, and a restart with the same
graph writes nothing. :class:`GraphCatalog` keeps every pool's latest document in memory from a
watch of the bucket, sharing a NATS connection that the process already holds (the operator's
status reader's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ..errors import CommandNetError
from .nats_status import ensure_bucket, watch_bucket

log = logging.getLogger("commandnet.nats")

DEFAULT_GRAPH_BUCKET = "COMMANDNET_GRAPHS"


async def ensure_graph_bucket(js: JetStreamContext, bucket: str = DEFAULT_GRAPH_BUCKET,
                              replicas: int = 1) -> KeyValue:
    """Bind to the graph bucket, creating it (history 1, file storage) if it is missing."""
    return await ensure_bucket(
        js, bucket, replicas, what="graph",
        description="commandnet: each pool's graph (nodes, edges, context schema, version)")


async def publish_graph(js: JetStreamContext, doc: dict[str, Any], replicas: int = 1, *,
                        bucket: str = DEFAULT_GRAPH_BUCKET) -> bool:
    """Store ``doc`` (a :func:`~commandnet.loading.describe_pool` document) under its pool,
    creating the bucket if it is missing, unless the stored document has the same ``version``.
    True when written, False when the bucket had it already."""
    kv = await ensure_graph_bucket(js, bucket, replicas)
    key, version = str(doc["pool"]), str(doc["version"])
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    for _ in range(10):
        try:
            entry: KeyValue.Entry | None = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # missing, or deleted
            entry = None
        if entry is not None and _version(entry.value) == version:
            return False
        try:
            if entry is None:
                await kv.create(key, data)
            else:
                await kv.update(key, data, last=entry.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # another worker wrote meanwhile: look again
    raise CommandNetError(f"graph of pool {key!r} in bucket {bucket!r} kept changing under "
                          "10 writes")


def _version(value: bytes | None) -> str | None:
    try:
        stored = json.loads(value or b"{}")
    except ValueError:
        return None
    return stored.get("version") if isinstance(stored, dict) else None


class GraphCatalog:
    """Every pool's published graph, kept current by a background watch of the graph bucket.

    ``nc``: a connected NATS client, shared (the catalog neither connects nor closes it).
    :meth:`start` starts the watch; :attr:`graphs` maps each pool to its latest document
    (:meth:`get`), a deleted key drops its pool. While the bucket does not exist (no worker
    started yet) the watch retries quietly and there are no graphs; after a reconnect it
    starts again, replays every key and drops pools whose key went meanwhile. :attr:`synced`
    is set once a first full replay is in.
    """

    def __init__(self, nc: NatsClient, *, bucket: str = DEFAULT_GRAPH_BUCKET) -> None:
        self.nc = nc
        self.bucket = bucket
        self.graphs: dict[str, dict[str, Any]] = {}
        self.revisions: dict[str, int] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def get(self, pool: str) -> dict[str, Any] | None:
        """The latest graph document of ``pool``, or None when none is published."""
        return self.graphs.get(pool)

    async def start(self) -> None:
        """Start the background watch (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="commandnet-graph-catalog")

    async def stop(self) -> None:
        """Stop the watch (the connection stays open)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _bind(self) -> KeyValue:
        return await self.nc.jetstream().key_value(self.bucket)

    async def _watch(self) -> None:
        replayed: set[str] = set()
        entries = watch_bucket(self._bind, ">", lambda: int(self.nc.stats["reconnects"]),
                               f"graph watch on bucket {self.bucket!r}")
        async with contextlib.aclosing(entries):
            async for entry, replay in entries:
                if entry is None:  # a replay is over: pools not in it are gone
                    for pool in set(self.graphs) - replayed:
                        self._forget(pool)
                    replayed.clear()
                    self.synced.set()
                    continue
                if replay:
                    replayed.add(entry.key)
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE"):
            self._forget(entry.key)
            return
        try:
            doc = json.loads(entry.value or b"")
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            log.warning("graph bucket %r: key %r holds no JSON object; ignored", self.bucket,
                        entry.key)
            self._forget(entry.key)
            return
        self.graphs[entry.key] = doc
        self.revisions[entry.key] = int(entry.revision or 0)

    def _forget(self, pool: str) -> None:
        self.graphs.pop(pool, None)
        self.revisions.pop(pool, None)
