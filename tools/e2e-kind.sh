#!/usr/bin/env bash
# `make e2e-kind`: the e2e suite (e2e/test_release.py) on a kind cluster: creates the cluster,
# loads the product's images, runs the suite, deletes the cluster (also on failure; KEEP_CLUSTER=1
# keeps it). The local test bed runs the same suite: `make e2e-local`.
#
# - With Docker (a developer's machine, .github/workflows/e2e-kind.yml): kind's official node
#   image, e2e/kind/cluster.yaml, the images built from the Dockerfiles with Docker and the
#   official base image, NATS and PostgreSQL from their official images.
# - Without Docker but with podman (these machines: no Docker, no registry):
#   KIND_EXPERIMENTAL_PROVIDER=podman, the node image built here by tools/kind-node/build.sh,
#   e2e/kind/cluster-podman.yaml, the images built with buildah by e2e/testbed/images.py (local
#   base, local NATS and PostgreSQL images) loaded from their OCI archives. See docs/kind.md.
# KIND_PROVIDER=docker|podman forces one.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CLUSTER=${KIND_CLUSTER:-commandnet-e2e}
TAG=${E2E_TAG:-e2e}
PY=${PY:-.venv/bin/python}
WORK=$ROOT/.tools/e2e-kind
tool() { if [[ -x .tools/bin/$1 ]]; then echo ".tools/bin/$1"; else command -v "$1"; fi; }
log() { printf '[e2e-kind] %s\n' "$*" >&2; }
t0=$SECONDS

PROVIDER=${KIND_PROVIDER:-}
if [[ -z $PROVIDER ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then PROVIDER=docker
  elif command -v podman >/dev/null; then PROVIDER=podman
  else
    log "needs Docker, or podman (apt-get install -y podman buildah mmdebstrap catatonit), to run kind's nodes as containers; without either run \`make e2e-local\`"
    exit 1
  fi
fi
[[ -x .tools/bin/kind && -x .tools/bin/helm ]] || bash tools/install.sh kind helm
KIND=$(tool kind)
command -v kubectl >/dev/null || [[ -x .tools/bin/kubectl ]] || { log "kubectl not found: run \`make tools\` or install it"; exit 1; }
mkdir -p "$WORK"

if [[ $PROVIDER == docker ]]; then
  log "building images (Dockerfile, official base)"
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
  CONFIG=e2e/kind/cluster.yaml
  CREATE_ARGS=()
  COMMANDNET_E2E_IMAGES=$(printf '{"worker": "commandnet-worker:%s", "operator": "commandnet-operator:%s", "graphs": "commandnet-e2e-graphs:%s", "nats": "%s", "postgres": "%s"}' \
    "$TAG" "$TAG" "$TAG" "$NATS_IMAGE" "$PG_IMAGE")
else
  export KIND_EXPERIMENTAL_PROVIDER=podman
  # What podman needs on these VMs (docs/kind.md): root lacks CAP_SYS_RESOURCE, so podman's
  # default nofile ulimit (1048576, above the hard limit) fails every container; and kind
  # bind-mounts /lib/modules, which this VM's kernel does not have.
  if ! grep -qs '^ *default_ulimits *= *\[ *\]' /etc/containers/containers.conf; then
    if [[ -e /etc/containers/containers.conf ]]; then
      log "/etc/containers/containers.conf exists without 'default_ulimits = []' under [containers]: add it (see docs/kind.md)"
      exit 1
    fi
    log "writing /etc/containers/containers.conf ([containers] default_ulimits = [])"
    printf '[containers]\n# root here lacks CAP_SYS_RESOURCE: keep the hard nofile limit (docs/kind.md)\ndefault_ulimits = []\n' \
      > /etc/containers/containers.conf
  fi
  [[ -d /lib/modules ]] || mkdir -p /lib/modules
  log "node image (tools/kind-node/build.sh)"
  NODE_IMAGE=$(bash tools/kind-node/build.sh)
  log "product images (e2e/testbed/images.py, buildah, local base)"
  # name<TAB>ref<TAB>archive for each image the suite needs
  "$PY" - > "$WORK/images.tsv" <<'PY'
from e2e.testbed import images
names = ["worker", "operator", "e2e-graphs", "nats", "postgres"]
for name, path in images.build(names).items():
    print(f"{name}\t{images.ref(name)}\t{path}")
PY
  ref() { awk -F'\t' -v n="$1" '$1 == n {print $2}' "$WORK/images.tsv"; }
  . tools/versions.env
  CONFIG=$WORK/cluster-podman.yaml
  sed -e "s/@ETCD_TAG@/${ETCD_VERSION#v}/" -e "s/@COREDNS_VERSION@/$COREDNS_VERSION/" \
    e2e/kind/cluster-podman.yaml > "$CONFIG"
  CREATE_ARGS=(--image "$NODE_IMAGE")
  COMMANDNET_E2E_IMAGES=$(printf '{"worker": "%s", "operator": "%s", "graphs": "%s", "nats": "%s", "postgres": "%s", "pull_policy": "Never"}' \
    "$(ref worker)" "$(ref operator)" "$(ref e2e-graphs)" "$(ref nats)" "$(ref postgres)")
fi
log "images ready after $((SECONDS - t0)) s"

log "creating kind cluster $CLUSTER ($PROVIDER)"
t1=$SECONDS
KUBECONFIG_FILE=$WORK/kubeconfig  # kind writes here, not into ~/.kube/config
cleanup() {
  "$KIND" export logs "$WORK/logs" --name "$CLUSTER" >/dev/null 2>&1 || true
  "$KIND" delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" || true
  if [[ $PROVIDER == podman ]]; then podman network rm "$KIND_EXPERIMENTAL_PODMAN_NETWORK" >/dev/null 2>&1 || true; fi
}
if [[ $PROVIDER == podman ]]; then
  # An IPv4-only network of our own: kind's default "kind" network is dual-stack, and netavark
  # then turns on the host's net.ipv6.conf.all.forwarding (docs/kind.md: what podman changes).
  export KIND_EXPERIMENTAL_PODMAN_NETWORK=${KIND_EXPERIMENTAL_PODMAN_NETWORK:-commandnet-kind}
  # A cluster of this name left by a killed run is replaced.
  "$KIND" delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" >/dev/null 2>&1 || true
  podman network exists "$KIND_EXPERIMENTAL_PODMAN_NETWORK" \
    || podman network create --driver bridge "$KIND_EXPERIMENTAL_PODMAN_NETWORK" >/dev/null
fi
[[ -n ${KEEP_CLUSTER:-} ]] || trap cleanup EXIT
"$KIND" create cluster --name "$CLUSTER" --config "$CONFIG" "${CREATE_ARGS[@]}" \
  --kubeconfig "$KUBECONFIG_FILE" --wait 300s
log "cluster ready in $((SECONDS - t1)) s"
t1=$SECONDS
if [[ $PROVIDER == docker ]]; then
  for image in "commandnet-worker:$TAG" "commandnet-operator:$TAG" "commandnet-e2e-graphs:$TAG" \
               "$NATS_IMAGE" "$PG_IMAGE"; do
    "$KIND" load docker-image "$image" --name "$CLUSTER"
  done
else
  cut -f3 "$WORK/images.tsv" | while read -r archive; do
    "$KIND" load image-archive "$archive" --name "$CLUSTER"
  done
fi
log "images loaded in $((SECONDS - t1)) s"

export COMMANDNET_E2E_KUBECONFIG=$KUBECONFIG_FILE COMMANDNET_E2E_IMAGES
t1=$SECONDS
"$PY" -m pytest e2e/test_release.py -q -p no:cacheprovider "$@"
log "suite ran in $((SECONDS - t1)) s; total $((SECONDS - t0)) s"
