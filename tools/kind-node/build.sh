#!/usr/bin/env bash
# Build kind's node image on a machine with no registry and no Docker (podman + buildah), and
# print its name:  tools/kind-node/build.sh  ->  localhost/commandnet-kind-node:v1.34.4-<key>
#
# Why not `kind build node-image`: it starts from kindest/base (pulled; its Dockerfile clones and
# builds containerd/runc/crictl/CNI from git), drives a `docker` CLI, and pulls kindnetd,
# local-path-provisioner and pause from a registry. Here every part is made locally instead:
#   1. Debian roots with mmdebstrap (the host's own apt sources), imported into podman's storage;
#   2. the images a kind cluster starts, with buildah, from binaries tools/install.sh builds from
#      Go modules (Kubernetes, etcd, CoreDNS, local-path-provisioner) plus Debian's catatonit
#      (pause) and kindnet-lite.sh (our stand-in for kindnetd, whose source no Go module serves);
#   3. the node image from ./Containerfile with `buildah bud`; those images ride along in
#      /kind/images and are imported into the node's containerd at its first boot.
# The result is cached in podman's storage under a tag keyed by everything it is built from
# (tools/versions.env, this folder, the apt sources): a second run only checks that it exists.
# Needs root, Go, and: apt-get install podman buildah mmdebstrap catatonit
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tools/kind-node
set -a
# shellcheck source=/dev/null
. "$ROOT/tools/versions.env"
set +a
CACHE=${COMMANDNET_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commandnet-tools}
SOURCES=/etc/apt/sources.list.d/debian.sources
[[ -s $SOURCES ]] || SOURCES=/etc/apt/sources.list
SUITE=bookworm
log() { printf '[kind-node] %s\n' "$*" >&2; }
for t in podman buildah mmdebstrap catatonit go; do
  command -v "$t" >/dev/null || { log "needs $t (apt-get install -y podman buildah mmdebstrap catatonit; Go >= 1.26)"; exit 1; }
done

mkdir -p "$CACHE/src"
# One build at a time per machine (podman's storage and the tags are machine-wide).
exec 9>"$CACHE/.kind-node.lock"
flock 9

KEY=$( { cat "$ROOT/tools/versions.env" "$SOURCES"; echo "$SUITE";
         (cd "$HERE" && find . -type f | LC_ALL=C sort | xargs sha256sum); } | sha256sum | cut -c1-12)
IMAGE=localhost/commandnet-kind-node:$KUBERNETES_VERSION-$KEY
if podman image exists "$IMAGE"; then
  log "$IMAGE: cached"
  echo "$IMAGE"; exit 0
fi
t0=$SECONDS

WORK=$(mktemp -d "$CACHE/.kind-node-$KEY.XXXX")
trap 'rm -rf "$WORK"' EXIT
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
KIND_DIR=$(cd "$CACHE/src" && go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')

DPKG_OPTS=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
           --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
           --dpkgopt='path-exclude=/usr/share/info/*')
# debroot NAME PACKAGES: a Debian root made by mmdebstrap, imported as
# localhost/commandnet-kind-NAME:<key of its recipe> (kept across node image rebuilds).
debroot() {
  local key t=$SECONDS
  key=$( { echo "$SUITE $2 ${DPKG_OPTS[*]}"; cat "$SOURCES"; } | sha256sum | cut -c1-12)
  local ref=localhost/commandnet-kind-$1:$key
  if ! podman image exists "$ref"; then
    mmdebstrap --variant=minbase --quiet --include="$2" "${DPKG_OPTS[@]}" \
      "$SUITE" "$WORK/$1.tar" "$SOURCES" >&2
    podman import --quiet "$WORK/$1.tar" "$ref" >/dev/null
    rm -f "$WORK/$1.tar"
    log "$ref: mmdebstrap + import in $((SECONDS - t)) s"
  fi
  echo "$ref"
}
NODE_BASE=$(debroot node-base systemd,systemd-sysv,containerd,runc,containernetworking-plugins,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,e2fsprogs,bash,ca-certificates,jq,procps,socat)
NET_BASE=$(debroot net iptables,conntrack,iproute2,ca-certificates)

# The binaries (each built once per machine into $CACHE/<tool>-<version>/).
bash "$ROOT/tools/install.sh" kubernetes kubelet kube_proxy kubeadm etcd coredns crictl \
  local_path_provisioner kind >&2
bin() { readlink -f "$ROOT/.tools/bin/$1"; }

# image REF FROM ENTRYPOINT-JSON FILE:DEST...: one image with buildah (no Dockerfile needed).
IMAGES=()
image() {
  local ref=$1 from=$2 entrypoint=$3; shift 3
  local c
  c=$(buildah from --quiet "$from")
  local pair
  for pair in "$@"; do buildah copy --quiet "$c" "${pair%%:*}" "${pair#*:}" >/dev/null; done
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "org.opencontainers.image.description=$ref for the kind node built by tools/kind-node" \
    ${entrypoint:+--entrypoint "$entrypoint"} "$c"
  buildah commit --quiet --rm "$c" "$ref" >/dev/null
  IMAGES+=("$ref")
}
K=$KUBERNETES_VERSION
log "building the cluster's images"
image "localhost/kube-apiserver:$K" scratch '' "$(bin kube-apiserver):/usr/local/bin/kube-apiserver"
image "localhost/kube-controller-manager:$K" scratch '' \
  "$(bin kube-controller-manager):/usr/local/bin/kube-controller-manager"
image "localhost/kube-scheduler:$K" scratch '' "$(bin kube-scheduler):/usr/local/bin/kube-scheduler"
image "localhost/kube-proxy:$K" "$NET_BASE" '' "$(bin kube-proxy):/usr/local/bin/kube-proxy"
image "localhost/etcd:${ETCD_VERSION#v}" scratch '' "$(bin etcd):/usr/local/bin/etcd"
image "localhost/coredns:$COREDNS_VERSION" scratch '["/coredns"]' "$(bin coredns):/coredns"
image localhost/pause:3.10 scratch '["/pause", "-P"]' "$(readlink -f "$(command -v catatonit)"):/pause"
image localhost/kindnet-lite:1 "$NET_BASE" '' "$(bin kubectl):/usr/local/bin/kubectl" \
  "$HERE/kindnet-lite.sh:/usr/local/bin/kindnet-lite.sh"
image "localhost/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION" scratch \
  '["/usr/local/bin/local-path-provisioner"]' \
  "$(bin local-path-provisioner):/usr/local/bin/local-path-provisioner"
buildah tag "$NET_BASE" localhost/local-path-helper:1
IMAGES+=(localhost/local-path-helper:1)

# The build context: kind's upstream node files, our overrides, binaries, the images.
CTX=$WORK/context
mkdir -p "$CTX/upstream" "$CTX/bin" "$CTX/images"
cp -r "$KIND_DIR/images/base/files/." "$CTX/upstream/"
rm -rf "$CTX/upstream/etc/containerd" "$CTX/upstream/etc/systemd/system/containerd.service" \
  "$CTX/upstream/etc/systemd/system/containerd-fuse-overlayfs.service" "$CTX/upstream/LICENSES"
chmod -R u+w "$CTX/upstream"
cp -r "$HERE/files" "$CTX/files"
# kind's default storage manifest (pkg/build/nodeimage/const_storage.go), with the local images.
python3 - "$KIND_DIR/pkg/build/nodeimage/const_storage.go" "$CTX/files/kind/manifests/default-storage.yaml" \
  "localhost/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION" localhost/local-path-helper:1 <<'PY'
import re, sys
src, out, provisioner, helper = sys.argv[1:]
text = open(src).read()
body = re.search(r"const defaultStorageManifest = `(.*?)`\n", text.replace("` + storageProvisionerImage + `", provisioner).replace("` + storageHelperImage + `", helper), re.S).group(1)
open(out, "w").write(body.replace("imagePullPolicy: IfNotPresent", "imagePullPolicy: Never"))
PY
for b in kubeadm kubelet kubectl crictl; do cp "$(bin "$b")" "$CTX/bin/$b"; done
podman save --quiet --multi-image-archive --format docker-archive -o "$CTX/images/images.tar" "${IMAGES[@]}"

log "building $IMAGE (buildah bud)"
buildah bud --quiet --isolation chroot --layers=false -f "$HERE/Containerfile" \
  --build-arg "BASE=$NODE_BASE" --build-arg "KUBERNETES_VERSION=$K" -t "$IMAGE" "$CTX" >&2
for ref in "${IMAGES[@]}"; do podman rmi --ignore "$ref" >/dev/null 2>&1 || true; done
# Older node images (other keys) are 1.3 GB each: keep only this one.
podman images --format '{{.Repository}}:{{.Tag}}' localhost/commandnet-kind-node \
  | grep -vxF "$IMAGE" | xargs -r podman rmi >/dev/null 2>&1 || true
log "$IMAGE built in $((SECONDS - t0)) s"
echo "$IMAGE"
