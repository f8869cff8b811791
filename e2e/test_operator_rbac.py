"""The operator's RBAC (operator/rbac/) is least privilege: the real operator, run as its
service account on the test bed's API server (RBAC on), works with the ClusterRole; fails in
the expected way without any single verb of it; and holds nothing else.

One NATS + worker + PostgreSQL stack for the module; each case only restarts the operator.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from commandnet.local.postgres import PostgresServer
from e2e.operator_stack import OperatorProc, OperatorStack, agent_manifest, scratch_database
from e2e.testbed import LocalCluster
from tests.graphs.procs import REPO, wait_until

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]

RBAC = REPO / "operator" / "rbac"
SA_NAMESPACE = "commandnet-system"
SA_NAME = "commandnet-operator"
SA_USER = f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}"
WEBHOOK = "commandnet.io"
PEERING = "commandnet"
FIRST_PRIORITY = 50_000_000  # above the operator's default (random, at most 1e6)
_names = itertools.count(1)


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((RBAC / name).read_text())
    return loaded


CLUSTER_ROLE = load("clusterrole.yaml")


@dataclass(frozen=True)
class Grant:
    """One verb on one resource, as one rule of the ClusterRole gives it."""

    group: str
    resource: str
    verb: str
    names: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        named = f"/{','.join(self.names)}" if self.names else ""
        return f"{self.resource}.{self.group or 'core'}{named}:{self.verb}"

    def can_i(self) -> list[str]:
        """``kubectl auth can-i`` arguments asking for this grant."""
        resource, _, sub = self.resource.partition("/")
        what = f"{resource}.{self.group}" if self.group else resource
        if self.names:
            what += f"/{self.names[0]}"
        return [self.verb, what] + ([f"--subresource={sub}"] if sub else [])


def grants(role: dict[str, Any]) -> list[Grant]:
    """Every (group, resource, verb) the role gives, one per rule entry."""
    found = []
    for rule in role["rules"]:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule["verbs"]:
                    found.append(Grant(group, resource, verb,
                                       tuple(rule.get("resourceNames", []))))
    return found


def without(role: dict[str, Any], grant: Grant) -> dict[str, Any]:
    """The role minus exactly ``grant`` (a rule is split when it names more than that)."""
    reduced = copy.deepcopy(role)
    rules = []
    for rule in reduced["rules"]:
        matches = (grant.group in rule.get("apiGroups", [])
                   and grant.resource in rule.get("resources", [])
                   and grant.verb in rule["verbs"]
                   and tuple(rule.get("resourceNames", [])) == grant.names)
        if not matches:
            rules.append(rule)
            continue
        others = {**rule, "resources": [r for r in rule["resources"] if r != grant.resource]}
        if others["resources"]:
            rules.append(others)
        verbs = [v for v in rule["verbs"] if v != grant.verb]
        if verbs:
            rules.append({**rule, "resources": [grant.resource], "verbs": verbs})
    reduced["rules"] = rules
    return reduced


# ------------------------------------------------------------------------------ the bed


@dataclass
class Bed:
    """The shared stack (NATS, a worker, the CRDs) and the operator's identity."""

    stack: OperatorStack
    kubeconfig: Path
    priorities: Iterator[int] = field(default_factory=lambda: itertools.count(FIRST_PRIORITY))
    priority: int = 0  # the running operator's

    def kubectl(self, *args: str, check: bool = True,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.stack.kubectl(*args, check=check, stdin=stdin)

    def apply_role(self, role: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(role))

    def allowed(self, grant: Grant) -> bool:
        result = self.kubectl("auth", "can-i", *grant.can_i(), f"--as={SA_USER}",
                              "-n", "default", check=False)
        return result.stdout.strip() == "yes"

    def start_operator(self, wait: bool = True) -> OperatorProc:
        """The operator as the service account (a higher peering priority than any before:
        an operator left in the peering by another module never pauses this one)."""
        self.priority = next(self.priorities)
        settings = {"priority": str(self.priority)}
        if wait:
            return self.stack.start_operator(**settings)
        self.stack.operator = OperatorProc(self.stack.kube, self.stack.nats.url,
                                           self.stack.workdir, kubeconfig=self.kubeconfig,
                                           **settings)
        return self.stack.operator

    def stop_operator(self, grace: float = 20.0) -> None:
        """SIGTERM; SIGKILL after ``grace`` seconds (an operator refused a patch may hang in
        its cleanup). Then its peering entry goes: it must not pause another module's."""
        operator = self.stack.operator
        if operator is None:
            return
        operator.proc.terminate()
        try:
            operator.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            operator.kill()
        operator.stop()  # closes the log
        self.stack.operator = None
        self.forget_peers()

    def forget_peers(self) -> None:
        """Drop this module's operators (priority >= FIRST_PRIORITY) from the peering."""
        found = self.kubectl("get", "clusterkopfpeering", PEERING, "-o", "json", check=False)
        if found.returncode != 0:
            return
        peers = json.loads(found.stdout).get("status") or {}
        ours = {peer: None for peer, info in peers.items()
                if isinstance(info, dict) and int(info.get("priority", 0)) >= FIRST_PRIORITY}
        if ours:
            self.kubectl("patch", "clusterkopfpeering", PEERING, "--type=merge",
                         "-p", json.dumps({"status": ours}), check=False)

    def namespace(self) -> str:
        return self.stack.namespace(f"rbac-{next(_names)}-{int(time.time()) % 100000}")

    def drop_namespace(self, ns: str) -> None:
        """Delete the namespace; Agents the operator could not finish lose their finalizer."""
        for name in self.stack.agents(ns):
            self.kubectl("patch", "agent", name, "-n", ns, "--type=merge",
                         "-p", '{"metadata":{"finalizers":null}}', check=False)
        self.kubectl("delete", "namespace", ns, "--wait=false", check=False)

    def events(self, ns: str, name: str) -> set[str]:
        out = self.kubectl("get", "events", "-n", ns, "--field-selector",
                           f"involvedObject.name={name}", "-o", "json").stdout
        return {e["reason"] for e in json.loads(out)["items"]}


def service_account_kubeconfig(kube: LocalCluster, path: Path) -> Path:
    """A kubeconfig for the operator's service account: the cluster's server and CA, a token
    minted by the API server (``kubectl create token``)."""
    admin = json.loads(kube.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    token = kube.kubectl("create", "token", SA_NAME, "-n", SA_NAMESPACE,
                         "--duration=2h").stdout.strip()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": SA_NAME, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": SA_NAME}}],
        "current-context": "local",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def bed(kube: LocalCluster, postgres_server: PostgresServer,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with scratch_database(postgres_server, "operator_rbac") as dsn:
        workdir = tmp_path_factory.mktemp("operator-rbac")
        stack = OperatorStack(kube, workdir, dsn, workers=1)
        try:
            stack.install_crds()
            stack.kubectl("create", "namespace", SA_NAMESPACE, check=False)
            stack.kubectl("apply", "-f", str(RBAC))
            stack.nats.start()
            stack.start_worker().wait_ready()
            stack.operator_kubeconfig = service_account_kubeconfig(kube,
                                                                   workdir / "sa.kubeconfig")
            yield Bed(stack, stack.operator_kubeconfig)
        finally:
            stack.stop()
            stack.kubectl("delete", "-f", str(RBAC), "--ignore-not-found", check=False)


# -------------------------------------------------- (c) nothing else; (a) everything works


def test_the_role_names_every_verb_and_resource_no_wildcards() -> None:
    assert CLUSTER_ROLE["kind"] == "ClusterRole"
    for rule in CLUSTER_ROLE["rules"]:
        assert "nonResourceURLs" not in rule, rule
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert not any("*" in value for value in rule.get(key, [])), rule
    stale = set(SCENARIOS) - {(g.group, g.resource, g.verb) for g in grants(CLUSTER_ROLE)}
    assert not stale, f"scenarios for verbs the role no longer holds: {stale}"
    binding = load("clusterrolebinding.yaml")
    account = load("serviceaccount.yaml")
    assert binding["roleRef"]["name"] == CLUSTER_ROLE["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SA_NAME,
                                    "namespace": SA_NAMESPACE}]
    assert (account["metadata"]["name"], account["metadata"]["namespace"]) == (
        SA_NAME, SA_NAMESPACE)


def rules_of(bed: Bed, user: str, namespace: str) -> set[tuple[str, ...]]:
    """What ``user`` may do in ``namespace``: the SelfSubjectRulesReview that ``kubectl auth
    can-i --list --as=USER -n NAMESPACE`` prints as a table (here as JSON), one tuple per
    (kind, group, resource, name, verb) or (url, verb)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
              "spec": {"namespace": namespace}}
    out = bed.kubectl("create", f"--as={user}", "--validate=false", "-o", "json", "-f", "-",
                      stdin=json.dumps(review)).stdout
    status = json.loads(out)["status"]
    assert not status.get("incomplete"), status
    found: set[tuple[str, ...]] = set()
    for rule in status.get("resourceRules") or []:
        for group, resource, verb in itertools.product(
                rule.get("apiGroups") or [""], rule["resources"], rule["verbs"]):
            for name in rule.get("resourceNames") or [""]:
                found.add(("resource", group, resource, name, verb))
    for rule in status.get("nonResourceRules") or []:
        for url, verb in itertools.product(rule["nonResourceURLs"], rule["verbs"]):
            found.add(("url", url, verb))
    return found


def test_the_service_account_holds_nothing_beyond_the_role(bed: Bed) -> None:
    bed.kubectl("create", "serviceaccount", "rbac-baseline", "-n", SA_NAMESPACE, check=False)
    granted = {("resource", g.group, g.resource, name, g.verb)
               for g in grants(CLUSTER_ROLE) for name in (g.names or ("",))}
    for namespace in ("default", SA_NAMESPACE):
        baseline = rules_of(bed, f"system:serviceaccount:{SA_NAMESPACE}:rbac-baseline",
                            namespace)
        ours = rules_of(bed, SA_USER, namespace)
        assert ours - baseline == granted - baseline, (namespace, sorted(ours - baseline))


def test_with_the_role_the_operator_does_everything_and_is_never_forbidden(bed: Bed) -> None:
    bed.apply_role(CLUSTER_ROLE)
    bed.kubectl("delete", "validatingwebhookconfiguration", WEBHOOK, "--ignore-not-found")
    operator = bed.start_operator()  # waits for /healthz and the webhook configuration
    stack, ns = bed.stack, bed.namespace()
    try:
        stack.apply([agent_manifest("hello", ns),
                     agent_manifest("slow", ns, context={"name": "slow", "delay": 5}),
                     agent_manifest("brief", ns, ttlSecondsAfterFinished=1)])
        hello = stack.wait_phase(ns, "hello", ["Succeeded", "Failed"])
        assert hello["status"]["phase"] == "Succeeded", hello["status"]
        assert (hello["status"]["currentNode"], hello["status"]["step"]) == ("Done", 3)
        wait_until(lambda: "Succeeded" in bed.events(ns, "hello"), 30,
                   "the Succeeded Event: "
                   + bed.kubectl("get", "events", "-n", ns, "-o", "wide").stdout)
        stack.wait_phase(ns, "slow", ["Running"])
        stack.kubectl("delete", "agent", "slow", "-n", ns, "--timeout=60s")  # the finalizer
        assert stack.agent(ns, "slow") is None
        wait_until(lambda: "cancel sent for agent" in operator.log, 10, "the cancel")
        wait_until(lambda: stack.agent(ns, "brief") is None, 30, "the TTL delete")
        refused = stack.apply([agent_manifest("ghost", ns, start="Nope")], check=False)
        assert refused.returncode != 0 and "spec.startNode" in refused.stderr, refused.stderr
        peering = json.loads(stack.kubectl("get", "clusterkopfpeering", PEERING,
                                           "-o", "json").stdout)
        priorities = {peer.get("priority") for peer in (peering.get("status") or {}).values()}
        assert bed.priority in priorities, peering
        assert not re.search("forbidden", operator.log, re.I), operator.log
    finally:
        bed.stop_operator()
        bed.drop_namespace(ns)
    assert not re.search("forbidden", operator.log, re.I), operator.log  # shutdown too


# ---------------------------------------------------------- (b) each verb is needed


def forbidden(grant: Grant) -> str:
    """The API server's words for a refusal of ``grant``."""
    return (f'cannot {grant.verb} resource "{grant.resource}" '
            f'in API group "{grant.group}"')


def expect_in_log(bed: Bed, text: str, timeout: float = 30.0) -> None:
    operator = bed.stack.operator
    assert operator is not None
    wait_until(lambda: text in operator.log, timeout,
               f"{text!r} in the operator's log:\n{operator.log[-4000:]}", interval=0.25)


Scenario = Callable[[Bed, Grant, str], None]


def at_start(bed: Bed, grant: Grant, ns: str) -> None:
    """The operator refused at once: starting it is the scenario."""
    expect_in_log(bed, forbidden(grant))


def on_create(bed: Bed, grant: Grant, ns: str) -> None:
    """An Agent is created: its daemon writes its status (agents/status patch)."""
    bed.stack.apply([agent_manifest("created", ns)])
    expect_in_log(bed, forbidden(grant))
    assert not (bed.stack.agent(ns, "created") or {}).get("status", {}).get("phase")


def on_delete(bed: Bed, grant: Grant, ns: str) -> None:
    """A running Agent is deleted: kopf patches the finalizer (agents patch): it removes it
    after the cancel, and adds it when the mutating webhook was not called (as here, where the
    operator has only just started)."""
    bed.stack.apply([agent_manifest("held", ns, context={"name": "held", "delay": 30})])
    bed.stack.wait_phase(ns, "held", ["Running"])
    bed.stack.kubectl("delete", "agent", "held", "-n", ns, "--wait=false")
    expect_in_log(bed, forbidden(grant))


def on_phase_change(bed: Bed, grant: Grant, ns: str) -> None:
    """An Agent runs to its end: its phases are Events (events create)."""
    bed.stack.apply([agent_manifest("told", ns)])
    bed.stack.wait_phase(ns, "told", ["Succeeded"])
    expect_in_log(bed, forbidden(grant))
    assert not bed.events(ns, "told") & {"Triggered", "Succeeded"}


def on_ttl(bed: Bed, grant: Grant, ns: str) -> None:
    """A finished Agent with ttlSecondsAfterFinished: kube.py deletes it (agents delete)."""
    bed.stack.apply([agent_manifest("kept", ns, ttlSecondsAfterFinished=1)])
    bed.stack.wait_phase(ns, "kept", ["Succeeded"])
    expect_in_log(bed, "delete after TTL failed (403 Forbidden)")
    assert bed.stack.agent(ns, "kept") is not None


SCENARIOS: dict[tuple[str, str, str], Scenario] = {
    ("commandnet.io", "agents", "list"): at_start,
    ("commandnet.io", "agents", "watch"): at_start,
    ("commandnet.io", "agents", "patch"): on_delete,
    ("commandnet.io", "agents", "delete"): on_ttl,
    ("commandnet.io", "agents/status", "patch"): on_create,
    ("", "events", "create"): on_phase_change,
    ("kopf.dev", "clusterkopfpeerings", "list"): at_start,
    ("kopf.dev", "clusterkopfpeerings", "watch"): at_start,
    ("kopf.dev", "clusterkopfpeerings", "patch"): at_start,
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "create"): at_start,
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch"): at_start,
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "create"): at_start,
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch"): at_start,
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): at_start,
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): at_start,
}


@pytest.mark.parametrize("grant", grants(CLUSTER_ROLE), ids=lambda g: g.id)
def test_without_this_verb_the_operator_fails(bed: Bed, grant: Grant) -> None:
    scenario = SCENARIOS.get((grant.group, grant.resource, grant.verb))
    if scenario is None:
        pytest.fail(f"{grant.id} has no scenario: add a scenario proving it is needed "
                    f"(SCENARIOS in {Path(__file__).name})", pytrace=False)
    bed.apply_role(without(CLUSTER_ROLE, grant))
    wait_until(lambda: not bed.allowed(grant), 10, f"RBAC to refuse {grant.id}")
    ns = bed.namespace()
    try:
        bed.start_operator(wait=False)
        scenario(bed, grant, ns)
    finally:
        bed.stop_operator(grace=3.0)
        bed.apply_role(CLUSTER_ROLE)
        bed.drop_namespace(ns)
    wait_until(lambda: bed.allowed(grant), 10, f"RBAC to allow {grant.id} again")
