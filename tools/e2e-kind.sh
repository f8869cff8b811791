#!/usr/bin/env bash
# `make e2e-kind`: the e2e suite (e2e/test_release.py) on a kind cluster, for machines with
# Docker (and the GitHub Actions workflow .github/workflows/e2e-kind.yml). Creates the cluster
# (e2e/kind/cluster.yaml), builds the images from the Dockerfiles with Docker and the official
# base image, loads them into kind, runs the suite, and deletes the cluster (also on failure;
# KEEP_CLUSTER=1 keeps it). The local test bed runs the same suite: `make e2e-local`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CLUSTER=${KIND_CLUSTER:-commandnet-e2e}
TAG=${E2E_TAG:-e2e}
PY=${PY:-.venv/bin/python}
WORK=$ROOT/.tools/e2e-kind
tool() { if [[ -x .tools/bin/$1 ]]; then echo ".tools/bin/$1"; else command -v "$1"; fi; }

command -v docker >/dev/null || { echo "e2e-kind: needs Docker (kind runs nodes as containers); without it run \`make e2e-local\`" >&2; exit 1; }
[[ -x .tools/bin/kind && -x .tools/bin/helm ]] || bash tools/install.sh kind helm
KIND=$(tool kind)
command -v kubectl >/dev/null || [[ -x .tools/bin/kubectl ]] || { echo "e2e-kind: kubectl not found: run \`make tools\` or install it" >&2; exit 1; }
mkdir -p "$WORK"

echo "[e2e-kind] building images (Dockerfile, official base)" >&2
docker build --target worker -t "commandnet-worker:$TAG" .
docker build --target operator -t "commandnet-operator:$TAG" .
graphs=$(mktemp -d)
mkdir -p "$graphs/app/e2e"
cp e2e/__init__.py e2e/graphs.py "$graphs/app/e2e/"
docker build -f examples/custom-worker/Dockerfile --build-arg "WORKER_IMAGE=commandnet-worker:$TAG" \
  --build-arg GRAPH=e2e.graphs:Hello -t "commandnet-e2e-graphs:$TAG" "$graphs"
rm -rf "$graphs"
NATS_IMAGE=$("$PY" -c 'from e2e.testbed.images import OFFICIAL_SERVER_IMAGES as o; print(o["nats"])')
PG_IMAGE=$("$PY" -c 'from e2e.testbed.images import OFFICIAL_SERVER_IMAGES as o; print(o["postgres"])')
docker pull -q "$NATS_IMAGE"
docker pull -q "$PG_IMAGE"

echo "[e2e-kind] creating kind cluster $CLUSTER" >&2
"$KIND" create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 180s
if [[ -z ${KEEP_CLUSTER:-} ]]; then
  trap '"$KIND" export logs "$WORK/logs" --name "$CLUSTER" >/dev/null 2>&1 || true; "$KIND" delete cluster --name "$CLUSTER"' EXIT
fi
"$KIND" get kubeconfig --name "$CLUSTER" > "$WORK/kubeconfig"
for image in "commandnet-worker:$TAG" "commandnet-operator:$TAG" "commandnet-e2e-graphs:$TAG" \
             "$NATS_IMAGE" "$PG_IMAGE"; do
  "$KIND" load docker-image "$image" --name "$CLUSTER"
done

export COMMANDNET_E2E_KUBECONFIG=$WORK/kubeconfig
COMMANDNET_E2E_IMAGES=$(printf '{"worker": "commandnet-worker:%s", "operator": "commandnet-operator:%s", "graphs": "commandnet-e2e-graphs:%s", "nats": "%s", "postgres": "%s"}' \
  "$TAG" "$TAG" "$TAG" "$NATS_IMAGE" "$PG_IMAGE")
export COMMANDNET_E2E_IMAGES
"$PY" -m pytest e2e/test_release.py -q -p no:cacheprovider "$@"
