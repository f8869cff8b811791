"""The reference loop the distributed benchmark is judged against, on the same server.

Bare asyncpg, no framework: per transition one durable transaction of ``SELECT ... FOR UPDATE``
and ``UPDATE``; the next step goes on an in-process queue. Run in several processes at once,
each owning a slice of the agents, as commandnet's workers share theirs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import time

import asyncpg

STEPS = 10


async def prepare(dsn: str, agents: int) -> None:
    """(Re)create the reference table with ``agents`` rows at step 0."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS reference_agents")
        await conn.execute("CREATE TABLE reference_agents (id text PRIMARY KEY, step int NOT NULL, "
                           "context jsonb NOT NULL)")
        await conn.executemany("INSERT INTO reference_agents VALUES ($1, 0, '{}')",
                               [(f"ref-{i}",) for i in range(agents)])
    finally:
        await conn.close()


async def _worker_loop(dsn: str, ids: list[str], concurrency: int,
                       go: multiprocessing.synchronize.Barrier) -> tuple[float, float]:
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    await asyncio.to_thread(go.wait)  # start together, connections ready
    started = time.time()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for agent_id in ids:
        queue.put_nowait(agent_id)
    remaining = len(ids)
    done = asyncio.Event()

    async def consume() -> None:
        nonlocal remaining
        while True:
            agent_id = await queue.get()
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT step, context FROM reference_agents WHERE id = $1 FOR UPDATE",
                    agent_id)
                await conn.execute("UPDATE reference_agents SET step = $2, context = $3 "
                                   "WHERE id = $1", agent_id, row["step"] + 1, row["context"])
            if row["step"] + 1 < STEPS:
                queue.put_nowait(agent_id)
            else:
                remaining -= 1
                if remaining == 0:
                    done.set()

    tasks = [asyncio.create_task(consume()) for _ in range(concurrency)]
    if ids:
        await done.wait()
    finished = time.time()
    for task in tasks:
        task.cancel()
    await pool.close()
    return started, finished


def _process(dsn: str, ids: list[str], concurrency: int, go: multiprocessing.synchronize.Barrier,
             out: multiprocessing.queues.Queue[tuple[float, float]]) -> None:
    out.put(asyncio.run(_worker_loop(dsn, ids, concurrency, go)))


def run_reference(dsn: str, agents: int, processes: int = 2,
                  concurrency: int = 16) -> dict[str, float]:
    """Run the reference loop; returns its transitions per second."""
    asyncio.run(prepare(dsn, agents))
    ids = [f"ref-{i}" for i in range(agents)]
    slices = [ids[i::processes] for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(processes)
    out: multiprocessing.queues.Queue[tuple[float, float]] = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(dsn, part, concurrency, go, out))
             for part in slices]
    for proc in procs:
        proc.start()
    spans = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(60)
        if proc.exitcode != 0:
            raise RuntimeError(f"reference process exited with {proc.exitcode}")
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"processes": processes, "transitions": agents * STEPS, "seconds": round(elapsed, 3),
            "transitions_per_s": round(agents * STEPS / elapsed)}
