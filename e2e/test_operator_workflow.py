"""Payloads, signals and resumes through the Agent resource (issue 11), on the test bed's real
API server with real NATS, PostgreSQL, ``commandnet worker`` processes running
tests/graphs/waiting.py, and the operator. One stack for the module; each test its namespace.

The graph: TakeOrder (payload Order{amount}) -> Ask, which waits for signal "approval"
(payload Approval{by}) -> Approved -> Charge, which fails when the context's fail_at is
"Charge"."""

from __future__ import annotations

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

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]
POOL = "wf"
_names = itertools.count(1)


@pytest.fixture(scope="module")
def stack(kube: LocalCluster, postgres_server: PostgresServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorStack]:
    with scratch_database(postgres_server, "operator_wf") as dsn:
        running = OperatorStack(kube, tmp_path_factory.mktemp("operator-wf"), dsn, pool=POOL,
                                graphs=("tests.graphs.waiting:TakeOrder",))
        try:
            yield running.start()
        finally:
            running.stop()


@pytest.fixture
def ns(stack: OperatorStack) -> Iterator[str]:
    name = stack.namespace(f"wf-{next(_names)}-{int(time.time()) % 100000}")
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


def manifest(name: str, ns: str, start: str = "Ask", **spec: Any) -> dict[str, Any]:
    context = {"timeout": 300.0, **spec.pop("context", {})}
    return agent_manifest(name, ns, start=start, pool=POOL, context=context, **spec)


def append(stack: OperatorStack, ns: str, name: str, field: str, entry: dict[str, Any]) -> None:
    """The documented way: ``kubectl patch --type=json``, op add, path /spec/<field>/-."""
    stack.kubectl("patch", "agent", name, "-n", ns, "--type=json", "-p",
                  json.dumps([{"op": "add", "path": f"/spec/{field}/-", "value": entry}]))


def stored(stack: OperatorStack, agent_id: str) -> dict[str, Any]:
    (row,) = sql(stack.store_url, "SELECT status, node, context FROM agents WHERE agent_id = $1",
                 agent_id)
    context = row["context"]
    return {"status": row["status"], "node": row["node"],
            "context": json.loads(context) if isinstance(context, str) else context}


def history(stack: OperatorStack, agent_id: str) -> list[tuple[str, str]]:
    rows = sql(stack.store_url, "SELECT from_node, to_node FROM history WHERE agent_id = $1 "
               "ORDER BY step", agent_id)
    return [(r["from_node"], r["to_node"]) for r in rows]


def condition(agent: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in agent.get("status", {}).get("conditions", [])
                 if c["type"] == kind), None)


def events(stack: OperatorStack, ns: str, name: str) -> list[tuple[str, str]]:
    out = stack.kubectl("get", "events", "-n", ns, "--field-selector",
                        f"involvedObject.name={name}", "-o", "json").stdout
    items = sorted(json.loads(out)["items"], key=lambda e: e["metadata"]["creationTimestamp"])
    return [(e["reason"], e["message"]) for e in items]


def wait_waiting(stack: OperatorStack, ns: str, name: str) -> dict[str, Any]:
    """Wait until the Agent runs and the store shows it parked at Ask."""
    agent = stack.wait_phase(ns, name, ["Running"])
    aid = agent["status"]["agentId"]
    wait_until(lambda: "ask" in stored(stack, aid)["context"].get("log", []), 60,
               f"agent {aid} to wait at Ask")
    return agent


def test_a_waiting_agent_finishes_when_a_signal_is_appended(stack: OperatorStack,
                                                            ns: str) -> None:
    stack.apply([manifest("approve-me", ns)])
    agent = wait_waiting(stack, ns, "approve-me")
    time.sleep(1.0)  # it keeps waiting: nothing is sent without an entry
    assert stack.agent(ns, "approve-me")["status"]["phase"] == "Running"  # type: ignore[index]
    append(stack, ns, "approve-me", "signals",
           {"id": "approve-1", "name": "approval", "payload": {"by": "ana"}})
    done = stack.wait_phase(ns, "approve-me", ["Succeeded", "Failed"])
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["signalsSent"] == 1
    sent = condition(done, "Signalled")
    assert sent is not None and (sent["status"], sent["reason"]) == ("True", "SignalSent")
    got = stored(stack, agent["status"]["agentId"])
    assert got["context"]["approved_by"] == "ana", got
    assert got["context"]["log"] == ["ask", "approved:ana"], got
    # A signal appended to a finished agent is refused, and the status and an Event say why.
    append(stack, ns, "approve-me", "signals", {"id": "late", "name": "approval",
                                                "payload": {"by": "bo"}})

    def refused() -> dict[str, Any] | None:
        now = stack.agent(ns, "approve-me")
        return now if now and now["status"].get("signalsSent") == 2 else None

    late = wait_until(refused, 30, "the late signal to be refused")
    said = condition(late, "Signalled")
    assert said is not None and (said["status"], said["reason"]) == ("False", "AgentFinished")
    assert late["status"]["phase"] == "Succeeded"
    wait_until(lambda: any(r == "SignalRefused" for r, _ in events(stack, ns, "approve-me")),
               30, "a SignalRefused event")
    assert stored(stack, agent["status"]["agentId"])["context"]["approved_by"] == "ana"


def test_a_trigger_payload_and_a_signal_given_at_creation_are_delivered(
        stack: OperatorStack, ns: str) -> None:
    # The signal is in the spec from the start: sent once the agent runs, kept until it waits.
    stack.apply([manifest("order", ns, start="TakeOrder", payload={"amount": 7},
                          signals=[{"id": "a1", "name": "approval", "payload": {"by": "cy"}}])])
    done = stack.wait_phase(ns, "order", ["Succeeded", "Failed"])
    assert done["status"]["phase"] == "Succeeded", done["status"]
    got = stored(stack, done["status"]["agentId"])
    assert got["context"]["log"] == ["order:7", "ask", "approved:cy", "charge:7"], got
    # The webhook checks the payload against TakeOrder's published schema.
    res = stack.apply([manifest("bad-order", ns, start="TakeOrder", payload={"amount": "x"})],
                      check=False)
    assert res.returncode != 0, res.stdout
    assert "spec.payload.amount: 'x' is not of type 'integer'" in res.stderr, res.stderr
    assert "must validate as Order" in res.stderr, res.stderr


def test_a_failed_agent_is_resumed_through_spec_resumes(stack: OperatorStack, ns: str) -> None:
    stack.apply([manifest("charge", ns, start="TakeOrder", payload={"amount": 5},
                          context={"fail_at": "Charge"},
                          signals=[{"id": "a1", "name": "approval", "payload": {"by": "di"}}])])
    failed = stack.wait_phase(ns, "charge", ["Succeeded", "Failed"])
    assert failed["status"]["phase"] == "Failed", failed["status"]
    assert "card declined" in failed["status"]["error"]
    aid = failed["status"]["agentId"]
    append(stack, ns, "charge", "resumes",
           {"id": "retry-1", "fromNode": "Charge", "contextPatch": {"fail_at": None}})
    done = stack.wait_phase(ns, "charge", ["Succeeded"], timeout=90)
    status = done["status"]
    assert status["resumesHandled"] == 1
    assert "error" not in status and status["completionTime"]
    resumed = condition(done, "Resumed")
    assert resumed is not None and (resumed["status"], resumed["reason"]) == ("True", "Resumed")
    assert condition(done, "Complete")["status"] == "True"  # type: ignore[index]
    phases = [h["phase"] for h in status["history"]]
    assert "Failed" in phases and phases[-1] == "Succeeded", phases
    got = stored(stack, aid)
    assert got["status"] == "succeeded" and got["context"]["fail_at"] is None, got
    assert got["context"]["log"][-1] == "charge:5", got
    assert ("Charge", "Charge") in history(stack, aid)  # the resume is in the store's history
    reasons = [r for r, _ in events(stack, ns, "charge")]
    assert "ResumeSent" in reasons and "Failed" in reasons  # (a list of Events has no order)
    # A resume appended to a Succeeded agent is refused, saying why.
    append(stack, ns, "charge", "resumes", {"id": "retry-2", "fromNode": "Charge"})

    def refused() -> dict[str, Any] | None:
        now = stack.agent(ns, "charge")
        return now if now and now["status"].get("resumesHandled") == 2 else None

    after = wait_until(refused, 30, "the second resume to be refused")
    said = condition(after, "Resumed")
    assert said is not None and (said["status"], said["reason"]) == ("False", "NotFinished")
    assert after["status"]["phase"] == "Succeeded"
    wait_until(lambda: any(r == "ResumeRefused" for r, _ in events(stack, ns, "charge")), 30,
               "a ResumeRefused event")


def test_a_resume_appended_while_running_is_refused_and_a_later_one_works(
        stack: OperatorStack, ns: str) -> None:
    stack.apply([manifest("early", ns, start="TakeOrder", payload={"amount": 2},
                          context={"fail_at": "Charge"})])
    wait_waiting(stack, ns, "early")
    append(stack, ns, "early", "resumes", {"id": "too-soon", "fromNode": "Charge"})

    def refused() -> dict[str, Any] | None:
        now = stack.agent(ns, "early")
        return now if now and now["status"].get("resumesHandled") == 1 else None

    agent = wait_until(refused, 30, "the early resume to be refused")
    said = condition(agent, "Resumed")
    assert said is not None and (said["status"], said["reason"]) == ("False", "NotFinished")
    assert "the agent is Running" in said["message"]
    append(stack, ns, "early", "signals", {"id": "ok", "name": "approval",
                                           "payload": {"by": "ed"}})
    assert stack.wait_phase(ns, "early", ["Failed", "Succeeded"])["status"]["phase"] == "Failed"
    # The operator restarts: a resume appended now is still handled (its progress is in the
    # status), and the refused one is not sent again.
    assert stack.operator is not None
    stack.operator.stop()
    stack.start_operator()
    append(stack, ns, "early", "resumes", {"id": "now", "fromNode": "Charge",
                                           "contextPatch": {"fail_at": None}})
    done = stack.wait_phase(ns, "early", ["Succeeded"], timeout=90)
    assert done["status"]["resumesHandled"] == 2
    got = stored(stack, done["status"]["agentId"])
    assert got["context"]["log"][-1] == "charge:2", got
    assert sum(1 for r, _ in events(stack, ns, "early") if r == "ResumeSent") == 1
