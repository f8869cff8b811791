"""The Helm chart (charts/commandnet): lint, helm-unittest, the values schema, and what must not
drift from the rest of the repository — the Agent CRD (crds/), the operator's RBAC
(operator/rbac/clusterrole.yaml), the admission webhooks kopf would register for the
operator's handlers, and a pool's KEDA trigger (the worker's own stream and consumer names,
metadata keys KEDA's nats-jetstream scaler reads). Then the rendered manifests (defaults, and
ci/full-values.yaml) go through a server-side dry-run on the local API server, into a namespace
that enforces Pod Security "restricted", with no warning allowed; the dry-run knows
prometheus-operator's ServiceMonitor and KEDA's ScaledObject CRDs.

The tools come from `make tools` (.tools/bin); a missing one fails with "run `make tools`".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from kopf._cogs.structs import references
from kopf._core.engines.admission import build_webhooks
from kopf._core.intents.causes import WebhookType

from commandnet.adapters.nats import JetStreamBus
from commandnet.worker.process import _make_bus
from commandnet.worker.settings import WorkerSettings
from commandnet_operator import crd
from commandnet_operator.handlers import registry
from commandnet_operator.resource import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from commandnet_operator.settings import OperatorSettings
from e2e.testbed import LocalCluster, run_tool, tool_env
from e2e.testbed.tools import read_versions

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "commandnet"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
CRD_FILE = ROOT / crd.CRD_PATH
CHART_CRD_FILE = CHART / "files" / "crds" / f"{crd.CRD_NAME}.yaml"
CLUSTERROLE_FILE = ROOT / "operator" / "rbac" / "clusterrole.yaml"
RELEASE, NAMESPACE = "rel", "apps"
SECRET = ["--set", "connection.existingSecret=commandnet-connection"]
# prometheus-operator's ServiceMonitor CRD, from its Go module (module proxy), for the dry-run.
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
SERVICEMONITOR_CRD = "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
# KEDA's Go module (the version the test bed builds, tools/versions.env): its ScaledObject CRD
# for the dry-run, and its nats-jetstream scaler, whose metadata keys the chart must use.
KEDA = f"github.com/kedacore/keda/v2@{read_versions()['KEDA_VERSION']}"
SCALEDOBJECT_CRD = "config/crd/bases/keda.sh_scaledobjects.yaml"
NATS_JETSTREAM_SCALER = "pkg/scalers/nats_jetstream_scaler.go"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """helm's homes in a temporary folder, the local plugin folder (helm unittest)."""
    return tool_env(tmp_path_factory.mktemp("helm"))


def helm(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("helm", *args, env=env, check=check, cwd=ROOT)


def render(env: dict[str, str], *args: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    out = helm(env, "template", RELEASE, str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ------------------------------------------------------------------------- lint, unittest


@pytest.mark.parametrize("values", [SECRET, ["-f", str(FULL_VALUES)]], ids=["defaults", "full"])
def test_helm_lint_strict_is_clean(env: dict[str, str], values: list[str]) -> None:
    res = helm(env, "lint", "--strict", str(CHART), *values, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    assert not re.search(r"\[(WARNING|ERROR)\]", out), out


def test_helm_unittest_suites_pass(env: dict[str, str]) -> None:
    res = helm(env, "unittest", str(CHART), check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    tests = re.search(r"Tests:\s+(\d+) passed, (\d+) total", out)
    assert tests, f"no test summary in helm unittest's output:\n{out}"
    passed, total = int(tests[1]), int(tests[2])
    assert passed == total > 0, out
    suites = re.search(r"Test Suites:\s+(\d+) passed, (\d+) total", out)
    assert suites and int(suites[1]) == int(suites[2]), out
    # Every template has a suite naming it.
    named = "\n".join(p.read_text() for p in (CHART / "tests").glob("*_test.yaml"))
    for template in (CHART / "templates").rglob("*"):
        if template.suffix in (".yaml", ".txt"):
            rel = template.relative_to(CHART / "templates").as_posix()
            assert re.search(rf"^\s*-?\s*(template: )?{re.escape(rel)}\s*$", named, re.M), (
                f"no helm-unittest suite covers templates/{rel}")


# ------------------------------------------------------------------------- values schema


@pytest.mark.parametrize(("values", "message"), [
    ("workers:\n  replicas: two\n", "at '/workers/replicas': got string, want integer"),
    ("pools:\n- name: orders\n  graph: [a.b:C]\n  replicas: \"2\"\n",
     "at '/pools/0/replicas': got string, want integer"),
    ("pools:\n- name: orders\n", "at '/pools/0': missing property 'graph'"),
    ("workerz:\n  replicas: 2\n", "at '': additional properties 'workerz' not allowed"),
    ("operator:\n  webhook:\n    port: 70000\n", "at '/operator/webhook/port': maximum"),
    ("pools:\n- name: Orders_1\n  graph: [a.b:C]\n",
     "at '/pools/0/name': 'Orders_1' does not match pattern"),
    ("pools:\n- name: a\n  graph: [a.b:C]\n  autoscaling: {enabled: true, minReplicas: 0}\n",
     "at '/pools/0/autoscaling/minReplicas': minimum: got 0, want 1"),
    ("workers:\n  keda: {lagThreshold: \"64\"}\n",
     "at '/workers/keda/lagThreshold': got string, want null or integer"),
], ids=["string-for-integer", "pool-replicas-string", "pool-without-graph", "unknown-key",
        "port-range", "pool-name", "hpa-min-replicas-zero", "keda-lag-string"])
def test_the_schema_refuses_wrong_values_saying_where(
        env: dict[str, str], tmp_path: Path, values: str, message: str) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text(values)
    res = helm(env, "template", RELEASE, str(CHART), *SECRET, "-f", str(bad), check=False)
    assert res.returncode != 0, res.stdout
    assert "values don't meet the specifications of the schema" in res.stderr, res.stderr
    assert message in res.stderr, res.stderr


def test_installing_without_the_connection_secret_says_how_to_make_it(
        env: dict[str, str]) -> None:
    res = helm(env, "template", RELEASE, str(CHART), check=False)
    assert res.returncode != 0
    assert "connection.existingSecret is required" in res.stderr, res.stderr
    assert "kubectl create secret generic" in res.stderr, res.stderr


# ---------------------------------------------------------- what must not drift: the CRD


def test_the_chart_crd_is_crds_agent_crd_plus_keep(env: dict[str, str]) -> None:
    assert crd.check(CHART_CRD_FILE) is None, crd.check(CHART_CRD_FILE)
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), "run `make crds`"
    rendered = one(render(env, *SECRET), "CustomResourceDefinition", crd.CRD_NAME)
    source = yaml.safe_load(CRD_FILE.read_text())
    meta = rendered["metadata"]
    assert meta.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    labels = meta.pop("labels")
    assert labels.items() >= source["metadata"].pop("labels").items()
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert rendered == source
    assert not [d for d in render(env, *SECRET, "--set", "crds.install=false")
                if d["kind"] == "CustomResourceDefinition"]


# --------------------------------------------------------- what must not drift: the RBAC


def test_the_operator_clusterrole_is_the_repositorys_minus_webhook_configurations(
        env: dict[str, str]) -> None:
    source = yaml.safe_load(CLUSTERROLE_FILE.read_text())["rules"]
    webhook_rules = [r for r in source if r["apiGroups"] == ["admissionregistration.k8s.io"]]
    assert {res for r in webhook_rules for res in r["resources"]} == {
        "validatingwebhookconfigurations", "mutatingwebhookconfigurations"}
    expected = [r for r in source if r not in webhook_rules]
    docs = render(env, *SECRET)
    role = one(docs, "ClusterRole")
    assert role["rules"] == expected
    binding = one(docs, "ClusterRoleBinding")
    account = one(docs, "ServiceAccount", f"{RELEASE}-commandnet-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                    "name": account["metadata"]["name"]}]
    deployment = one(docs, "Deployment", f"{RELEASE}-commandnet-operator")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == (
        account["metadata"]["name"])


# ------------------------------------------------------ what must not drift: the webhooks


def _kopf_webhooks(reason: WebhookType, client_config: dict[str, Any]) -> list[dict[str, Any]]:
    """What kopf's configuration manager would write for the operator's handlers."""
    agents = references.Resource(
        group=GROUP, version=VERSION, plural=PLURAL, kind=KIND, singular=SINGULAR,
        shortcuts=frozenset(SHORT_NAMES), categories=frozenset(CATEGORIES),
        subresources=frozenset({"status"}), namespaced=True,
        verbs=frozenset({"list", "watch", "patch", "create", "delete", "get", "update"}))
    handlers = [h for h in registry._webhooks.get_all_handlers() if h.reason == reason]
    assert handlers, f"the operator registers no {reason.value} webhook handler"
    suffix = OperatorSettings.model_fields["webhook_configuration"].default
    built = build_webhooks(handlers, resources=[agents], name_suffix=suffix,
                           client_config=client_config)  # type: ignore[arg-type]
    # Keys kopf leaves as None are absent in the manifest (the API server's default).
    return [{k: v for k, v in hook.items() if v is not None} for hook in built]


def test_the_webhook_configurations_are_what_kopf_would_register(env: dict[str, str]) -> None:
    docs = render(env, *SECRET)
    operator = one(docs, "Deployment", f"{RELEASE}-commandnet-operator")
    settings = container_env(operator)
    assert settings["COMMANDNET_WEBHOOK_CONFIGURATION"] == ""  # the operator manages none
    service_name = settings["COMMANDNET_WEBHOOK_SERVICE"]
    secret = one(docs, "Secret", f"{RELEASE}-commandnet-webhook-tls")
    ca_bundle = secret["data"]["ca.crt"]
    # As the operator's ServiceWebhookServer yields it (webhook.py), from the Deployment's env.
    client_config = {
        "caBundle": ca_bundle,
        "service": {"name": service_name,
                    "namespace": settings["COMMANDNET_WEBHOOK_SERVICE_NAMESPACE"],
                    "port": int(settings["COMMANDNET_WEBHOOK_SERVICE_PORT"]), "path": ""},
    }
    for kind, reason in (("ValidatingWebhookConfiguration", WebhookType.VALIDATING),
                         ("MutatingWebhookConfiguration", WebhookType.MUTATING)):
        rendered = one(docs, kind)["webhooks"]
        assert rendered == _kopf_webhooks(reason, client_config), kind
    validate = one(docs, "ValidatingWebhookConfiguration")["webhooks"][0]
    assert validate["failurePolicy"] == "Ignore"  # admit(): ignore_failures=True

    # The Service behind it reaches the port the operator serves on.
    service = one(docs, "Service", service_name)
    port = next(p for p in service["spec"]["ports"] if p["port"] == client_config[
        "service"]["port"])
    container = operator["spec"]["template"]["spec"]["containers"][0]
    target = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    assert target["containerPort"] == int(settings["COMMANDNET_WEBHOOK_PORT"])
    assert service["spec"]["selector"].items() <= (
        operator["spec"]["template"]["metadata"]["labels"].items())

    # The serving certificate is signed by that CA, for the Service's names.
    ca = x509.load_pem_x509_certificate(base64.b64decode(ca_bundle))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    key = ca.public_key()
    assert cert.signature_hash_algorithm is not None
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                   cert.signature_hash_algorithm)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(cert.signature, cert.tbs_certificate_bytes,
                   ec.ECDSA(cert.signature_hash_algorithm))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{service_name}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)

    # The operator's pod is stamped with that very certificate (one render makes one).
    pem = {"ca": "ca.crt", "crt": "tls.crt", "key": "tls.key"}
    made = json.dumps({k: base64.b64decode(secret["data"][v]).decode() for k, v in pem.items()},
                      sort_keys=True, separators=(",", ":"))
    annotations = operator["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/webhook-tls"] == hashlib.sha256(made.encode()).hexdigest()


def test_the_operator_mounts_the_certificate_it_is_told_to_read(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(env, *SECRET)
    operator = one(docs, "Deployment", f"{RELEASE}-commandnet-operator")
    settings = container_env(operator)
    pod = operator["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert volume["secret"]["secretName"] == f"{RELEASE}-commandnet-webhook-tls"
    folder = mounts["webhook-tls"]
    assert settings["COMMANDNET_WEBHOOK_CERT_FILE"] == f"{folder}/tls.crt"
    assert settings["COMMANDNET_WEBHOOK_KEY_FILE"] == f"{folder}/tls.key"
    assert settings["COMMANDNET_WEBHOOK_CA_FILE"] == f"{folder}/ca.crt"
    # The operator's own settings model reads the rendered environment as the pod would.
    for name in list(os.environ):
        if name.startswith("COMMANDNET_"):
            monkeypatch.delenv(name)
    for name, value in settings.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    parsed = OperatorSettings()
    assert parsed.standalone and parsed.webhook_enabled and parsed.webhook_configuration == ""
    assert parsed.webhook_service == f"{RELEASE}-commandnet-operator"
    assert parsed.webhook_ca_file == f"{folder}/ca.crt"


# ------------------------------------- what must not drift: the KEDA trigger's JetStream names


@pytest.fixture(scope="module")
def keda_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KEDA's Go module (module proxy): its ScaledObject CRD and its scalers' source."""
    return _go_module(KEDA, tmp_path_factory)


def _worker_bus_names(deployment: dict[str, Any]) -> tuple[str, str]:
    """The stream and durable consumer the worker of `deployment` consumes, as the worker
    itself builds its bus from the pod's arguments (no connection is made)."""
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    pool = next(a.removeprefix("--pool=") for a in args if a.startswith("--pool="))
    graphs = [a.removeprefix("--graph=") for a in args if a.startswith("--graph=")]
    bus = _make_bus(WorkerSettings(pool=pool, graph=graphs, bus_url="nats://nats:4222"))
    assert isinstance(bus, JetStreamBus)
    return bus.stream, bus.consumer


def test_the_keda_trigger_reads_the_stream_and_consumer_each_pools_workers_consume(
        env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COMMANDNET_"):
            monkeypatch.delenv(name)
    graph = ["commandnet.examples.orders:Intake"]
    values = tmp_path / "keda.yaml"
    values.write_text(yaml.safe_dump({
        "workers": {"keda": {"enabled": True, "natsServerMonitoringEndpoint": "nats:8222"}},
        "pools": [{"name": name, "graph": graph} for name in ("default", "batch-jobs", "x9")]}))
    docs = render(env, *SECRET, "-f", str(values))
    triggers = {d["spec"]["scaleTargetRef"]["name"]: d["spec"]["triggers"]
                for d in docs if d["kind"] == "ScaledObject"}
    deployments = [d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
    assert len(deployments) == len(triggers) == 3
    for deployment in deployments:
        assert "replicas" not in deployment["spec"]  # KEDA owns the scale
        (trigger,) = triggers[deployment["metadata"]["name"]]
        assert trigger["type"] == "nats-jetstream"
        stream, consumer = _worker_bus_names(deployment)
        assert (trigger["metadata"]["stream"], trigger["metadata"]["consumer"]) == (
            stream, consumer), deployment["metadata"]["name"]


def test_the_keda_lag_threshold_defaults_to_the_workers_max_in_flight(
        env: dict[str, str]) -> None:
    docs = render(env, *SECRET, "--set", "workers.keda.enabled=true",
                  "--set", "workers.keda.natsServerMonitoringEndpoint=nats:8222")
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]
    assert "COMMANDNET_MAX_IN_FLIGHT" not in container_env(
        one(docs, "Deployment", f"{RELEASE}-commandnet-default"))
    default = WorkerSettings.model_fields["max_in_flight"].default
    assert trigger["metadata"]["lagThreshold"] == str(default)


def test_the_keda_trigger_uses_only_metadata_keys_the_nats_jetstream_scaler_reads(
        env: dict[str, str], keda_module: Path) -> None:
    source = (keda_module / NATS_JETSTREAM_SCALER).read_text()
    known = set(re.findall(r'keda:"name=(\w+)', source))
    assert {"natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"} <= known, (
        f"{NATS_JETSTREAM_SCALER} changed shape: {sorted(known)}")
    assert '"nats-jetstream"' in (keda_module / "pkg/scaling/scalers_builder.go").read_text()
    so = next(d for d in render(env, "-f", str(FULL_VALUES)) if d["kind"] == "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    assert set(trigger["metadata"]) <= known, sorted(set(trigger["metadata"]) - known)
    # Every value a string (the CRD's metadata is a map of strings).
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]


# ------------------------------------------------------------ the API server's judgement


@pytest.fixture(scope="module")
def restricted(kube: LocalCluster, tmp_path_factory: pytest.TempPathFactory,
               keda_module: Path) -> Iterator[str]:
    """A namespace enforcing Pod Security "restricted", and the real CRDs of what the chart
    may render beside core kinds: prometheus-operator's ServiceMonitor and KEDA's ScaledObject
    (from their Go modules, through the module proxy)."""
    name = "chart-restricted"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, *(f"pod-security.kubernetes.io/{mode}=restricted"
                                               for mode in ("enforce", "warn", "audit")))
    servicemonitors = _go_module(PROMETHEUS_OPERATOR, tmp_path_factory) / SERVICEMONITOR_CRD
    for crd_file, crd_name in ((servicemonitors, "servicemonitors.monitoring.coreos.com"),
                               (keda_module / SCALEDOBJECT_CRD, "scaledobjects.keda.sh")):
        assert crd_file.is_file(), f"{crd_file} is missing from its module"
        kube.kubectl("apply", "--server-side", "-f", str(crd_file))
        _wait_established(kube, crd_name)
    try:
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _wait_established(kube: LocalCluster, name: str, within: float = 60.0) -> None:
    # (`kubectl wait` errors out while the new CRD has no status.conditions yet.)
    deadline = time.monotonic() + within
    while True:
        res = kube.kubectl("get", "crd", name, "-o",
                           'jsonpath={.status.conditions[?(@.type=="Established")].status}',
                           check=False)
        if res.stdout.strip() == "True":
            return
        assert time.monotonic() < deadline, f"CRD {name} not Established after {within} s: {res}"
        time.sleep(0.5)


def _go_module(module: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of Go module `module` ("path@version") in the module cache (downloaded
    through the module proxy the first time)."""
    go = next((str(Path(d) / "go") for d in [*os.environ.get("PATH", "").split(os.pathsep),
                                               "/usr/local/go/bin"] if (Path(d) / "go").exists()),
              None)
    assert go, f"no `go` command: it fetches {module}; run `make tools`"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    res = subprocess.run([go, "mod", "download", "-json", module],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path_factory.mktemp("gomod"), check=False)
    assert res.returncode == 0, f"go mod download {module} failed:\n{res.stderr}"
    return Path(json.loads(res.stdout)["Dir"])


def _dry_run(kube: LocalCluster, namespace: str, manifests: str
             ) -> subprocess.CompletedProcess[str]:
    return kube.kubectl("apply", "--dry-run=server", "--namespace", namespace, "-f", "-",
                        input=manifests, check=False)


def test_the_namespace_really_enforces_restricted(kube: LocalCluster, restricted: str) -> None:
    """The control for the test below: a pod that breaks the level is refused, and a
    Deployment of one draws a warning, so "no warning" there means something."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "loose"},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    res = _dry_run(kube, restricted, json.dumps(pod))
    assert res.returncode != 0 and 'violates PodSecurity "restricted' in res.stderr, res
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "loose"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}},
                           "template": {"metadata": {"labels": {"a": "b"}},
                                        "spec": pod["spec"]}}}
    res = _dry_run(kube, restricted, json.dumps(deployment))
    assert res.returncode == 0, res.stderr
    assert 'would violate PodSecurity "restricted' in res.stderr, res.stderr


@pytest.mark.parametrize("values", [SECRET, ["-f", str(FULL_VALUES)]], ids=["defaults", "full"])
def test_rendered_manifests_pass_a_server_side_dry_run_under_restricted(
        kube: LocalCluster, restricted: str, values: list[str]) -> None:
    out = kube.helm("template", RELEASE, str(CHART), "--namespace", restricted, *values).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Job", "PodDisruptionBudget", "CustomResourceDefinition",
            "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"} <= kinds
    if values != SECRET:
        assert {"ServiceMonitor", "HorizontalPodAutoscaler", "ScaledObject"} <= kinds
    res = _dry_run(kube, restricted, out)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.stderr.strip() == "", f"warnings from the API server:\n{res.stderr}"
    applied = [line for line in res.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(applied) == len(docs), res.stdout


def test_install_upgrade_uninstall_keep_the_certificate_then_the_crd_and_agents(
        kube: LocalCluster) -> None:
    """A real release (hooks off: no node runs the setup Job here): an upgrade reuses the
    webhook certificate (lookup); uninstalling removes the release's objects but keeps the
    CRD and the Agents."""
    ns = "chart-release"
    kube.kubectl("create", "namespace", ns)
    try:
        kube.kubectl("-n", ns, "create", "secret", "generic", "commandnet-connection",
                     "--from-literal=store-url=postgresql://u@db:5432/d",
                     "--from-literal=bus-url=nats://nats:4222")
        common = ["--namespace", ns, *SECRET, "--no-hooks"]
        # --take-ownership: other tests of the session may have applied the CRD already.
        kube.helm("install", RELEASE, str(CHART), *common, "--take-ownership")

        def certificate() -> tuple[str, list[str], str]:
            secret = json.loads(kube.kubectl("-n", ns, "get", "secret",
                                             f"{RELEASE}-commandnet-webhook-tls",
                                             "-o", "json").stdout)
            bundles = [json.loads(kube.kubectl("get", kind, f"{RELEASE}-commandnet", "-o",
                                               "json").stdout)["webhooks"][0]["clientConfig"][
                "caBundle"] for kind in ("validatingwebhookconfiguration",
                                         "mutatingwebhookconfiguration")]
            operator = json.loads(kube.kubectl("-n", ns, "get", "deployment",
                                               f"{RELEASE}-commandnet-operator", "-o",
                                               "json").stdout)
            checksum = operator["spec"]["template"]["metadata"]["annotations"][
                "checksum/webhook-tls"]
            return secret["data"]["ca.crt"], bundles, checksum

        ca, bundles, checksum = certificate()
        assert bundles == [ca, ca]
        kube.helm("upgrade", RELEASE, str(CHART), *common, "--set", "workers.replicas=3")
        assert certificate() == (ca, bundles, checksum), "the upgrade rotated the certificate"
        replicas = kube.kubectl("-n", ns, "get", "deployment", f"{RELEASE}-commandnet-default",
                                "-o", "jsonpath={.spec.replicas}").stdout
        assert replicas == "3"

        agent = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                 "metadata": {"name": "kept", "namespace": ns},
                 "spec": {"startNode": "Intake", "pool": "default", "context": {}}}
        kube.kubectl("apply", "-f", "-", input=json.dumps(agent))

        kube.helm("uninstall", RELEASE, "--namespace", ns)
        left = kube.kubectl("get", "crd", crd.CRD_NAME, "-o", "json", check=False)
        assert left.returncode == 0, "uninstall deleted the Agent CRD"
        assert json.loads(left.stdout)["metadata"]["annotations"][
            "helm.sh/resource-policy"] == "keep"
        assert kube.kubectl("-n", ns, "get", "agent", "kept", check=False).returncode == 0
        for kind, name in (("validatingwebhookconfiguration", f"{RELEASE}-commandnet"),
                           ("mutatingwebhookconfiguration", f"{RELEASE}-commandnet"),
                           ("clusterrole", f"{RELEASE}-commandnet-operator"),
                           ("clusterrolebinding", f"{RELEASE}-commandnet-operator")):
            res = kube.kubectl("get", kind, name, check=False)
            assert res.returncode != 0 and "NotFound" in res.stderr, (kind, res)
        rest = kube.kubectl("-n", ns, "get", "deploy,svc,secret,sa,pdb", "-l",
                            f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout
        assert rest.strip() == "", f"left behind by helm uninstall:\n{rest}"
    finally:
        kube.kubectl("-n", ns, "delete", "agents", "--all", "--wait=false", check=False)
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
