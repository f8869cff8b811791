# Test-bed tools and the local Kubernetes control plane (issue 4; docs/kubernetes-testbed.md).
# Versions: tools/versions.env. Built binaries are cached outside the repository, keyed by version.

.PHONY: tools cluster-up cluster-down e2e-kube

# helm, helm-unittest (untt + a local helm plugin), etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kubelet, kube-proxy, coredns, metrics-server, keda + keda-adapter,
# kind -> .tools/bin. Seconds when already built.
tools:
	bash tools/install.sh

# `make cluster-up CLUSTER_FLAGS=--node`: the full bed (node, kube-proxy, CoreDNS; needs root).
cluster-up: $(STAMP)
	$(PY) -m e2e.testbed up $(CLUSTER_FLAGS)

cluster-down: $(STAMP)
	$(PY) -m e2e.testbed down

e2e-kube: $(STAMP)
	$(PY) -m pytest e2e -q
