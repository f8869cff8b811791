"""The engine: leases a step, runs its node with no transaction open, commits, publishes next.

See DESIGN §3. The store is the truth; the bus only says "run step N". Every state change is
fenced by (lease owner, step), so duplicates, stale workers and cancellations cannot double a
transition; crashes are repaired by redelivery, the outbox sweeper and the stalled-agent
reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from .api.actions import AgentActions, validate_payload
from .bus import Delivery, EventBus
from .errors import (
    CommandNetError,
    ContextValidationError,
    InvalidTransitionError,
    MalformedMessageError,
    StoreUnavailableError,
    UnknownNodeError,
    WorkerDiedError,
)
from .graph import Graph, GraphAnalyzer, NodeClass
from .leasing.kept import KeptLeases
from .leasing.runs import RunningNodes
from .messages import StepEvent, decode
from .node import Directive
from .observer import ErrorInfo, Observer, StatusInfo
from .observing.fanout import Notifications
from .persistence import Persistence
from .policy import RetryPolicy
from .records import (
    AgentRecord,
    AgentStatus,
    Commit,
    Failure,
    LeaseState,
    OutboxEntry,
    branch_id,
)
from .workflow.deploys import SafeDeploys

log = logging.getLogger("commandnet")


# Failures that no retry can fix: they fail the agent at once.
_FATAL = (ContextValidationError, UnknownNodeError, InvalidTransitionError, WorkerDiedError)


class Engine(AgentActions, Notifications, SafeDeploys, KeptLeases, RunningNodes):
    """Runs agents: triggers them, and (after :meth:`start_worker`) executes their steps.

    One engine is one worker of the bus's pool. Several engines (processes, pools) may share a
    store and a bus. ``lease_seconds`` bounds how long a crashed worker blocks its agents;
    ``max_in_flight`` bounds concurrent steps; ``wake_interval`` is how often each worker
    wakes parked agents that are due (timers, signals); ``node_grace``: how long a step at a
    node this worker's graphs lack waits for a worker that has it (safe deploys);
    ``sweep_interval``, ``outbox_grace``, ``stall_after`` and ``reconcile_batch`` tune the
    repair loops (lost publishes, lost messages), run by one worker of the pool at a time: it
    re-publishes at most ``reconcile_batch`` stalled agents per sweep, whatever the number of
    workers.
    """

    def __init__(
        self,
        persistence: Persistence,
        event_bus: EventBus,
        *,
        graphs: Iterable[NodeClass] = (),
        observer: Observer | None = None,
        observers: Iterable[Observer] = (),
        owner: str | None = None,
        lease_seconds: float = 30.0,
        max_in_flight: int = 64,
        sweep_interval: float = 2.0,
        outbox_grace: float = 5.0,
        stall_after: float = 300.0,
        reconcile_batch: int = 100,
        wake_interval: float = 0.5,
        node_grace: float = 600.0,
    ) -> None:
        self.persistence = persistence
        self.bus = event_bus
        self.observers = [*([observer] if observer else []), *observers]
        self.owner = owner or f"worker-{uuid.uuid4().hex[:12]}"
        self.lease_seconds = lease_seconds
        self.max_in_flight = max_in_flight
        self.sweep_interval, self.outbox_grace = sweep_interval, outbox_grace
        self.stall_after, self.reconcile_batch = stall_after, reconcile_batch
        self.wake_interval, self.node_grace = wake_interval, node_grace
        self.pool = event_bus.pool
        self._nodes: dict[str, tuple[Graph, NodeClass]] = {}
        self._graphs: dict[NodeClass, Graph] = {}
        self._leased = 0  # steps being leased or run by this worker now
        self._alone = asyncio.Event()  # cleared while a suspect step runs alone (_run_step)
        self._alone.set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: set[asyncio.Task[None]] = set()  # sweeper, recovery: cancelled at stop
        self._started = False
        self._consuming = False
        self._redo = itertools.count(time.time_ns() // 1000)  # unique across restarts
        self._final = asyncio.Condition()
        for start in graphs:
            self.register(start)

    # ----------------------------------------------------------------- graphs

    def register(self, start: NodeClass) -> Graph:
        """Validate the graph reachable from ``start`` and let this engine run its nodes."""
        if start in self._graphs:
            return self._graphs[start]
        graph = GraphAnalyzer.validate(start)
        for name, cls in graph.nodes.items():
            known = self._nodes.get(name, (graph, cls))[1]
            if known is not cls:
                raise UnknownNodeError(
                    f"node name {name!r} is used by {known.__qualname__} and "
                    f"{cls.__qualname__} in two registered graphs; give one a stable name")
        self._nodes.update({n: (graph, c) for n, c in graph.nodes.items() if n not in self._nodes})
        self._graphs[start] = graph
        return graph

    def _resolve(self, name: str) -> tuple[Graph, NodeClass]:
        try:
            return self._nodes[name]
        except KeyError:
            known = ", ".join(sorted(self._nodes)) or "none"
            raise UnknownNodeError(
                f"unknown node {name!r}: this worker's graphs have {known}"
            ) from None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Prepare the store and connect the bus (enough to trigger, cancel and query)."""
        if not self._started:
            await self.persistence.setup()
            await self.bus.connect()
            self._started = True

    async def start_worker(self) -> None:
        """Start consuming steps and commands, and the repair loops, in the background."""
        await self.start()
        if not self._consuming:
            self._consuming = True
            await self.bus.subscribe(self._on_delivery)
            self._loops.add(asyncio.create_task(_every(self.sweep_interval, self.sweep_once),
                                                name="commandnet-sweeper"))
            self._loops.add(asyncio.create_task(_every(self.wake_interval, self.wake_once),
                                                name="commandnet-wake"))
            self._loops.add(asyncio.create_task(self._heartbeat_loop(), name="commandnet-leases"))
            if not self.bus.durable:
                await self._recover()
                self._loops.add(asyncio.create_task(self._recover(self.lease_seconds + 0.1)))

    async def stop(self, grace: float = 30.0) -> None:
        """Drain: stop fetching, let in-flight steps finish for ``grace`` s, hand back the rest.

        Closes the bus and the store.
        """
        if self._consuming:
            self._consuming = False
            await self.bus.unsubscribe()
            # Leases stay alive while in-flight steps finish; only then stop the heartbeat.
            if self._tasks:
                _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5.0)
            for loop_task in self._loops:
                loop_task.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
            self._loops.clear()
            self._disarm()
            with contextlib.suppress(Exception):  # hand the pool's repair turn on at once
                await self.persistence.claim_sweep(self.pool, self.owner, 0.0)
        if self._started:
            self._started = False
            await self._close_observers()
            await self.bus.close()
            await self.persistence.close()

    async def __aenter__(self) -> Engine:
        await self.start_worker()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        """Steps this engine is running now."""
        return len(self._tasks)

    # ----------------------------------------------------------- public actions

    async def sweep_once(self) -> int:
        """If this worker has its pool's repair turn: re-publish lost outbox events and the
        current step of stalled agents; returns how many."""
        if await self.persistence.claim_sweep(self.pool, self.owner,
                                              self.sweep_interval * 3 + 1) is None:
            return 0
        entries = await self.persistence.pending_outbox(self.outbox_grace, 1000, self.pool)
        await self._publish_outbox(entries)
        # Changed after the bus's oldest undelivered message: queued behind it, not stalled.
        age = await self.bus.undelivered_age()
        quiet = max(self.stall_after, age + self.outbox_grace if age else 0.0)
        stalled = await self.persistence.stalled_agents(quiet, self.reconcile_batch, self.pool)
        await self._publish_outbox(stalled, redo=True)
        if entries or stalled:
            log.info("sweeper of pool %r re-published %d outbox events and %d stalled steps",
                     self.pool, len(entries), len(stalled))
        return len(entries) + len(stalled)

    async def wake_once(self) -> int:
        """Publish the step of parked agents of this pool that are due; returns how many."""
        entries = await self.persistence.wake_due(self.pool, 1000)
        await self._publish_outbox(entries)
        return len(entries)

    async def _publish_outbox(self, entries: list[OutboxEntry], redo: bool = False) -> None:
        """Publish committed step events, then forget them; ``redo``: re-send current steps
        under a fresh de-dup id (the first may still be remembered) and keep no outbox."""
        for entry in entries:
            await self.bus.publish(StepEvent(agent_id=entry.agent_id, step=entry.step,
                                             redo=next(self._redo) if redo else 0))
        if entries and not redo:
            await self.persistence.clear_outbox(entries)

    async def _recover(self, after: float = 0.0) -> None:
        """Re-publish what a non-durable bus lost with the last process: agents free now, and
        (called again once their leases have run out) the agents a dead worker still held."""
        await asyncio.sleep(after)
        await self._publish_outbox(await self.persistence.stalled_agents(
            max(after - 0.1, 0.0), 1_000_000, self.pool), redo=True)

    async def _on_delivery(self, delivery: Delivery) -> None:
        await self._free_slot(delivery)
        task = asyncio.create_task(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("step handler died", exc_info=task.exception())

    async def _handle(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.data)
        except MalformedMessageError as exc:
            log.error("dead-lettering message: %s", exc)
            await delivery.dead_letter(str(exc))
            await self._notify_delivery("malformed", delivery, "dead_letter")
            return
        try:
            if isinstance(message, StepEvent):
                await self._run_step(message, delivery)
                return
            await self._on_command(message)
            await delivery.ack()
            await self._notify_delivery(message.kind, delivery, "handled")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._drop_kept(delivery)
                await delivery.nack(0)
            raise
        except Exception as exc:
            if isinstance(exc, CommandNetError) and not isinstance(exc, StoreUnavailableError):
                log.error("dead-lettering %s: %s", message.kind, exc)  # it will not get better
                await delivery.dead_letter(str(exc))
                await self._notify_delivery(message.kind, delivery, "dead_letter")
                return
            # The store or the bus failed, or is busy: try again later.
            log.exception("handling %s failed; redelivering later", message.dedup_id)
            with contextlib.suppress(Exception):
                await delivery.nack(min(self.lease_seconds, 5.0))

    async def _run_step(self, event: StepEvent, delivery: Delivery) -> None:
        """Lease and run a step. A step whose worker died holding it (a suspect) that is leased
        by an idle worker runs alone: no other step is leased here until it ends, so if it kills
        this worker too, the store counts that death against it alone. A death during a run
        that was not alone may have been any step's doing and uses up no attempt."""
        if not self._alone.is_set():
            await self._alone.wait()
        alone = not self._leased
        if alone:  # shut until the lease says whether this is a suspect (which keeps it shut)
            self._alone.clear()
        self._leased += 1
        try:
            await self._lease_and_run(event, delivery, alone)
        finally:
            self._leased -= 1
            if alone:  # only an alone lease closes the gate
                self._alone.set()

    async def _lease_and_run(self, event: StepEvent, delivery: Delivery, alone: bool) -> None:
        lease = await self._kept_lease(event) or await self.persistence.load_and_lock_agent(
            event.agent_id, event.step, self.owner, self.lease_seconds, self.pool, alone)
        await self._notify_delivery(event.kind, delivery, lease.state.value)
        if lease.state is LeaseState.BUSY:
            await delivery.nack(min(max(lease.retry_after, 0.01), self.lease_seconds))
            return
        if lease.state is LeaseState.FOREIGN:
            log.warning("agent %r belongs to another pool than %r; left to its own pool",
                        event.agent_id, self.pool)
        if lease.state is not LeaseState.GRANTED or lease.record is None:
            await delivery.ack()  # a duplicate or stale event: the store has moved on
            return
        rec = lease.record
        if alone and not rec.crashes:
            self._alone.set()
        attempt = rec.attempts  # counted by the lease, so a worker that dies still used one
        started = time.monotonic()
        try:
            if attempt > self._policy(rec.node).max_attempts:
                raise WorkerDiedError(f"worker died during the step ({rec.crashes} times) at "
                                      f"node {rec.node!r}")
            if rec.node not in self._nodes and await self._node_missing(rec, delivery):
                return
            target, context = await self._execute(rec, delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.persistence.release_lease(rec.agent_id, rec.step, self.owner)
            raise
        except BaseException as exc:  # SystemExit in a node too: the worker goes on
            await self._fail(rec, attempt, exc, delivery)
            return
        fields = target.commit_fields() if isinstance(target, Directive) else {}
        to = target.targets()[0] if isinstance(target, Directive) else target
        commit = Commit(rec.agent_id, self.owner, rec.step, rec.node,
                        None if to is None else to.node_name, context, attempt,
                        time.monotonic() - started, graph_version=self._version(rec.node),
                        keep_lease=self._keep_next(), **fields)
        try:
            saved = await self.persistence.save_state(commit)
        except ContextValidationError as exc:  # the store cannot hold it (NaN in jsonb, say)
            await self._fail(rec, attempt, exc, delivery)
            return
        if not saved:
            await self._refused(rec, delivery)
            return
        if commit.branches:
            await self._publish_outbox([OutboxEntry(branch_id(rec.agent_id, rec.step + 1, i), 0)
                                        for i in range(len(commit.branches))])
        if commit.keep_lease is not None:
            await self._kept_after(rec, commit)
        if commit.plain and await self.bus.publish(
                StepEvent(agent_id=rec.agent_id, step=rec.step + 1)) is not False:
            await self.persistence.clear_outbox([OutboxEntry(rec.agent_id, rec.step + 1)])
        await delivery.ack()
        await self._notify_transition(rec, commit.to_node, commit.duration, attempt)

    async def _refused(self, rec: AgentRecord, delivery: Delivery) -> None:
        """The fence refused our lease. A lease the store forgot (a database crash, leases
        commit without a flush) leaves the step running with no owner: retry it now.
        Otherwise the agent moved on, was cancelled, or another worker took over: drop."""
        now = await self.persistence.get_agent(rec.agent_id)
        if (now is not None and now.status is AgentStatus.RUNNING and now.step == rec.step
                and now.lease_owner is None):
            log.warning("agent %r step %d: the store forgot our lease; running it again",
                        rec.agent_id, rec.step)
            await delivery.nack(0)
            return
        log.info("agent %r step %d: result discarded (lease lost or agent cancelled)",
                 rec.agent_id, rec.step)
        await delivery.ack()

    async def _execute(
        self, rec: AgentRecord, delivery: Delivery
    ) -> tuple[NodeClass | Directive[Any] | None, dict[str, Any]]:
        """Run the leased node; returns where it goes next and the new context (as JSON)."""
        graph, node_cls = self._resolve(rec.node)
        ctx = self._model(graph, rec.context, f"stored context at node {rec.node!r}")
        node = node_cls()
        node.payload = validate_payload(node_cls, rec.payload)
        result = await self._run_node(rec, delivery, node.run(ctx), node_cls.retry.timeout)
        if not graph.allows(rec.node, result):
            declared = [*graph.edges[rec.node], *(["None"] if rec.node in graph.terminal else [])]
            got = getattr(result, "__qualname__", repr(result))
            raise InvalidTransitionError(
                f"node {rec.node!r} returned {got}, which its return hint does not declare "
                f"(declared: {', '.join(declared) or 'nothing'})")
        dumped = ctx.model_dump(mode="json")
        self._model(graph, dumped, f"context returned by node {rec.node!r}")
        return result, dumped

    async def _fail(self, rec: AgentRecord, attempt: int, exc: BaseException,
                    delivery: Delivery) -> None:
        policy = self._policy(rec.node)
        final = isinstance(exc, _FATAL) or not policy.should_retry(attempt, exc)
        delay = 0.0 if final else policy.backoff(attempt)
        error = _describe(exc)
        recorded = await self.persistence.record_failure(
            Failure(rec.agent_id, self.owner, rec.step, attempt, error, final, delay)
        )
        if not recorded:
            await self._refused(rec, delivery)
            return
        if not final:
            log.warning("agent %r node %r attempt %d failed, retry in %.2fs: %s",
                        rec.agent_id, rec.node, attempt, delay, error.splitlines()[0])
            await delivery.nack(delay)
        else:
            log.error("agent %r failed at node %r after %d attempt(s): %s",
                      rec.agent_id, rec.node, attempt, error.splitlines()[0])
            await delivery.ack()
        info = ErrorInfo(rec.agent_id, rec.step, rec.node, exc, attempt, final,
                         None if final else delay)
        await self._emit("on_error", rec.agent_id, rec.node, exc)
        await self._emit("on_step_error", info)
        if final:
            await self._notify_status(StatusInfo(rec.agent_id, AgentStatus.FAILED, rec.node,
                                                 rec.step, error))
            await self._wake()
            await self._notify_parent(rec)

    # ------------------------------------------------------------------ helpers

    def _policy(self, node: str) -> RetryPolicy:
        return self._nodes[node][1].retry if node in self._nodes else RetryPolicy()

    @staticmethod
    def _model(graph: Graph, raw: dict[str, Any], where: str) -> BaseModel:
        try:
            return graph.context.model_validate(raw)
        except ValidationError as exc:
            raise ContextValidationError(
                f"{where} does not validate as {graph.context.__name__}: {exc}"
            ) from None

    def _validate(self, graph: Graph, raw: dict[str, Any], where: str) -> dict[str, Any]:
        return self._model(graph, raw, where).model_dump(mode="json")


async def _every(interval: float, work: Any) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await work()
        except Exception:
            log.exception("%s failed; retrying in %.1fs", work.__name__, interval)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CommandNetError):
        return str(exc)
    tail = "".join(traceback.format_exception(exc)[-3:]).strip()
    return f"{type(exc).__name__}: {exc}\n{tail}"
