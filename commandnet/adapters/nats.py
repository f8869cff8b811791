"""NATS JetStream bus (nats-py): one work stream, a durable pull consumer per pool, a DLQ.

Layout (DESIGN §4), for the defaults ``stream="COMMANDNET"``, ``prefix="commandnet"``:

- stream ``COMMANDNET`` (file storage, work-queue retention: an acknowledged message is gone)
  takes ``commandnet.*.events`` (step events) and ``commandnet.*.commands`` (trigger/cancel);
  ``Nats-Msg-Id`` = the message's ``dedup_id`` de-duplicates within ``duplicate_window``.
- durable pull consumer ``<pool>`` filtered on ``commandnet.<pool>.events`` and
  ``.commands``: explicit ack, bounded ``max_ack_pending``, ``max_deliver`` (no ``backoff``
  by default). Every worker of the pool binds to it, so the replicas compete for its messages.
- stream ``COMMANDNET_DLQ`` (limits retention, bounded: at most ``dlq_max_bytes`` (256 MiB)
  and ``dlq_max_age`` (14 days), the oldest dead letters dropped first; 0 lifts a limit) takes
  ``commandnet.dlq.<pool>.<events|commands>``; a dead letter is the original bytes with the
  reason and origin in ``Commandnet-*`` headers. It is never redelivered. A message that
  JetStream gives up on after ``max_deliver`` deliveries is moved there too.
- KV bucket ``COMMANDNET_STATUS``: agents' latest status (see :mod:`.nats_status`).
- KV bucket ``COMMANDNET_GRAPHS``: each pool's graph, written by workers at start (see
  :mod:`.nats_graphs`).

Who configures the bus: a managing bus (``manage=True``, workers and ``commandnet pools
ensure``) creates or updates streams and buckets at :meth:`JetStreamBus.connect` and the pool's
consumer at :meth:`JetStreamBus.subscribe` or :meth:`JetStreamBus.ensure_consumer`,
idempotently; a config that differs from ours is updated, a change the server refuses raises
:class:`JetStreamConfigError`. Clients (``commandnet trigger|cancel``, the operator) use
``manage=False``: publish-only, they never create or change anything, so a mistyped pool never
looks served, and a publish to a stream that does not exist fails with a BusPublishError naming
the stream and saying to start a worker or run ``commandnet pools ensure``.

``max_deliver`` counts only deliveries that are never settled (a worker that dies holding the
message), so it catches poison messages that kill workers. Nothing the engine decides runs a
message into it:

- a nack ("retry later": a busy lease, a retry's backoff, a message handed back at drain) is a
  plain delayed nak until the message has been delivered ``renew_after`` times (half of
  ``max_deliver``); from then on the bus publishes a fresh copy of the same bytes on the same
  subject (``Nats-Msg-Id`` = the original id + ``#renewed@<stream seq>``, so a renewal retried
  after a lost ack is stored once) and acknowledges the old message. The copy starts again at
  delivery 1; it is delivered at once rather than after the nak's delay (the engine naks it
  again with its delay). A duplicate step waiting 45 minutes behind a running one is renewed
  now and then, never dead-lettered.
- messages fetched but waiting for a free slot of the engine (the handler blocks) get
  in-progress acks every ``ack_wait / 3``, so they are not redelivered meanwhile (a full worker
  holds at most ``fetch_batch`` such messages).

Unknown pools: a message on ``commandnet.<other>.events`` is only ever seen by pool
``<other>``'s consumer, so it never blocks another pool. If no consumer serves ``<other>``, it
waits in the stream (a pool being deployed gets its queued work) for ``orphan_after`` seconds;
then any subscribed worker moves it to the DLQ under ``commandnet.dlq.<other>.*`` with the
reason "unknown pool", logged. A subject outside the stream (``commandnet.<pool>.foo``) is
refused at publish time (BusPublishError).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from typing_extensions import override

from ..bus import Delivery, EventBus, Handler
from ..errors import CommandNetError
from ..messages import AnyMessage, StepEvent, encode
from ..tracing import TRACE_HEADERS
from ..tracing import active as _tracing_active
from .connection import NatsAuth, server_address, split_nats_servers
from .nats_graphs import ensure_graph_bucket
from .nats_status import (
    JetStreamStatusObserver,
    StatusReader,
    StatusUpdate,
    decode_agent_id,
    encode_agent_id,
    ensure_bucket,
    read_status,
    status_key,
)

__all__ = [
    "BusPublishError",
    "JetStreamBus",
    "JetStreamConfigError",
    "JetStreamStatusObserver",
    "StatusReader",
    "StatusUpdate",
    "decode_agent_id",
    "encode_agent_id",
    "read_status",
    "status_key",
]

log = logging.getLogger("commandnet.nats")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
REASON_HEADER = "Commandnet-Reason"
SUBJECT_HEADER = "Commandnet-Subject"
SEQUENCE_HEADER = "Commandnet-Stream-Seq"
DELIVERIES_HEADER = "Commandnet-Deliveries"
RENEWED_FROM_HEADER = "Commandnet-Renewed-From"

# True inside the handling of a delivery (the fetch loop's context, inherited by the tasks the
# handler starts): only a step event published there, by the engine after its commit, may be
# handed over locally (never a sweeper's re-publish, which clears its outbox rows itself).
_HANDLING: contextvars.ContextVar[bool] = contextvars.ContextVar("commandnet_nats_handling",
                                                                default=False)


class JetStreamConfigError(CommandNetError):
    """A stream, consumer or bucket exists with a config the server will not let us change."""


class BusPublishError(ConnectionError):
    """A publish was not acknowledged by JetStream (server down, reconnecting, no stream).

    Deliberately not a CommandNetError: the engine treats those as permanent and dead-letters;
    a failed publish is transient (the incoming message is nacked, the outbox re-publishes).
    """


def _token(kind: str, value: str) -> str:
    if not _TOKEN.match(value):
        raise JetStreamConfigError(
            f"{kind} {value!r} is not usable in NATS subjects and names: "
            "use letters, digits, '-' and '_' only")
    return value


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a trailing ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


def _header_value(text: str, limit: int = 2000) -> str:
    """Headers are single-line ASCII: fold newlines, escape the rest, bound the length."""
    flat = " | ".join(part.strip() for part in text.splitlines() if part.strip())
    flat = flat.encode("ascii", "backslashreplace").decode("ascii")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _JetStreamDelivery(Delivery):
    """One fetched message; settling it twice is a no-op (as in the memory bus)."""

    def __init__(self, bus: JetStreamBus, msg: Msg) -> None:
        self.bus = bus
        self.msg = msg
        self.data = msg.data
        self.deliveries = msg.metadata.num_delivered
        self.settled = False

    def _settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        return True

    @override
    async def ack(self) -> None:
        if self._settle():
            await self.msg.ack()

    @override
    async def nack(self, delay: float) -> None:
        if self._settle():
            await self.bus._retry_later(self.msg, delay if delay > 0 else None)

    @override
    async def in_progress(self) -> None:
        if not self.settled:
            await self.msg.in_progress()

    @override
    async def dead_letter(self, reason: str) -> None:
        if self.settled:
            return
        await self.bus._dead_letter(self.msg, reason)  # raises: leave it unsettled, redelivered
        self.settled = True
        await self.msg.term()


class _LocalDelivery(Delivery):
    """A step event handed over in this process (no stream message behind it).

    Its outbox row stays until the step commits (the commit deletes it), so a crash of this
    worker loses nothing: the pool's sweeper publishes the row after ``outbox_grace``. A nack
    publishes the event to the stream for real (any worker may then take it, and a lease that
    is still held or backing off answers "busy" there, as for a stream message).
    """

    deliveries = 1

    def __init__(self, bus: JetStreamBus, event: StepEvent) -> None:
        self.bus = bus
        self.event = event
        self.data = encode(event)
        self.settled = False

    @override
    async def ack(self) -> None:
        self.settled = True

    @override
    async def nack(self, delay: float) -> None:
        if not self.settled:
            self.settled = True
            await self.bus.publish_raw(self.data, self.bus.events_subject, self.event.dedup_id)

    @override
    async def in_progress(self) -> None:
        return None  # nothing to keep alive: the lease is what protects the step

    @override
    async def dead_letter(self, reason: str) -> None:
        if not self.settled:
            await self.bus._store_dead_letter(self.data, self.bus.events_subject, 0, 1, reason)
            self.settled = True


class JetStreamBus(EventBus):
    """EventBus over NATS JetStream for worker pool ``pool``; see the module docstring.

    ``servers``: one URL or several (``nats://host:4222``; ``tls://`` for TLS with the system
    CAs); ``auth``: credentials and TLS (:class:`~.connection.NatsAuth`; a ``user:pass@`` in
    a URL is taken out of it and used as credentials). ``ack_wait``: seconds a
    delivery may stay unsettled (in-progress acks extend it) before JetStream redelivers it;
    ``backoff`` the consumer's successive ack waits of redeliveries (default: none, plain
    ``ack_wait``). Leave it empty: with a consumer BackOff, nats-server (2.15) ignores the delay
    of a nak from the second redelivery on, so the engine's retry policy (which naks with its
    backoff) would wait ``backoff[n]`` instead. ``max_deliver`` bounds deliveries that are never
    settled (nacks do not use it up: see the module docstring); ``fetch_batch`` and
    ``fetch_wait`` shape the pull loop; ``dlq_max_bytes`` and ``dlq_max_age`` bound the
    dead-letter stream (0: no limit); ``manage`` False: publish-only, never create or change
    streams, consumers or buckets (clients); ``max_age`` bounds how long an
    unconsumed message is kept (0: forever); ``orphan_after``: a subscribed bus moves messages
    of pools that no consumer serves to the DLQ once they are this old (None: never);
    ``status_bucket`` and ``graph_bucket`` name the KV buckets (default ``<stream>_STATUS``
    and ``<stream>_GRAPHS``).

    ``local_handoff`` (a subscribed bus): the step event the engine publishes right after a
    commit is handed to this process's own handler instead of the stream (at most
    ``local_handoff`` waiting at once; 0: never), and :meth:`publish` returns False so the
    engine keeps its outbox row, which the step's own commit deletes. The committing worker
    thus runs the agent's next step at once, with the same fenced lease and commit, and no
    stream round trip; the durable outbox row is the recovery path (see :class:`_LocalDelivery`).
    """

    durable = True

    def __init__(
        self,
        servers: str | list[str],
        *,
        pool: str = "default",
        stream: str = "COMMANDNET",
        prefix: str = "commandnet",
        status_bucket: str | None = None,
        graph_bucket: str | None = None,
        max_ack_pending: int = 1000,
        max_deliver: int = 100,
        ack_wait: float = 30.0,
        backoff: Sequence[float] = (),
        fetch_batch: int = 32,
        fetch_wait: float = 1.0,
        duplicate_window: float = 120.0,
        max_age: float = 7 * 24 * 3600.0,
        publish_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        replicas: int = 1,
        orphan_after: float | None = 3600.0,
        dlq_max_bytes: int = 256 * 1024 * 1024,
        dlq_max_age: float = 14 * 24 * 3600.0,
        manage: bool = True,
        auth: NatsAuth | None = None,
        local_handoff: int = 0,
    ) -> None:
        # Credentials are passed to the client as credentials, never inside a URL (so any
        # password works, and no URL this bus holds or logs carries one).
        self.servers, self.auth = split_nats_servers(servers, auth)
        self.pool = _token("pool", pool)
        self.stream = _token("stream", stream)
        self.prefix = prefix
        for part in prefix.split("."):
            _token("subject prefix part", part)
        self.dlq_stream = f"{stream}_DLQ"
        self.status_bucket = _token("status bucket", status_bucket or f"{stream}_STATUS")
        self.graph_bucket = _token("graph bucket", graph_bucket or f"{stream}_GRAPHS")
        self.consumer = self.pool
        self.events_subject = f"{prefix}.{pool}.events"
        self.commands_subject = f"{prefix}.{pool}.commands"
        self.max_ack_pending = max_ack_pending
        self.ack_wait = ack_wait
        self.backoff = [float(b) for b in backoff]
        if self.backoff and self.backoff[0] < ack_wait:
            raise JetStreamConfigError(
                f"pool {pool!r}: the first backoff ({self.backoff[0]}s) replaces ack_wait "
                f"({ack_wait}s); in-progress acks would come too late. Start backoff at ack_wait")
        self.max_deliver = max_deliver
        if max_deliver != -1 and self.backoff and max_deliver <= len(self.backoff):
            raise JetStreamConfigError(
                f"pool {pool!r}: max_deliver ({max_deliver}) must exceed len(backoff) "
                f"({len(self.backoff)})")
        self.fetch_batch = fetch_batch
        self.fetch_wait = fetch_wait
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.replicas = replicas
        self.orphan_after = orphan_after
        if dlq_max_bytes < 0 or dlq_max_age < 0:
            raise JetStreamConfigError(
                f"pool {pool!r}: dlq_max_bytes ({dlq_max_bytes}) and dlq_max_age "
                f"({dlq_max_age}s) must be >= 0 (0: no limit)")
        self.dlq_max_bytes = dlq_max_bytes
        self.dlq_max_age = dlq_max_age
        self.manage = manage
        # A nack from this many deliveries on renews the message instead (module docstring).
        self.renew_after: int | None = max(1, max_deliver // 2) if max_deliver > 0 else None
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._advisories: Subscription | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self.local_handoff = local_handoff
        self._handler: Handler | None = None
        self._local: set[asyncio.Task[None]] = set()  # handed-over events waiting for a slot

    # ------------------------------------------------------------------ setup

    @property
    def is_connected(self) -> bool:
        """Whether the client holds a live connection now (for ``/readyz``)."""
        return self.nc is not None and self.nc.is_connected

    def dlq_subject(self, origin: str | None = None) -> str:
        """Where dead letters from subject ``origin`` go: ``<prefix>.dlq.<pool>.<kind>``."""
        pool, kind = self.pool, "other"
        head = f"{self.prefix}."
        if origin and origin.startswith(head):
            parts = origin[len(head):].split(".")
            if len(parts) == 2 and _TOKEN.match(parts[0]):
                pool = parts[0]
                kind = parts[1] if parts[1] in ("events", "commands") else "other"
        return f"{self.prefix}.dlq.{pool}.{kind}"

    @override
    async def connect(self) -> None:
        async with self._lock:
            if self.nc is not None and not self.nc.is_closed:
                return
            self.nc = await nats.connect(
                self.servers, name=f"commandnet-{self.pool}",
                connect_timeout=max(1, int(self.connect_timeout)),
                reconnect_time_wait=1, max_reconnect_attempts=-1,
                error_cb=self._on_error, disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect, **self.auth.connect_kwargs(),
            )
            self.js = self.nc.jetstream(timeout=self.publish_timeout)
            if self.manage:
                await self.ensure()

    def _server(self) -> str:
        """``host:port`` of the server the client uses now (never ``user:password@``)."""
        url = self.nc.connected_url if self.nc is not None else None
        if url is None:
            return ", ".join(server_address(s) for s in self.servers)
        return server_address(url.geturl())

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats client error (pool %r, %s): %s: %s", self.pool, self._server(),
                    type(exc).__name__, exc)

    async def _on_disconnect(self) -> None:
        if not self._stopping:
            log.warning("nats disconnected (pool %r) from %s; reconnecting", self.pool,
                        self._server())

    async def _on_reconnect(self) -> None:
        log.info("nats reconnected (pool %r) to %s", self.pool, self._server())

    def _jsc(self) -> JetStreamContext:
        if self.js is None:
            raise CommandNetError(f"JetStreamBus for pool {self.pool!r} is not connected: "
                                  "call connect() (the engine does at start)")
        return self.js

    def jetstream(self) -> JetStreamContext:
        """The connected JetStream context; CommandNetError when not connected."""
        return self._jsc()

    async def ensure(self) -> None:
        """Create or update the work stream, the DLQ stream, the status and graph buckets.

        A managing bus does this at :meth:`connect`; calling it explicitly works on any bus.
        """
        js = self._jsc()
        storage = StorageType.FILE
        await self._ensure_stream(StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.*.events", f"{self.prefix}.*.commands"],
            retention=RetentionPolicy.WORK_QUEUE, storage=storage, discard=DiscardPolicy.OLD,
            duplicate_window=self.duplicate_window, max_age=self.max_age,
            num_replicas=self.replicas,
            description="commandnet work: step events and commands, one consumer per pool",
        ))
        await self._ensure_stream(StreamConfig(
            name=self.dlq_stream, subjects=[f"{self.prefix}.dlq.*.*"],
            retention=RetentionPolicy.LIMITS, storage=storage, discard=DiscardPolicy.OLD,
            # The server wants the de-dup window within max_age.
            duplicate_window=min(self.duplicate_window, self.dlq_max_age or self.duplicate_window),
            num_replicas=self.replicas,
            max_bytes=self.dlq_max_bytes or None, max_age=self.dlq_max_age or None,
            description="commandnet dead letters: unprocessable messages, with the reason",
        ))
        await ensure_bucket(js, self.status_bucket, self.replicas)
        await ensure_graph_bucket(js, self.graph_bucket, self.replicas)

    async def ensure_consumer(self) -> None:
        """Create or update the pool's durable consumer (at :meth:`subscribe`).

        Only consuming workers and ``commandnet pools ensure`` create it: a process that merely
        publishes (the CLI, the operator) must not make a mistyped pool look served (see
        ``orphan_after``). Idempotent.
        """
        js = self._jsc()
        config = ConsumerConfig(
            durable_name=self.consumer, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait,
            max_deliver=self.max_deliver, backoff=self.backoff or None,
            max_ack_pending=self.max_ack_pending,
            filter_subjects=[self.events_subject, self.commands_subject],
            description=f"commandnet worker pool {self.pool}",
        )
        try:
            await js.add_consumer(self.stream, config)
        except nats.js.errors.APIError as exc:
            raise JetStreamConfigError(
                f"consumer {self.consumer!r} on stream {self.stream!r} (pool {self.pool!r}) "
                f"cannot be created or updated to our config: {exc.description} "
                f"(err_code {exc.err_code}); delete it or align the settings") from None

    async def _ensure_stream(self, config: StreamConfig) -> None:
        js = self._jsc()
        assert config.name is not None
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different config
                raise JetStreamConfigError(
                    f"stream {config.name!r} cannot be created: {exc.description}") from None
        try:
            await js.update_stream(config)
            log.info("stream %r existed with another config; updated it", config.name)
        except nats.js.errors.APIError as exc:
            raise JetStreamConfigError(
                f"stream {config.name!r} exists with a config that cannot be changed to ours "
                f"({exc.description}); delete or migrate the stream") from None

    # ---------------------------------------------------------------- publish

    def subject_for(self, message: AnyMessage) -> str:
        """Step events go to the pool's ``.events``, commands to its ``.commands``."""
        return self.events_subject if isinstance(message, StepEvent) else self.commands_subject

    @override
    def hands_over(self) -> bool:
        return (self._handler is not None and not self._stopping
                and len(self._local) < self.local_handoff and _HANDLING.get())

    @override
    async def publish(self, message: AnyMessage) -> bool | None:
        if (isinstance(message, StepEvent) and message.step > 0 and not message.redo
                and self.hands_over()):
            task = asyncio.create_task(self._hand_over(_LocalDelivery(self, message)),
                                       name=f"commandnet-handoff-{self.pool}")
            self._local.add(task)
            task.add_done_callback(self._local.discard)
            return False
        if _tracing_active():  # trace headers (docs/tracing.md); nothing imported otherwise
            from ..tracing.nats import publish as traced_publish

            await traced_publish(self, message)
            return None
        await self.publish_raw(encode(message), self.subject_for(message), message.dedup_id)
        return None

    async def _hand_over(self, delivery: _LocalDelivery) -> None:
        """Give a handed-over event to the handler (which waits for a free slot)."""
        assert self._handler is not None
        try:
            if _tracing_active():
                from ..tracing.nats import deliver_local

                await deliver_local(self, self._handler, delivery)
            else:
                await self._handler(delivery)
        except asyncio.CancelledError:  # stopping: the stream takes it (else the outbox does)
            with contextlib.suppress(Exception):
                await delivery.nack(0)
            raise
        except Exception:
            log.exception("handler failed on handed-over %s; publishing it",
                          delivery.event.dedup_id)
            with contextlib.suppress(Exception):
                await delivery.nack(0)

    async def publish_raw(self, data: bytes, subject: str | None = None,
                          dedup_id: str | None = None,
                          headers: dict[str, str] | None = None) -> None:
        """Publish bytes (default subject: the pool's events); raises BusPublishError."""
        subject = subject or self.events_subject
        if headers is None and _tracing_active():  # a raw re-publish stays in its trace
            from ..tracing.spans import current_headers

            headers = current_headers()
        if dedup_id:
            headers = {**(headers or {}), "Nats-Msg-Id": dedup_id}
        try:
            try:
                await self._jsc().publish(subject, data, headers=headers,
                                          timeout=self.publish_timeout)
            except nats.js.errors.NoStreamResponseError:
                if subject not in (self.events_subject, self.commands_subject) or not self.manage:
                    raise
                # Our own stream is gone (a server that lost its store): recreate, retry once.
                log.warning("no stream takes %r; re-creating stream %r", subject, self.stream)
                await self.ensure()
                await self._jsc().publish(subject, data, headers=headers,
                                          timeout=self.publish_timeout)
        except nats.js.errors.NoStreamResponseError:
            raise BusPublishError(await self._explain_no_stream(subject)) from None
        except (nats.errors.Error, OSError, TimeoutError, JetStreamConfigError) as exc:
            raise BusPublishError(
                f"publish of {dedup_id or 'a message'!r} to {subject!r} failed: "
                f"{type(exc).__name__}: {exc}") from exc

    async def _explain_no_stream(self, subject: str) -> str:
        """Why nothing took ``subject``: our stream is missing, or the subject is not ours."""
        if subject in (self.events_subject, self.commands_subject):
            missing = False
            with contextlib.suppress(Exception):
                try:
                    await self._jsc().stream_info(self.stream)
                except nats.js.errors.NotFoundError:
                    missing = True
            if missing:
                return (f"stream {self.stream!r} does not exist, so nothing takes {subject!r}: "
                        f"start a worker of pool {self.pool!r} or run `commandnet pools ensure "
                        f"--pool {self.pool}` first (clients never create streams)")
        return (f"no JetStream stream takes subject {subject!r} (is the server up, and is "
                f"{subject!r} one of {self.prefix}.<pool>.events/.commands?)")

    async def _retry_later(self, msg: Msg, delay: float | None) -> None:
        """Nak ``msg`` (redeliver after ``delay`` s) without running it into ``max_deliver``.

        From ``renew_after`` deliveries on, publish a fresh copy instead and ack the old
        message (see the module docstring). Raises when even the nak fails (the message then
        comes back after ``ack_wait``).
        """
        delivered = msg.metadata.num_delivered
        if self.renew_after is None or delivered < self.renew_after:
            await msg.nak(delay)
            return
        seq = msg.metadata.sequence.stream
        headers = msg.headers or {}
        origin = (headers.get(RENEWED_FROM_HEADER) or headers.get("Nats-Msg-Id")
                  or f"{self.stream}:{seq}")
        renewed = {"Nats-Msg-Id": f"{origin}#renewed@{seq}", RENEWED_FROM_HEADER: origin,
                   **{k: headers[k] for k in TRACE_HEADERS if k in headers}}  # same trace
        try:
            await self._jsc().publish(msg.subject, msg.data, headers=renewed,
                                      timeout=self.publish_timeout)
        except Exception as exc:
            log.warning("renewing %s seq %d (delivery %d of max %d) failed, nak instead: %s: %s",
                        msg.subject, seq, delivered, self.max_deliver, type(exc).__name__, exc)
            await msg.nak(delay)
            return
        await msg.ack()
        log.info("renewed %s seq %d (%r) after %d deliveries: a fresh copy replaces it",
                 msg.subject, seq, origin, delivered)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        await self._store_dead_letter(msg.data, msg.subject, meta.sequence.stream,
                                      meta.num_delivered, reason)

    async def _store_dead_letter(self, data: bytes, origin: str, seq: int, deliveries: int,
                                 reason: str) -> None:
        """Publish to the DLQ; raises BusPublishError (the message then stays where it is)."""
        headers = {
            REASON_HEADER: _header_value(reason) or "unspecified",
            SUBJECT_HEADER: origin,
            SEQUENCE_HEADER: str(seq),
            DELIVERIES_HEADER: str(deliveries),
            # A retried dead-lettering (term lost, message redelivered) is stored once.
            "Nats-Msg-Id": f"dlq:{self.stream}:{seq}",
        }
        subject = self.dlq_subject(origin)
        try:
            await self._jsc().publish(subject, data, headers=headers,
                                      timeout=self.publish_timeout)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BusPublishError(f"dead-lettering stream message {seq} of {origin!r} to "
                                  f"{subject!r} failed: {exc}") from exc
        log.warning("dead-lettered %s seq %d (delivery %d) to %s: %s", origin, seq,
                    deliveries, subject, headers[REASON_HEADER])

    async def _on_max_deliveries(self, advisory: Msg) -> None:
        """JetStream gave up on a message (``max_deliver``): move it to the DLQ.

        Without this it would sit in the work-queue stream, unacknowledged and never delivered.
        Every worker of the pool gets the advisory; the DLQ de-duplicates, a second delete
        finds nothing. The store stays the truth: a running agent whose step was dropped here
        is re-published by the stalled-agent reconciler.
        """
        try:
            info = json.loads(advisory.data)
            seq, deliveries = int(info["stream_seq"]), int(info.get("deliveries", 0))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("unreadable max-deliveries advisory %r: %s", advisory.data[:200], exc)
            return
        js = self._jsc()
        try:
            raw = await js.get_msg(self.stream, seq)
        except nats.js.errors.NotFoundError:
            return  # another worker moved it already
        except Exception as exc:
            log.error("message %d of stream %r exceeded max_deliver (%d) but cannot be read "
                      "to dead-letter it: %s", seq, self.stream, self.max_deliver, exc)
            return
        try:
            await self._store_dead_letter(
                raw.data or b"", str(raw.subject or self.events_subject), seq, deliveries,
                f"exceeded max_deliver ({deliveries} deliveries, limit {self.max_deliver})")
            await js.delete_msg(self.stream, seq)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            log.error("dead-lettering message %d of stream %r after max_deliver failed: %s",
                      seq, self.stream, exc)

    # -------------------------------------------------------------- consuming

    @override
    async def subscribe(self, handler: Handler) -> None:
        if self._task is not None:
            raise CommandNetError(f"JetStreamBus for pool {self.pool!r} already has a subscriber")
        if not self.manage:
            raise CommandNetError(f"JetStreamBus for pool {self.pool!r} is publish-only "
                                  "(manage=False): it cannot consume")
        self._jsc()
        assert self.nc is not None
        await self.ensure_consumer()
        self._stopping = False
        self._handler = handler
        self._advisories = await self.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.consumer}",
            cb=self._on_max_deliveries)
        self._task = asyncio.create_task(self._fetch_loop(handler),
                                         name=f"commandnet-nats-{self.pool}")
        self._task.add_done_callback(self._loop_ended)
        if self.orphan_after is not None:
            self._janitor = asyncio.create_task(self._orphan_loop(self.orphan_after),
                                                name=f"commandnet-nats-orphans-{self.pool}")

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the fetch loop of pool %r stopped: no more messages will be consumed",
                      self.pool, exc_info=task.exception())

    async def _fetch_loop(self, handler: Handler) -> None:
        _HANDLING.set(True)  # this task's own context, inherited by the handler's tasks
        js = self._jsc()
        psub = await js.pull_subscribe_bind(self.consumer, stream=self.stream)
        failures = 0
        try:
            while not self._stopping:
                try:
                    msgs = await psub.fetch(self.fetch_batch, timeout=self.fetch_wait)
                except (nats.errors.TimeoutError, TimeoutError):
                    failures = 0
                    continue  # nothing to do within fetch_wait
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    pause = min(0.1 * 2**failures, 5.0)
                    log.warning("fetch from consumer %r failed (%d in a row), retrying in "
                                "%.1fs: %s: %s", self.consumer, failures, pause,
                                type(exc).__name__, exc)
                    await asyncio.sleep(pause)
                    if failures % 5 == 0:  # the consumer may be gone (server lost its store)
                        with contextlib.suppress(Exception):
                            await self.ensure()
                            await self.ensure_consumer()
                    continue
                failures = 0
                await self._dispatch(msgs, handler)
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _dispatch(self, msgs: list[Msg], handler: Handler) -> None:
        """Hand each message to the handler (which waits while the engine has no free slot).

        While a handover waits, the messages not handed over yet (the waiting one included)
        get in-progress acks every ``ack_wait / 3``: a redelivery meanwhile would count a
        delivery and run two copies.
        """
        deliveries: list[_JetStreamDelivery] = []
        for msg in msgs:
            try:
                deliveries.append(_JetStreamDelivery(self, msg))
            except Exception as exc:  # not a JetStream message (no ack reply): drop it
                log.error("ignoring a non-JetStream message on %s: %s", msg.subject, exc)
        next_up = 0

        async def keep_waiting_alive() -> None:
            while True:
                await asyncio.sleep(self.ack_wait / 3)
                for waiting in deliveries[next_up:]:
                    with contextlib.suppress(Exception):
                        await waiting.in_progress()

        keeper = asyncio.create_task(keep_waiting_alive(), name=f"commandnet-wait-{self.pool}")
        try:
            for next_up, delivery in enumerate(deliveries):  # next_up: read by the keeper
                if self._stopping:
                    await self._give_back(deliveries[next_up:])
                    return
                try:
                    if _tracing_active():
                        from ..tracing.nats import deliver

                        await deliver(self, handler, delivery, delivery.msg.headers,
                                      delivery.msg.subject)
                    else:
                        await handler(delivery)
                except asyncio.CancelledError:
                    await self._give_back(deliveries[next_up:])
                    raise
                except Exception:
                    log.exception("handler failed on %s; it will be redelivered",
                                  delivery.msg.subject)
                    with contextlib.suppress(Exception):
                        await delivery.nack(1.0)
        finally:
            keeper.cancel()

    @staticmethod
    async def _give_back(deliveries: list[_JetStreamDelivery]) -> None:
        """Let other workers take messages this one fetched but will not handle."""
        for delivery in deliveries:
            with contextlib.suppress(Exception):
                await delivery.nack(0)  # a no-op for one the handler settled

    @override
    async def unsubscribe(self) -> None:
        janitor, self._janitor = self._janitor, None
        if janitor is not None:
            janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await janitor
        advisories, self._advisories = self._advisories, None
        if advisories is not None:
            with contextlib.suppress(Exception):
                await advisories.unsubscribe()
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._handler = None
        waiting = list(self._local)  # handed-over events not started: to the stream
        for handed in waiting:
            handed.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        # The loop ends by itself after the current fetch; cancel it if a handler blocks.
        done, _ = await asyncio.wait({task}, timeout=self.fetch_wait + 0.5)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    @override
    async def close(self) -> None:
        await self.unsubscribe()
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            self._stopping = True
            # Drain flushes the acks still buffered; bounded, as the server may be gone.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5.0)
            with contextlib.suppress(Exception):
                await nc.close()

    # --------------------------------------------------------------- orphans

    async def _orphan_loop(self, older_than: float) -> None:
        interval = max(0.5, min(older_than / 2, 60.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_orphans(older_than)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("orphan sweep of stream %r failed: %s: %s", self.stream,
                            type(exc).__name__, exc)

    async def sweep_orphans(self, older_than: float) -> int:
        """Dead-letter messages older than ``older_than`` s on subjects no consumer reads.

        Such a message is addressed to a pool that has no workers (a typo in ``--pool``, a pool
        removed); its own subject keeps it away from every other pool, so it blocks nobody, but
        left alone it would wait until ``max_age``. Returns how many were moved.
        """
        js = self._jsc()
        info = await js.stream_info(self.stream, subjects_filter=">")
        subjects = info.state.subjects or {}
        if not subjects:
            return 0
        filters: list[str] = []
        for consumer in await js.consumers_info(self.stream):
            config = consumer.config
            filters += config.filter_subjects or [config.filter_subject or ">"]
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        moved = 0
        for subject in subjects:
            if any(_subject_matches(pattern, subject) for pattern in filters):
                continue
            seq = 0
            while True:
                try:
                    raw = await js.get_msg(self.stream, seq=seq + 1, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    break
                seq = int(raw.seq or 0)
                if raw.time is not None and raw.time > cutoff:
                    break  # the rest of this subject is younger still
                pool = subject[len(self.prefix) + 1:].split(".")[0]
                await self._store_dead_letter(
                    raw.data or b"", subject, seq, 0,
                    f"no worker pool {pool!r} consumes {subject!r} (waited over "
                    f"{older_than:g}s): unknown pool")
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_msg(self.stream, seq)
                moved += 1
        return moved

    # --------------------------------------------------------------- queries

    async def lag(self) -> int:
        """Messages of this pool not yet acknowledged (pending + ack-pending), as KEDA counts."""
        info = await self._jsc().consumer_info(self.stream, self.consumer)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    @override
    async def undelivered_age(self) -> float:
        """Age of the first message after the consumer's delivered sequence, on either of the
        pool's subjects. Unreadable (NATS away): 0.0, so the reconciler falls back to
        ``stall_after`` alone and a lost step is still repaired."""
        try:
            js = self._jsc()
            info = await js.consumer_info(self.stream, self.consumer)
            if not info.num_pending:
                return 0.0
            start = int(info.delivered.stream_seq or 0) + 1
            times = []
            for subject in (self.events_subject, self.commands_subject):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    raw = await js.get_msg(self.stream, seq=start, subject=subject, next=True)
                    if raw.time is not None:
                        times.append(raw.time)
        except Exception as exc:  # an estimate: falling back to 0.0 is safe
            log.debug("cannot read the oldest undelivered message of pool %r: %s: %s",
                      self.pool, type(exc).__name__, exc)
            return 0.0
        return max((datetime.now(UTC) - min(times)).total_seconds(), 0.0) if times else 0.0

    async def dead_letters(self, limit: int = 1000) -> list[tuple[bytes, dict[str, str]]]:
        """This pool's dead letters (data, headers), oldest first, at most ``limit`` per kind."""
        js = self._jsc()
        found: list[tuple[int, bytes, dict[str, str]]] = []
        for kind in ("events", "commands", "other"):
            subject = f"{self.prefix}.dlq.{self.pool}.{kind}"
            seq, count = 0, 0
            while count < limit:
                try:
                    raw = await js.get_msg(self.dlq_stream, seq=seq + 1, subject=subject,
                                           next=True)
                except nats.js.errors.NotFoundError:
                    break
                seq, count = int(raw.seq or 0), count + 1
                headers = {str(k): str(v) for k, v in (raw.headers or {}).items()}
                found.append((seq, raw.data or b"", headers))
        found.sort(key=lambda item: item[0])
        return [(data, headers) for _, data, headers in found]
