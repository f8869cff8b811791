"""NATS (JetStream) and PostgreSQL for the end-to-end tests, as pods: ``nats.yaml`` and
``postgres.yaml`` next to this file name the official images (kind, any cluster that pulls);
:func:`server_manifests` returns their documents with other images, e.g. the test bed's
(``e2e.testbed.images.LOCAL_SERVER_IMAGES``, built from e2e/images/ and never pulled).

The PostgreSQL pod reads its password from the Secret ``postgres`` (key ``password``), which the
caller creates; user and database are ``commandnet``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVERS = ("nats", "postgres")
OFFICIAL_IMAGES = {"nats": "nats:2.11-alpine", "postgres": "postgres:16"}


def server_manifests(images: Mapping[str, str] | None = None,
                     pull_policy: str | None = None) -> list[dict[str, Any]]:
    """The documents of nats.yaml and postgres.yaml (Services, Deployments; no namespace), the
    container named ``nats`` / ``postgres`` running ``images[name]`` (default: the official
    images). `pull_policy` sets imagePullPolicy; by default ``Never`` when every image is a
    ``localhost/`` one (imported into the node, nothing to pull), else the cluster's default."""
    import yaml

    chosen = {**OFFICIAL_IMAGES, **(images or {})}
    if pull_policy is None and all(chosen[s].startswith("localhost/") for s in SERVERS):
        pull_policy = "Never"
    docs: list[dict[str, Any]] = []
    for server in SERVERS:
        for doc in yaml.safe_load_all((HERE / f"{server}.yaml").read_text()):
            if not doc:
                continue
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                if container["name"] in chosen:
                    container["image"] = chosen[container["name"]]
                    if pull_policy:
                        container["imagePullPolicy"] = pull_policy
            docs.append(doc)
    return docs
