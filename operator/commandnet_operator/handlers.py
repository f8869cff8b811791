"""The kopf handlers: a daemon per unfinished Agent (trigger, then status from the bucket),
delete → cancel, TTL, and the admission webhooks.

Writes per Agent are kept to what its status needs: the mutating webhook puts the finalizer
in at creation (no patch for it), nothing is diffed (the spec is immutable, so kopf keeps no
diff base in an annotation), and the trigger's Pending joins the first status patch when
the agent moves within the coalescing window.

Handlers reach the operator's parts through kopf's ``memo`` (an :class:`Operator`). They are
registered in :data:`registry`, not kopf's global one, so importing this module runs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from aiolimiter import AsyncLimiter
from kubernetes_asyncio.client import ApiException
from kubernetes_asyncio.client import Configuration as KubeConfiguration

from commandnet.messages import CancelCommand, TriggerCommand

from .admission import Refused, check_agent, check_size
from .commands import decide, due, handled, not_applied, resume_in_flight, resume_overdue
from .kube import Kube, api_message, connection_info
from .link import BusLink, NotSent
from .metrics import COMMANDS, PATCHES, STATUS_LAG, TRACKED, WEBHOOK
from .resource import GROUP, PLURAL, VERSION, Phase, agent_id
from .settings import OperatorSettings
from .status import (
    FAILED,
    RESUMED,
    TRIGGERED,
    bus_shown_down,
    changed,
    merge,
    now,
    set_condition,
    with_bus,
)
from .webhook import webhook_server

registry = kopf.OperatorRegistry()
Logger = logging.Logger | logging.LoggerAdapter[Any]
FINALIZER = "commandnet.io/cancel"


@dataclass
class Operator:
    """What the handlers share (kopf's ``memo``)."""

    settings: OperatorSettings
    configuration: KubeConfiguration
    link: BusLink
    kube: Kube
    limiter: AsyncLimiter
    #: Agent id -> who follows it now: None for kopf's daemon, a Follower for ours.
    followers: dict[str, Any] = field(default_factory=dict)
    #: Agent id -> (signals, resumes) handled by this process: never sent twice.
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: no handler needs one (an Agent's spec only grows, by signals and resumes,
    which a watch handler sees), and storing one would cost an API write per Agent."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """Nothing stored."""
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Nothing to store."""


def _phase(status: dict[str, Any]) -> Phase | None:
    value = status.get("phase")
    return Phase(value) if value else None


# ---------------------------------------------------------------------------- lifecycle


@kopf.on.login(registry=registry)
async def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    """kopf uses the credentials kubernetes-asyncio found."""
    return await connection_info(memo.configuration)


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """kopf's settings from ours; connect to NATS (in the background: it may be down)."""
    ours = memo.settings
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="commandnet.io")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING  # our Events are explicit; kopf's chatter is not
    settings.peering.clusterwide = True
    settings.peering.stealth = True
    if ours.webhook_enabled:
        settings.admission.server = webhook_server(ours)
        # Empty: the configurations are someone else's (the Helm chart's); only serve.
        settings.admission.managed = ours.webhook_configuration or None
    memo.link.start()


@kopf.on.cleanup(registry=registry)
async def shut_down(memo: Any, **_: Any) -> None:
    """Stop the followers; disconnect from NATS and the API server."""
    ours = [f for f in memo.followers.values() if isinstance(f, Follower)]
    for follower in ours:
        follower.stopped.set()
    await asyncio.gather(*(f.task for f in ours if f.task is not None),
                         return_exceptions=True)
    await memo.link.stop()
    await memo.kube.close()


# ---------------------------------------------------------------------------- admission


@kopf.on.mutate(GROUP, VERSION, PLURAL, registry=registry, id="finalizer",
                operations=["CREATE"], ignore_failures=True)
def add_finalizer(meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    """The cancel finalizer, in the object as created: no patch for it later (kopf adds it
    itself when the webhook was not called)."""
    finalizers = list(meta.get("finalizers") or [])
    if FINALIZER not in finalizers:
        patch.meta["finalizers"] = [*finalizers, FINALIZER]


@kopf.on.validate(GROUP, VERSION, PLURAL, registry=registry, id="agents", operations=["CREATE"],
                  ignore_failures=True)
def admit(spec: kopf.Spec, memo: Any, **_: Any) -> None:
    """Refuse an Agent its pool's published graph cannot run (unknown node, bad context)."""
    raw = dict(spec)
    graph = memo.link.graph(str(raw.get("pool", "default")))
    try:
        check_agent(raw, graph)
    except Refused as exc:
        WEBHOOK.labels("deny", exc.reason).inc()
        raise kopf.AdmissionError(str(exc), code=422) from None
    WEBHOOK.labels("allow", "Checked" if graph else "NoGraph").inc()


# ------------------------------------------------------------------------------ agents


# No `when=` filter: kopf stops a daemon whose filter stops matching by patching a dummy
# annotation to look again (a write per Agent); this one returns by itself when finished.
@kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, id="agent",
             cancellation_backoff=5.0, cancellation_timeout=5.0)
async def run_agent(stopped: kopf.DaemonStopped, spec: kopf.Spec, body: kopf.Body,
                    meta: kopf.Meta, namespace: str | None, name: str, uid: str, memo: Any,
                    logger: Logger, **_: Any) -> None:
    """An unfinished Agent's life: send its trigger (until NATS takes it), then keep its status
    current from the bucket, each burst of changes in one rate-limited patch, and send its
    signals and resumes (:mod:`.commands`) as they are appended.

    A finished Agent has nothing to follow: its daemon returns at once, and a resume (or
    signal) appended later starts a follower of its own (:func:`watch_commands`). Unless it
    still shows BusAvailable=False (it finished during an outage, and an operator restarted
    before the link came back): it is followed until that is cleared.
    """
    shown: dict[str, Any] = dict(body.get("status") or {})
    phase = _phase(shown)
    aid = agent_id(namespace or "", name, uid)
    finished = phase is not None and phase.finished and not bus_shown_down(shown)
    if finished or aid in memo.followers:
        return
    await _follow(stopped, lambda: body, (namespace or "", name, uid), memo, logger)


class Stopped:
    """A follower's stop flag, as kopf's ``DaemonStopped`` is a daemon's."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        """Ask the follower to stop."""
        self._event.set()

    async def wait(self, timeout: float | None = None) -> None:
        """Sleep ``timeout`` seconds, or until stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


@dataclass
class Follower:
    """A finished Agent followed again (a resume or a signal was appended): the latest body
    the watch showed, and how to stop it."""

    body: dict[str, Any]
    stopped: Stopped
    task: asyncio.Task[None] | None = None


async def _follow(stopped: Any, body_of: Callable[[], Mapping[str, Any]],
                  ref: tuple[str, str, str], memo: Any, logger: Logger) -> None:
    """Trigger (if not yet), then follow the bucket and the spec (``body_of()``: the Agent as
    last seen) until the agent is finished with nothing in flight and no outage shown. What
    is sent but not yet written waits for the coalescing window: an agent that finishes
    within it goes from no phase to its final one in one write."""
    namespace, name, uid = ref
    aid = agent_id(*ref)

    def spec_of() -> Mapping[str, Any]:
        return body_of().get("spec") or {}

    def generation_of() -> int:
        return int((body_of().get("metadata") or {}).get("generation") or 1)

    generation = generation_of()
    shown: dict[str, Any] = dict(body_of().get("status") or {})
    held = shown
    memo.followers.setdefault(aid, None)  # None: kopf's daemon (a Follower: ours)
    board = memo.link.board
    changes = board.watch(aid)
    TRACKED.inc()
    try:
        held = _known(memo, aid, shown)
        if _phase(shown) is None:
            sent = await _trigger(stopped, spec_of(), shown, ref, generation, memo, logger)
            if sent is None:
                return  # stopped before NATS took it
            held = sent
        changes.set()  # a first look: the bucket may have the agent's status already
        window = memo.settings.status_window
        last = time.monotonic()  # the trigger counts as a write: Pending waits a window
        while not stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changes.wait(), timeout=1.0)  # and look at `stopped`
            if not changes.is_set() and not resume_overdue(held) and not _actionable(
                    memo, spec_of(), held, aid):
                continue
            # At most one patch per window: a change after a quiet spell goes at once, a
            # burst waits for the rest of the window and goes as one.
            await asyncio.sleep(max(0.0, last + window - time.monotonic()))
            async with memo.limiter:  # under pressure, later changes join this patch
                changes.clear()
                generation = generation_of()  # signals and resumes appended: it grows
                value = board.values.get(aid)
                new = merge(held, value, generation) if value else held
                new = with_bus(new, memo.link.available)
                new, events, retry = await _commands(memo, spec_of(), new, aid, generation,
                                                     logger)
                _remember(memo, aid, new)
                delta = changed(shown, new)
                written = not delta or await _patch(memo, namespace, name, uid, delta, logger)
            if retry:
                changes.set()  # NATS refused a command: again after the next window
            if not written:
                held, last = new, time.monotonic()
                changes.set()  # try again after the next window
                continue
            if value is not None and delta.get("step") is not None:
                STATUS_LAG.observe(_age(value))
            for kind, reason, message in events:
                await _post_event(memo, body_of(), kind, reason, message, logger)
            if new.get("phase") != shown.get("phase"):
                await _announce(memo, body_of(), spec_of(), new, logger)
            shown = held = new
            last = time.monotonic()
            if Phase(new["phase"]).finished and not resume_in_flight(new) and not retry \
                    and not bus_shown_down(new) and not _actionable(memo, spec_of(), new, aid):
                break
    finally:
        TRACKED.dec()
        board.unwatch(aid)
        memo.followers.pop(aid, None)
    # An entry appended as it returned found it still here and poked it in vain: follow again.
    if not stopped and _actionable(memo, spec_of(), _known(memo, aid, held), aid):
        _spawn(memo, {**body_of(), "status": held}, ref, logger)


def _actionable(memo: Any, spec: Mapping[str, Any], status: Mapping[str, Any],
                aid: str) -> bool:
    """Whether an entry of spec.signals or spec.resumes can be handled now (the spec is live:
    a look each second, should a watch event's wake-up be missed)."""
    if not due(spec, status):
        return False
    graph = memo.link.graph(str(spec.get("pool", "default")))
    return decide(spec, status, aid, graph) is not None


def _known(memo: Any, aid: str, status: dict[str, Any]) -> dict[str, Any]:
    """``status`` with the entries this process handled already counted (a watch event older
    than the operator's last patch may start a follower: it must not send them again)."""
    signals, resumes = memo.progress.get(aid, (0, 0))
    if signals <= int(status.get("signalsSent") or 0) and \
            resumes <= int(status.get("resumesHandled") or 0):
        return status
    return {**status, "signalsSent": max(signals, int(status.get("signalsSent") or 0)),
            "resumesHandled": max(resumes, int(status.get("resumesHandled") or 0))}


def _remember(memo: Any, aid: str, status: dict[str, Any]) -> None:
    counts = (int(status.get("signalsSent") or 0), int(status.get("resumesHandled") or 0))
    if counts != (0, 0):
        memo.progress[aid] = counts


async def _commands(memo: Any, spec: Mapping[str, Any], status: dict[str, Any], aid: str,
                    generation: int, logger: Logger
                    ) -> tuple[dict[str, Any], list[tuple[str, str, str]], bool]:
    """Send (or refuse) the signals and resumes that are due; returns the status after, the
    Events to post once it is written, and whether to try again (NATS refused a command)."""
    events: list[tuple[str, str, str]] = []
    if resume_overdue(status):
        status = not_applied(status, generation)
        events.append(("Warning", "ResumeNotApplied",
                       next(c["message"] for c in status["conditions"]
                            if c["type"] == RESUMED)))
    pool = str(spec.get("pool", "default"))
    while (decision := decide(spec, status, aid, memo.link.graph(pool))) is not None:
        if decision.command is not None:
            try:
                await memo.link.send(pool, decision.command)
            except NotSent as exc:
                COMMANDS.labels(decision.kind, exc.reason).inc()
                logger.warning("%s of agent %r not sent: %s", decision.kind, aid, exc)
                return status, events, True
            COMMANDS.labels(decision.kind, "Sent").inc()
        else:
            COMMANDS.labels(decision.kind, decision.reason).inc()
        logger.info("%s", decision.message)
        status = {**handled(status, decision, generation), "observedGeneration": generation}
        events.append(decision.event)
    return status, events, False


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="commands")
async def watch_commands(event: kopf.RawEvent, body: kopf.Body, spec: kopf.Spec,
                         meta: kopf.Meta, namespace: str | None, name: str, uid: str,
                         memo: Any, logger: Logger, **_: Any) -> None:
    """A new spec.signals or spec.resumes entry: wake the Agent's follower; a finished Agent
    has none (its daemon returned), so start one. No API call unless an entry is due."""
    aid = agent_id(namespace or "", name, uid)
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        memo.progress.pop(aid, None)
        follower = memo.followers.get(aid)
        if follower is not None:
            follower.stopped.set()
        return
    status = _known(memo, aid, dict(body.get("status") or {}))
    follower = memo.followers.get(aid)
    if isinstance(follower, Follower):
        follower.body = dict(body)
    if not due(spec, status):
        return
    if aid in memo.followers:
        memo.link.board.poke(aid)
        return
    phase = _phase(status)
    if phase is None or not phase.finished:
        return  # kopf's daemon follows it (and looks at the spec when it starts)
    _spawn(memo, body, (namespace or "", name, uid), logger)


def _spawn(memo: Any, body: Mapping[str, Any], ref: tuple[str, str, str],
           logger: Logger) -> None:
    """Follow a finished Agent again, in a task of ours (its kopf daemon has returned)."""
    ours = Follower(body=copy.deepcopy(dict(body)), stopped=Stopped())
    memo.followers[agent_id(*ref)] = ours
    ours.task = asyncio.create_task(_follow_again(ours, ref, memo, logger),
                                    name=f"commandnet-follow-{agent_id(*ref)}")


async def _follow_again(ours: Follower, ref: tuple[str, str, str], memo: Any,
                        logger: Logger) -> None:
    try:
        await _follow(ours.stopped, lambda: ours.body, ref, memo, logger)
    except Exception:  # logged; the next watch event starts another
        logger.exception("following agent %r failed", agent_id(*ref))


async def _trigger(stopped: Any, spec: Mapping[str, Any], shown: dict[str, Any],
                   ref: tuple[str, str, str], generation: int, memo: Any, logger: Logger
                   ) -> dict[str, Any] | None:
    """Send the trigger command (idempotent per Agent: JetStream de-duplicates it and the store
    takes a repeated request as a no-op); returns the status to show, None when stopped first.
    While NATS refuses it, the Triggered condition says why (written once per reason)."""
    aid = agent_id(*ref)
    pool = str(spec.get("pool", "default"))
    start = str(spec["startNode"])
    context = dict(spec.get("context") or {})
    payload = spec.get("payload")
    conditions = list(shown.get("conditions") or [])
    base = {**shown, "agentId": aid, "observedGeneration": generation}
    try:
        check_size(context)  # the webhook may have been bypassed (failurePolicy Ignore)
        check_size(payload, "spec.payload", "PayloadTooLarge")
    except Refused as exc:
        failed = set_condition(conditions, TRIGGERED, "False", exc.reason, str(exc), generation)
        return {**base, "phase": Phase.FAILED.value, "error": str(exc), "completionTime": now(),
                "conditions": set_condition(failed, FAILED, "True", exc.reason, str(exc),
                                            generation)}
    command = TriggerCommand(agent_id=aid, start_node=start, context=context, payload=payload)
    said = ""
    while not stopped:
        try:
            trace_id = await memo.link.send(pool, command)
        except NotSent as exc:
            COMMANDS.labels("trigger", exc.reason).inc()
            logger.warning("trigger of agent %r not sent: %s", aid, exc)
            if exc.reason != said:
                conditions = set_condition(conditions, TRIGGERED, "False", exc.reason,
                                           str(exc), generation)
                if await _patch(memo, *ref, {"agentId": aid, "conditions": conditions}, logger):
                    said = exc.reason
            await stopped.wait(memo.settings.trigger_retry)
            continue
        COMMANDS.labels("trigger", "Sent").inc()
        if trace_id:  # tracing: the trigger span is the root of the agent's trace
            base["traceId"] = trace_id
        return {**base, "phase": Phase.PENDING.value, "startTime": now(),
                "conditions": set_condition(conditions, TRIGGERED, "True", "TriggerSent",
                                            f"sent to pool {pool}: start at node {start}",
                                            generation)}
    return None


async def _patch(memo: Any, namespace: str, name: str, uid: str, delta: dict[str, Any],
                 logger: Logger) -> bool:
    """Merge ``delta`` into the Agent's status; False (logged, counted) when it did not land."""
    try:
        await memo.kube.patch_status(namespace, name, delta, uid)
    except ApiException as exc:
        result = {404: "gone", 409: "conflict"}.get(exc.status or 0, "error")
        PATCHES.labels(result).inc()
        logger.warning("status patch refused (%s %s): %s", exc.status, exc.reason,
                       api_message(exc))
        return False
    except Exception as exc:  # the API server is unreachable: try later
        PATCHES.labels("error").inc()
        logger.warning("status patch failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(1.0)
        return False
    PATCHES.labels("ok").inc()
    return True


def _age(value: dict[str, Any]) -> float:
    try:
        written = datetime.fromisoformat(str(value.get("updated_at")))
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(UTC) - written).total_seconds())


async def _announce(memo: Any, body: Mapping[str, Any], spec: Mapping[str, Any],
                    status: dict[str, Any], logger: Logger) -> None:
    """An Event per phase the Agent shows: ``kubectl describe agent`` tells the story. Posted
    and awaited here (kopf's own queue posts in the background and may drop one)."""
    phase = Phase(status["phase"])
    node, step = status.get("currentNode"), status.get("step")
    if phase is Phase.PENDING:
        reason = "Triggered"
        message = (f"trigger sent to pool {spec.get('pool', 'default')}: start at node "
                   f"{spec.get('startNode')}")
    elif phase is Phase.RUNNING:
        reason, message = phase.value, f"running: at node {node}, step {step}"
    elif phase is Phase.SUCCEEDED:
        reason, message = phase.value, f"succeeded at node {node} after {step} step(s)"
    else:
        reason = phase.value
        message = f"{phase.value.lower()} at node {node}: {status.get('error') or ''}".strip()
    await _post_event(memo, body, "Warning" if phase is Phase.FAILED else "Normal", reason,
                      message, logger)


async def _post_event(memo: Any, body: Mapping[str, Any], kind: str, reason: str, message: str,
                      logger: Logger) -> None:
    """Post an Event; a failure is logged, never fatal (Events help, the status is the truth)."""
    for delay in (0.5, 1.0, 2.0, None):
        try:
            await memo.kube.post_event(dict(body), kind, reason, message)
            return
        except ApiException as exc:
            if delay is None or exc.status not in (429, 500, 502, 503, 504):
                logger.warning("event %s not posted (%s %s): %s", reason, exc.status,
                               exc.reason, api_message(exc))
                return
        except Exception as exc:  # the API server is unreachable
            if delay is None:
                logger.warning("event %s not posted: %s: %s", reason, type(exc).__name__, exc)
                return
        await asyncio.sleep(delay)


# ------------------------------------------------------------------------------ delete


@kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="cancel")
async def cancel(spec: kopf.Spec, status: kopf.Status, body: kopf.Body, namespace: str | None,
                 name: str, uid: str, memo: Any, runtime: timedelta, logger: Logger,
                 **_: Any) -> None:
    """Cancel a running agent, then let the Agent go (after ``cancel_timeout`` without NATS,
    let go anyway: a finalizer must not hold a delete forever)."""
    phase = _phase(dict(status))
    if phase is not None and phase.finished:
        return
    aid = agent_id(namespace or "", name, uid)
    pool = str(spec.get("pool", "default"))
    command = CancelCommand(agent_id=aid, reason=f"Agent {namespace}/{name} was deleted")
    try:
        await memo.link.send(pool, command)
    except NotSent as exc:
        COMMANDS.labels("cancel", exc.reason).inc()
        waited = runtime.total_seconds()
        if waited < memo.settings.cancel_timeout:
            raise kopf.TemporaryError(f"{exc.reason}: {exc}",
                                      delay=min(5.0, memo.settings.cancel_timeout)) from None
        logger.error("cancel of agent %r not sent after %.0fs (%s); letting the Agent go: "
                     "the agent may run to its end", aid, waited, exc)
        await _post_event(memo, body, "Warning", "CancelNotSent",
                          f"{exc} (gave up after {waited:.0f}s)", logger)
        return
    COMMANDS.labels("cancel", "Sent").inc()
    logger.info("cancel sent for agent %r", aid)


# --------------------------------------------------------------------------------- TTL


def _expiring(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    phase = _phase(dict(status))
    return (spec.get("ttlSecondsAfterFinished") is not None and phase is not None
            and phase.finished)


@kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, id="ttl", when=_expiring,
             cancellation_backoff=5.0, cancellation_timeout=5.0)
async def expire(stopped: kopf.DaemonStopped, spec: kopf.Spec, status: kopf.Status,
                 namespace: str | None, name: str, uid: str, memo: Any,
                 logger: Logger, **_: Any) -> None:
    """Delete a finished Agent ``ttlSecondsAfterFinished`` after it finished."""
    ttl = float(spec["ttlSecondsAfterFinished"])
    try:
        finished = datetime.fromisoformat(str(status.get("completionTime")))
    except ValueError:
        finished = datetime.now(UTC)
    left = ttl - (datetime.now(UTC) - finished).total_seconds()
    if left > 0:
        await stopped.wait(left)
    while not stopped:
        try:
            await memo.kube.delete_agent(namespace or "", name, uid)
            logger.info("deleted %ss after it finished (ttlSecondsAfterFinished)", ttl)
            return
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or another Agent has the name now
                return
            logger.warning("delete after TTL failed (%s %s): %s; retrying", exc.status,
                           exc.reason, api_message(exc))
        await stopped.wait(5.0)
