#!/usr/bin/env bash
# Build the pinned test-bed tools from Go modules and link them into .tools/bin.
#
#   tools/install.sh              # everything (what `make tools` runs)
#   tools/install.sh helm etcd    # just these (names: see DEFAULT at the bottom)
#
# Versions come from tools/versions.env only. Each built tool lands in
#   ${COMMANDNET_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commandnet-tools}/<name>-<version>/
# outside the repository, so a machine that built a version once never builds it again, and a
# run with everything present only checks links. The default GOCACHE/GOMODCACHE are kept.
# Nothing is downloaded but Go modules, through the Go module proxy.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
set -a
# shellcheck source=/dev/null
. "$ROOT/tools/versions.env"
set +a

CACHE=${COMMANDNET_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commandnet-tools}
BIN=$ROOT/.tools/bin
PLUGINS=$ROOT/.tools/helm-plugins
mkdir -p "$CACHE/src" "$BIN" "$PLUGINS"

command -v go >/dev/null || { echo "tools/install.sh: Go is not installed (need Go >= 1.26)" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
# Two cores: one go command at a time, nice'd so the machine stays usable.
NICE=(nice -n 10)
PYTHON=${PYTHON:-python3}

log() { printf '[tools] %s\n' "$*" >&2; }

# cached NAME-VERSION BINARY...: true when every binary is already built in the cache.
cached() {
  local dir=$CACHE/$1; shift
  local b
  for b in "$@"; do [[ -x $dir/$b ]] || return 1; done
}

# link NAME-VERSION BINARY...: point .tools/bin/BINARY at the cached build.
link() {
  local dir=$CACHE/$1; shift
  local b
  for b in "$@"; do ln -sfn "$dir/$b" "$BIN/$b"; done
}

# publish NAME-VERSION TMPDIR: move a finished build into place (a half build never looks done).
publish() {
  chmod 755 "$2"
  rm -rf "${CACHE:?}/$1"
  mv "$2" "$CACHE/$1"
}

# wrapper NAME-VERSION MODULE VERSION: a wrapper module dir, go.mod generated from upstream's.
wrapper() {
  local src=$CACHE/src/$1 mod=$2 ver=$3
  if [[ ! -f $src/go.mod ]]; then
    local upstream
    upstream=$(cd "$CACHE/src" && go mod download -json "$mod@$ver" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    "$PYTHON" "$ROOT/tools/gowrapper.py" "$mod" "$ver" "$upstream" "$src" >&2
  fi
  printf '%s\n' "$src"
}

timed() { # timed LABEL CMD...: run and report the wall time
  local label=$1; shift
  local t0=$SECONDS
  "$@"
  log "$label built in $((SECONDS - t0)) s"
}

k8s_ldflags() {
  local v=${KUBERNETES_VERSION} major minor
  major=${v#v}; major=${major%%.*}
  minor=${v#v"$major".}; minor=${minor%%.*}
  local date commit
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  commit=$(cd "$CACHE/src" && go mod download -json "k8s.io/kubernetes@$v" | "$PYTHON" -c \
    'import json,sys; print((json.load(sys.stdin).get("Origin") or {}).get("Hash", ""))')
  local flags="-s -w" pkg
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
    [[ -n $commit ]] && flags+=" -X $pkg.gitCommit=$commit"
  done
  printf '%s' "$flags"
}

# go_build_k8s NAME BINARY...: build cmd/BINARY of k8s.io/kubernetes into the cache.
go_build_k8s() {
  local name=$1; shift
  local key=$name-$KUBERNETES_VERSION
  if cached "$key" "$@"; then link "$key" "$@"; return; fi
  local src tmp pkgs=() b
  src=$(wrapper "kubernetes-$KUBERNETES_VERSION" k8s.io/kubernetes "$KUBERNETES_VERSION")
  tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
  for b in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  log "building $* (Kubernetes $KUBERNETES_VERSION): the first time this takes a while"
  (cd "$src" && timed "$key" "${NICE[@]}" go build -trimpath -ldflags "$(k8s_ldflags)" -o "$tmp/" "${pkgs[@]}")
  publish "$key" "$tmp"
  link "$key" "$@"
}

build_kubernetes() {
  go_build_k8s kubernetes kube-apiserver kube-controller-manager kube-scheduler kubectl
}

build_kubelet() {
  go_build_k8s kubelet kubelet
}

build_kube_proxy() {
  go_build_k8s kube-proxy kube-proxy
}

# kubeadm: only the kind node image built here needs it (tools/kind-node/build.sh).
build_kubeadm() {
  go_build_k8s kubeadm kubeadm
}

build_etcd() {
  local key=etcd-$ETCD_VERSION
  if cached "$key" etcd; then link "$key" etcd; return; fi
  local src tmp
  src=$(wrapper "$key" go.etcd.io/etcd/server/v3 "$ETCD_VERSION")
  tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
  log "building etcd $ETCD_VERSION"
  (cd "$src" && timed "$key" "${NICE[@]}" go build -trimpath -o "$tmp/etcd" \
    -ldflags "-s -w" go.etcd.io/etcd/server/v3)
  publish "$key" "$tmp"
  link "$key" etcd
}

build_helm() {
  local key=helm-$HELM_VERSION
  if cached "$key" helm; then link "$key" helm; return; fi
  local tmp
  tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
  log "building helm $HELM_VERSION"
  (cd "$CACHE/src" && GOBIN=$tmp timed "$key" "${NICE[@]}" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION")
  publish "$key" "$tmp"
  link "$key" helm
}

build_helm_unittest() {
  local key=helm-unittest-$HELM_UNITTEST_VERSION
  if ! cached "$key" untt; then
    local src tmp m=github.com/helm-unittest/helm-unittest
    src=$(wrapper "$key" "$m" "$HELM_UNITTEST_VERSION")
    tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
    log "building helm-unittest $HELM_UNITTEST_VERSION"
    # The embedded helm v3 renders .Capabilities.KubeVersion from these two variables.
    local kmajor=${KUBERNETES_VERSION#v} kminor
    kmajor=${kmajor%%.*}; kminor=${KUBERNETES_VERSION#v"$kmajor".}; kminor=${kminor%%.*}
    (cd "$src" && timed "$key" "${NICE[@]}" go build -trimpath -o "$tmp/untt" -ldflags \
      "-s -w -X $m/internal/build.version=$HELM_UNITTEST_VERSION
       -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$kmajor
       -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor
       -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$kmajor
       -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kminor" \
      "$m/cmd/helm-unittest")
    publish "$key" "$tmp"
  fi
  link "$key" untt
  # `helm unittest` through our own plugin manifest (no download hook), HELM_PLUGINS=$PLUGINS.
  mkdir -p "$PLUGINS/unittest"
  cp "$ROOT/tools/helm-plugin-unittest/plugin.yaml" "$PLUGINS/unittest/plugin.yaml"
  ln -sfn "$CACHE/$key/untt" "$PLUGINS/unittest/untt"
}

# CoreDNS with its default plugin set (`go install` of the main module: it has no replaces).
# go_install NAME VERSION PACKAGE BINARY: `go install PACKAGE@VERSION` into the cache.
go_install() {
  local key=$1-$2 pkg=$3 bin=$4
  if cached "$key" "$bin"; then link "$key" "$bin"; return; fi
  local tmp
  tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
  log "building $1 $2"
  (cd "$CACHE/src" && GOBIN=$tmp timed "$key" "${NICE[@]}" go install -trimpath -ldflags "-s -w" \
    "$pkg@$2")
  publish "$key" "$tmp"
  link "$key" "$bin"
}

build_coredns() { go_install coredns "$COREDNS_VERSION" github.com/coredns/coredns coredns; }

# metrics-server: the resource-metrics API (metrics.k8s.io) the HPA reads. No replaces in its
# go.mod; its Makefile stamps client-go's version variables.
build_metrics_server() {
  local key=metrics-server-$METRICS_SERVER_VERSION
  if cached "$key" metrics-server; then link "$key" metrics-server; return; fi
  local tmp pkg=k8s.io/client-go/pkg/version
  tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
  log "building metrics-server $METRICS_SERVER_VERSION"
  (cd "$CACHE/src" && GOBIN=$tmp timed "$key" "${NICE[@]}" go install -trimpath -ldflags \
    "-s -w -X $pkg.gitVersion=$METRICS_SERVER_VERSION -X $pkg.gitTreeState=clean" \
    "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION")
  publish "$key" "$tmp"
  link "$key" metrics-server
}

# KEDA: the operator (cmd/operator, upstream's binary name `keda`) and the metrics API server
# (cmd/adapter, `keda-adapter`). Its go.mod has a replace, so `go install` refuses it: a wrapper
# module repeats it. Both binaries in one `go build` (they share most packages).
build_keda() {
  local key=keda-$KEDA_VERSION m=github.com/kedacore/keda/v2
  if cached "$key" keda keda-adapter; then link "$key" keda keda-adapter; return; fi
  local src tmp
  src=$(wrapper "$key" "$m" "$KEDA_VERSION")
  tmp=$(mktemp -d "$CACHE/.build-$key.XXXX")
  log "building KEDA $KEDA_VERSION (operator + adapter): the first time this takes a while"
  local flags="-s -w -X $m/version.Version=${KEDA_VERSION#v} -X $m/version.GitCommit=none"
  (cd "$src" && timed "$key keda" "${NICE[@]}" go build -trimpath -ldflags "$flags" \
      -o "$tmp/keda" "$m/cmd/operator" &&
    timed "$key keda-adapter" "${NICE[@]}" go build -trimpath -ldflags "$flags" \
      -o "$tmp/keda-adapter" "$m/cmd/adapter")
  # Its CRDs and RBAC, next to the binaries (e2e/testbed/keda.py applies them): copied from
  # the module cache, never into the repository.
  local dir
  dir=$(cd "$src" && go list -m -f '{{.Dir}}' "$m")
  mkdir -p "$tmp/config"
  cp -r "$dir/config/crd/bases" "$tmp/config/crd"
  cp -r "$dir/config/rbac" "$dir/config/metrics-server" "$tmp/config/"
  chmod -R u+w "$tmp/config"
  publish "$key" "$tmp"
  link "$key" keda keda-adapter
}

# kind: for users with Docker (`make e2e-kind`); it cannot run here.
build_kind() { go_install kind "$KIND_VERSION" sigs.k8s.io/kind kind; }

# The kind node image built here (tools/kind-node/build.sh): crictl, and kind's default storage
# class provisioner. Not in DEFAULT: only `make kind-node-image` asks for them.
build_crictl() { go_install crictl "$CRI_TOOLS_VERSION" sigs.k8s.io/cri-tools/cmd/crictl crictl; }
build_local_path_provisioner() {
  go_install local-path-provisioner "$LOCAL_PATH_PROVISIONER_VERSION" \
    github.com/rancher/local-path-provisioner local-path-provisioner
}

# actionlint: tests/test_workflows.py lints .github/workflows/ with it.
build_actionlint() {
  go_install actionlint "$ACTIONLINT_VERSION" github.com/rhysd/actionlint/cmd/actionlint actionlint
}

DEFAULT=(kubernetes kubelet kube_proxy coredns metrics_server keda etcd helm helm_unittest kind
  actionlint)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${DEFAULT[@]}")
rm -rf "$CACHE"/.build-* 2>/dev/null || true
t0=$SECONDS
for t in "${targets[@]}"; do
  t=${t//-/_}
  declare -F "build_$t" >/dev/null || { echo "tools/install.sh: unknown tool '$t'" >&2; exit 2; }
  "build_$t"
done
log "tools ready in $BIN ($((SECONDS - t0)) s); cache: $CACHE"
