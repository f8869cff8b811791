"""Agents' latest status in a NATS KV bucket: the workers write it, the operator watches it.

Keys are ``<pool>.<encoded agent id>``. KV keys allow only ``[-/_=.A-Za-z0-9]`` and a ``.``
separates subject tokens, so an agent id is encoded byte-wise: ``A-Z a-z 0-9 - _`` stay as
they are, every other UTF-8 byte (``.`` ``/`` ``=`` included) becomes ``=XX`` (two upper-case
hex digits). ``order-1`` stays ``order-1``, ``a.b`` becomes ``a=2Eb``, ``é`` becomes ``=C3=A9``.
The scheme is reversible and injective (``=`` is always escaped), and ``<pool>.>`` watches one
pool.

The value is JSON: ``agent_id``, ``pool``, ``status`` (running/succeeded/failed/cancelled),
``phase`` (the Agent CR's Running/Succeeded/...), ``node``, ``step``, ``error``, ``reason``
(a CamelCase reason for a failed or cancelled agent, :func:`failure_reason`; None otherwise),
``updated_at`` (ISO 8601, UTC), and ``trace`` while tracing is active (the W3C traceparent of
the span that handled the agent's latest step: a re-publish continues the trace from it, the
operator shows its trace id; see docs/tracing.md). Writers never move a key backwards: a
status is written only if its (step, final?) is not older than the stored one
(compare-and-set on the key's revision), so two workers' racing notifications cannot leave a
finished agent shown as running.

A write that fails (server down, reconnecting, bucket lost) is kept in the buffer and retried
at the next flush, with the flush interval doubling up to ``max_backoff`` while writes fail; a
key still failing after ``retry_for`` seconds is dropped (logged; the store's resync writes it
later), and the buffer holds at most ``max_pending`` keys (the oldest go first when it is full).
A retried status never replaces a later one buffered meanwhile, and the compare-and-set still
guards the bucket.

This module does not import :mod:`.nats` (which imports it): the observer takes any object
with ``pool``, ``status_bucket``, ``replicas`` and ``jetstream()`` (:class:`StatusBucketHost`),
such as a connected :class:`~commandnet.adapters.nats.JetStreamBus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from typing_extensions import override

from ..errors import CommandNetError
from ..observer import Observer, StatusInfo
from ..tracing import active as _tracing_active
from .connection import NatsAuth, server_address, split_nats_servers

log = logging.getLogger("commandnet.nats")

DEFAULT_BUCKET = "COMMANDNET_STATUS"
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPE = re.compile(r"=([0-9A-F]{2})")
_FINAL_RANK = {"running": 0, "succeeded": 1, "failed": 1, "cancelled": 1}


def encode_agent_id(agent_id: str) -> str:
    """An agent id as one KV key token (see the module docstring)."""
    return "".join(chr(b) if b in _PLAIN else f"={b:02X}" for b in agent_id.encode())


def decode_agent_id(token: str) -> str:
    """The inverse of :func:`encode_agent_id`."""
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(token):
        raw += token[pos:match.start()].encode()
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += token[pos:].encode()
    return raw.decode()


def status_key(pool: str, agent_id: str) -> str:
    """The KV key of ``agent_id``'s status in ``pool``."""
    return f"{pool}.{encode_agent_id(agent_id)}"


def _phase(status: str) -> str:
    return status.capitalize()


# The engine's own failure texts (commandnet/engine.py, adapters' ContextValidationError), matched
# at the start: an exception raised by a node is stored as "TypeName: message", so a node's
# message never passes for one of them. tests/test_status_reason.py produces each for real.
_REASONS = (
    ("UnknownNode", re.compile(r"unknown node '")),
    ("InvalidContext", re.compile(r"(initial context of|stored context at node|context returned "
                                  r"by node) .* does not validate as \w+: ")),
    ("InvalidContext", re.compile(r"agent .*: the context for node .* cannot be stored in ")),
    ("InvalidPayload", re.compile(r"payload of node '.*' does not validate as ")),
    ("NodeRemoved", re.compile(r"node '.*' was removed: agent ")),
    ("WorkerDied", re.compile(r"worker died during the step ")),
    ("InvalidTransition", re.compile(r"node '.*' returned .*, which its return hint does not "
                                     r"declare")),
    ("NodeTimeout", re.compile(r"node '.*' timed out after ")),
)


def failure_reason(status: str, error: str | None) -> str | None:
    """Why an agent ended, in CamelCase (for the Agent CR's conditions): None while running or
    succeeded; ``Cancelled``; for ``failed``: ``UnknownNode``, ``InvalidContext``,
    ``InvalidPayload``, ``NodeRemoved``, ``WorkerDied``, ``InvalidTransition``, ``NodeTimeout``,
    else ``NodeFailed`` (the node raised, or anything else)."""
    if status == "cancelled":
        return "Cancelled"
    if status != "failed":
        return None
    for reason, pattern in _REASONS:
        if error is not None and pattern.match(error):
            return reason
    return "NodeFailed"


def _newer_or_same(new: dict[str, Any], old: dict[str, Any]) -> bool:
    def order(value: dict[str, Any]) -> tuple[int, int]:
        return int(value.get("step", 0)), _FINAL_RANK.get(str(value.get("status")), 0)

    return order(new) >= order(old)


async def ensure_bucket(js: JetStreamContext, bucket: str, replicas: int = 1, *,
                        description: str = "commandnet: each agent's latest status",
                        what: str = "status") -> KeyValue:
    """Bind to KV bucket ``bucket``, creating it (history 1, file storage) if it is missing;
    ``what`` names it in errors (the status bucket by default)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas,
            description=description,
        ))
    except nats.js.errors.APIError as exc:
        # Someone created it meanwhile with another config: use theirs if it is a KV bucket.
        try:
            return await js.key_value(bucket)
        except nats.js.errors.APIError:
            raise CommandNetError(f"{what} bucket {bucket!r} cannot be created: "
                                  f"{exc.description}") from None


def _order(value: dict[str, Any]) -> tuple[int, bool]:
    """Later steps win; at one step a final status wins over running."""
    return int(value["step"]), value["status"] != "running"


class StatusBucketHost(Protocol):
    """What the status observer needs from a bus: its pool, bucket, replicas and JetStream."""

    @property
    def pool(self) -> str:
        """The worker pool: keys are ``<pool>.<agent>``."""

    @property
    def status_bucket(self) -> str:
        """The KV bucket's name."""

    @property
    def replicas(self) -> int:
        """Replicas of the bucket, should the observer have to create it."""

    def jetstream(self) -> JetStreamContext:
        """The connected JetStream context (raises when not connected)."""


class JetStreamStatusObserver(Observer):
    """Mirrors each agent's latest status of the bus's pool into the bus's status bucket.

    Statuses are buffered and written in the background every ``flush_interval`` seconds, many
    writes in flight at once: a step never waits for the bucket, and an agent that moved several
    times within one interval costs one write (its latest status). ``close()`` (called by
    ``Engine.stop``) writes what is left. Failures are never raised (the transition is
    committed already, and the store is the truth): a failed write stays buffered and is
    retried with backoff (see the module docstring). Each write is a compare-and-set that never
    moves a key back to an earlier step.
    """

    def __init__(self, bus: StatusBucketHost, cache_size: int = 10_000,
                 flush_interval: float = 0.25, max_concurrency: int = 64, *,
                 max_pending: int = 100_000, retry_for: float = 300.0,
                 max_backoff: float = 5.0) -> None:
        self.bus = bus
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.retry_for = retry_for
        self.max_backoff = max_backoff
        self.dropped = 0  # statuses given up on (retry_for exceeded, or evicted from a full buffer)
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None
        self._bind = asyncio.Lock()
        self._revisions: OrderedDict[str, int] = OrderedDict()
        self._cache_size = cache_size
        self._pending: dict[str, dict[str, Any]] = {}
        self._failing: dict[str, float] = {}  # key -> monotonic time of its first failed write
        self._slots = asyncio.Semaphore(max_concurrency)
        self._flusher: asyncio.Task[None] | None = None

    async def _bucket(self) -> KeyValue:
        async with self._bind:
            js = self.bus.jetstream()
            if self._kv is None or self._js is not js:  # first use, reconnected, or failing
                self._kv = await ensure_bucket(js, self.bus.status_bucket, self.bus.replicas)
                self._js = js
            return self._kv

    def _remember(self, key: str, revision: int, final: bool) -> None:
        self._revisions.pop(key, None)
        if not final:
            self._revisions[key] = revision
            while len(self._revisions) > self._cache_size:
                self._revisions.popitem(last=False)

    @override
    async def on_status(self, info: StatusInfo) -> None:
        value = {
            "agent_id": info.agent_id, "pool": self.bus.pool, "status": info.status.value,
            "phase": _phase(info.status.value), "node": info.node, "step": info.step,
            "error": info.error, "reason": failure_reason(info.status.value, info.error),
            "updated_at": datetime.now(UTC).isoformat(),
        }
        if _tracing_active():  # nothing imported when tracing is off
            from ..tracing.spans import current_traceparent

            value["trace"] = current_traceparent(info.agent_id)
        key = status_key(self.bus.pool, info.agent_id)
        old = self._pending.get(key)
        if old is None or _order(value) >= _order(old):
            self._pending[key] = value
            self._failing.pop(key, None)  # a new status gets its own retry period
        while len(self._pending) > self.max_pending:  # bounded: the oldest entry goes
            evicted = next(iter(self._pending))
            del self._pending[evicted]
            self._failing.pop(evicted, None)
            self.dropped += 1
            log.warning("status buffer full (%d keys; bucket %r unreachable?): dropped the "
                        "status of %r; the store's resync writes it later", self.max_pending,
                        self.bus.status_bucket, evicted)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="commandnet-status")

    async def _flush_loop(self) -> None:
        delay = self.flush_interval
        while self._pending:
            await asyncio.sleep(delay)
            if await self.flush():
                delay = self.flush_interval
            else:  # back off while the bucket fails, up to max_backoff
                delay = min(max(delay * 2, self.flush_interval), self.max_backoff)

    async def flush(self) -> bool:
        """Write every buffered status now (concurrently); True when none failed.

        A failed write goes back into the buffer for the next flush, unless a later status of
        its key arrived meanwhile or the key has failed for over ``retry_for`` seconds.
        """
        batch, self._pending = self._pending, {}
        results = await asyncio.gather(*(self._write_logged(key, value)
                                         for key, value in batch.items()))
        now = time.monotonic()
        failed = 0
        first = ""
        for (key, value), error in zip(batch.items(), results, strict=True):
            if error is None:
                self._failing.pop(key, None)
                continue
            failed += 1
            first = first or f"agent {value['agent_id']!r} step {value['step']}: {error}"
            since = self._failing.setdefault(key, now)
            if now - since > self.retry_for:
                self._failing.pop(key, None)
                self.dropped += 1
                log.error("status of agent %r (step %d) not written to bucket %r for %.0fs: "
                          "given up; the store's resync writes it later", value["agent_id"],
                          value["step"], self.bus.status_bucket, now - since)
                continue
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = value
            elif _order(value) > _order(newer):  # never let the retry replace a later status
                self._pending[key] = value
        if failed:
            log.warning("%d status write(s) to bucket %r failed; retrying (first: %s)",
                        failed, self.bus.status_bucket, first)
            self._kv = None  # bind again (re-creating a bucket the server lost) next time
        return failed == 0

    @override
    async def close(self) -> None:
        """Write what is buffered (one more attempt) and stop the background writer."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if not await self.flush():
            log.error("%d status(es) not written to bucket %r at close; the store's resync "
                      "writes them later", len(self._pending), self.bus.status_bucket)
        self._pending.clear()
        self._failing.clear()

    async def _write_logged(self, key: str, value: dict[str, Any]) -> str | None:
        """Write; None when done, else the error (described) for the caller to retry."""
        async with self._slots:
            try:
                await self.write(key, value)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return None

    async def write(self, key: str, value: dict[str, Any]) -> bool:
        """Store ``value`` unless the key holds a later status; True when written."""
        kv = await self._bucket()
        if "trace" in value and value["trace"] is None:  # tracing, but not from a step (resync)
            value = await _keep_trace(kv, key, value)
        data = json.dumps(value, separators=(",", ":")).encode()
        final = value.get("status") != "running"
        for _ in range(10):
            revision = self._revisions.get(key)
            try:
                if revision is None:
                    written = await kv.create(key, data)
                else:
                    written = await kv.update(key, data, last=revision)
                self._remember(key, written, final)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:  # deleted meanwhile: create again
                self._revisions.pop(key, None)
                continue
            stored = json.loads(entry.value or b"{}")
            if not _newer_or_same(value, stored):
                self._remember(key, int(entry.revision or 0), True)
                return False
            self._revisions[key] = int(entry.revision or 0)
        raise CommandNetError(f"status key {key!r} kept changing under 10 writes")


async def _keep_trace(kv: KeyValue, key: str, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` with the trace the key holds: a resync (from the store, which knows no trace)
    must not cut off where a re-publish continues the agent's trace (docs/tracing.md)."""
    with contextlib.suppress(Exception):
        stored = json.loads((await kv.get(key)).value or b"{}")
        if isinstance(stored, dict) and stored.get("trace"):
            return {**value, "trace": stored["trace"]}
    return value


@dataclass(frozen=True)
class StatusUpdate:
    """One watched change: ``status`` None when the key was deleted; ``replay`` while the watch
    replays the latest value of every key (before it turns to live changes)."""

    pool: str
    agent_id: str
    status: dict[str, Any] | None
    revision: int
    replay: bool


class StatusReader:
    """Reads and watches the status bucket (the CLI's ``status``, the operator).

    ``auth``: credentials and TLS, as for :class:`~.nats.JetStreamBus`.
    """

    def __init__(self, servers: str | list[str], *, bucket: str = DEFAULT_BUCKET,
                 connect_timeout: float = 5.0, auth: NatsAuth | None = None) -> None:
        self.servers, self.auth = split_nats_servers(servers, auth)
        self.bucket = bucket
        self.connect_timeout = connect_timeout
        self.nc: NatsClient | None = None
        self._kv: KeyValue | None = None
        self._reconnects = 0

    async def _on_reconnect(self) -> None:
        self._reconnects += 1

    async def _on_error(self, exc: Exception) -> None:
        log.warning("status reader: nats client error (%s): %s: %s", self._where(),
                    type(exc).__name__, exc)

    def _where(self) -> str:
        """The servers as ``host:port`` (never ``user:password@``)."""
        return ", ".join(server_address(s) for s in self.servers)

    async def connect(self) -> None:
        """Connect and bind to the bucket; CommandNetError when it does not exist."""
        if self.nc is None:
            self.nc = await nats.connect(self.servers, name="commandnet-status-reader",
                                         connect_timeout=max(1, int(self.connect_timeout)),
                                         max_reconnect_attempts=-1, reconnect_time_wait=1,
                                         reconnected_cb=self._on_reconnect,
                                         error_cb=self._on_error,
                                         **self.auth.connect_kwargs())
        try:
            self._kv = await self.nc.jetstream().key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            raise CommandNetError(
                f"no status bucket {self.bucket!r} on {self._where()}: no worker "
                "has started on this bus yet") from None

    async def close(self) -> None:
        """Disconnect."""
        nc, self.nc, self._kv = self.nc, None, None
        if nc is not None:
            await nc.close()

    async def __aenter__(self) -> StatusReader:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _bound(self) -> KeyValue:
        if self._kv is None:
            raise CommandNetError("StatusReader is not connected: call connect() first")
        return self._kv

    async def get_status(self, agent_id: str, pool: str = "default") -> dict[str, Any] | None:
        """The latest status of ``agent_id`` in ``pool``, or None."""
        try:
            entry = await self._bound().get(status_key(pool, agent_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        value: dict[str, Any] = json.loads(entry.value or b"{}")
        return value

    async def watch(self, pool: str | None = None) -> AsyncIterator[StatusUpdate]:
        """Every key's latest value first (``replay=True``), then changes as they happen.

        After a reconnect (a restarted server loses the watch's ephemeral consumer) the watch
        starts again and replays every key, so a consumer resynchronises without scanning.
        """
        pattern = f"{pool}.>" if pool else ">"

        async def bound() -> KeyValue:
            return self._bound()

        entries = watch_bucket(bound, pattern, lambda: self._reconnects,
                               f"status watch on bucket {self.bucket!r}")
        async with contextlib.aclosing(entries):  # stops the watcher when the caller stops
            async for entry, replay in entries:
                if entry is not None:
                    yield _update(entry, replay)


async def watch_bucket(bind: Callable[[], Awaitable[KeyValue]], pattern: str,
                       reconnects: Callable[[], int],
                       what: str) -> AsyncGenerator[tuple[KeyValue.Entry | None, bool], None]:
    """Watch keys ``pattern`` of the bucket ``bind()`` returns: ``(entry, replay)`` for every
    key's latest value first (``replay=True``), then ``(None, False)`` (the replay is over),
    then changes as they happen. Deletions come as entries whose ``operation`` is ``DEL`` or
    ``PURGE``.

    A server that restarts loses the watch's ephemeral consumer, so whenever ``reconnects()``
    (a counter of the client's reconnects) changes, the watch starts again and replays every
    key. A watch that cannot start (server away, bucket missing: ``bind`` raises) is retried
    with backoff, for ever; a missing bucket is logged at debug level only. It ends only when
    the watcher is stopped or the iteration is closed.
    """
    failures = 0
    while True:
        seen = reconnects()
        try:
            watcher = await (await bind()).watch(pattern)
        except (nats.errors.Error, TimeoutError) as exc:
            failures += 1
            level = (logging.DEBUG if isinstance(exc, nats.js.errors.BucketNotFoundError)
                     else logging.WARNING)
            log.log(level, "%s not started (%s); retrying", what, exc)
            await asyncio.sleep(min(0.2 * 2**failures, 5.0))
            continue
        failures = 0
        replay = True
        try:
            while reconnects() == seen:
                try:
                    entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # the marker: the replay is over
                    replay = False
                    yield None, False
                    continue
                if not isinstance(entry, KeyValue.Entry):  # the watcher was stopped
                    return
                yield entry, replay
            log.info("%s restarts after a reconnect", what)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except (nats.errors.Error, RuntimeError) as exc:
                log.debug("%s: watcher stop: %s", what, exc)


def _update(entry: KeyValue.Entry, replay: bool) -> StatusUpdate:
    key_pool, _, token = entry.key.partition(".")
    deleted = entry.operation in ("DEL", "PURGE")
    return StatusUpdate(
        pool=key_pool, agent_id=decode_agent_id(token),
        status=None if deleted else json.loads(entry.value or b"{}"),
        revision=int(entry.revision or 0), replay=replay,
    )


async def read_status(servers: str | list[str], pool: str, agent_id: str,
                      bucket: str = DEFAULT_BUCKET,
                      auth: NatsAuth | None = None) -> dict[str, Any] | None:
    """One agent's latest status from the bucket (connects, reads, disconnects)."""
    async with StatusReader(servers, bucket=bucket, auth=auth) as reader:
        return await reader.get_status(agent_id, pool)
