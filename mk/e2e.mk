# The e2e suite on real pods (e2e/test_release.py, issue 9) and the cluster demo.

.PHONY: e2e-local e2e-kind kind-node-image demo-cluster demo-cluster-down

# The suite on the local test bed: a node of its own, images built from the Dockerfiles with
# buildah and imported, NATS and PostgreSQL as pods, the chart installed with helm.
e2e-local: $(STAMP) tools
	$(PY) -m pytest e2e/test_release.py -q

# The same suite on a kind cluster: tools/e2e-kind.sh creates and deletes it. With Docker: the
# official node image; without (these machines): podman and the node image built here (docs/kind.md).
e2e-kind: $(STAMP)
	bash tools/e2e-kind.sh

# kind's node image built without a registry (podman + buildah; cached by version): prints its name.
kind-node-image:
	bash tools/kind-node/build.sh

# A newcomer's look at the Kubernetes half: the test bed, the chart, 20 Agents (e2e/demo_cluster.py).
demo-cluster: $(STAMP) tools
	$(PY) -m e2e.demo_cluster

demo-cluster-down: $(STAMP)
	$(PY) -m e2e.testbed down --dir .tools/demo-cluster
