"""``make bench-operator``: the operator's latency and API-server cost, on a real control plane.

Starts its own control plane (``e2e.testbed.LocalCluster``; etcd + kube-apiserver unless
``--controllers``), a PostgreSQL, and :class:`e2e.operator_stack.OperatorStack` (NATS, 2
``commandnet worker`` processes, the operator with its default settings). Agents are created
from this process with kubernetes_asyncio; one watch on Agents (per namespace) records, on this
process's monotonic clock, when each Agent was first seen in each phase. A watch on the
workers' status bucket records when each status value appeared in NATS (same clock).

1. ``apply → Succeeded``: ``--agents`` (500) Agents of ``e2e.graphs:Hello`` (3 nodes, delay
   0) created at ``--rate`` (50/s); per Agent, first watch event with phase Succeeded minus
   the moment its create call returned. p50/p99.
2. ``status lag``: ``--running`` (1,000) Agents of ``e2e.graphs:Six1`` (6 nodes) with
   ``--delay`` (2 s) per node, created as fast as the API server takes them. The operator's
   own histogram ``commandnet_operator_status_lag_seconds`` (bucket ``updated_at`` → status
   patch returned), delta over the run, quantiles interpolated within its buckets as
   Prometheus' ``histogram_quantile`` does. Cross-check, same clock: for every bucket value,
   the time from the bench seeing it in NATS to the bench seeing an Agent status at least
   that far along (the staleness a ``kubectl get`` reader sees).
3. ``API-server writes per Agent`` during run 1: ``apiserver_request_total`` (POST, PUT,
   PATCH, DELETE, APPLY) from the API server's ``/metrics`` before and after, by resource
   and subresource, divided by the number of Agents; next to the phase changes per Agent
   seen on the watch.

Figures are printed and written under ``"operator"`` in ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).with_name("results.json")
GROUP, VERSION, PLURAL = "commandnet.io", "v1alpha1", "agents"
POOL = "e2e"
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
LAG_METRIC = "commandnet_operator_status_lag_seconds"
CREATE_CONCURRENCY = 32
FINISHED = ("Succeeded", "Failed", "Cancelled")
_ORDER = {"Pending": 0, "Running": 1, "Succeeded": 2, "Failed": 2, "Cancelled": 2}

console = Console()


class BenchError(RuntimeError):
    """The benchmark could not run to its end."""


# ---------------------------------------------------------------------------- figures


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of ``values`` (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of histogram ``name`` in ``text``."""
    found: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                found[float(sample.labels["le"])] = sample.value
    return found


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float
                       ) -> dict[str, Any]:
    """Quantile ``q`` of the observations between two snapshots: linear within its bucket (as
    Prometheus does); ``bucket`` gives the bounds, i.e. the precision."""
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return {"value": None, "bucket": None, "count": 0}
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return {"value": None, "bucket": [lower, None], "count": int(total),
                        "note": f"above the largest finite bucket ({lower:g} s)"}
            inside = count - below
            value = lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            return {"value": round(value, 3), "bucket": [lower, bound], "count": int(total)}
        lower, below = bound, count
    return {"value": None, "bucket": None, "count": int(total)}


def counter_samples(text: str, sample_name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample named ``sample_name`` (labels, value)."""
    out: list[tuple[dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name:
                out.append((dict(sample.labels), sample.value))
    return out


def _write_kind(labels: dict[str, str]) -> str:
    resource, sub, verb = labels.get("resource", ""), labels.get("subresource", ""), \
        labels.get("verb", "")
    if resource == "agents":
        if sub == "status":
            return f"agents/status {verb}"
        if sub:
            return f"agents/{sub} {verb}"
        return "agents create" if verb == "POST" else f"agents {verb}"
    if resource == "events":
        return f"events {verb}"
    if resource.endswith("kopfpeerings"):
        return "kopf peering"
    return f"other ({resource or '?'}{'/' + sub if sub else ''} {verb})"


def apiserver_writes(before: str, after: str) -> tuple[dict[str, float], dict[str, float]]:
    """Write requests between two ``/metrics`` texts: (by kind, by HTTP code)."""
    def table(text: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(labels.items())): value
                for labels, value in counter_samples(text, "apiserver_request_total")
                if labels.get("verb") in WRITE_VERBS}

    old, new = table(before), table(after)
    kinds: defaultdict[str, float] = defaultdict(float)
    codes: defaultdict[str, float] = defaultdict(float)  # code, and "code kind" for every non-2xx
    for key, value in new.items():
        delta = value - old.get(key, 0.0)
        if delta <= 0:
            continue
        labels = dict(key)
        kinds[_write_kind(labels)] += delta
        code = labels.get("code", "?")
        codes[code] += delta
        if not code.startswith("2"):
            codes[f"{code} {_write_kind(labels)}"] += delta
    return dict(kinds), dict(codes)


# ---------------------------------------------------------------------------- observers


class AgentWatch:
    """One watch on the Agents of a namespace: when each was first seen in each phase/step."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.first_phase: dict[str, dict[str, float]] = defaultdict(dict)
        # (name) -> [(time, phase, step)] for every event whose (phase, step) moved on
        self.progress: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
        self.modified: Counter[str] = Counter()
        self.changes: Counter[str] = Counter()  # what each MODIFIED event changed
        self._last: dict[str, dict[str, Any]] = {}
        self.uids: dict[str, str] = {}
        self.last_event = time.monotonic()
        self.peak_unfinished = 0
        self._unfinished: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._watch: Any = None
        self.started = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch-{self.namespace}")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        from kubernetes_asyncio import client, watch

        api = client.CustomObjectsApi(self.api_client)
        listed = await api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        version = listed["metadata"]["resourceVersion"]
        self._watch = watch.Watch()
        self.started.set()
        async with self._watch.stream(api.list_namespaced_custom_object, GROUP, VERSION,
                                      self.namespace, PLURAL, resource_version=version,
                                      allow_watch_bookmarks=True) as stream:
            async for event in stream:
                if event["type"] not in ("ADDED", "MODIFIED"):
                    continue
                self._seen(event["type"], event["raw_object"], time.monotonic())

    def _seen(self, kind: str, agent: dict[str, Any], at: float) -> None:
        self.last_event = at
        name = agent["metadata"]["name"]
        self.uids[name] = agent["metadata"]["uid"]
        if kind == "MODIFIED":
            self.modified[name] += 1
            self.changes[_what_changed(self._last.get(name, {}), agent)] += 1
        self._last[name] = agent
        status = agent.get("status") or {}
        phase = status.get("phase")
        if not phase:
            return
        self.first_phase[name].setdefault(phase, at)
        step = int(status.get("step") or 0)
        trail = self.progress[name]
        if not trail or (trail[-1][1], trail[-1][2]) != (phase, step):
            trail.append((at, phase, step))
        if phase in FINISHED:
            self._unfinished.discard(name)
        else:
            self._unfinished.add(name)
            self.peak_unfinished = max(self.peak_unfinished, len(self._unfinished))

    def count(self, phase: str) -> int:
        return sum(1 for seen in self.first_phase.values() if phase in seen)

    def finished(self) -> int:
        return sum(1 for seen in self.first_phase.values() if any(p in seen for p in FINISHED))


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which parts of an Agent one write changed: finalizers, annotation keys, status."""
    parts = []
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    if old_meta.get("finalizers") != new_meta.get("finalizers"):
        parts.append("finalizers")
    old_notes = old_meta.get("annotations") or {}
    new_notes = new_meta.get("annotations") or {}
    for key in sorted(set(old_notes) | set(new_notes)):
        if old_notes.get(key) != new_notes.get(key):
            parts.append(f"annotation {key}")
    old_status, new_status = old.get("status") or {}, new.get("status") or {}
    if old_status != new_status:
        phases = (old_status.get("phase"), new_status.get("phase"))
        parts.append(f"status {phases[0]}→{phases[1]}" if phases[0] != phases[1]
                     else "status (same phase)")
    return ", ".join(parts) or "nothing visible"


class BucketWatch:
    """The workers' status bucket, as the operator reads it: when each value appeared."""

    def __init__(self, nats_url: str) -> None:
        from commandnet.adapters.nats_status import StatusReader

        self.reader = StatusReader(nats_url)
        self.values: dict[str, list[tuple[float, str, int]]] = defaultdict(list)  # by agent id
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reader.connect()
        self._task = asyncio.create_task(self._run(), name="bucket-watch")

    async def _run(self) -> None:
        async for update in self.reader.watch(POOL):
            if update.status is None or update.replay:
                continue
            phase = str(update.status.get("status", "running")).capitalize()
            self.values[update.agent_id].append(
                (time.monotonic(), phase, int(update.status.get("step") or 0)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.reader.close()


def staleness(bucket: BucketWatch, agents: AgentWatch) -> list[float]:
    """For each bucket value of the namespace's Agents: seconds until the Agent's status
    showed that value or a later one (values never shown are left out, and counted)."""
    lags: list[float] = []
    for name, trail in agents.progress.items():
        uid = agents.uids.get(name)
        values = bucket.values.get(f"{agents.namespace}/{name}/{uid}", [])
        for at, phase, step in values:
            wanted = (step, phase in FINISHED)
            shown = next((t for t, p, s in trail if (s, p in FINISHED) >= wanted), None)
            if shown is not None:
                lags.append(max(0.0, shown - at))
    return lags


# ---------------------------------------------------------------------------- the runs


def _manifest(name: str, namespace: str, start: str, context: dict[str, Any]
              ) -> dict[str, Any]:
    from e2e.operator_stack import agent_manifest

    return agent_manifest(name, namespace, start=start, pool=POOL, context=context)


async def _create_all(api: Any, namespace: str, manifests: list[dict[str, Any]],
                      rate: float | None) -> tuple[dict[str, float], float]:
    """Create ``manifests`` (``rate`` per second, None: as fast as they go); when each create
    call returned (monotonic), and the achieved rate."""
    returned: dict[str, float] = {}
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)
    failures: list[str] = []

    async def create(body: dict[str, Any]) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    await api.create_namespaced_custom_object(GROUP, VERSION, namespace,
                                                              PLURAL, body)
                    returned[body["metadata"]["name"]] = time.monotonic()
                    return
                except Exception as exc:  # a webhook/API hiccup: say so, retry a few times
                    if attempt == 4:
                        failures.append(f"{body['metadata']['name']}: {exc}")
                    await asyncio.sleep(0.5)

    started = time.monotonic()
    tasks = []
    for n, body in enumerate(manifests):
        if rate is not None:
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(create(body)))
    await asyncio.gather(*tasks)
    if failures:
        raise BenchError(f"{len(failures)} create(s) failed, e.g. {failures[:3]}")
    span = max(returned.values()) - started
    return returned, round(len(manifests) / span, 1) if span > 0 else float("inf")


async def _wait_finished(watcher: AgentWatch, count: int, timeout: float, what: str,
                         stack: Any) -> None:
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while watcher.finished() < count:
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s: {watcher.finished()}/{count} "
                             f"{what} finished\n{stack.operator_log_tail()}")
        if stack.operator is not None and stack.operator.proc.poll() is not None:
            raise BenchError(f"the operator exited\n{stack.operator_log_tail()}")
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            console.print(f"  {what}: {watcher.finished()}/{count} finished, "
                          f"{watcher.count('Running')} seen Running")
        await asyncio.sleep(0.2)


async def _quiet(watcher: AgentWatch, seconds: float = 3.0, limit: float = 30.0) -> None:
    """Wait until the namespace's Agents have not changed for ``seconds`` (at most ``limit``)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        idle = time.monotonic() - watcher.last_event
        if idle >= seconds:
            return
        await asyncio.sleep(seconds - idle)


def _pids(stack: Any, kube: Any, pg: Any) -> dict[int, str]:
    """The processes whose CPU time is reported: pid -> component."""
    pids = {os.getpid(): "bench process"}
    if stack.operator is not None:
        pids[stack.operator.proc.pid] = "operator"
    for worker in stack.workers:
        pids[worker.proc.pid] = "workers"
    if stack.nats.process is not None:
        pids[stack.nats.process.pid] = "nats-server"
    if pg is not None and pg.process is not None:
        pids[pg.process.pid] = "postgres"
    for name, component in kube.components.items():
        if component.proc is not None:
            pids[component.proc.pid] = name
    return pids


def _cpu(pids: dict[int, str]) -> dict[str, float]:
    """CPU seconds used so far by each component (PostgreSQL: with its backends)."""
    from .distributed import _cpu_seconds

    used: defaultdict[str, float] = defaultdict(float)
    for pid, (_, ppid, seconds) in _cpu_seconds().items():
        kind = pids.get(pid) or ("postgres" if pids.get(ppid) == "postgres" else None)
        if kind is not None:
            used[kind] += seconds
    return dict(used)


def _cpu_delta(before: dict[str, float], after: dict[str, float], seconds: float
               ) -> dict[str, float]:
    """Cores used on average by each component over ``seconds``, busiest first."""
    cores = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / seconds for k in after}
    return {k: round(v, 2) for k, v in sorted(cores.items(), key=lambda kv: -kv[1])}


def _default(setting: str) -> Any:
    """The operator's default for ``setting`` (the bench runs it with its defaults)."""
    from commandnet_operator.settings import OperatorSettings

    return OperatorSettings.model_fields[setting].default


def _apiserver_metrics(kube: Any) -> str:
    request = urllib.request.Request(f"{kube.server}/metrics")
    with urllib.request.urlopen(request, context=kube.admin_ssl_context(), timeout=30) as resp:
        return str(resp.read().decode())


def _operator_counter(text: str, sample: str, **labels: str) -> float:
    return sum(v for lab, v in counter_samples(text, sample)
               if all(lab.get(k) == want for k, want in labels.items()))


async def run_apply(stack: Any, kube: Any, bucket: BucketWatch, agents: int, rate: float,
                    pids: dict[int, str]) -> dict[str, Any]:
    """Run 1: apply → Succeeded and API-server writes per Agent."""
    from kubernetes_asyncio import client

    namespace = stack.namespace("bench-apply")
    manifests = [_manifest(f"hello-{i:04d}", namespace, "Hello", {"name": f"h{i}", "delay": 0})
                 for i in range(agents)]
    async with await kube.api_client() as watch_client, await kube.api_client() as api_client:
        watcher = AgentWatch(watch_client, namespace)
        watcher.start()
        await asyncio.wait_for(watcher.started.wait(), 30)
        await asyncio.sleep(1.0)  # the watch request is established
        api_before = await asyncio.to_thread(_apiserver_metrics, kube)
        op_before = await asyncio.to_thread(stack.operator.metrics)
        console.print(f"run 1: creating {agents} Hello Agents at {rate:g}/s")
        cpu_before, started = _cpu(pids), time.monotonic()
        created, achieved = await _create_all(client.CustomObjectsApi(api_client), namespace,
                                              manifests, rate)
        await _wait_finished(watcher, agents, 600, "Hello Agents", stack)
        cores = _cpu_delta(cpu_before, _cpu(pids), time.monotonic() - started)
        await _quiet(watcher)
        api_after = await asyncio.to_thread(_apiserver_metrics, kube)
        op_after = await asyncio.to_thread(stack.operator.metrics)
        await watcher.stop()

    failed = [n for n, seen in watcher.first_phase.items() if "Succeeded" not in seen]
    if failed:
        raise BenchError(f"{len(failed)} Agent(s) did not succeed, e.g. {failed[:3]}")
    to_succeeded = [watcher.first_phase[n]["Succeeded"] - created[n] for n in created]
    to_pending = [watcher.first_phase[n]["Pending"] - created[n] for n in created
                  if "Pending" in watcher.first_phase[n]]
    tenth = max(1, agents // 10)
    in_order = sorted(created, key=created.__getitem__)
    backlog = {
        f"first {tenth}": round(quantile([watcher.first_phase[n]["Succeeded"] - created[n]
                                          for n in in_order[:tenth]], 0.5), 3),
        f"last {tenth}": round(quantile([watcher.first_phase[n]["Succeeded"] - created[n]
                                         for n in in_order[-tenth:]], 0.5), 3)}
    # The worker side: when the bucket said succeeded (what the operator can know at best).
    to_bucket_done = []
    for name, at in created.items():
        values = bucket.values.get(f"{namespace}/{name}/{watcher.uids[name]}", [])
        done = next((t for t, p, _ in values if p in FINISHED), None)
        if done is not None:
            to_bucket_done.append(done - at)
    phases_seen = [len(seen) for seen in watcher.first_phase.values()]
    running_seen = sum(1 for seen in watcher.first_phase.values() if "Running" in seen)
    kinds, codes = apiserver_writes(api_before, api_after)
    per_agent = {k: round(v / agents, 3) for k, v in sorted(kinds.items())}
    agent_writes = sum(v for k, v in kinds.items() if k.startswith(("agents", "events")))
    status_patches = (_operator_counter(op_after, "commandnet_operator_status_patches_total")
                      - _operator_counter(op_before, "commandnet_operator_status_patches_total"))
    phase_changes = sum(phases_seen) / agents
    window = float(_default("status_window"))
    return {
        "graph": "e2e.graphs:Hello (3 nodes, delay 0)",
        "agents": agents,
        "create_rate_per_s": {"asked": rate, "achieved": achieved},
        "apply_to_succeeded_s": {"p50": round(quantile(to_succeeded, 0.5), 3),
                                 "p99": round(quantile(to_succeeded, 0.99), 3),
                                 "max": round(max(to_succeeded), 3)},
        "apply_to_succeeded_p50_first_vs_last_created_s": backlog,
        "cpu_cores_used_during_run": cores,
        "apply_to_pending_s": {"p50": round(quantile(to_pending, 0.5), 3),
                               "p99": round(quantile(to_pending, 0.99), 3)},
        "apply_to_bucket_succeeded_s": {"p50": round(quantile(to_bucket_done, 0.5), 3),
                                        "p99": round(quantile(to_bucket_done, 0.99), 3),
                                        "n": len(to_bucket_done)},
        "phase_changes_per_agent": round(phase_changes, 3),
        "agents_seen_running": running_seen,
        "apiserver_writes_per_agent": per_agent,
        "apiserver_writes_per_agent_total": round(sum(kinds.values()) / agents, 3),
        "apiserver_writes_per_agent_agents_and_events": round(agent_writes / agents, 3),
        "apiserver_write_codes": {k: int(v) for k, v in sorted(codes.items())},
        "watch_modified_events_per_agent": round(sum(watcher.modified.values()) / agents, 3),
        "watch_modified_events_by_change_per_agent": {
            k: round(v / agents, 3) for k, v in watcher.changes.most_common()},
        "status_writes_per_agent": round(
            sum(v for k, v in kinds.items() if k.startswith("agents/status")) / agents, 3),
        "operator_status_patches_per_agent": round(status_patches / agents, 3),
        "coalescing_window_s": window,
        "target_writes_per_agent": round(phase_changes + 1, 3),
    }


async def run_lag(stack: Any, kube: Any, bucket: BucketWatch, agents: int, delay: float,
                  pids: dict[int, str]) -> dict[str, Any]:
    """Run 2: status lag with ``agents`` Six1 Agents in flight at once."""
    from kubernetes_asyncio import client

    namespace = stack.namespace("bench-lag")
    manifests = [_manifest(f"six-{i:04d}", namespace, "Six1", {"name": f"s{i}", "delay": delay})
                 for i in range(agents)]
    async with await kube.api_client() as watch_client, await kube.api_client() as api_client:
        watcher = AgentWatch(watch_client, namespace)
        watcher.start()
        await asyncio.wait_for(watcher.started.wait(), 30)
        await asyncio.sleep(1.0)
        before = histogram(await asyncio.to_thread(stack.operator.metrics), LAG_METRIC)
        op_before = await asyncio.to_thread(stack.operator.metrics)
        console.print(f"run 2: creating {agents} Six1 Agents (delay {delay:g}s per node)")
        cpu_before, started = _cpu(pids), time.monotonic()
        _, achieved = await _create_all(client.CustomObjectsApi(api_client), namespace,
                                        manifests, None)
        await _wait_finished(watcher, agents, 1800, "Six1 Agents", stack)
        seconds = time.monotonic() - started
        cores = _cpu_delta(cpu_before, _cpu(pids), seconds)
        await _quiet(watcher)
        op_after = await asyncio.to_thread(stack.operator.metrics)
        after = histogram(op_after, LAG_METRIC)
        await watcher.stop()

    lags = staleness(bucket, watcher)
    shown_values = sum(len(v) for v in watcher.progress.values())
    patches = {result: _operator_counter(op_after, "commandnet_operator_status_patches_total",
                                         result=result)
               - _operator_counter(op_before, "commandnet_operator_status_patches_total",
                                   result=result)
               for result in ("ok", "conflict", "gone", "error")}
    deltas = {("+Inf" if b == float("inf") else f"{b:g}"): int(after[b] - before.get(b, 0))
              for b in sorted(after)}
    return {
        "graph": f"e2e.graphs:Six1 (6 nodes, delay {delay:g}s per node)",
        "agents": agents,
        "create_rate_per_s": {"asked": "as fast as possible", "achieved": achieved},
        "peak_agents_in_flight": watcher.peak_unfinished,
        "seconds": round(seconds, 1),
        "cpu_cores_used_during_run": cores,
        "histogram_status_lag_s": {"p50": histogram_quantile(before, after, 0.5),
                                   "p99": histogram_quantile(before, after, 0.99)},
        "histogram_bucket_counts_cumulative": deltas,
        "watched_staleness_s": {"p50": round(quantile(lags, 0.5), 3),
                                "p99": round(quantile(lags, 0.99), 3),
                                "max": round(max(lags), 3) if lags else None,
                                "bucket_values": len(lags),
                                "status_changes_seen_on_agents": shown_values},
        "operator_status_patches": {k: int(v) for k, v in patches.items()},
        "operator_status_patches_per_s": round(patches["ok"] / seconds, 1),
        "status_writes_per_second_setting": float(_default("status_writes_per_second")),
    }


# ---------------------------------------------------------------------------- the stack


def _start_cluster(workdir: Path, controllers: bool) -> Any:
    from e2e.testbed import CONTROL_PLANE_TOOLS, start_cluster

    return start_cluster(workdir, CONTROL_PLANE_TOOLS if controllers else CONTROL_PLANE_TOOLS[:2])


async def _both(stack: Any, kube: Any, args: argparse.Namespace, pids: dict[int, str]
                ) -> dict[str, Any]:
    bucket = BucketWatch(stack.nats.url)
    await bucket.start()
    try:
        out: dict[str, Any] = {}
        if args.agents:
            out["apply_to_succeeded"] = await run_apply(stack, kube, bucket, args.agents,
                                                        args.rate, pids)
        if args.running:
            out["status_lag"] = await run_lag(stack, kube, bucket, args.running, args.delay,
                                           pids)
        return out
    finally:
        await bucket.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, run both cases, stop everything (also on failure)."""
    from commandnet.local.postgres import PostgresServer
    from e2e.operator_stack import OperatorStack

    base = Path(tempfile.mkdtemp(prefix="commandnet-bench-operator-"))
    os.chmod(base, 0o755)  # PostgreSQL may run as another user: it must enter
    kube = pg = stack = None
    try:
        console.print(f"starting the control plane, PostgreSQL, NATS, {args.workers} "
                      f"workers and the operator in {base}")
        kube = _start_cluster(base / "kube", args.controllers)
        pg = PostgresServer(base / "pg", max_connections=300).start()
        dsn = pg.create_database("bench_operator")
        (base / "stack").mkdir()
        stack = OperatorStack(kube, base / "stack", dsn, pool=POOL, workers=args.workers)
        # The operator runs with its default settings, unless --operator-setting says otherwise.
        stack.start(**dict(item.split("=", 1) for item in args.operator_setting))
        results = asyncio.run(_both(stack, kube, args, _pids(stack, kube, pg)))
        results["setup"] = {
            "control_plane": "etcd + kube-apiserver + controllers" if args.controllers
            else "etcd + kube-apiserver (envtest shape)",
            "workers": args.workers,
            "operator_settings": {"status_window": _default("status_window"),
                                  "status_writes_per_second":
                                      _default("status_writes_per_second")},
        }
        return results
    except BaseException:
        if stack is not None and stack.operator is not None:
            console.print(f"[red]operator log tail:[/red]\n{stack.operator_log_tail(4000)}")
        raise
    finally:
        if stack is not None:
            with contextlib.suppress(Exception):
                stack.stop()
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.stop()
        if kube is not None:
            with contextlib.suppress(Exception):
                kube.stop()
        if args.keep:
            console.print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "" if value.get("value") is None else f"{value['value']:g}"
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _tables(results: dict[str, Any]) -> None:
    targets: dict[str, bool | None] = {}
    table = Table(title="operator: latency")
    for column in ("case", "agents", "rate/s", "p50 s", "p99 s", "target", "met"):
        table.add_column(column, justify="left" if column == "case" else "right")
    one = results.get("apply_to_succeeded")
    if one:
        p50 = one["apply_to_succeeded_s"]["p50"]
        targets["apply_to_succeeded_p50<=1s"] = p50 <= 1.0
        table.add_row("apply → Succeeded (Hello)", str(one["agents"]),
                      _fmt(one["create_rate_per_s"]["achieved"]), _fmt(p50),
                      _fmt(one["apply_to_succeeded_s"]["p99"]), "p50 ≤ 1", str(p50 <= 1.0))
        table.add_row("  apply → Pending", "", "", _fmt(one["apply_to_pending_s"]["p50"]),
                      _fmt(one["apply_to_pending_s"]["p99"]), "", "")
        table.add_row("  apply → bucket succeeded (workers)", "", "",
                      _fmt(one["apply_to_bucket_succeeded_s"]["p50"]),
                      _fmt(one["apply_to_bucket_succeeded_s"]["p99"]), "", "")
    two = results.get("status_lag")
    if two:
        hist = two["histogram_status_lag_s"]
        p99 = hist["p99"]["value"]
        met = p99 is not None and p99 <= 2.0
        targets["status_lag_p99<=2s"] = met
        bucket = hist["p99"]["bucket"]
        table.add_row("status lag, operator histogram (Six1)", str(two["agents"]),
                      _fmt(two["create_rate_per_s"]["achieved"]), _fmt(hist["p50"]),
                      _fmt(hist["p99"]) or f"> {bucket[0]:g}" if bucket else "",
                      "p99 ≤ 2", str(met))
        stale = two["watched_staleness_s"]
        table.add_row("  bucket seen → Agent status seen (bench)", "", "", _fmt(stale["p50"]),
                      _fmt(stale["p99"]), "", "")
    console.print(table)
    if one:
        writes = Table(title=f"API-server writes per Agent (run 1, {one['agents']} Agents)")
        writes.add_column("kind")
        writes.add_column("per Agent", justify="right")
        for kind, value in one["apiserver_writes_per_agent"].items():
            writes.add_row(kind, f"{value:g}")
        writes.add_row("total", f"{one['apiserver_writes_per_agent_total']:g}")
        writes.add_row("phase changes per Agent (watch)", f"{one['phase_changes_per_agent']:g}")
        writes.add_row("target: phase changes + 1 window", f"{one['target_writes_per_agent']:g}")
        console.print(writes)
        target = one["target_writes_per_agent"]
        targets["status_writes_per_agent<=phase_changes+1"] = (
            one["status_writes_per_agent"] <= target)
        targets["all_writes_per_agent<=phase_changes+1"] = (
            one["apiserver_writes_per_agent_total"] <= target)
        changes = Table(title="what each Agent write changed (watch, MODIFIED events per Agent)")
        changes.add_column("change")
        changes.add_column("per Agent", justify="right")
        for kind, value in one["watch_modified_events_by_change_per_agent"].items():
            changes.add_row(kind, f"{value:g}")
        console.print(changes)
    results["targets"] = targets
    console.print(f"targets: {targets}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=500, help="run 1 Agents (0: skip)")
    parser.add_argument("--rate", type=float, default=50.0, help="run 1 creates per second")
    parser.add_argument("--running", type=int, default=1000, help="run 2 Agents (0: skip)")
    parser.add_argument("--delay", type=float, default=2.0, help="run 2 seconds per node")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--operator-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="an operator setting (COMMANDNET_NAME), e.g. "
                             "status_writes_per_second=200; repeatable")
    parser.add_argument("--controllers", action="store_true",
                        help="also start kube-controller-manager and kube-scheduler")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--no-save", action="store_true", help="do not write results.json")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg": os.getloadavg()},
        **run(args),
    }
    _tables(report)
    if args.no_save:
        return
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous["operator"] = report
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    console.print(f"written to {RESULTS} (key \"operator\")")


if __name__ == "__main__":
    main()
