"""The distributed benchmark: PostgreSQL (durable commits) + NATS JetStream (file storage).

In one invocation, against the same two servers: the bare-asyncpg reference loop (2 processes),
then commandnet with real ``commandnet worker`` subprocesses running the 10-node linear example
(trivial nodes), agents triggered from this process. Cases:

- ``reference``: :func:`bench.reference.run_reference`, 2 processes.
- ``workers=N saturated`` (N = 1, 2, 4): every agent triggered at once (throughput). The
  reference and ``workers=2`` take :data:`TURNS` turns; each keeps its best turn, and the
  summary gives the ratio of each turn and their median (the target is judged on that).
- ``workers=2 paced``: agents arriving at a steady rate well below capacity (latency).

Step latency is read from the database: for step N of an agent, the commit time of transition
N+1 (``history.at``) minus that of transition N (``agents.created_at`` for the first), i.e.
publish of step N, fetch, lease, run and commit. Both are ``now()`` of single-statement
transactions, so the same clock. It is split into the node's run (``history.duration``) and the
rest, reported as ``queueing``: the time the step waited (in the stream, or for a free slot of a
worker) plus its lease and commit round trips; saturated, that is almost all queueing.
Statements and transactions per transition come from ``pg_stat_statements`` (preloaded into the
throwaway server) and ``pg_stat_database``.

CPU: every case reports the CPU seconds of the workers, PostgreSQL and NATS per transition; the
reference reports its own processes' and PostgreSQL's, measured the same way in the same run.
An independent bound runs the reference's statements (``SELECT ... FOR UPDATE`` and ``UPDATE``
in one durable transaction) from ``pgbench`` (C, prepared statements, as many clients as the
reference has connections) against the same server.

``BENCH_PROFILE_DIR=/some/folder`` runs every worker under cProfile (one ``.prof`` per worker,
written at its graceful exit); ``python -m bench.distributed --agents N --workers W`` runs a
single saturated case, for profiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from commandnet.local.nats import NatsServer
from commandnet.local.postgres import PostgresServer
from commandnet.local.process import free_port

from .reference import run_reference

GRAPH = "commandnet.examples.linear:Start"
TURNS = 3  # the reference and commandnet (2 workers, saturated) take turns this often
START_NODE = "Step0"
STEPS = 10
READY_TIMEOUT = 90.0
TRIGGER_CONCURRENCY = 64
PROFILE_ENV = "BENCH_PROFILE_DIR"  # a folder: each worker runs under cProfile, dumping there


class BenchError(RuntimeError):
    """A benchmark case could not run (a worker died, agents never finished)."""


# ---------------------------------------------------------------------------- servers


def start_postgres(base: Path) -> PostgresServer:
    """A durable cluster (fsync, synchronous_commit on) with pg_stat_statements preloaded."""
    server = PostgresServer(base / "pg", durable=True, max_connections=300)
    server.initdb()
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("\nshared_preload_libraries = 'pg_stat_statements'\n"
                   "pg_stat_statements.track = all\n")
    return server.start()


# ---------------------------------------------------------------------------- workers


class _Worker:
    """One ``commandnet worker`` subprocess; :meth:`stop` always leaves nothing behind."""

    def __init__(self, index: int, pool: str, store: str, bus: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"{pool}-worker{index}.log"
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("COMMANDNET_EXAMPLE_DELAY", None)
        cmd = [sys.executable, "-m", "commandnet.cli.main"] if _no_script() else [_script()]
        profile_dir = os.environ.get(PROFILE_ENV)
        if profile_dir:  # SIGTERM drains, exits 0, and cProfile writes its file
            out = Path(profile_dir) / f"{pool}-worker{index}.prof"
            cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "commandnet.cli.main"]
        self.proc = subprocess.Popen(
            [*cmd, "worker", "--graph", GRAPH, "--pool", pool, "--store", store, "--bus", bus,
             "--worker-id", f"{pool}-w{index}", "--http-host", "127.0.0.1",
             "--http-port", str(self.port), "--log-level", "WARNING"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(f"worker {self.log_path.name} exited with {self.proc.returncode}:"
                             f"\n{self.log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        self._log.close()


def _script() -> str:
    return str(Path(sys.executable).parent / "commandnet")


def _no_script() -> bool:
    return not Path(_script()).exists()


async def _wait(check: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------- one case


async def run_case(pg: PostgresServer, nats: NatsServer, log_dir: Path, *, name: str,
                   workers: int, agents: int, rate: float | None = None) -> dict[str, Any]:
    """Run ``agents`` agents on ``workers`` worker processes; ``rate`` agents/s (None: all)."""
    from commandnet.adapters.nats import JetStreamBus
    from commandnet.adapters.postgres import PostgresPersistence
    from commandnet.engine import Engine
    from commandnet.examples.linear import Start

    pool = name
    database = f"bench_{name}"
    dsn = pg.create_database(database)
    store = PostgresPersistence(dsn, min_size=1, max_size=TRIGGER_CONCURRENCY)
    await store.setup()  # schema before the workers start: they would race to migrate it
    bus = JetStreamBus(nats.url, pool=pool)
    engine = Engine(store, bus, graphs=[Start])
    await engine.start()
    procs: list[_Worker] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        procs = [_Worker(i, pool, dsn, nats.url, log_dir) for i in range(workers)]

        async def all_ready() -> bool:
            return all(await asyncio.gather(*(asyncio.to_thread(w.ready) for w in procs)))

        await _wait(all_ready, READY_TIMEOUT, f"{workers} worker(s) of {name} to be ready")
        await conn.execute("SELECT pg_stat_statements_reset()")
        xacts_before = await _xact_commits(conn, database)
        cpu_before = _cpu_seconds()

        ids = [f"{name}-{i}" for i in range(agents)]
        gate = asyncio.Semaphore(TRIGGER_CONCURRENCY)

        async def trigger(agent_id: str) -> None:
            async with gate:
                await engine.trigger_agent(agent_id, Start, {"visited": []})

        started = time.time()
        if rate is None:
            await asyncio.gather(*(trigger(i) for i in ids))
        else:
            pending = []
            for n, agent_id in enumerate(ids):
                delay = started + n / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(trigger(agent_id)))
            await asyncio.gather(*pending)

        async def finished() -> bool:
            for w in procs:
                if w.proc.poll() is not None:
                    raise BenchError(f"worker {w.log_path.name} died during {name}")
            done = await conn.fetchval(
                "SELECT count(*) FROM agents WHERE status <> 'running'")
            return bool(done >= agents)

        await _wait(finished, 600.0, f"{agents} agents of {name} to finish", 0.2)
        cpu = _cpu_delta(cpu_before, _cpu_seconds(), {w.proc.pid for w in procs},
                         pg.process.pid if pg.process else -1,
                         nats.process.pid if nats.process else -1)
        # Backends report their transaction counts when they exit: stop the workers first.
        for w in procs:
            w.stop()
        await engine.stop()
        await asyncio.sleep(0.5)
        xacts = await _xact_commits(conn, database) - xacts_before
        statements = await _statements(conn, database)
        result = await _figures(conn, agents)
    finally:
        for w in procs:
            w.stop()
        await conn.close()
        await engine.stop()
    transitions = result["transitions"]
    result.update(
        workers=workers,
        sql_calls_per_transition=round(statements["calls"] / transitions, 2),
        sql_calls_per_transition_by_kind=statements["by_kind"],
        transactions_per_transition=round(xacts / transitions, 2),
        cpu_seconds=cpu,
        cpu_ms_per_transition={k: round(v * 1000 / transitions, 3) for k, v in cpu.items()},
        note="SQL counts include triggering (1 create per agent) and the workers' sweeps",
    )
    if rate is not None:
        result["arrivals_per_s"] = rate
    return result


def _cpu_seconds() -> dict[int, tuple[str, int, float]]:
    """CPU seconds (user + system) used so far by every process: pid -> (name, ppid, s).

    A process's figure includes its exited, reaped children (cutime, cstime): the postmaster's
    thus counts the backends of connections closed meanwhile (the reference's pools).
    """
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = (entry / "stat").read_text()
            name = raw[raw.index("(") + 1: raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            found[int(entry.name)] = (name, int(fields[1]), sum(map(int, fields[11:15])) / tick)
    return found


def _cpu_delta(before: dict[int, tuple[str, int, float]],
               after: dict[int, tuple[str, int, float]], workers: set[int],
               postmaster: int, nats: int) -> dict[str, float]:
    """CPU seconds spent during the case by the workers, PostgreSQL, NATS and this process.

    Backends that exited within the window are missed (the workers' stay connected).
    """
    kinds = {"workers": 0.0, "postgres": 0.0, "nats-server": 0.0, "bench process": 0.0}
    me = os.getpid()
    for pid, (name, ppid, seconds) in after.items():
        used = seconds - before.get(pid, (name, ppid, 0.0))[2]
        if pid in workers:
            kinds["workers"] += used
        elif pid == me:
            kinds["bench process"] += used
        elif pid == postmaster or ppid == postmaster:
            kinds["postgres"] += used
        elif pid == nats:
            kinds["nats-server"] += used
    return {k: round(v, 2) for k, v in kinds.items()}


async def _xact_commits(conn: asyncpg.Connection, database: str) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    value = await conn.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database)
    return int(value)


_KINDS = (("lease", "WITH granted AS"), ("commit", "WITH moved AS"),
          ("outbox_clear", "DELETE FROM outbox"), ("create", "WITH ins AS"),
          ("sweep_outbox", "FROM outbox"), ("sweep_stalled", "FROM agents\nWHERE status"),
          ("extend", "SET lease_until = now() +"))


async def _statements(conn: asyncpg.Connection, database: str) -> dict[str, Any]:
    """Calls and mean time of the workload's statements (our own queries left out)."""
    rows = await conn.fetch(
        "SELECT query, calls, mean_exec_time FROM pg_stat_statements s "
        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 "
        "AND query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%count(*) FROM agents%' "
        "AND query NOT ILIKE '%FROM history h%' AND query NOT ILIKE '%CREATE EXTENSION%'",
        database)
    total = sum(int(r["calls"]) for r in rows)
    transitions = max(1, (await conn.fetchval("SELECT count(*) FROM history")))
    by_kind: dict[str, dict[str, float]] = {}
    for r in rows:
        kind = next((k for k, marker in _KINDS if marker in r["query"]), "other")
        entry = by_kind.setdefault(kind, {"calls": 0.0, "ms_total": 0.0})
        entry["calls"] += int(r["calls"])
        entry["ms_total"] += float(r["mean_exec_time"]) * int(r["calls"])
    shaped = {k: {"per_transition": round(v["calls"] / transitions, 3),
                  "mean_ms": round(v["ms_total"] / v["calls"], 3) if v["calls"] else 0.0}
              for k, v in sorted(by_kind.items())}
    return {"calls": total, "by_kind": shaped}


async def _figures(conn: asyncpg.Connection, agents: int) -> dict[str, Any]:
    """Throughput, step latency and its split (node run, queueing) from agents and history."""
    bad = await conn.fetchval(
        "SELECT count(*) FROM agents WHERE status <> 'succeeded' OR step <> $1", STEPS)
    if bad:
        raise BenchError(f"{bad} agent(s) did not succeed with step {STEPS}")
    rows = await conn.fetch(
        "SELECT extract(epoch FROM h.at - coalesce(lag(h.at) OVER w, a.created_at))::float8 "
        "AS gap, h.duration, h.step FROM history h JOIN agents a USING (agent_id) "
        "WINDOW w AS (PARTITION BY h.agent_id ORDER BY h.step)")
    span = await conn.fetchrow(
        "SELECT extract(epoch FROM max(h.at) - min(a.created_at))::float8 AS seconds, "
        "count(*) AS transitions FROM history h JOIN agents a USING (agent_id)")
    gaps = sorted(float(r["gap"]) for r in rows)
    runs = sorted(float(r["duration"]) for r in rows)
    waits = sorted(float(r["gap"]) - float(r["duration"]) for r in rows)
    first = sorted(float(r["gap"]) - float(r["duration"]) for r in rows if r["step"] == 1)
    later = sorted(float(r["gap"]) - float(r["duration"]) for r in rows if r["step"] > 1)
    transitions = int(span["transitions"])
    if transitions != agents * STEPS:
        raise BenchError(f"{transitions} history rows, expected {agents * STEPS}")
    seconds = float(span["seconds"])
    return {
        "agents": agents,
        "transitions": transitions,
        "seconds": round(seconds, 3),
        "transitions_per_s": round(transitions / seconds),
        "step_latency_ms_p50": round(_quantile(gaps, 0.50) * 1000, 1),
        "step_latency_ms_p99": round(_quantile(gaps, 0.99) * 1000, 1),
        "step_latency_split_ms": {
            "node_run_p50": round(_quantile(runs, 0.50) * 1000, 3),
            "node_run_p99": round(_quantile(runs, 0.99) * 1000, 3),
            "queueing_p50": round(_quantile(waits, 0.50) * 1000, 1),
            "queueing_p99": round(_quantile(waits, 0.99) * 1000, 1),
            "queueing_first_step_p50": round(_quantile(first, 0.50) * 1000, 1),
            "queueing_first_step_p99": round(_quantile(first, 0.99) * 1000, 1),
            "queueing_later_steps_p50": round(_quantile(later, 0.50) * 1000, 1),
            "queueing_later_steps_p99": round(_quantile(later, 0.99) * 1000, 1),
            "queueing_is": "step latency minus node run: waiting in the stream or for a free "
                           "worker slot, plus the lease and commit round trips; an agent's "
                           "first step always comes through the stream (triggered), later "
                           "ones may be handed over by the worker that committed the one "
                           "before",
        },
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


# ---------------------------------------------------------------------------- the suite


async def _commandnet_cases(pg: PostgresServer, nats: NatsServer, log_dir: Path, agents: int,
                            scaling: tuple[int, ...], paced: int,
                            saturated: float) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    # Paced: a tenth of the saturated rate, so steps do not queue behind each other.
    rate = max(1.0, round(saturated / STEPS / 10, 1))
    cases["commandnet workers=2 paced"] = await run_case(
        pg, nats, log_dir, name="w2paced", workers=2, agents=paced, rate=rate)
    for n in scaling:
        if n == 2:
            continue
        cases[f"commandnet workers={n} saturated"] = await run_case(
            pg, nats, log_dir, name=f"w{n}sat", workers=n, agents=agents)
    return cases


def _turns(pg: PostgresServer, nats: NatsServer, log_dir: Path, ref_dsn: str, agents: int,
           processes: int, turns: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The reference and commandnet (2 workers, saturated) taking turns: a run of a few
    seconds on a shared machine moves by tens of percent (a checkpoint's full-page writes, a
    neighbour), so the ratio is taken over turns, each pair measured back to back."""
    pairs = []
    for turn in range(turns):
        ref = _measured_reference(pg, ref_dsn, agents, processes)
        main = asyncio.run(run_case(pg, nats, log_dir, name=f"w2sat{turn}", workers=2,
                                    agents=agents))
        pairs.append((ref, main))
    return pairs


def run_distributed(agents: int, *, scaling: tuple[int, ...] = (1, 2, 4),
                    paced_agents: int | None = None, reference_processes: int = 2,
                    turns: int = TURNS) -> dict[str, Any]:
    """Run every case against one PostgreSQL and one NATS; the bench table's rows."""
    with bench_servers("commandnet-bench-") as (pg, nats, log_dir):
        results: dict[str, Any] = {}
        ref_dsn = pg.create_database("bench_reference")
        pairs = _turns(pg, nats, log_dir, ref_dsn, agents, reference_processes, turns)
        ref = max((r for r, _ in pairs), key=lambda r: r["transitions_per_s"])
        main = max((m for _, m in pairs), key=lambda m: m["transitions_per_s"])
        results["reference (bare asyncpg)"] = {
            **ref, "step_latency_ms_p50": "", "step_latency_ms_p99": ""}
        bound = _pgbench(pg, ref_dsn, agents, 16 * reference_processes)
        if bound is not None:
            results["independent: pgbench, reference statements"] = {
                **bound, "step_latency_ms_p50": "", "step_latency_ms_p99": ""}
        results["commandnet workers=2 saturated"] = main
        paced = paced_agents if paced_agents is not None else max(10, agents // 5)
        results.update(asyncio.run(_commandnet_cases(
            pg, nats, log_dir, agents, scaling, paced, main["transitions_per_s"])))
        results["summary"] = _summary(pairs, ref, main, bound,
                                      results["commandnet workers=2 paced"])
        return results


def _summary(pairs: list[tuple[dict[str, Any], dict[str, Any]]], ref: dict[str, Any],
             main: dict[str, Any], bound: dict[str, Any] | None,
             paced: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's targets are about; ratios of each turn, their median, and the
    best commandnet turn against the best reference turn (as the core bench's rounds)."""
    each = [round(m["transitions_per_s"] / r["transitions_per_s"], 3) for r, m in pairs]
    cpu = [m["cpu_ms_per_transition"]["workers"] for _, m in pairs]
    ref_cpu = [r["cpu_ms_per_transition"]["reference processes"] for r, _ in pairs]
    median = round(statistics.median(each), 3)
    worker_cpu, reference_cpu = statistics.median(cpu), statistics.median(ref_cpu)
    return {
        "ratio_to_reference": median,
        "ratio_to_reference_each_turn": each,
        "ratio_to_reference_best_vs_best": round(
            main["transitions_per_s"] / ref["transitions_per_s"], 3),
        "ratio_to_pgbench": (round(main["transitions_per_s"] / bound["transitions_per_s"], 3)
                             if bound else None),
        "reference_ratio_to_pgbench": (
            round(ref["transitions_per_s"] / bound["transitions_per_s"], 3) if bound else None),
        "worker_cpu_ms_per_transition": worker_cpu,
        "worker_cpu_ms_per_transition_each_turn": cpu,
        "reference_cpu_ms_per_transition": reference_cpu,
        "worker_cpu_ratio_to_reference": (round(worker_cpu / reference_cpu, 2)
                                          if reference_cpu else None),
        "statements_per_transition": main["sql_calls_per_transition"],
        "turns": len(pairs),
        "targets": {"ratio_to_reference>=0.75 (median of turns)": median >= 0.75,
                    "worker_cpu_ms<=0.3 (median of turns)": worker_cpu <= 0.3,
                    "p99_step_ms<=10 (paced)": paced["step_latency_ms_p99"] <= 10},
        "postgres": "fsync=on, synchronous_commit=on (commits); leases/outbox deletes "
                    "synchronous_commit=off by the adapter's design",
        "nats": "JetStream file storage",
    }


@contextlib.contextmanager
def bench_servers(prefix: str) -> Iterator[tuple[PostgresServer, NatsServer, Path]]:
    """A PostgreSQL, a NATS server and a log folder in a fresh temporary folder, all gone
    afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)  # the cluster may run as another user (root): it must enter
    log_dir = base / "logs"
    log_dir.mkdir()
    pg = nats = None
    try:
        pg = start_postgres(base)
        nats = NatsServer(base / "nats").start()
        yield pg, nats, log_dir
    finally:
        if nats is not None:
            with contextlib.suppress(Exception):
                nats.stop()
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measured_reference(pg: PostgresServer, dsn: str, agents: int,
                        processes: int) -> dict[str, Any]:
    """:func:`run_reference`, with the CPU its processes (reaped children) and PostgreSQL used."""
    before, children = _cpu_seconds(), _children_cpu()
    ref: dict[str, Any] = dict(run_reference(dsn, agents, processes=processes))
    mine = round(_children_cpu() - children, 2)
    cpu = _cpu_delta(before, _cpu_seconds(), set(), pg.process.pid if pg.process else -1, -1)
    cpu = {"reference processes": mine, "postgres": cpu["postgres"]}
    ref.update(cpu_seconds=cpu, cpu_ms_per_transition={
        k: round(v * 1000 / ref["transitions"], 3) for k, v in cpu.items()})
    return ref


PGBENCH_SCRIPT = """\\set id random(0, {last})
BEGIN;
SELECT step, context FROM reference_agents WHERE id = 'ref-' || :id FOR UPDATE;
UPDATE reference_agents SET step = step + 1, context = context WHERE id = 'ref-' || :id;
END;
"""


def _pgbench(pg: PostgresServer, dsn: str, agents: int, clients: int) -> dict[str, Any] | None:
    """The reference's transaction from pgbench (C client, prepared): the database's bound."""
    exe = pg.bin_dir / "pgbench"
    if not exe.exists():
        found = shutil.which("pgbench")
        if found is None:
            return None
        exe = Path(found)
    transitions = agents * STEPS
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(PGBENCH_SCRIPT.format(last=agents - 1))
    try:
        children = _children_cpu()
        started = time.monotonic()
        out = subprocess.run(
            [str(exe), "-n", "-M", "prepared", "-c", str(clients), "-j", "2",
             "-t", str(max(1, transitions // clients)), "-f", script.name, dsn],
            capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - started
        mine = _children_cpu() - children
    finally:
        os.unlink(script.name)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    done = max(1, transitions // clients) * clients
    tps = next((float(line.split("=")[1].split()[0]) for line in out.stdout.splitlines()
                if line.startswith("tps =")), done / elapsed)
    return {"clients": clients, "transitions": done, "seconds": round(done / tps, 3),
            "transitions_per_s": round(tps),
            "cpu_ms_per_transition": {"pgbench": round(mine * 1000 / done, 3)},
            "what": "pgbench -M prepared running the reference's SELECT ... FOR UPDATE and "
                    "UPDATE in one durable transaction on random agents of the same table"}


def main() -> None:
    """``python -m bench.distributed``: one saturated case (with BENCH_PROFILE_DIR: profiled)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="commandnet-bench-"))
    os.chmod(base, 0o755)
    (base / "logs").mkdir()
    pg = nats = None
    try:
        pg = start_postgres(base)
        nats = NatsServer(base / "nats").start()
        result = asyncio.run(run_case(pg, nats, base / "logs", name="single",
                                      workers=args.workers, agents=args.agents))
        print(json.dumps(result, indent=2))
    finally:
        if nats is not None:
            nats.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
