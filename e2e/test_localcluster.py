"""The local control plane is a real Kubernetes: schema validation, real controllers, helm and
helm-unittest. Needs `make tools` (the fixtures fail, with that hint, without it)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from e2e.testbed import LocalCluster, read_versions, run_tool, tool_env

pytestmark = pytest.mark.kube

TESTDATA = Path(__file__).parent / "testdata"
TINY_CHART = TESTDATA / "tiny-chart"
T = TypeVar("T")

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.commandnet.io"},
    "spec": {
        "group": "e2e.commandnet.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "colour": {"type": "string", "enum": ["red", "blue"]},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


async def eventually(what: str, probe: Callable[[], Awaitable[T | None]], limit: float = 90) -> T:
    """Poll `probe` until it returns something truthy; fail saying what was awaited."""
    deadline = time.monotonic() + limit
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:.0f} s waiting for {what}")
        await asyncio.sleep(0.5)


async def test_server_reports_the_pinned_version(kube: LocalCluster) -> None:
    from kubernetes_asyncio import client

    async with await kube.api_client() as api:
        info = await client.VersionApi(api).get_code()
    assert info.git_version == read_versions()["KUBERNETES_VERSION"]


async def test_crd_schema_validation_accepts_good_and_rejects_bad(kube: LocalCluster) -> None:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.rest import ApiException

    kube.kubectl("apply", "-f", "-", input=json.dumps(CRD))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.e2e.commandnet.io"
    )
    async with await kube.api_client() as api:
        custom = client.CustomObjectsApi(api)
        good = {
            "apiVersion": "e2e.commandnet.io/v1",
            "kind": "Widget",
            "metadata": {"name": "good"},
            "spec": {"size": 3, "colour": "red"},
        }
        await custom.create_namespaced_custom_object(
            "e2e.commandnet.io", "v1", "default", "widgets", good
        )
        got = await custom.get_namespaced_custom_object(
            "e2e.commandnet.io", "v1", "default", "widgets", "good"
        )
        assert got["spec"] == {"size": 3, "colour": "red"}

        bad = {**good, "metadata": {"name": "bad"}, "spec": {"size": 0, "colour": "green"}}
        with pytest.raises(ApiException) as err:
            await custom.create_namespaced_custom_object(
                "e2e.commandnet.io", "v1", "default", "widgets", bad
            )
    assert err.value.status == 422
    body = json.loads(err.value.body)
    assert "spec.size" in body["message"] and "spec.colour" in body["message"], body["message"]

    # The same server-side schema check, as the offline validator for rendered manifests.
    res = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0 and "spec.size" in res.stderr, res


async def test_controller_manager_creates_replicaset_and_scheduler_sees_pods(
    kube: LocalCluster,
) -> None:
    from kubernetes_asyncio import client

    labels = {"app": "e2e-web"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="e2e-web"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="web", image="localhost/none:0")]
                ),
            ),
        ),
    )
    async with await kube.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        created = await apps.create_namespaced_deployment("default", deployment)

        async def owned_replicaset() -> Any:
            rss = await apps.list_namespaced_replica_set("default", label_selector="app=e2e-web")
            uid = created.metadata.uid
            return next(
                (
                    rs for rs in rss.items
                    if any(o.uid == uid for o in rs.metadata.owner_references or [])
                ),
                None,
            )

        rs = await eventually("the Deployment's ReplicaSet (controller manager)", owned_replicaset)
        assert rs.spec.replicas == 2

        async def two_pods() -> Any:
            pods = await core.list_namespaced_pod("default", label_selector="app=e2e-web")
            return pods.items if len(pods.items) == 2 else None

        pods = await eventually("the ReplicaSet's two Pods (replicaset controller)", two_pods)
        assert all(p.metadata.owner_references[0].uid == rs.metadata.uid for p in pods)

        async def unschedulable() -> Any:
            # No node exists, so the real scheduler marks the pods Unschedulable.
            pods = await core.list_namespaced_pod("default", label_selector="app=e2e-web")
            conds = [
                c for p in pods.items for c in (p.status.conditions or [])
                if c.type == "PodScheduled" and c.reason == "Unschedulable"
            ]
            return conds if len(conds) == 2 else None

        await eventually("the scheduler's PodScheduled=False/Unschedulable", unschedulable)
        await apps.delete_namespaced_deployment("e2e-web", "default")


def test_helm_install_and_uninstall_tiny_chart(kube: LocalCluster) -> None:
    ns = "e2e-helm"
    # Render, then validate on the server without persisting (the offline-schema check).
    rendered = kube.helm("template", "demo", str(TINY_CHART), "--namespace", ns).stdout
    kube.kubectl("apply", "--dry-run=server", "--namespace", "default", "-f", "-", input=rendered)

    kube.helm(
        "install", "demo", str(TINY_CHART), "--namespace", ns, "--create-namespace",
        "--set", "greeting=from-helm", "--wait", "--timeout", "60s",
    )
    listed = json.loads(kube.helm("list", "--namespace", ns, "--output", "json").stdout)
    assert [(r["name"], r["status"]) for r in listed] == [("demo", "deployed")]
    cm = json.loads(kube.kubectl("get", "configmap", "demo-tiny", "-n", ns, "-o", "json").stdout)
    assert cm["data"] == {"greeting": "from-helm", "kubeMajor": "1", "kubeMinor": "34"}

    kube.helm("uninstall", "demo", "--namespace", ns, "--wait", "--timeout", "60s")
    gone = kube.kubectl("get", "configmap", "demo-tiny", "-n", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    assert json.loads(kube.helm("list", "--namespace", ns, "--output", "json").stdout) == []


def untt(tmp_path: Path, *args: str, check: bool = True) -> Any:
    return run_tool("untt", *args, env=tool_env(tmp_path), check=check)


def helm_offline(tmp_path: Path, *args: str) -> Any:
    return run_tool("helm", *args, env=tool_env(tmp_path))


def chart_copy(tmp_path: Path) -> Path:
    """helm-unittest writes a __snapshot__ folder into the chart: test a copy."""
    return Path(shutil.copytree(TINY_CHART, tmp_path / "tiny-chart"))


def test_helm_unittest_standalone_untt(kube_tools: dict[str, Path], tmp_path: Path) -> None:
    junit = tmp_path / "untt.xml"
    chart = chart_copy(tmp_path)
    res = untt(tmp_path, "--output-type", "JUnit", "--output-file", str(junit), str(chart))
    assert "1 passed" in res.stdout, res.stdout
    assert "failures=\"0\"" in junit.read_text()


def test_helm_unittest_as_helm_plugin(kube_tools: dict[str, Path], tmp_path: Path) -> None:
    plugins = helm_offline(tmp_path, "plugin", "list").stdout
    assert "unittest" in plugins, plugins
    res = helm_offline(tmp_path, "unittest", str(chart_copy(tmp_path)))
    assert "1 passed" in res.stdout, res.stdout


def test_helm_unittest_suite_fails_on_wrong_expectation(
    kube_tools: dict[str, Path], tmp_path: Path
) -> None:
    """Guard against a vacuous pass: a suite expecting another version must fail."""
    chart = chart_copy(tmp_path)
    suite_path = chart / "tests" / "configmap_test.yaml"
    suite = yaml.safe_load(suite_path.read_text())
    suite["tests"][0]["asserts"][-1]["equal"]["value"] = "20"
    suite_path.write_text(yaml.safe_dump(suite))
    res = untt(tmp_path, str(chart), check=False)
    assert res.returncode != 0, res.stdout
