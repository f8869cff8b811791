"""`make demo-cluster`: commandnet on the local test bed's real node, for a newcomer.

Starts the test bed detached (control plane, node, kube-proxy, CoreDNS) in .tools/demo-cluster,
builds the images from the Dockerfiles and imports them, runs NATS and PostgreSQL as pods,
`helm install`s charts/commandnet with the bundled order flow, applies 20 Agents and shows
`kubectl get agents` changing until every one is final. The cluster keeps running afterwards;
the last lines say how to look further and how to stop it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from e2e.release import Cluster, Images, Release
from e2e.testbed import images as built
from e2e.testbed.tools import REPO_ROOT

WORKDIR = REPO_ROOT / ".tools" / "demo-cluster"
NAMESPACE = "commandnet-demo"
GRAPH = "commandnet.examples.orders:Intake"
FINAL = ("Succeeded", "Failed", "Cancelled")


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def start_bed(workdir: Path) -> Path:
    """The detached test bed's kubeconfig (an already running one is reused)."""
    cli = [sys.executable, "-m", "e2e.testbed"]
    status = subprocess.run([*cli, "status", "--dir", str(workdir)], capture_output=True,
                            text=True, check=False)
    if status.returncode == 0 and "DEAD" not in status.stdout and "kubelet" in status.stdout:
        say(f"the test bed in {workdir} is running; reusing it")
    else:
        say("starting the test bed: etcd, API server, controllers, node, kube-proxy, CoreDNS")
        subprocess.run([*cli, "down", "--dir", str(workdir)], capture_output=True, check=False)
        up = subprocess.run([*cli, "up", "--node", "--dir", str(workdir)], stdout=subprocess.PIPE,
                            text=True, check=False)
        if up.returncode != 0:
            raise SystemExit("the test bed did not start (its messages are above)")
    state = json.loads((workdir / "state.json").read_text())
    return Path(state["kubeconfig"])


def orders(count: int) -> list[dict[str, object]]:
    return [{"apiVersion": "commandnet.io/v1alpha1", "kind": "Agent",
             "metadata": {"name": f"order-{i:02d}"},
             "spec": {"startNode": "Intake", "pool": "orders",
                      "context": {"order_id": f"A-{1000 + i}", "amount": 40 + 37 * i}}}
            for i in range(1, count + 1)]


def watch(cluster: Cluster, count: int, timeout: float) -> None:
    """Print `kubectl get agents` whenever it changes, until all are final."""
    last = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = cluster.kubectl("get", "agents", "-n", NAMESPACE).stdout
        if table != last:
            print(f"\n$ kubectl get agents -n {NAMESPACE}    ({time.strftime('%H:%M:%S')})")
            print(table, end="", flush=True)
            last = table
        items = cluster.json("get", "agents", "-n", NAMESPACE)["items"]
        if len(items) == count and all(a.get("status", {}).get("phase") in FINAL
                                       for a in items):
            return
        time.sleep(1)
    raise SystemExit(f"not every Agent was final after {timeout:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo-cluster", description=__doc__)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=WORKDIR)
    args = parser.parse_args(argv)
    workdir: Path = args.dir.resolve()

    say("building the images from the Dockerfiles with buildah (cached after the first time)")
    archives = built.build(["worker", "operator", "nats", "postgres"])
    kubeconfig = start_bed(workdir)
    say("importing the images into the node's containerd")
    subprocess.run([sys.executable, "-m", "e2e.testbed", "import", "--dir", str(workdir),
                    *map(str, archives.values())], check=True)
    images = Images(worker=built.ref("worker"), operator=built.ref("operator"),
                    graphs=built.ref("worker"), nats=built.ref("nats"),
                    postgres=built.ref("postgres"), pull_policy="Never")
    cluster = Cluster(kubeconfig, workdir, images)
    release = Release(cluster, NAMESPACE, "commandnet", pool="orders", graphs=[GRAPH],
                      worker_image=images.worker)
    if cluster.helm("status", release.name, "-n", NAMESPACE, check=False).returncode == 0:
        say("the chart is installed already; deleting the last run's Agents")
        cluster.kubectl("delete", "agents", "--all", "-n", NAMESPACE, "--timeout=120s")
    else:
        say(f"running NATS and PostgreSQL as pods in namespace {NAMESPACE}")
        release.create_namespace()
        release.deploy_servers()
        say("helm install commandnet charts/commandnet (workers of pool 'orders', the operator)")
        release.install()
    print(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout, flush=True)
    say(f"kubectl apply -f - with {args.agents} Agents (the order flow)")
    cluster.apply(orders(args.agents), namespace=NAMESPACE)
    watch(cluster, args.agents, timeout=300)
    worker = release.pods("worker")[0]["metadata"]["name"]
    print(f"""
All {args.agents} Agents are final. Look further:

  export KUBECONFIG={kubeconfig}
  kubectl describe agent order-01 -n {NAMESPACE}      # status, transitions, events
  kubectl get agent order-01 -n {NAMESPACE} -o jsonpath='{{.status.history}}'
  kubectl logs -n {NAMESPACE} -l app.kubernetes.io/component=worker --tail=20
  kubectl exec -n {NAMESPACE} {worker} -- python3 -c "import urllib.request as u; \\
    print(u.urlopen('http://localhost:8080/metrics').read().decode()[:2000])"
  helm status commandnet -n {NAMESPACE}

Run it again with `make demo-cluster` (it reuses the cluster); stop it with
`make demo-cluster-down`.""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
