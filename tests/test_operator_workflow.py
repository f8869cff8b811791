"""Payloads, signals and resumes through the Agent resource, without a cluster: the payload
schemas in the graph document, the webhook's payload check, which spec.signals/spec.resumes
entry is due and what it becomes, and the status of a resumed agent. (On a real API server
with workers: e2e/test_operator_workflow.py; the CEL rules: e2e/test_agent_crd.py.)"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from commandnet import GraphAnalyzer
from commandnet.loading import describe_pool
from commandnet.messages import ResumeCommand, SignalCommand
from commandnet_operator.admission import Refused, check_agent
from commandnet_operator.commands import (
    RESUME_TIMEOUT,
    decide,
    due,
    handled,
    not_applied,
    resume_in_flight,
    resume_overdue,
)
from commandnet_operator.handlers import _commands, _known
from commandnet_operator.link import NotSent, StatusBoard
from commandnet_operator.resource import MAX_CONTEXT_BYTES, AgentSpec
from commandnet_operator.status import RESUMED, SIGNALLED, merge
from tests.graphs.waiting import Approval, Order, Split, TakeOrder

GRAPH = describe_pool("wf", [GraphAnalyzer.validate(TakeOrder)])
AID = "ns/a/u"


def cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def spec(**extra: Any) -> dict[str, Any]:
    return {"startNode": "Ask", "pool": "wf", "context": {}, "signals": [], "resumes": [],
            **extra}


SIGNAL = {"id": "approve-1", "name": "approval", "payload": {"by": "ana"}}
RESUME = {"id": "retry-1", "fromNode": "Charge", "contextPatch": {"fail_at": None}}


# ------------------------------------------------------------------- graph document, webhook


def test_the_graph_document_carries_each_payload_schema() -> None:
    (graph,) = GRAPH["graphs"]
    assert graph["payloads"] == {"Approved": Approval.model_json_schema(),
                                 "TakeOrder": Order.model_json_schema()}
    fan = describe_pool("f", [GraphAnalyzer.validate(Split)])["graphs"][0]
    assert list(fan["payloads"]) == ["Gather"]  # list[BranchResult[Ctx]] has a schema too


def test_the_webhook_checks_the_payload_against_the_start_nodes_schema() -> None:
    check_agent(spec(startNode="TakeOrder", payload={"amount": 3}), GRAPH)
    with pytest.raises(Refused, match=r"spec\.payload\.amount: 'x' is not of type 'integer' "
                                      r"\(the payload of node 'TakeOrder' must validate as "
                                      r"Order\)") as info:
        check_agent(spec(startNode="TakeOrder", payload={"amount": "x"}), GRAPH)
    assert info.value.reason == "InvalidPayload"
    with pytest.raises(Refused, match=r"spec\.payload: None is not of type 'object'"):
        check_agent(spec(startNode="TakeOrder"), GRAPH)  # the node needs one
    with pytest.raises(Refused, match="'amount' is a required property"):
        check_agent(spec(startNode="TakeOrder", payload={}), GRAPH)
    check_agent(spec(startNode="Ask", payload={"any": 1}), GRAPH)  # Ask declares none
    old = {**GRAPH, "graphs": [{k: v for k, v in GRAPH["graphs"][0].items()
                                if k != "payloads"}]}
    check_agent(spec(startNode="TakeOrder", payload={"amount": "x"}), old)  # worker checks


def test_payloads_are_size_bounded_like_the_context() -> None:
    big = {"blob": "x" * MAX_CONTEXT_BYTES}
    for where, given in (("spec.payload", spec(payload=big)),
                         ("spec.signals[0].payload",
                          spec(signals=[{**SIGNAL, "payload": big}]))):
        with pytest.raises(Refused, match=re.escape(where) + r" is \d+ bytes") as info:
            check_agent(given, None)
        assert info.value.reason == "PayloadTooLarge"


def test_the_model_takes_signals_and_resumes() -> None:
    model = AgentSpec.model_validate(spec(signals=[SIGNAL], resumes=[RESUME]))
    assert model.signals[0].payload == {"by": "ana"} and model.resumes[0].fromNode == "Charge"
    assert AgentSpec(startNode="A").signals == [] and AgentSpec(startNode="A").resumes == []


# ------------------------------------------------------------------------------- decisions


def test_a_signal_waits_until_the_agent_runs_then_is_sent_with_its_id() -> None:
    given = spec(signals=[SIGNAL])
    assert due(given, {}) and decide(given, {}, AID, GRAPH) is None
    assert decide(given, {"phase": "Pending"}, AID, GRAPH) is None
    decision = decide(given, {"phase": "Running"}, AID, GRAPH)
    assert decision is not None and decision.reason == "SignalSent"
    assert decision.command == SignalCommand(agent_id=AID, name="approval",
                                             payload={"by": "ana"}, signal_id="approve-1")
    after = handled({"phase": "Running", "conditions": []}, decision, 2)
    assert after["signalsSent"] == 1 and not due(given, after)
    assert (cond(after, SIGNALLED)["status"], cond(after, SIGNALLED)["reason"]) == (
        "True", "SignalSent")
    assert decision.event == ("Normal", "SignalSent",
                              "signal 'approval' (id approve-1) sent")


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Cancelled"])
def test_a_signal_for_a_finished_agent_is_refused_and_counted(phase: str) -> None:
    decision = decide(spec(signals=[SIGNAL]), {"phase": phase}, AID, GRAPH)
    assert decision is not None and decision.command is None
    assert decision.reason == "AgentFinished"
    after = handled({"phase": phase}, decision, 1)
    assert after["signalsSent"] == 1
    assert (cond(after, SIGNALLED)["status"], cond(after, SIGNALLED)["reason"]) == (
        "False", "AgentFinished")
    kind, reason, message = decision.event
    assert (kind, reason) == ("Warning", "SignalRefused") and message.startswith("AgentFinished")


@pytest.mark.parametrize("phase", ["Failed", "Cancelled"])
def test_a_resume_of_a_failed_or_cancelled_agent_is_sent_and_in_flight(phase: str) -> None:
    given = spec(resumes=[RESUME])
    decision = decide(given, {"phase": phase}, AID, GRAPH)
    assert decision is not None and decision.reason == "ResumeSent"
    assert decision.command == ResumeCommand(agent_id=AID, node="Charge",
                                             context_patch={"fail_at": None}, request="retry-1")
    after = handled({"phase": phase, "conditions": []}, decision, 1)
    assert after["resumesHandled"] == 1 and resume_in_flight(after)
    assert (cond(after, RESUMED)["status"], cond(after, RESUMED)["reason"]) == (
        "Unknown", "ResumeSent")
    # Nothing more is decided until the workers show the agent running again.
    more = spec(resumes=[RESUME, {**RESUME, "id": "retry-2"}], signals=[SIGNAL])
    assert due(more, after) and decide(more, after, AID, GRAPH) is None


@pytest.mark.parametrize(("phase", "words"), [
    (None, "not started"), ("Pending", "Pending"), ("Running", "Running"),
    ("Succeeded", "Succeeded")])
def test_a_resume_of_an_agent_not_failed_is_refused_saying_why(phase: str | None,
                                                               words: str) -> None:
    status = {"phase": phase} if phase else {}
    decision = decide(spec(resumes=[RESUME]), status, AID, GRAPH)
    assert decision is not None and decision.command is None
    assert decision.reason == "NotFinished" and f"the agent is {words}" in decision.message
    after = handled(status, decision, 1)
    assert after["resumesHandled"] == 1 and not resume_in_flight(after)
    assert (cond(after, RESUMED)["status"], cond(after, RESUMED)["reason"]) == (
        "False", "NotFinished")
    assert decision.event[:2] == ("Warning", "ResumeRefused")


def test_a_resume_at_a_node_the_graph_lacks_is_refused_listing_its_nodes() -> None:
    decision = decide(spec(resumes=[{**RESUME, "fromNode": "Nope"}]), {"phase": "Failed"}, AID,
                      GRAPH)
    assert decision is not None and decision.command is None and decision.reason == "UnknownNode"
    assert "no node 'Nope'" in decision.message and "Charge" in decision.message
    # Without a published graph the worker decides.
    sent = decide(spec(resumes=[{**RESUME, "fromNode": "Nope"}]), {"phase": "Failed"}, AID, None)
    assert sent is not None and sent.command is not None


def test_resumes_come_before_signals_and_entries_go_in_order() -> None:
    given = spec(signals=[SIGNAL], resumes=[RESUME])
    first = decide(given, {"phase": "Failed"}, AID, GRAPH)
    assert first is not None and first.kind == "resume"
    status = handled({"phase": "Failed"}, first, 1)
    assert decide(given, status, AID, GRAPH) is None  # in flight
    running = merge(status, {"status": "running", "node": "Charge", "step": 3,
                             "updated_at": "2026-12-02T10:00:00+00:00"}, 1)
    then = decide(given, running, AID, GRAPH)
    assert then is not None and then.kind == "signal" and then.command is not None


def test_a_resume_the_workers_do_not_apply_is_reported_after_the_timeout() -> None:
    decision = decide(spec(resumes=[RESUME]), {"phase": "Failed"}, AID, GRAPH)
    assert decision is not None
    sent = handled({"phase": "Failed"}, decision, 1)
    at = datetime.fromisoformat(cond(sent, RESUMED)["lastTransitionTime"].replace("Z", "+00:00"))
    assert not resume_overdue(sent, at + timedelta(seconds=RESUME_TIMEOUT - 1))
    assert resume_overdue(sent, at + timedelta(seconds=RESUME_TIMEOUT + 1))
    gave_up = not_applied(sent, 1)
    assert not resume_in_flight(gave_up)
    assert (cond(gave_up, RESUMED)["status"], cond(gave_up, RESUMED)["reason"]) == (
        "False", "ResumeNotApplied")


# --------------------------------------------------------------------- a resumed agent's status


def value(status: str, node: str, step: int, **extra: object) -> dict[str, object]:
    return {"status": status, "node": node, "step": step,
            "updated_at": "2026-12-02T10:00:00+00:00", **extra}


def test_a_resumed_agent_goes_back_to_running_and_on() -> None:
    running = merge({"phase": "Pending", "conditions": []}, value("running", "Charge", 2), 1)
    failed = merge(running, value("failed", "Charge", 2, error="card declined"), 1)
    assert failed["phase"] == "Failed" and failed["completionTime"]
    assert merge(failed, value("failed", "Charge", 2), 1) is failed  # a replay: no change
    again = merge(failed, value("running", "Charge", 3), 1)
    assert (again["phase"], again["step"], again["currentNode"]) == ("Running", 3, "Charge")
    assert again["completionTime"] is None and again["error"] is None  # patched away (null)
    assert (cond(again, "Failed")["status"], cond(again, "Failed")["reason"]) == (
        "False", "Resumed")
    assert (cond(again, RESUMED)["status"], cond(again, RESUMED)["reason"]) == (
        "True", "Resumed")
    assert [h["phase"] for h in again["history"]] == ["Running", "Failed", "Running"]
    done = merge(again, value("succeeded", "Charge", 4), 1)
    assert done["phase"] == "Succeeded" and done["completionTime"]
    assert cond(done, "Complete")["status"] == "True"


# ------------------------------------------------------------------ the operator's send loop


class FakeLink:
    def __init__(self, refuse: bool = False) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.refuse = refuse
        self.board = StatusBoard()

    def graph(self, pool: str) -> dict[str, Any] | None:
        return GRAPH if pool == "wf" else None

    async def send(self, pool: str, command: Any) -> None:
        if self.refuse:
            raise NotSent("BusUnavailable", "NATS is unreachable")
        self.sent.append((pool, command))


async def test_the_operator_sends_what_is_due_and_counts_it() -> None:
    memo = SimpleNamespace(link=FakeLink(), progress={}, followers={})
    log = logging.getLogger("test")
    given = spec(signals=[SIGNAL, {**SIGNAL, "id": "approve-2"}], resumes=[RESUME])
    status, events, retry = await _commands(memo, given, {"phase": "Running", "conditions": []},
                                            AID, 1, log)
    assert not retry
    assert (status["resumesHandled"], status["signalsSent"]) == (1, 2)
    assert [type(c).__name__ for _, c in memo.link.sent] == ["SignalCommand", "SignalCommand"]
    assert [e[1] for e in events] == ["ResumeRefused", "SignalSent", "SignalSent"]
    memo.link.refuse = True
    more = spec(signals=[*given["signals"], {**SIGNAL, "id": "approve-3"}])
    after, events, retry = await _commands(memo, more, status, AID, 1, log)
    assert retry and after["signalsSent"] == 2 and events == []  # again later


def test_progress_this_process_made_is_never_forgotten_by_a_stale_event() -> None:
    memo = SimpleNamespace(progress={AID: (2, 1)})
    stale = {"phase": "Failed", "signalsSent": 1}
    assert _known(memo, AID, stale) == {"phase": "Failed", "signalsSent": 2,
                                        "resumesHandled": 1}
    fresh = {"phase": "Running", "signalsSent": 3, "resumesHandled": 1}
    assert _known(memo, AID, fresh) is fresh
    assert _known(memo, "other", stale) is stale


def test_the_resume_condition_time_is_a_kubernetes_time() -> None:
    decision = decide(spec(resumes=[RESUME]), {"phase": "Cancelled"}, AID, GRAPH)
    assert decision is not None
    when = cond(handled({}, decision, 1), RESUMED)["lastTransitionTime"]
    parsed = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 5


# --------------------------------------------------------- a finished Agent followed again


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                           uid: str) -> None:
        self.patches.append(status)

    async def post_event(self, agent: dict[str, Any], kind: str, reason: str,
                         message: str) -> None:
        self.events.append((reason, message))


def operator_memo() -> SimpleNamespace:
    from aiolimiter import AsyncLimiter

    link = FakeLink()
    link.available = True  # type: ignore[attr-defined]
    return SimpleNamespace(link=link, kube=FakeKube(), limiter=AsyncLimiter(100, 1.0),
                           settings=SimpleNamespace(status_window=0.05, trigger_retry=0.1),
                           followers={}, progress={})


def agent_body(status: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": "a", "namespace": "ns", "uid": "u", "generation": 3},
            "spec": spec(**extra), "status": status}


async def test_a_resume_appended_to_a_failed_agent_starts_a_follower_to_its_new_end() -> None:
    from commandnet_operator.handlers import Follower, watch_commands

    memo = operator_memo()
    failed = merge({"phase": "Pending", "conditions": []}, value("failed", "Charge", 2,
                                                                 error="card declined"), 1)
    body = agent_body({**failed, "agentId": AID}, resumes=[RESUME])
    log = logging.getLogger("test")
    kwargs = {"body": body, "spec": body["spec"], "meta": body["metadata"], "namespace": "ns",
              "name": "a", "uid": "u", "memo": memo, "logger": log}
    await watch_commands(event={"type": "MODIFIED"}, **kwargs)
    follower = memo.followers[AID]
    assert isinstance(follower, Follower) and follower.task is not None
    await watch_commands(event={"type": "MODIFIED"}, **kwargs)  # one follower, not two
    assert memo.followers[AID] is follower

    async def until(check: Any) -> None:
        for _ in range(200):
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    await until(lambda: memo.link.sent)
    ((pool, command),) = memo.link.sent
    assert pool == "wf" and command == ResumeCommand(
        agent_id=AID, node="Charge", context_patch={"fail_at": None}, request="retry-1")
    await until(lambda: memo.kube.patches)
    assert memo.kube.patches[0]["resumesHandled"] == 1
    assert memo.kube.patches[0]["observedGeneration"] == 3
    assert not follower.task.done()  # in flight: it waits for the workers
    memo.link.board.put(AID, value("running", "Charge", 3))
    memo.link.board.put(AID, value("succeeded", "Charge", 4))
    await asyncio.wait_for(follower.task, 5)
    assert AID not in memo.followers
    last = memo.kube.patches[-1]
    assert last["phase"] == "Succeeded", memo.kube.patches
    reasons = [r for r, _ in memo.kube.events]
    assert reasons[0] == "ResumeSent" and reasons[-1] == "Succeeded", reasons
    # Deleting the Agent forgets it.
    await watch_commands(event={"type": "DELETED"}, **kwargs)
    assert AID not in memo.progress
