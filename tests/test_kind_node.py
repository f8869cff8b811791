"""The kind recipes for machines without Docker (docs/kind.md): cheap checks that keep the podman
path's kind config, the node image's manifests and the versions in step. `make e2e-kind` is what
runs them for real."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
KIND_DIR = REPO / "e2e" / "kind"
NODE_DIR = REPO / "tools" / "kind-node"


def versions() -> dict[str, str]:
    lines = (REPO / "tools" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))


def test_the_podman_cluster_has_the_same_nodes_as_the_docker_one() -> None:
    docker = yaml.safe_load((KIND_DIR / "cluster.yaml").read_text())
    podman = yaml.safe_load((KIND_DIR / "cluster-podman.yaml").read_text())
    assert podman["nodes"] == docker["nodes"]
    assert podman["name"] == docker["name"]


def test_the_podman_cluster_points_kubeadm_at_the_images_the_node_image_carries() -> None:
    text = (KIND_DIR / "cluster-podman.yaml").read_text()
    patch = yaml.safe_load(yaml.safe_load(text)["kubeadmConfigPatches"][0])
    assert patch["imageRepository"] == "localhost"
    # tools/e2e-kind.sh fills these in from tools/versions.env; build.sh tags the same way.
    assert patch["etcd"]["local"]["imageTag"] == "@ETCD_TAG@"
    assert patch["dns"]["imageTag"] == "@COREDNS_VERSION@"
    build = (NODE_DIR / "build.sh").read_text()
    assert '"localhost/etcd:${ETCD_VERSION#v}"' in build
    assert '"localhost/coredns:$COREDNS_VERSION"' in build
    assert versions()["ETCD_VERSION"].startswith("v")


def test_the_node_images_manifests_name_only_images_it_carries() -> None:
    build = (NODE_DIR / "build.sh").read_text()
    cni = list(yaml.safe_load_all((NODE_DIR / "files/kind/manifests/default-cni.yaml").read_text()))
    images = [c["image"] for d in cni if d["kind"] == "DaemonSet"
              for c in d["spec"]["template"]["spec"]["containers"]]
    assert images == ["localhost/kindnet-lite:1"]
    assert "image localhost/kindnet-lite:1 " in build
    containerd = (NODE_DIR / "files/etc/containerd/config.toml").read_text()
    assert 'sandbox_image = "localhost/pause:3.10"' in containerd
    assert "image localhost/pause:3.10 " in build
    assert "restrict_oom_score_adj = true" in containerd


def test_the_recipes_download_nothing_but_go_modules_and_debian_packages() -> None:
    for path in [*NODE_DIR.rglob("*"), REPO / "tools" / "e2e-kind.sh"]:
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\b(curl|wget)\b|https?://(?!containerd\.io)", text), path
