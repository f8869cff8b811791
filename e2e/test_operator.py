"""The operator on the test bed's real API server, with real NATS, PostgreSQL and
``commandnet worker`` processes (issue 8). One stack for the module; each test its namespace."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from commandnet.local.postgres import PostgresServer
from e2e.operator_stack import OperatorStack, agent_manifest, scratch_database
from e2e.testbed import LocalCluster
from tests.graphs.procs import wait_until
from tests.test_distributed_faults import sql

pytestmark = [pytest.mark.kube, pytest.mark.timeout(900)]
_names = itertools.count(1)


@pytest.fixture(scope="module")
def stack(kube: LocalCluster, postgres_server: PostgresServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorStack]:
    with scratch_database(postgres_server, "operator_e2e") as dsn:
        running = OperatorStack(kube, tmp_path_factory.mktemp("operator"), dsn)
        try:
            yield running.start()
        finally:
            running.stop()


@pytest.fixture
def ns(stack: OperatorStack) -> Iterator[str]:
    name = stack.namespace(f"op-{next(_names)}-{int(time.time()) % 100000}")
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


def history_rows(stack: OperatorStack, agent_id: str) -> list[tuple[int, str, str]]:
    """(step, from, to) of every transition the store holds for the agent."""
    rows = sql(stack.store_url, "SELECT step, from_node, to_node FROM history "
               "WHERE agent_id = $1 ORDER BY step", agent_id)
    return [(r["step"], r["from_node"], r["to_node"]) for r in rows]


def condition(agent: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in agent.get("status", {}).get("conditions", [])
                 if c["type"] == kind), None)


def test_agent_succeeds_with_its_terminal_node_and_step(stack: OperatorStack, ns: str) -> None:
    stack.apply([agent_manifest("hello", ns)])
    agent = stack.wait_phase(ns, "hello", ["Succeeded", "Failed"])
    status = agent["status"]
    assert status["phase"] == "Succeeded", status
    assert (status["currentNode"], status["step"]) == ("Done", 3)
    assert status["agentId"] == f"{ns}/hello/{agent['metadata']['uid']}"
    assert status["observedGeneration"] == 1
    assert status["startTime"] and status["completionTime"]
    complete = condition(agent, "Complete")
    assert complete is not None and complete["status"] == "True", status["conditions"]
    assert condition(agent, "Triggered")["reason"] == "TriggerSent"  # type: ignore[index]
    assert [r[0] for r in history_rows(stack, status["agentId"])] == [1, 2, 3]

    def reasons() -> set[str]:
        events = stack.kubectl("get", "events", "-n", ns, "--field-selector",
                               "involvedObject.name=hello", "-o", "json").stdout
        return {e["reason"] for e in json.loads(events)["items"]}

    # One Event per phase the Agent showed (Pending and Running may be coalesced away); the
    # last one is posted just after the status that shows it.
    seen = wait_until(lambda: "Succeeded" in reasons() and reasons(), 30, "the Succeeded Event")
    assert seen <= {"Triggered", "Running", "Succeeded"}, seen


def test_intermediate_nodes_of_a_six_node_graph_appear_in_status(stack: OperatorStack,
                                                                   ns: str) -> None:
    stack.apply([agent_manifest("six", ns, start="Six1",
                                context={"name": "six", "delay": 1.2})])
    seen: set[str] = set()

    def finished() -> bool:
        agent = stack.agent(ns, "six") or {}
        status = agent.get("status", {})
        if status.get("phase") == "Running":
            seen.add(status.get("currentNode", ""))
        return status.get("phase") in ("Succeeded", "Failed")

    wait_until(finished, 60, "the six-node agent to finish", interval=0.2)
    agent = stack.agent(ns, "six")
    assert agent is not None
    status = agent["status"]
    assert (status["phase"], status["currentNode"], status["step"]) == ("Succeeded", "Six6", 6)
    assert len(seen & {"Six2", "Six3", "Six4", "Six5"}) >= 3, seen  # watched live
    steps = [h["step"] for h in status["history"]]
    assert steps == sorted(steps) and steps[-1] == 6, status["history"]
    assert {"Six2", "Six3", "Six4", "Six5"} <= {h["node"] for h in status["history"]}


def test_kubectl_get_agents_shows_the_columns(stack: OperatorStack, ns: str) -> None:
    stack.apply([agent_manifest("columns", ns)])
    stack.wait_phase(ns, "columns", ["Succeeded"])
    out = stack.kubectl("get", "agents", "-n", ns).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "POOL", "PHASE", "NODE", "STEP", "AGE"], out
    assert row.split()[:5] == ["columns", "e2e", "Succeeded", "Done", "3"], out


def test_deleting_a_running_agent_cancels_it(stack: OperatorStack, ns: str) -> None:
    stack.apply([agent_manifest("slow", ns, context={"name": "slow", "delay": 5})])
    agent = stack.wait_phase(ns, "slow", ["Running"])
    agent_id = agent["status"]["agentId"]
    stack.kubectl("delete", "agent", "slow", "-n", ns, "--timeout=60s")
    assert stack.agent(ns, "slow") is None
    wait_until(lambda: stored_status(stack, agent_id) == "cancelled", 30,
               f"agent {agent_id} to be cancelled in the store")
    time.sleep(6)  # the node in flight ends: its result must be discarded
    assert stored_status(stack, agent_id) == "cancelled"
    assert len(history_rows(stack, agent_id)) <= 1


def test_delete_a_millisecond_after_create_cancels_or_never_starts(stack: OperatorStack,
                                                                    ns: str) -> None:
    names = [f"blink-{i}" for i in range(10)]
    for name in names:
        stack.apply([agent_manifest(name, ns, context={"name": name, "delay": 2})])
        stack.kubectl("delete", "agent", name, "-n", ns, "--wait=false")
    wait_until(lambda: not stack.agents(ns), 60, "the deleted Agents to be gone")
    time.sleep(8)  # anything triggered has had time to run to its end, were it not cancelled
    ids = stored_ids(stack, f"{ns}/blink-")
    for agent_id, status in ids.items():
        assert status == "cancelled", (agent_id, status)


def stored_status(stack: OperatorStack, agent_id: str) -> str | None:
    return stored_ids(stack, agent_id).get(agent_id)


def stored_ids(stack: OperatorStack, prefix: str) -> dict[str, str]:
    rows = sql(stack.store_url, "SELECT agent_id, status FROM agents WHERE agent_id LIKE $1",
               prefix.replace("%", r"\%") + "%")
    return {r["agent_id"]: r["status"] for r in rows}


def test_webhook_refuses_an_unknown_start_node_naming_the_nodes(stack: OperatorStack,
                                                                  ns: str) -> None:
    result = stack.apply([agent_manifest("ghost", ns, start="Nope")], check=False)
    assert result.returncode != 0
    assert "spec.startNode" in result.stderr and "'Nope'" in result.stderr, result.stderr
    assert "Hello" in result.stderr and "Six6" in result.stderr, result.stderr
    assert stack.agent(ns, "ghost") is None


def test_webhook_refuses_a_bad_context_naming_the_field(stack: OperatorStack, ns: str) -> None:
    result = stack.apply([agent_manifest("badctx", ns, context={"name": 5})], check=False)
    assert result.returncode != 0
    assert "spec.context.name" in result.stderr, result.stderr
    missing = stack.apply([agent_manifest("noname", ns, context={"delay": 1})], check=False)
    assert missing.returncode != 0 and "name" in missing.stderr, missing.stderr


def test_agents_past_admission_fail_with_the_workers_reason(stack: OperatorStack,
                                                           ns: str) -> None:
    """With no published graph the webhook admits; the worker then fails the agent, and the
    Agent ends Failed with reason UnknownNode / InvalidContext and the worker's message."""
    import nats

    async def graph_doc(action: str, doc: bytes = b"") -> bytes:
        nc = await nats.connect(stack.nats.url)
        try:
            kv = await nc.jetstream().key_value("COMMANDNET_GRAPHS")
            if action == "take":
                entry = await kv.get(stack.pool)
                await kv.delete(stack.pool)
                return entry.value or b""
            await kv.put(stack.pool, doc)
            return doc
        finally:
            await nc.close()

    def admitted(start: str) -> bool:
        probe = agent_manifest("probe", ns, start=start)
        return stack.apply([probe], check=False, dry_run=True).returncode == 0

    doc = asyncio.run(graph_doc("take"))
    try:
        wait_until(lambda: admitted("Nope"), 30, "the webhook to forget the pool's graph")
        stack.apply([agent_manifest("lost", ns, start="Nope"),
                     agent_manifest("typo", ns, context={"name": 5})])
        lost = stack.wait_phase(ns, "lost", ["Failed", "Succeeded"])["status"]
        typo = stack.wait_phase(ns, "typo", ["Failed", "Succeeded"])["status"]
    finally:
        asyncio.run(graph_doc("put", doc))
    wait_until(lambda: not admitted("Nope"), 30, "the webhook to see the graph again")
    assert lost["phase"] == "Failed" and condition({"status": lost}, "Failed")["reason"] == (
        "UnknownNode"), lost
    assert "unknown node 'Nope'" in lost["error"], lost
    assert typo["phase"] == "Failed", typo
    assert condition({"status": typo}, "Failed")["reason"] == "InvalidContext", typo
    assert "does not validate as Job" in typo["error"] and "name" in typo["error"], typo


def test_schema_refuses_a_bad_resource_naming_the_field(stack: OperatorStack, ns: str) -> None:
    bad = agent_manifest("badpool", ns, pool="no/slash")
    result = stack.apply([bad], check=False)
    assert result.returncode != 0 and "spec.pool" in result.stderr, result.stderr


def test_ttl_deletes_a_finished_agent(stack: OperatorStack, ns: str) -> None:
    stack.apply([agent_manifest("brief", ns, ttlSecondsAfterFinished=2)])
    stack.wait_phase(ns, "brief", ["Succeeded"])
    wait_until(lambda: stack.agent(ns, "brief") is None, 30, "the TTL to delete the Agent")


def phases(stack: OperatorStack, ns: str) -> dict[str, str | None]:
    return {name: a.get("status", {}).get("phase") for name, a in stack.agents(ns).items()}


def test_a_thousand_agents_applied_at_once_all_succeed(stack: OperatorStack, ns: str) -> None:
    count = 1000
    manifests = [agent_manifest(f"many-{i:04d}", ns) for i in range(count)]
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
    stack.kubectl("create", "-f", "-", stdin=body, timeout=600)

    def all_done() -> bool:
        seen = phases(stack, ns)
        return len(seen) == count and all(p == "Succeeded" for p in seen.values())

    wait_until(all_done, 600, f"{count} Agents to succeed: "
               f"{sorted(set(phases(stack, ns).values()), key=str)}", interval=2.0)
    agents = stack.agents(ns)
    assert {(a["status"]["currentNode"], a["status"]["step"]) for a in agents.values()} == {
        ("Done", 3)}
    stored = stored_ids(stack, f"{ns}/many-")
    assert len(stored) == count and set(stored.values()) == {"succeeded"}


def test_operator_killed_mid_run_converges_without_triggering_twice(stack: OperatorStack,
                                                                     ns: str) -> None:
    count = 40
    stack.apply([agent_manifest(f"kill-{i}", ns, context={"name": f"k{i}", "delay": 1.0})
                 for i in range(count)])
    wait_until(lambda: sum(p is not None for p in phases(stack, ns).values()) >= count // 4,
               60, "some Agents to be triggered")
    assert stack.operator is not None
    stack.operator.kill()
    time.sleep(2)
    stack.start_operator()

    def all_done() -> bool:
        seen = phases(stack, ns)
        return len(seen) == count and all(p == "Succeeded" for p in seen.values())

    wait_until(all_done, 180, f"the Agents to succeed after the restart: {phases(stack, ns)}",
               interval=1.0)
    for name, agent in stack.agents(ns).items():
        agent_id = agent["status"]["agentId"]
        # Each agent ran once: exactly one transition per step, in order.
        assert history_rows(stack, agent_id) == [(1, "Hello", "Work"), (2, "Work", "Done"),
                                                 (3, "Done", None)], name
        assert agent["status"]["step"] == 3


def test_nats_down_for_twenty_seconds_shows_a_condition_and_recovers(stack: OperatorStack,
                                                                      ns: str) -> None:
    assert stack.operator is not None
    stack.operator.stop()
    stack.start_operator(cancel_timeout="6")
    stack.apply([agent_manifest("outage", ns, start="Six1",
                                context={"name": "outage", "delay": 3.0}),
                 agent_manifest("orphan", ns, context={"name": "orphan", "delay": 30.0})])
    stack.wait_phase(ns, "outage", ["Running"])
    stack.wait_phase(ns, "orphan", ["Pending", "Running"])
    stack.nats.kill()
    down_at = time.monotonic()

    def bus_down() -> dict[str, Any] | None:
        agent = stack.agent(ns, "outage") or {}
        found = condition(agent, "BusAvailable")
        return found if found and found["status"] == "False" else None

    shown = wait_until(bus_down, 15, "the BusAvailable=False condition")
    assert shown["reason"] == "BusUnavailable"
    # A delete while NATS is down: the finalizer lets go after the cancel timeout.
    stack.kubectl("delete", "agent", "orphan", "-n", ns, "--wait=false")
    wait_until(lambda: stack.agent(ns, "orphan") is None, 30,
               "the finalizer to let go of a delete NATS could not carry")
    events = json.loads(stack.kubectl("get", "events", "-n", ns, "--field-selector",
                                      "involvedObject.name=orphan", "-o", "json").stdout)
    assert "CancelNotSent" in {e["reason"] for e in events["items"]}
    time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
    stack.nats.start()
    agent = stack.wait_phase(ns, "outage", ["Succeeded", "Failed"], timeout=180)
    assert agent["status"]["phase"] == "Succeeded", agent["status"]
    assert agent["status"]["step"] == 6
    # It may have finished while the operator's link was still down (a worker runs the next
    # steps itself, through PostgreSQL): its follower stays until the link is back and clears
    # the condition.

    def bus_back() -> dict[str, Any] | None:
        found = condition(stack.agent(ns, "outage") or {}, "BusAvailable")
        return found if found and found["status"] == "True" else None

    back = wait_until(bus_back, 30, "BusAvailable=True once NATS is back")
    assert back["reason"] == "BusReconnected"
    assert [r[0] for r in history_rows(stack, agent["status"]["agentId"])] == [1, 2, 3, 4, 5, 6]


def test_peering_lets_one_replica_act(stack: OperatorStack, ns: str) -> None:
    from e2e.operator_stack import OperatorProc

    def triggers(metrics: str) -> float:
        line = 'commandnet_operator_commands_total{kind="trigger",result="Sent"}'
        return sum(float(row.split()[-1]) for row in metrics.splitlines()
                   if row.startswith(line))

    def peers() -> int:
        out = stack.kubectl("get", "clusterkopfpeering", "commandnet", "-o", "json").stdout
        return len(json.loads(out).get("status") or {})

    assert stack.operator is not None
    first = stack.operator
    second = OperatorProc(stack.kube, stack.nats.url, stack.workdir, priority="0")
    try:
        second.wait_ready()
        wait_until(lambda: peers() >= 2, 60, "both replicas in the peering object")
        before = triggers(first.metrics())
        stack.apply([agent_manifest(f"peered-{i}", ns) for i in range(5)])
        for i in range(5):
            assert stack.wait_phase(ns, f"peered-{i}", ["Succeeded"])["status"]["step"] == 3
        assert triggers(first.metrics()) == before + 5
        assert triggers(second.metrics()) == 0  # the paused replica sent nothing
        assert "Resuming operations" not in second.log
    finally:
        second.stop()
