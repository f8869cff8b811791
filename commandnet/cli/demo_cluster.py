"""The demo's multi-process mode: an embedded nats-server and N ``commandnet worker`` processes
sharing one SQLite file. The demo process itself only triggers agents and watches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from ..adapters.nats import JetStreamBus
from ..adapters.sqlite import SQLitePersistence
from ..engine import Engine
from ..examples.orders import Intake
from ..local.nats import NatsServer
from ..local.process import free_port


async def run_cluster(
    db: Path,
    agents: int,
    workers: int,
    graph: str,
    watch: Callable[[], AbstractAsyncContextManager[None]],
    trigger_all: Callable[[Engine, int], Awaitable[None]],
) -> None:
    """Start the server and the workers, trigger ``agents`` agents, wait, and shut down."""
    server = NatsServer(store_dir=db.parent / "nats")
    await asyncio.to_thread(server.start)
    procs: list[subprocess.Popen[bytes]] = []
    engine = Engine(SQLitePersistence(db), JetStreamBus(server.url, pool="demo"),
                    graphs=[Intake])
    try:
        await engine.start()  # creates the schema before the workers race to
        for index in range(workers):
            procs.append(_spawn_worker(index, db, server.url, graph))
        async with watch():
            await trigger_all(engine, agents)
            _check_alive(procs)
    finally:
        await engine.stop()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.to_thread(server.stop)


def _spawn_worker(index: int, db: Path, nats_url: str, graph: str) -> subprocess.Popen[bytes]:
    log = (db.parent / f"worker-{index}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "commandnet.cli.main", "worker", "--graph", graph,
         "--pool", "demo", "--store", f"sqlite:///{db.resolve()}", "--bus", nats_url,
         "--worker-id", f"demo-worker-{index}", "--http-port", str(free_port()),
         "--http-host", "127.0.0.1", "--log-format", "text",
         "--log-level", os.environ.get("COMMANDNET_DEMO_WORKER_LOG", "ERROR")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _check_alive(procs: list[subprocess.Popen[bytes]]) -> None:
    dead = [proc.pid for proc in procs if proc.poll() is not None]
    if dead:
        raise RuntimeError(f"worker process {dead[0]} exited early (see worker-*.log)")
