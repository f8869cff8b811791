"""``make bench-scale``: 100,000 agents in flight on 2 workers (issue 12, part 3).

Against a durable PostgreSQL and NATS JetStream (file storage), started as
:mod:`bench.distributed` starts them, this bench triggers ``--agents`` (100,000) agents of a
3-step chain (the last three nodes of the linear example, ``Step7 -> Step8 -> Step9``) and lets
2 ``commandnet worker`` processes (default settings) run them all. With ``--arrival backlog``
(the default) every agent is triggered before the workers start, as when a burst reaches a pool
scaled to zero: all of them are in flight at once, waiting in the stream. With ``live`` the
workers run while agents arrive as fast as the trigger path takes them.

Triggering goes through :meth:`commandnet.Engine.trigger_agent`, as an application does: a fixed
number of coroutines take the next id from a counter, so nothing per agent is held in memory.

Reported (printed, and written under ``"scale"`` in ``bench/results.json``):

- worker RSS over time (``VmRSS`` from ``/proc`` every ``--sample-every`` s), with nats-server
  and the bench process beside them; ``bounded`` means the second half of the run did not raise
  the peak of the first half by more than 5 % (the workers stopped growing);
- PostgreSQL tables and indexes when empty, when every agent is triggered, and at the end:
  ``pg_total_relation_size``, ``pg_indexes_size``, live and dead tuples, HOT updates, sequential
  scans, and whether autovacuum ran (``pg_stat_user_tables``);
- that every agent finished: counts by status, and every history exact (3 rows, steps 1..3, the
  chain's nodes in order, the context visited the three nodes once);
- the repair loops: stalled-agent re-publishes and outbox re-publishes (calls and rows of their
  statements in ``pg_stat_statements``; agents whose ``republished_at`` is set), status-resync
  replays, the workers' lease outcomes (``/metrics``), messages stored in the work stream
  against transitions (at most one per transition unless something was re-published or renewed;
  a step handed over inside its worker stores none), and nats-server's own message totals;
- the statements that took the most database time (a slow query shows up there).

``--png`` draws worker RSS, agents running and the stream backlog over time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import asyncpg  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from commandnet.local.nats import NatsServer
from commandnet.local.postgres import PostgresServer

from . import distributed
from .distributed import READY_TIMEOUT, BenchError, bench_servers

RESULTS = Path(__file__).with_name("results.json")
PNG = Path(__file__).with_name("scale_rss.png")
POOL = "scale"
GRAPH = "commandnet.examples.linear:Step7"  # Step7 -> Step8 -> Step9: a 3-step chain
NODES = ("Step7", "Step8", "Step9")
STEPS = len(NODES)
TRIGGER_CONCURRENCY = 64
TABLES = ("agents", "history", "outbox", "sweeps")
PROGRESS_EVERY = 10.0

console = Console()


# ---------------------------------------------------------------------------- sampling


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (``VmRSS``), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


class Sampler:
    """Every ``every`` s: RSS of the workers, nats-server and this process, agents running,
    the pool's stream backlog and the tables' total sizes. Also prints progress."""

    def __init__(self, conn: asyncpg.Connection, bus: Any, nats_pid: int, every: float) -> None:
        self.conn, self.bus, self.nats_pid, self.every = conn, bus, nats_pid, every
        self.workers: dict[str, int] = {}  # name -> pid
        self.samples: list[dict[str, Any]] = []
        self.triggered = 0
        self.started = time.monotonic()
        self.phase = "setup"
        self._task: asyncio.Task[None] | None = None
        self._printed = 0.0
        self._lock = asyncio.Lock()  # one query at a time on the sampler's own connection

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="bench-scale-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # a sample missed, not the run
                console.print(f"[yellow]sample failed: {type(exc).__name__}: {exc}[/yellow]")
            await asyncio.sleep(self.every)

    async def sample(self) -> dict[str, Any]:
        async with self._lock:
            return await self._sample()

    async def _sample(self) -> dict[str, Any]:
        at = round(time.monotonic() - self.started, 1)
        running = await self.conn.fetchval("SELECT count(*) FROM agents WHERE status = 'running'")
        sizes = await self.conn.fetchrow(
            "SELECT " + ", ".join(f"pg_total_relation_size('{t}') AS {t}" for t in TABLES))
        stream = await _stream_state(self.bus)
        workers_rss = {name: rss_mb(pid) for name, pid in self.workers.items()}
        tables_mb = {t: round(int(sizes[t]) / 2**20, 2) for t in TABLES}
        row: dict[str, Any] = {
            "t": at, "phase": self.phase, "triggered": self.triggered, "running": int(running),
            "stream_messages": stream["messages"],
            "workers_rss_mb": workers_rss,
            "nats_rss_mb": rss_mb(self.nats_pid), "bench_rss_mb": rss_mb(os.getpid()),
            "tables_mb": tables_mb,
        }
        self.samples.append(row)
        if at - self._printed >= PROGRESS_EVERY or not self._printed:
            self._printed = at
            rss = " ".join(f"{v}" for v in workers_rss.values()) or "-"
            console.print(f"[dim]{at:7.1f}s {self.phase:>9}: triggered {self.triggered:,}, "
                          f"running {row['running']:,}, stream {row['stream_messages']:,}, "
                          f"worker RSS MiB {rss}, nats {row['nats_rss_mb']}, "
                          f"tables {sum(tables_mb.values()):.0f} MiB"
                          "[/dim]")
        return row


# ---------------------------------------------------------------------------- figures


async def _stream_state(bus: Any) -> dict[str, int]:
    """The work stream's stored messages now and its last sequence (messages ever stored)."""
    info = await bus.jetstream().stream_info(bus.stream)
    return {"messages": int(info.state.messages), "last_seq": int(info.state.last_seq)}


async def _nats_figures(bus: Any) -> dict[str, Any]:
    js = bus.jetstream()
    stream = await _stream_state(bus)
    found: dict[str, Any] = {"stream": stream}
    with contextlib.suppress(Exception):
        consumer = await js.consumer_info(bus.stream, bus.consumer)
        found["consumer"] = {"num_pending": int(consumer.num_pending or 0),
                             "num_ack_pending": int(consumer.num_ack_pending or 0),
                             "num_redelivered": int(consumer.num_redelivered or 0),
                             "delivered_stream_seq": int(consumer.delivered.stream_seq or 0)}
    with contextlib.suppress(Exception):
        kv = await js.stream_info(f"KV_{bus.status_bucket}")
        found["status_bucket"] = {"keys": int(kv.state.messages),
                                  "mb": round(int(kv.state.bytes) / 2**20, 2),
                                  "writes": int(kv.state.last_seq)}
    with contextlib.suppress(Exception):
        dlq = await js.stream_info(bus.dlq_stream)
        found["dead_letters"] = int(dlq.state.messages)
    return found


async def table_stats(conn: asyncpg.Connection) -> dict[str, Any]:
    """Sizes and vacuum figures of the store's tables, and the size of every index."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        "SELECT relname, pg_total_relation_size(relid) AS total, pg_relation_size(relid) AS heap,"
        " pg_indexes_size(relid) AS indexes, n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd,"
        " n_tup_hot_upd, n_tup_del, seq_scan, seq_tup_read, idx_scan, autovacuum_count,"
        " autoanalyze_count, vacuum_count, last_autovacuum IS NOT NULL AS autovacuumed"
        " FROM pg_stat_user_tables WHERE relname = ANY($1::text[]) ORDER BY relname",
        list(TABLES))
    indexes = await conn.fetch(
        "SELECT relname, indexrelname, pg_relation_size(indexrelid) AS bytes, idx_scan "
        "FROM pg_stat_user_indexes WHERE relname = ANY($1::text[]) ORDER BY indexrelname",
        list(TABLES))
    mb = 2**20
    tables: dict[str, Any] = {}
    for r in rows:
        updates = int(r["n_tup_upd"])
        tables[r["relname"]] = {
            "total_mb": round(r["total"] / mb, 2), "heap_mb": round(r["heap"] / mb, 2),
            "indexes_mb": round(r["indexes"] / mb, 2),
            "live_tuples": int(r["n_live_tup"]), "dead_tuples": int(r["n_dead_tup"]),
            "inserts": int(r["n_tup_ins"]), "updates": updates, "deletes": int(r["n_tup_del"]),
            "hot_update_pct": round(100 * int(r["n_tup_hot_upd"]) / updates, 1) if updates
            else None,
            "seq_scans": int(r["seq_scan"]), "seq_tuples_read": int(r["seq_tup_read"]),
            "index_scans": int(r["idx_scan"] or 0),
            "autovacuum_count": int(r["autovacuum_count"]),
            "autoanalyze_count": int(r["autoanalyze_count"]),
            "autovacuum_ran": bool(r["autovacuumed"]),
            "index_mb": {i["indexrelname"]: round(i["bytes"] / mb, 2)
                         for i in indexes if i["relname"] == r["relname"]},
        }
    return tables


# pg_stat_statements markers of the repair loops' statements (commandnet/adapters/postgres.py).
_REPAIR = (("stalled_republish", "SET republished_at = now()"),
           ("outbox_sweep", "FROM outbox o JOIN agents"),
           ("status_resync", "ORDER BY updated_at, agent_id"),
           ("sweep_claim", "INSERT INTO sweeps"))
_KINDS = (*_REPAIR, ("lease", "WITH granted AS"), ("commit", "WITH moved AS"),
          ("create", "WITH ins AS"), ("outbox_clear", "DELETE FROM outbox"),
          ("extend", "SET lease_until = now() +"), ("get", "FROM agents WHERE agent_id = $1"))


def _kind(query: str) -> str:
    return next((k for k, marker in _KINDS if marker in query), "other")


async def statement_figures(conn: asyncpg.Connection, database: str) -> dict[str, Any]:
    """Calls and rows of the repair loops' statements, and the costliest statements."""
    rows = await conn.fetch(
        "SELECT query, calls, rows, total_exec_time, mean_exec_time, max_exec_time "
        "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 "
        "AND query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%pg_total_relation_size%' "
        "AND query NOT ILIKE '%count(*) FROM agents%' AND query NOT ILIKE '%FROM history h%' "
        "AND query NOT ILIKE '%CREATE EXTENSION%'", database)
    repair = {name: {"calls": 0, "rows": 0} for name, _ in _REPAIR}
    by_kind: dict[str, dict[str, float]] = {}
    for r in rows:
        kind = _kind(r["query"])
        if kind in repair:
            repair[kind]["calls"] += int(r["calls"])
            repair[kind]["rows"] += int(r["rows"])
        entry = by_kind.setdefault(kind, {"calls": 0, "rows": 0, "total_ms": 0.0,
                                          "max_ms": 0.0})
        entry["calls"] += int(r["calls"])
        entry["rows"] += int(r["rows"])
        entry["total_ms"] += float(r["total_exec_time"])
        entry["max_ms"] = max(entry["max_ms"], float(r["max_exec_time"]))
    costliest = sorted(by_kind.items(), key=lambda kv: -kv[1]["total_ms"])
    return {
        "repair": repair,
        "by_total_time": [
            {"kind": k, "calls": int(v["calls"]), "rows": int(v["rows"]),
             "total_s": round(v["total_ms"] / 1000, 2),
             "mean_ms": round(v["total_ms"] / v["calls"], 3) if v["calls"] else 0.0,
             "max_ms": round(v["max_ms"], 1)}
            for k, v in costliest[:10]],
    }


async def check_agents(conn: asyncpg.Connection, agents: int) -> dict[str, Any]:
    """Counts by status, and whether every history is exact (raises BenchError if not)."""
    by_status = {r["status"]: int(r["n"]) for r in await conn.fetch(
        "SELECT status, count(*) AS n FROM agents WHERE pool = $1 GROUP BY status", POOL)}
    wrong_rows = await conn.fetchval(
        "SELECT count(*) FROM agents WHERE pool = $1 AND (status <> 'succeeded' OR step <> $2 "
        "OR context -> 'visited' <> $3::jsonb)", POOL, STEPS, json.dumps(list(NODES)))
    chain = [(i + 1, NODES[i], NODES[i + 1] if i + 1 < STEPS else None) for i in range(STEPS)]
    wrong_history = await conn.fetchval(
        "WITH h AS (SELECT agent_id, count(*) AS n, bool_and((step, from_node, "
        "coalesce(to_node, '')) IN (SELECT s, f, coalesce(t, '') FROM unnest($2::int[], "
        "$3::text[], $4::text[]) AS c(s, f, t))) AS ok FROM history GROUP BY agent_id) "
        "SELECT (SELECT count(*) FROM agents a WHERE a.pool = $1 AND NOT EXISTS "
        "(SELECT 1 FROM h WHERE h.agent_id = a.agent_id AND h.n = $5 AND h.ok)) "
        "+ (SELECT count(*) FROM h WHERE h.n <> $5 OR NOT h.ok)",
        POOL, [c[0] for c in chain], [c[1] for c in chain], [c[2] for c in chain], STEPS)
    transitions = int(await conn.fetchval("SELECT count(*) FROM history"))
    republished = int(await conn.fetchval(
        "SELECT count(*) FROM agents WHERE republished_at IS NOT NULL"))
    outbox_left = int(await conn.fetchval("SELECT count(*) FROM outbox"))
    result = {
        "by_status": by_status, "transitions": transitions,
        "agents_with_wrong_row": int(wrong_rows), "agents_with_wrong_history": int(wrong_history),
        "agents_republished_by_reconciler": republished, "outbox_rows_left": outbox_left,
    }
    result["all_finished_exactly"] = (
        by_status == {"succeeded": agents} and not wrong_rows and not wrong_history
        and transitions == agents * STEPS)
    if not result["all_finished_exactly"]:
        raise BenchError(f"agents did not all finish exactly: {result}")
    return result


def _varz(nats: NatsServer) -> dict[str, int]:
    """Messages and bytes nats-server received and sent so far (its monitoring ``/varz``)."""
    with urllib.request.urlopen(f"{nats.monitor_url}/varz", timeout=5) as response:
        varz = json.loads(response.read())
    return {k: int(varz[k]) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}


def _metrics(port: int) -> dict[str, float]:
    """The worker's lease, redelivery and dead-letter counters (``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "commandnet_leases_total":
                key = f"leases_{sample.labels['result']}"
            elif sample.name in ("commandnet_redeliveries_total", "commandnet_dead_letters_total",
                                 "commandnet_lease_conflicts_total",
                                 "commandnet_transitions_total"):
                key = sample.name.removeprefix("commandnet_").removesuffix("_total")
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


def rss_summary(samples: list[dict[str, Any]], name: str, until: float) -> dict[str, Any]:
    """One worker's RSS: once it was ready, peak, at the end, and whether it stopped growing
    (the second half of the run up to ``until`` raised the first half's peak by <= 5 %)."""
    series = [(s["t"], s["workers_rss_mb"].get(name)) for s in samples
              if s["phase"] != "starting"]  # from ready on, not the interpreter's start-up
    series = [(t, v) for t, v in series if v is not None]
    if not series:
        return {"samples": 0}
    start = series[0][0]
    middle = start + (until - start) / 2
    first = [v for t, v in series if t <= middle] or [series[0][1]]
    second = [v for t, v in series if middle < t <= until] or first
    growth = max(second) - max(first)
    return {
        "samples": len(series), "first_mb": series[0][1], "peak_mb": max(v for _, v in series),
        "end_mb": series[-1][1], "peak_first_half_mb": max(first),
        "peak_second_half_mb": max(second), "growth_second_half_mb": round(growth, 1),
        "bounded": growth <= 0.05 * max(first),
    }


# ---------------------------------------------------------------------------- the run


async def run_case(pg: PostgresServer, nats: NatsServer, log_dir: Path, *, agents: int,
                   workers: int, arrival: str, sample_every: float,
                   idle_after: float) -> dict[str, Any]:
    """Trigger ``agents`` agents, let ``workers`` workers run them; the figures."""
    from commandnet.adapters.nats import JetStreamBus
    from commandnet.adapters.postgres import PostgresPersistence
    from commandnet.engine import Engine
    from commandnet.examples.linear import CHAIN

    start = CHAIN[-STEPS]
    assert start.node_name == NODES[0], start.node_name

    database = "bench_scale"
    dsn = pg.create_database(database)
    store = PostgresPersistence(dsn, min_size=1, max_size=TRIGGER_CONCURRENCY)
    await store.setup()  # the schema before the workers start: they would race to migrate it
    bus = JetStreamBus(nats.url, pool=POOL)
    engine = Engine(store, bus, graphs=[start])
    await engine.start()  # creates the stream (the workers create the pool's consumer)
    conn = await asyncpg.connect(dsn)
    sampler_conn = await asyncpg.connect(dsn)
    procs: list[distributed._Worker] = []
    sampler = Sampler(sampler_conn, bus, nats.process.pid if nats.process else -1, sample_every)
    result: dict[str, Any] = {"agents": agents, "steps": STEPS, "workers": workers,
                              "arrival": arrival, "graph": f"{GRAPH} (Step7 -> Step8 -> Step9)"}
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        tables = {"empty": await table_stats(conn)}
        first_seq = (await _stream_state(bus))["last_seq"]
        varz_before = await asyncio.to_thread(_varz, nats)
        sampler.start()
        t0 = time.monotonic()

        async def start_workers() -> None:
            sampler.phase = "starting"
            # The distributed bench's worker runs its module-level GRAPH; this bench's graph
            # is the 3-step tail of the same example.
            with mock.patch.object(distributed, "GRAPH", GRAPH):
                procs.extend(distributed._Worker(i, POOL, dsn, nats.url, log_dir)
                             for i in range(workers))
            sampler.workers = {f"worker{i}": w.proc.pid for i, w in enumerate(procs)}

            async def all_ready() -> bool:
                return all(await asyncio.gather(*(asyncio.to_thread(w.ready) for w in procs)))

            await distributed._wait(all_ready, READY_TIMEOUT, f"{workers} workers to be ready")
            sampler.phase = "running"

        if arrival == "live":
            await start_workers()
        sampler.phase = "trigger" if arrival == "backlog" else "trigger+run"
        bench_rss_before = rss_mb(os.getpid())
        trigger_started = time.monotonic()
        ids = itertools.count()

        async def trigger() -> None:  # one of TRIGGER_CONCURRENCY: no list of agents anywhere
            while (n := next(ids)) < agents:
                await engine.trigger_agent(f"{POOL}-{n}", start, {"visited": []})
                sampler.triggered += 1

        await asyncio.gather(*(trigger() for _ in range(TRIGGER_CONCURRENCY)))
        trigger_seconds = time.monotonic() - trigger_started
        result["trigger"] = {
            "seconds": round(trigger_seconds, 1),
            "agents_per_s": round(agents / trigger_seconds),
            "concurrency": TRIGGER_CONCURRENCY,
            "bench_rss_mb_before": bench_rss_before, "bench_rss_mb_after": rss_mb(os.getpid()),
        }
        at_trigger_end = await sampler.sample()
        tables["triggered"] = await table_stats(conn)
        if arrival == "backlog":
            await start_workers()
        run_started = time.monotonic()

        async def finished() -> bool:
            for w in procs:
                if w.proc.poll() is not None:
                    raise BenchError(f"worker {w.log_path.name} died: "
                                     f"{w.log_path.read_text(errors='replace')[-3000:]}")
            left = await conn.fetchval("SELECT count(*) FROM agents WHERE status = 'running'")
            return not left

        await distributed._wait(finished, 120 + agents * STEPS / 200, f"{agents} agents to "
                                "finish", interval=2.0)
        done = time.monotonic()
        sampler.phase = "idle"
        await asyncio.sleep(idle_after)  # does anything move (or grow) once all is done?
        await sampler.sample()
        metrics: dict[str, float] = {}
        for w in procs:
            for key, value in (await asyncio.to_thread(_metrics, w.port)).items():
                metrics[key] = metrics.get(key, 0.0) + value
        await sampler.stop()
        nats_figures = await _nats_figures(bus)
        varz_after = await asyncio.to_thread(_varz, nats)
        nats_figures["server_totals"] = {k: v - varz_before[k] for k, v in varz_after.items()}
        # Backends report their table statistics when they exit: stop the workers first.
        for w in procs:
            await asyncio.to_thread(w.stop)
        await engine.stop()
        await asyncio.sleep(1.0)
        tables["finished"] = await table_stats(conn)
        statements = await statement_figures(conn, database)
        agents_check = await check_agents(conn, agents)
    finally:
        await sampler.stop()
        for w in procs:
            w.stop()
        await engine.stop()
        await conn.close()
        await sampler_conn.close()
    transitions = agents_check["transitions"]
    stored = nats_figures["stream"]["last_seq"] - first_seq
    finish_at = done - t0
    workers_rss = {name: rss_summary(sampler.samples, name, finish_at)
                   for name in sampler.workers}
    result.update(
        seconds={"trigger": round(trigger_seconds, 1), "run": round(done - run_started, 1),
                 "total": round(finish_at, 1)},
        transitions_per_s=round(transitions / (done - (run_started if arrival == "backlog"
                                                         else trigger_started))),
        in_flight={"peak_running": max(s["running"] for s in sampler.samples),
                   "peak_stream_messages": max(s["stream_messages"] for s in sampler.samples),
                   "running_when_triggered": at_trigger_end["running"],
                   "stream_messages_when_triggered": at_trigger_end["stream_messages"]},
        rss=workers_rss,
        rss_bounded=all(r.get("bounded", False) for r in workers_rss.values()),
        nats_rss_mb_peak=max((s["nats_rss_mb"] or 0) for s in sampler.samples),
        tables=tables,
        agents_check=agents_check,
        repair={
            **statements["repair"],
            "agents_republished_by_reconciler": agents_check["agents_republished_by_reconciler"],
            "stream_messages_stored": stored,
            "transitions": transitions,
            "extra_stream_messages": stored - transitions,
            "worker_metrics": {k: int(v) for k, v in sorted(metrics.items())},
        },
        nats=nats_figures,
        nats_messages_in_per_transition=round(
            nats_figures["server_totals"]["in_msgs"] / max(1, transitions), 2),
        statements_by_total_time=statements["by_total_time"],
        series=_series(sampler.samples),
    )
    return result


def _series(samples: list[dict[str, Any]], points: int = 400) -> list[dict[str, Any]]:
    """The samples, thinned to at most ``points`` (for results.json and the PNG)."""
    step = max(1, -(-len(samples) // points))
    keep = samples[::step]
    if samples and keep[-1] is not samples[-1]:
        keep.append(samples[-1])
    return keep


def run_scale(agents: int = 100_000, *, workers: int = 2, arrival: str = "backlog",
              sample_every: float = 2.0, idle_after: float = 6.0) -> dict[str, Any]:
    """Start PostgreSQL and NATS, run the case, stop everything; the figures."""
    if arrival not in ("backlog", "live"):
        raise ValueError(f"arrival must be 'backlog' or 'live', not {arrival!r}")
    with bench_servers("commandnet-bench-scale-") as (pg, nats, log_dir):
        return asyncio.run(run_case(pg, nats, log_dir, agents=agents, workers=workers,
                                    arrival=arrival, sample_every=sample_every,
                                    idle_after=idle_after))


# ---------------------------------------------------------------------------- report


def print_report(r: dict[str, Any]) -> None:
    """The figures as rich tables."""
    head = Table(title=f"scale: {r['agents']:,} agents x {r['steps']} steps, {r['workers']} "
                       f"workers, arrival {r['arrival']}")
    head.add_column("figure")
    head.add_column("value", justify="right")
    check = r["agents_check"]
    rows = [
        ("trigger (agents/s)", f"{r['seconds']['trigger']} s ({r['trigger']['agents_per_s']:,}/s)"),
        ("run until all finished", f"{r['seconds']['run']} s"),
        ("transitions/s", f"{r['transitions_per_s']:,}"),
        ("peak agents running / stream messages",
         f"{r['in_flight']['peak_running']:,} / {r['in_flight']['peak_stream_messages']:,}"),
        ("by status", ", ".join(f"{k} {v:,}" for k, v in check["by_status"].items())),
        ("every history exact", str(check["all_finished_exactly"])),
        ("bench process RSS before / after trigger (MiB)",
         f"{r['trigger']['bench_rss_mb_before']} / {r['trigger']['bench_rss_mb_after']}"),
        ("nats-server RSS peak (MiB)", str(r["nats_rss_mb_peak"])),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)

    rss = Table(title="worker RSS (MiB)")
    for col in ("worker", "first", "peak", "end", "peak 1st half", "peak 2nd half", "bounded"):
        rss.add_column(col, justify="right")
    for name, s in r["rss"].items():
        rss.add_row(name, *(str(s.get(k)) for k in (
            "first_mb", "peak_mb", "end_mb", "peak_first_half_mb", "peak_second_half_mb",
            "bounded")))
    console.print(rss)

    tab = Table(title="PostgreSQL tables: total (indexes) MiB, dead tuples")
    tab.add_column("table")
    for stage in r["tables"]:
        tab.add_column(stage, justify="right")
    for col in ("HOT upd %", "seq scans", "autovacuum / analyze"):
        tab.add_column(col, justify="right")
    for name in TABLES:
        cells = []
        for stage in r["tables"].values():
            t = stage.get(name)
            cells.append(f"{t['total_mb']} ({t['indexes_mb']}), {t['dead_tuples']:,} dead"
                         if t else "-")
        end = r["tables"]["finished"].get(name, {})
        tab.add_row(name, *cells, str(end.get("hot_update_pct")), str(end.get("seq_scans")),
                    f"{end.get('autovacuum_count')} / {end.get('autoanalyze_count')}")
    console.print(tab)

    rep = Table(title="repair loops and stream")
    rep.add_column("figure")
    rep.add_column("value", justify="right")
    p = r["repair"]
    for name in ("stalled_republish", "outbox_sweep", "status_resync", "sweep_claim"):
        rep.add_row(f"{name}: statements / rows", f"{p[name]['calls']:,} / {p[name]['rows']:,}")
    rep.add_row("agents re-published by the reconciler",
                f"{p['agents_republished_by_reconciler']:,}")
    kv = r["nats"].get("status_bucket", {})
    rep.add_row("status bucket writes / keys", f"{kv.get('writes', 0):,} / {kv.get('keys', 0):,}")
    rep.add_row("nats-server messages in per transition",
                str(r["nats_messages_in_per_transition"]))
    rep.add_row("stream messages stored / transitions",
                f"{p['stream_messages_stored']:,} / {p['transitions']:,} "
                f"(extra {p['extra_stream_messages']:,})")
    for k, v in p["worker_metrics"].items():
        rep.add_row(f"workers: {k}", f"{v:,}")
    console.print(rep)

    top = Table(title="statements by total database time")
    for col in ("kind", "calls", "rows", "total s", "mean ms", "max ms"):
        top.add_column(col, justify="right")
    for s in r["statements_by_total_time"]:
        top.add_row(s["kind"], f"{s['calls']:,}", f"{s['rows']:,}", str(s["total_s"]),
                    str(s["mean_ms"]), str(s["max_ms"]))
    console.print(top)


def plot(r: dict[str, Any], path: Path) -> None:
    """Worker RSS, agents running and the stream backlog over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = r["series"]
    t = [s["t"] for s in series]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in r["rss"]:
        ax.plot(t, [s["workers_rss_mb"].get(name) for s in series], label=f"{name} RSS")
    ax.plot(t, [s["nats_rss_mb"] for s in series], label="nats-server RSS", linestyle=":")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    other = ax.twinx()
    other.plot(t, [s["running"] for s in series], color="grey", linestyle="--",
               label="agents running")
    other.plot(t, [s["stream_messages"] for s in series], color="black", linestyle="-.",
               label="stream messages")
    other.set_ylabel("agents / messages")
    other.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize="small")
    ax.set_title(f"{r['agents']:,} agents x {r['steps']} steps, {r['workers']} workers "
                 f"({r['arrival']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arrival", choices=["backlog", "live"], default="backlog",
                        help="backlog: trigger all, then start the workers; live: workers "
                             "first, agents arriving as fast as they are triggered")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds")
    parser.add_argument("--png", type=Path, default=PNG, help="RSS over time ('' for none)")
    args = parser.parse_args()
    console.print(f"scale bench: {args.agents:,} agents, {args.workers} workers, "
                  f"arrival {args.arrival}; PostgreSQL and NATS starting")
    result = run_scale(args.agents, workers=args.workers, arrival=args.arrival,
                       sample_every=args.sample_every)
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    print_report(result)
    if str(args.png) not in ("", "."):
        plot(result, args.png)
        console.print(f"RSS over time: {args.png}")
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous["scale"] = result
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    console.print(f"written to {RESULTS} (key \"scale\")")


if __name__ == "__main__":
    main()
