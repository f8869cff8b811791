"""The generated Agent CRD (crds/agents.commandnet.io.yaml) and kopf's peering CRD on a real
kube-apiserver: schema, CEL immutability, printer columns, status subresource, limits.

Uses its own namespace on the shared session cluster and deletes it (and the peering object,
if it created it) afterwards. The CRDs stay installed: they are cluster-wide, and any other test
applies the same files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from commandnet_operator.crd import (
    APPEND_ONLY_MESSAGE,
    CRD_NAME,
    ENTRY_CHANGED_MESSAGE,
    IMMUTABLE_SPEC_MESSAGE,
)
from commandnet_operator.resource import (
    API_VERSION,
    HISTORY_LIMIT,
    MAX_CONTEXT_PROPERTIES,
    Agent,
    AgentSpec,
    AgentStatus,
    Condition,
    Phase,
    Transition,
)
from e2e.testbed import LocalCluster
from tests.graphs.procs import wait_until

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parent.parent
AGENT_CRD = ROOT / "crds" / "agents.commandnet.io.yaml"
PEERING_CRD = ROOT / "crds" / "kopf-peering.yaml"
PEERING_OBJECT = ROOT / "operator" / "deploy" / "peering.yaml"
NS = "e2e-agent-crd"
COLUMNS = ["NAME", "POOL", "PHASE", "NODE", "STEP", "AGE"]


@pytest.fixture(scope="module")
def agents(kube: LocalCluster) -> Iterator[LocalCluster]:
    """The Agent CRD applied and Established, and namespace NS (deleted afterwards)."""
    kube.kubectl("apply", "-f", str(AGENT_CRD))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
    kube.kubectl("create", "namespace", NS)
    try:
        yield kube
    finally:
        kube.kubectl("delete", "namespace", NS, "--wait=false", "--ignore-not-found", check=False)


def agent(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Agent", "metadata": {"name": name},
            "spec": spec}


def create(kube: LocalCluster, obj: dict[str, Any], check: bool = True) -> CompletedProcess[str]:
    return kube.kubectl("create", "-n", NS, "-f", "-", input=json.dumps(obj), check=check)


def get(kube: LocalCluster, name: str) -> dict[str, Any]:
    out = kube.kubectl("get", "agent", name, "-n", NS, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def table(kube: LocalCluster, resource: str) -> list[list[str]]:
    out = kube.kubectl("get", resource, "-n", NS).stdout
    return [line.split() for line in out.splitlines()]


def test_crd_is_established_with_its_names(agents: LocalCluster) -> None:
    crd = json.loads(agents.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True", conditions
    assert conditions.get("NonStructuralSchema") is None, conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == ["ag"]
    assert crd["status"]["acceptedNames"]["categories"] == ["commandnet", "all"]


def test_kubectl_explain_shows_the_descriptions(agents: LocalCluster) -> None:
    # The OpenAPI document is published a moment after Established.
    def explain() -> str | None:
        res = agents.kubectl("explain", "agent.spec.context", check=False)
        return res.stdout if res.returncode == 0 else None

    shown = wait_until(explain, 60, "kubectl explain agent.spec.context", interval=0.5)
    text = " ".join(shown.split())
    assert "Initial context: a JSON object" in text, text
    assert f"At most {MAX_CONTEXT_PROPERTIES} top-level keys" in text, text
    kind = " ".join(agents.kubectl("explain", "agent").stdout.split())
    assert "A durable agent run by a commandnet worker pool." in kind, kind
    assert "spec <Object> -required-" in kind and "What to run:" in kind, kind
    assert "What the agent is doing" in kind, kind
    signals = " ".join(agents.kubectl("explain", "agent.spec.signals").stdout.split())
    assert "Append only" in signals and "/spec/signals/-" in signals, signals
    resumes = " ".join(agents.kubectl("explain", "agent.spec.resumes.contextPatch").stdout.split())
    assert "JSON merge patch (RFC 7396)" in resumes, resumes


def test_valid_agent_from_the_model_is_created_and_reads_back(agents: LocalCluster) -> None:
    model = Agent(metadata={"name": "valid"},
                  spec=AgentSpec(startNode="AuthCheck",
                                 context={"user_query": "clean_logs", "nested": {"a": [1, 2]}}))
    # model_dump gives null for unset optionals (status, ttlSecondsAfterFinished): the API
    # server prunes them, and the model reads the absent fields back as None.
    create(agents, model.model_dump(mode="json"))
    got = get(agents, "valid")
    assert got["spec"] == {"startNode": "AuthCheck", "pool": "default",
                           "context": {"user_query": "clean_logs", "nested": {"a": [1, 2]}},
                           "signals": [], "resumes": []}
    assert "status" not in got
    back = Agent.model_validate(got)
    assert back.spec == model.spec and back.status is None


@pytest.mark.parametrize(("case", "spec", "field", "words"), [
    ("no-start-node", {"pool": "default"}, "spec.startNode", "Required value"),
    ("bad-pool", {"startNode": "A", "pool": "bad pool!"}, "spec.pool", "should match"),
    ("negative-ttl", {"startNode": "A", "ttlSecondsAfterFinished": -1},
     "spec.ttlSecondsAfterFinished", "greater than or equal to 0"),
    ("context-list", {"startNode": "A", "context": [1, 2]}, "spec.context",
     "must be of type object"),
    ("context-string", {"startNode": "A", "context": "text"}, "spec.context",
     "must be of type object"),
    ("too-many-keys",
     {"startNode": "A", "context": {f"k{i}": i for i in range(MAX_CONTEXT_PROPERTIES + 1)}},
     "spec.context", f"must have at most {MAX_CONTEXT_PROPERTIES} items"),
])
def test_invalid_agent_is_refused_naming_the_field(
    agents: LocalCluster, case: str, spec: dict[str, Any], field: str, words: str
) -> None:
    res = create(agents, agent(f"bad-{case}", **spec), check=False)
    assert res.returncode != 0, res.stdout
    assert field in res.stderr and words in res.stderr, res.stderr
    gone = agents.kubectl("get", "agent", f"bad-{case}", "-n", NS, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_missing_spec_and_unknown_fields_are_refused(agents: LocalCluster) -> None:
    res = create(agents, {"apiVersion": API_VERSION, "kind": "Agent",
                          "metadata": {"name": "no-spec"}}, check=False)
    assert res.returncode != 0 and "spec: Required value" in res.stderr, res.stderr
    res = create(agents, agent("typo", startNode="A", startnode="B"), check=False)
    assert res.returncode != 0 and 'unknown field "spec.startnode"' in res.stderr, res.stderr


def test_context_at_the_limit_is_accepted(agents: LocalCluster) -> None:
    create(agents, agent("full", startNode="A",
                         context={f"k{i}": i for i in range(MAX_CONTEXT_PROPERTIES)}))
    assert len(get(agents, "full")["spec"]["context"]) == MAX_CONTEXT_PROPERTIES


def test_spec_is_immutable(agents: LocalCluster) -> None:
    create(agents, agent("fixed", startNode="AuthCheck", context={"n": 1}))
    for patch in ({"spec": {"startNode": "Other"}}, {"spec": {"context": {"n": 2}}},
                  {"spec": {"pool": "other"}}, {"spec": {"payload": {"n": 2}}},
                  {"spec": {"ttlSecondsAfterFinished": 3}}):
        res = agents.kubectl("patch", "agent", "fixed", "-n", NS, "--type=merge",
                             "-p", json.dumps(patch), check=False)
        assert res.returncode != 0, (patch, res.stdout)
        assert IMMUTABLE_SPEC_MESSAGE in res.stderr, res.stderr
    assert get(agents, "fixed")["spec"]["startNode"] == "AuthCheck"
    # Metadata is not spec: labels may change.
    agents.kubectl("label", "agent", "fixed", "-n", NS, "team=a")
    assert get(agents, "fixed")["metadata"]["labels"] == {"team": "a"}


def json_patch(kube: LocalCluster, name: str, *ops: dict[str, Any]) -> CompletedProcess[str]:
    """``kubectl patch --type=json`` as the docs show it."""
    return kube.kubectl("patch", "agent", name, "-n", NS, "--type=json", "-p", json.dumps(ops),
                        check=False)


def test_payload_is_a_json_object_kept_as_given_and_immutable(agents: LocalCluster) -> None:
    payload = {"amount": 5, "items": [1, "a"], "nested": {"x": None, "y": 1.5}}
    create(agents, agent("paid", startNode="TakeOrder", payload=payload))
    assert get(agents, "paid")["spec"]["payload"] == payload
    res = create(agents, agent("paid-list", startNode="TakeOrder", payload=[1, 2]), check=False)
    assert res.returncode != 0 and "spec.payload" in res.stderr, res.stderr
    res = agents.kubectl("patch", "agent", "paid", "-n", NS, "--type=merge",
                         "-p", json.dumps({"spec": {"payload": {"amount": 6}}}), check=False)
    assert res.returncode != 0 and IMMUTABLE_SPEC_MESSAGE in res.stderr, res.stderr
    res = json_patch(agents, "paid", {"op": "remove", "path": "/spec/payload"})
    assert res.returncode != 0 and IMMUTABLE_SPEC_MESSAGE in res.stderr, res.stderr
    # Adding a field that was absent is a change too.
    res = json_patch(agents, "paid", {"op": "add", "path": "/spec/ttlSecondsAfterFinished",
                                      "value": 5})
    assert res.returncode != 0 and IMMUTABLE_SPEC_MESSAGE in res.stderr, res.stderr
    assert get(agents, "paid")["spec"]["payload"] == payload


@pytest.mark.parametrize("field", ["signals", "resumes"])
def test_signals_and_resumes_may_only_grow(agents: LocalCluster, field: str) -> None:
    name = f"grow-{field}"
    create(agents, agent(name, startNode="Ask", context={"n": 1}))
    assert get(agents, name)["spec"][field] == []  # defaulted: `add .../-` works at once

    def entry(i: int, **extra: Any) -> dict[str, Any]:
        if field == "signals":
            return {"id": f"e-{i}", "name": "approval", "payload": {"by": f"u{i}"}, **extra}
        return {"id": f"e-{i}", "fromNode": "Ask", "contextPatch": {"n": i}, **extra}

    # The documented way: kubectl patch --type=json, op add, path /spec/<field>/-.
    for i in (1, 2):
        res = json_patch(agents, name, {"op": "add", "path": f"/spec/{field}/-",
                                        "value": entry(i)})
        assert res.returncode == 0, res.stderr
    assert get(agents, name)["spec"][field] == [entry(1), entry(2)]
    changed = ENTRY_CHANGED_MESSAGE.format(field=field)
    grow_only = APPEND_ONLY_MESSAGE.format(field=field)
    refused = [
        ([{"op": "replace", "path": f"/spec/{field}/0", "value": entry(1, fromNode="Other")
           if field == "resumes" else entry(1, name="other")}], changed),
        ([{"op": "remove", "path": f"/spec/{field}/0"}], grow_only),
        ([{"op": "remove", "path": f"/spec/{field}/1"}], grow_only),
        ([{"op": "replace", "path": f"/spec/{field}", "value": [entry(2), entry(1)]}], grow_only),
        ([{"op": "add", "path": f"/spec/{field}/0", "value": entry(3)}], grow_only),
        ([{"op": "add", "path": f"/spec/{field}/1", "value": entry(3)}], grow_only),
        # removed and another appended: the size stays, the entry is gone
        ([{"op": "remove", "path": f"/spec/{field}/1"},
          {"op": "add", "path": f"/spec/{field}/-", "value": entry(3)}], grow_only),
        ([{"op": "add", "path": f"/spec/{field}/-", "value": entry(3)},
          {"op": "replace", "path": "/spec/startNode", "value": "Other"}],
         IMMUTABLE_SPEC_MESSAGE),
    ]
    for ops, message in refused:
        res = json_patch(agents, name, *ops)
        assert res.returncode != 0, (ops, res.stdout)
        assert message in res.stderr, (ops, res.stderr)
    res = json_patch(agents, name, {"op": "add", "path": f"/spec/{field}/-", "value": entry(1)})
    assert res.returncode != 0 and "Duplicate value" in res.stderr, res.stderr
    assert get(agents, name)["spec"][field] == [entry(1), entry(2)]
    # A merge patch replaces the whole list: appending that way works too.
    res = agents.kubectl("patch", "agent", name, "-n", NS, "--type=merge", "-p", json.dumps(
        {"spec": {field: [entry(1), entry(2), entry(3)]}}), check=False)
    assert res.returncode == 0, res.stderr
    assert [e["id"] for e in get(agents, name)["spec"][field]] == ["e-1", "e-2", "e-3"]


def test_status_subresource_and_printer_columns(agents: LocalCluster) -> None:
    create(agents, agent("columns", startNode="AuthCheck", pool="gpu-1"))
    for resource in ("agents", "ag", "commandnet"):
        rows = table(agents, resource)
        assert rows[0] == COLUMNS, (resource, rows)
        assert ["columns", "gpu-1"] == next(r for r in rows if r[0] == "columns")[:2], rows

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    status = AgentStatus(
        phase=Phase.RUNNING, agentId=f"{NS}/columns/uid", currentNode="Executing", step=2,
        observedGeneration=1, startTime=now,
        conditions=[Condition(type="Triggered", status="True", reason="TriggerSent",
                              lastTransitionTime=now, observedGeneration=1)],
        history=[Transition(step=s, node="AuthCheck", phase=Phase.RUNNING, time=now)
                 for s in (1, 2)],
    )
    patch = {"status": status.model_dump(mode="json")}
    # Through the main resource, status is ignored (the status subresource owns it).
    agents.kubectl("patch", "agent", "columns", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    assert "status" not in get(agents, "columns")
    agents.kubectl("patch", "agent", "columns", "-n", NS, "--subresource=status",
                   "--type=merge", "-p", json.dumps(patch))
    got = get(agents, "columns")
    assert AgentStatus.model_validate(got["status"]) == status
    assert "error" not in got["status"]  # None was sent as null, which deletes / prunes
    row = next(r for r in table(agents, "agents") if r[0] == "columns")
    assert row[:5] == ["columns", "gpu-1", "Running", "Executing", "2"], row

    # Conditions are a map keyed by type: a second entry of one type is refused.
    res = agents.kubectl("patch", "agent", "columns", "-n", NS, "--subresource=status",
                         "--type=json", "-p", json.dumps([
                             {"op": "add", "path": "/status/conditions/-",
                              "value": {"type": "Triggered", "status": "False", "reason": "Dup",
                                        "lastTransitionTime": "2026-01-02T03:04:05Z"}}]),
                         check=False)
    assert res.returncode != 0, res.stdout
    assert "status.conditions[1]: Duplicate value" in res.stderr, res.stderr
    conditions = get(agents, "columns")["status"]["conditions"]
    assert [c["type"] for c in conditions] == ["Triggered"], conditions


def test_status_is_validated(agents: LocalCluster) -> None:
    create(agents, agent("checked", startNode="AuthCheck"))

    def patch_status(status: dict[str, Any]) -> CompletedProcess[str]:
        return agents.kubectl("patch", "agent", "checked", "-n", NS, "--subresource=status",
                              "--type=merge", "-p", json.dumps({"status": status}),
                              check=False)

    res = patch_status({"phase": "Bogus"})
    assert res.returncode != 0 and "status.phase" in res.stderr, res.stderr
    entry = {"step": 1, "node": "A", "phase": "Running", "time": "2026-01-02T03:04:05Z"}
    res = patch_status({"history": [entry] * (HISTORY_LIMIT + 1)})
    assert res.returncode != 0, res.stdout
    assert f"status.history: Too many: {HISTORY_LIMIT + 1}" in res.stderr, res.stderr
    patch_status({"history": [entry] * HISTORY_LIMIT, "phase": "Succeeded"}).check_returncode()
    got = get(agents, "checked")["status"]
    assert len(got["history"]) == HISTORY_LIMIT and got["phase"] == "Succeeded"


def test_kopf_peering_crd_and_object(kube: LocalCluster) -> None:
    existed = kube.kubectl("get", "clusterkopfpeering", "commandnet", check=False)
    kube.kubectl("apply", "-f", str(PEERING_CRD))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                 "crd/clusterkopfpeerings.kopf.dev")
    created_here = existed.returncode != 0
    kube.kubectl("apply", "-f", str(PEERING_OBJECT))
    try:
        # What kopf's keep-alive does: a merge patch of status with its identity's record.
        record = {"priority": 0, "lifetime": 60, "lastseen": "2026-01-02T03:04:05+00:00"}
        kube.kubectl("patch", "clusterkopfpeering", "commandnet", "--type=merge",
                     "-p", json.dumps({"status": {"e2e@host/1/abc": record}}))
        got = json.loads(kube.kubectl("get", "clusterkopfpeering", "commandnet",
                                      "-o", "json").stdout)
        assert got["status"]["e2e@host/1/abc"] == record
        assert "namespace" not in got["metadata"]  # cluster-scoped
        kube.kubectl("patch", "clusterkopfpeering", "commandnet", "--type=merge",
                     "-p", json.dumps({"status": {"e2e@host/1/abc": None}}))
    finally:
        if created_here:
            kube.kubectl("delete", "clusterkopfpeering", "commandnet", "--ignore-not-found",
                         check=False)
