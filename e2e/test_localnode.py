"""A real node: a pod runs to completion on kubelet + containerd + runc and its log is read
through the API server (kubelet API). Images are built locally; nothing is pulled."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from e2e.testbed import BUSYBOX_IMAGE, NODE_NAME, POD_CIDR, LocalCluster

pytestmark = pytest.mark.kube

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "hello"},
    "spec": {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "hello",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": [
                    "/bin/sh", "-c",
                    "echo hello from a real pod;"
                    " cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo",
                ],
            }
        ],
    },
}


def run_to_end(k: LocalCluster, manifest: dict[str, object], limit: float = 180) -> str:
    """Create the pod, wait (bounded) until it Succeeded or Failed; return its log. A failed
    pod fails the test with its log and status."""
    name = manifest["metadata"]["name"]  # type: ignore[index]
    k.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    deadline = time.monotonic() + limit
    while True:
        pod = json.loads(k.kubectl("get", "pod", name, "-o", "json").stdout)
        phase = pod["status"].get("phase")
        if phase in ("Succeeded", "Failed"):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:.0f} s waiting for pod {name} to finish: "
                        f"{json.dumps(pod['status'])[:2000]}")
        time.sleep(0.5)
    log = k.kubectl("logs", name).stdout
    assert phase == "Succeeded", f"pod {name} {phase}; log:\n{log}\n{json.dumps(pod['status'])}"
    return log


def test_pod_runs_to_completion_and_its_log_is_read(kube_with_node: LocalCluster) -> None:
    k = kube_with_node
    node = json.loads(k.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")

    # The log travels kubelet -> API server -> kubectl, like on any cluster.
    assert run_to_end(k, POD) == "hello from a real pod\ndefault\n"
    pod = json.loads(k.kubectl("get", "pod", "hello", "-o", "json").stdout)
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)
    state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    k.kubectl("delete", "pod", "hello", "--wait=true", "--timeout=60s")


def test_python_pod_from_a_locally_built_debian_image(kube_with_node: LocalCluster) -> None:
    from e2e.testbed import PYTHON_IMAGE

    k = kube_with_node
    node = k.node
    assert node.import_python_image() == PYTHON_IMAGE
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "py"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "py",
                    "image": PYTHON_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": [
                        "python3", "-c",
                        "import json, sys; print(json.dumps({'major': sys.version_info[0]}))",
                    ],
                }
            ],
        },
    }
    assert json.loads(run_to_end(k, pod)) == {"major": 3}
    k.kubectl("delete", "pod", "py", "--wait=true", "--timeout=60s")
