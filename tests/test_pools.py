"""Two pools with different graphs on one PostgreSQL and one NATS stay apart (issue 7 item 1).

Pool ``A`` runs the bundled linear graph (``Step0`` ... ``Step9``), pool ``B`` the parcels graph
(``Receive -> Weigh -> Light | Heavy -> Ship``), each with real ``commandnet worker`` processes
that the test SIGKILLs and replaces mid-run. The repair loops are short (sweep every 0.5 s,
outbox grace 1 s, stall after 3 s, lease 2 s) so repairs happen within the test.

What makes the old code fail: agents whose first publish was lost (their row and outbox row
written straight into the store, or their outbox row gone too, so only the stalled-agent
reconciler can find them), in both pools, and step events of one pool's agents published on the
other pool's subject. While pool B has no worker at all, pool A's sweeper repairs A's lost agents
and must leave B's alone; a pool-blind sweeper (the old code) re-published B's rows on A's
subject, A's worker leased them and failed them for good with "unknown node".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from commandnet.local.nats import NatsServer
from commandnet.messages import StepEvent
from tests.graphs import parcels
from tests.graphs.procs import WorkerProc, clean_env, wait_until
from tests.test_distributed_faults import Fleet, bus_state, setup_schema, sql, trigger

pytestmark = pytest.mark.slow

LINEAR = "commandnet.examples.linear:Start"
PARCELS = "tests.graphs.parcels:Receive"
LINEAR_ROUTE = [f"Step{i}" for i in range(10)]
LEASE, ACK_WAIT = 2.0, 3.0
PER_PHASE = 200  # agents triggered through each pool in each phase
LOST = 20  # per pool: first publish lost (outbox row left), and lost with no outbox row


class PoolFleet(Fleet):
    """A :class:`Fleet` of one pool: worker ids and logs named after the pool."""

    def __init__(self, tmp_path: Path, pool: str, graph: str, dsn: str, nats_url: str,
                 env: dict[str, str]) -> None:
        folder = tmp_path / pool
        folder.mkdir()
        super().__init__(folder, [
            "--graph", graph, "--pool", pool, "--store", dsn, "--bus", nats_url,
            "--lease-seconds", str(LEASE), "--ack-wait", str(ACK_WAIT),
            "--sweep-interval", "0.5", "--outbox-grace", "1", "--stall-after", "3",
            "--drain-grace", "1", "--log-level", "WARNING", "--no-migrate",
            # Few steps at once, so that each phase outlasts several SIGKILLs (with local
            # handoff a worker runs an agent's steps back to back).
            "--max-in-flight", "4"], env)
        self.pool = pool
        self.kills = 0
        self._names = itertools.count()

    def spawn(self) -> WorkerProc:
        name = f"{self.pool}-w{next(self._names)}"
        proc = WorkerProc([*self.args, "--worker-id", name], self.tmp_path / f"{name}.log",
                          env=self.env)
        self.live.append(proc)
        return proc

    def kill_oldest_ready(self) -> bool:
        """SIGKILL the oldest worker that is consuming (it holds the most work) and replace it."""
        for proc in self.live:
            if proc.get("/readyz")[0] == 200:
                self.kill_and_replace(proc)
                self.kills += 1
                return True
        return False


def route_of(agent: dict[str, Any]) -> list[str]:
    """The nodes the agent must have run, from its stored row."""
    if agent["pool"] == "A":
        return LINEAR_ROUTE
    return parcels.route(json.loads(agent["initial_context"])["weight"])


def create_unpublished(dsn: str, pool: str, start: str, agents: dict[str, dict[str, Any]],
                       *, drop_outbox: bool) -> None:
    """Write agents as a trigger that crashed before its publish: row and outbox row, no
    message (``drop_outbox``: the outbox row is gone too, only the reconciler can help)."""
    from commandnet.adapters.postgres import PostgresPersistence
    from commandnet.records import NewAgent, OutboxEntry

    async def go() -> None:
        store = PostgresPersistence(dsn, min_size=1, max_size=2)
        await store.setup()
        try:
            for agent_id, ctx in agents.items():
                assert await store.create_agent(NewAgent(agent_id, start, ctx, pool=pool))
            if drop_outbox:
                await store.clear_outbox([OutboxEntry(a, 0) for a in agents])
        finally:
            await store.close()

    asyncio.run(go())


def publish_on(nats_url: str, pool: str, agent_ids: list[str]) -> None:
    """Publish step 0 of ``agent_ids`` on ``pool``'s subject (fresh de-dup ids), as a
    pool-blind sweeper did."""
    from commandnet.adapters.nats import JetStreamBus

    async def go() -> None:
        bus = JetStreamBus(nats_url, pool=pool)
        await bus.connect()
        try:
            for n, agent_id in enumerate(agent_ids, start=1):
                await bus.publish(StepEvent(agent_id=agent_id, step=0, redo=n))
        finally:
            await bus.close()

    asyncio.run(go())


def progress(dsn: str) -> dict[str, int]:
    """Final (not running) agents per pool."""
    rows = sql(dsn, "SELECT pool, count(*) FILTER (WHERE status <> 'running') AS done "
                    "FROM agents GROUP BY pool")
    return {r["pool"]: r["done"] for r in rows}


def transitions(dsn: str) -> int:
    return int(sql(dsn, "SELECT count(*) AS n FROM history")[0]["n"])


def chaos_until_done(dsn: str, fleets: list[PoolFleet], expected: dict[str, int],
                     timeout: float, every: float = 0.7, per_fleet: int = 3) -> float:
    """Until every agent is final: every ``every`` s, if transitions were committed since the
    last kill, SIGKILL a worker (the fleets in turn, at most ``per_fleet`` each)."""
    began = time.monotonic()
    turn = itertools.cycle(fleets)
    last_kill, last_count = time.monotonic(), transitions(dsn)
    kills = dict.fromkeys(fleets, 0)
    while True:
        done = progress(dsn)
        if all(done.get(pool, 0) >= n for pool, n in expected.items()):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            logs = "\n".join(f.logs() for f in fleets)
            stuck = sql(dsn, "SELECT agent_id, pool, status, node, step, attempts, crashes, "
                             "lease_owner, error FROM agents WHERE status <> 'succeeded' "
                             "ORDER BY status, agent_id LIMIT 10")
            raise AssertionError(f"timed out after {timeout:g}s: final agents {done}, "
                                 f"expected {expected}; not succeeded: "
                                 f"{[dict(r) for r in stuck]}\n{logs}")
        for fleet in fleets:
            fleet.replace_exited()
        if time.monotonic() - last_kill >= every and transitions(dsn) > last_count:
            for _ in fleets:  # the next fleet that may still lose a ready worker
                fleet = next(turn)
                if kills[fleet] < per_fleet and fleet.kill_oldest_ready():
                    kills[fleet] += 1
                    last_kill, last_count = time.monotonic(), transitions(dsn)
                    break
        time.sleep(0.05)


def test_two_pools_with_different_graphs_stay_apart_through_sigkills(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer,
) -> None:
    dsn, nats = postgres_dsn, restartable_nats
    setup_schema(dsn)
    env = clean_env(COMMANDNET_EXAMPLE_DELAY="0.03")
    fleet_a = PoolFleet(tmp_path, "A", LINEAR, dsn, nats.url, env)
    fleet_b = PoolFleet(tmp_path, "B", PARCELS, dsn, nats.url, env)
    from commandnet.examples.linear import Start

    def linear_agents(prefix: str, n: int) -> dict[str, dict[str, Any]]:
        return {f"{prefix}{i}": {"visited": []} for i in range(n)}

    def parcel_agents(prefix: str, n: int) -> dict[str, dict[str, Any]]:
        return {f"{prefix}{i}": {"weight": i % 20, "visited": []} for i in range(n)}

    try:
        # ---- phase 1: only pool A has workers
        for _ in range(2):
            fleet_a.spawn()
        for proc in fleet_a.live:
            proc.wait_ready(90)
        create_unpublished(dsn, "A", "Step0", linear_agents("a-lost", LOST), drop_outbox=False)
        create_unpublished(dsn, "A", "Step0", linear_agents("a-stall", LOST), drop_outbox=True)
        create_unpublished(dsn, "B", "Receive", parcel_agents("b-lost", LOST), drop_outbox=False)
        create_unpublished(dsn, "B", "Receive", parcel_agents("b-stall", LOST),
                           drop_outbox=True)
        trigger(dsn, nats.url, "A", Start, linear_agents("a", PER_PHASE))
        trigger(dsn, nats.url, "B", parcels.Receive, parcel_agents("b", PER_PHASE))
        # Misrouted steps: B's agents on A's subject (A's workers must leave them alone), and
        # A's on B's subject (waiting there until B's workers start).
        publish_on(nats.url, "A", [f"b{i}" for i in range(LOST)] + [f"b-lost{i}" for i in
                                                                    range(LOST)])
        publish_on(nats.url, "B", [f"a{i}" for i in range(LOST)])

        # A's lost agents are only found by A's sweeper (outbox) and reconciler (stalled).
        phase1 = chaos_until_done(dsn, [fleet_a], {"A": PER_PHASE + 2 * LOST}, timeout=120)
        assert fleet_a.kills >= 2, f"only {fleet_a.kills} SIGKILLs in phase 1"
        untouched = sql(dsn, "SELECT agent_id, status, step, attempts, crashes, lease_owner, "
                             "error FROM agents WHERE pool = 'B'")
        moved = [dict(r) for r in untouched
                 if (r["status"], r["step"], r["attempts"], r["crashes"], r["lease_owner"])
                 != ("running", 0, 0, 0, None)]
        assert len(untouched) == PER_PHASE + 2 * LOST and not moved, (
            f"pool A's workers touched {len(moved)} of pool B's agents while B had no "
            f"worker: {moved[:5]}")
        b_outbox = sql(dsn, "SELECT count(*) AS n FROM outbox JOIN agents USING (agent_id) "
                            "WHERE pool = 'B'")[0]["n"]
        assert b_outbox == LOST, f"pool B's unpublished outbox rows: {b_outbox}, not {LOST}"
        print(f"\nphase 1: pool A ({PER_PHASE + 2 * LOST} agents) done in {phase1:.1f}s after "
              f"{fleet_a.kills} SIGKILLs; pool B's {PER_PHASE + 2 * LOST} agents untouched")

        # ---- phase 2: both pools, more agents, SIGKILLs in both
        for _ in range(2):
            fleet_b.spawn()
        for proc in fleet_b.live:
            proc.wait_ready(90)
        trigger(dsn, nats.url, "A", Start, linear_agents("a2-", PER_PHASE))
        trigger(dsn, nats.url, "B", parcels.Receive, parcel_agents("b2-", PER_PHASE))
        kills_a = fleet_a.kills
        total = 2 * PER_PHASE + 2 * LOST
        phase2 = chaos_until_done(dsn, [fleet_b, fleet_a], {"A": total, "B": total},
                                  timeout=150)
        print(f"phase 2: both pools done in {phase2:.1f}s; SIGKILLs: A {fleet_a.kills - kills_a},"
              f" B {fleet_b.kills}")
        assert fleet_a.kills - kills_a >= 2 and fleet_b.kills >= 2, (
            f"too few SIGKILLs in phase 2: A {fleet_a.kills - kills_a}, B {fleet_b.kills}")

        # ---- every agent ended in its own graph's terminal node, exactly once per step
        agents = sql(dsn, "SELECT agent_id, pool, status, node, step, error, context, "
                          "initial_context FROM agents")
        expected_pool = {**{a: "A" for a in [*linear_agents("a", PER_PHASE),
                                                *linear_agents("a2-", PER_PHASE),
                                                *linear_agents("a-lost", LOST),
                                                *linear_agents("a-stall", LOST)]},
                         **{b: "B" for b in [*parcel_agents("b", PER_PHASE),
                                                *parcel_agents("b2-", PER_PHASE),
                                                *parcel_agents("b-lost", LOST),
                                                *parcel_agents("b-stall", LOST)]}}
        assert {r["agent_id"]: r["pool"] for r in agents} == expected_pool, "pool column wrong"
        unknown = [(r["agent_id"], r["error"]) for r in agents
                   if "unknown node" in (r["error"] or "")]
        assert not unknown, f"{len(unknown)} agents failed for an unknown node: {unknown[:5]}"
        wrong = []
        for r in agents:
            route = route_of(dict(r))
            got = (r["status"], r["node"], r["step"], json.loads(r["context"])["visited"])
            if got != ("succeeded", route[-1], len(route), route):
                wrong.append((r["agent_id"], r["pool"], *got[:3], r["error"]))
        assert not wrong, f"{len(wrong)} agents not succeeded at their terminal node: {wrong[:5]}"

        history = sql(dsn, "SELECT agent_id, step, from_node, to_node FROM history "
                           "ORDER BY agent_id, step")
        by_agent: dict[str, list[tuple[int, str, str | None]]] = {}
        for h in history:
            by_agent.setdefault(h["agent_id"], []).append(
                (h["step"], h["from_node"], h["to_node"]))
        bad = []
        for r in agents:
            route = route_of(dict(r))
            want = [(i + 1, node, nxt) for i, (node, nxt) in
                    enumerate(zip(route, [*route[1:], None], strict=True))]
            if by_agent.get(r["agent_id"]) != want:
                bad.append((r["agent_id"], by_agent.get(r["agent_id"])))
        assert not bad, f"{len(bad)} agents' history is not steps 1..N of their route: {bad[:3]}"

        # Nothing left behind on the bus, nothing dead-lettered, in either pool.
        state: dict[str, tuple[int, int]] = {}

        def drained() -> bool:
            for fleet in (fleet_a, fleet_b):
                fleet.replace_exited()
            state["A"], state["B"] = bus_state(nats.url, "A"), bus_state(nats.url, "B")
            return state["A"][0] == 0 and state["B"][0] == 0

        wait_until(drained, ACK_WAIT * 2 + 30,
                   f"both pools' consumers to hold nothing unacknowledged ({state})",
                   interval=1.0)
        assert (state["A"][1], state["B"][1]) == (0, 0), f"dead letters: {state}"
    finally:
        for fleet in (fleet_a, fleet_b):
            fleet.stop_all()

