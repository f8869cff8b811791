"""The Agent CRD generated from the Pydantic models (operator/commandnet_operator/crd.py), and
the kopf peering manifests, checked offline. The API server's own checks: e2e/test_agent_crd.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from commandnet_operator import crd
from commandnet_operator.resource import (
    API_VERSION,
    CATEGORIES,
    HISTORY_LIMIT,
    KIND,
    MAX_CONTEXT_PROPERTIES,
    MAX_RESUMES,
    MAX_SIGNALS,
    POOL_PATTERN,
    SHORT_NAMES,
    Agent,
    AgentSpec,
)

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / crd.CRD_PATH
PEERING_CRD = ROOT / "crds" / "kopf-peering.yaml"
PEERING_OBJECT = ROOT / "operator" / "deploy" / "peering.yaml"


def schema() -> dict[str, Any]:
    version = crd.agent_crd()["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_is_not_stale() -> None:
    problem = crd.check(CRD_FILE)
    assert problem is None, problem
    assert CRD_FILE.read_text() == crd.render(), (
        f"{crd.CRD_PATH} is stale: regenerate it with `{crd.REGENERATE}`")


def test_check_reports_a_stale_file_with_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "agents.yaml"
    stale.write_text(crd.render().replace("maxItems: 10", "maxItems: 9"))
    assert crd.main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "is stale" in err and "make crds" in err and crd.CRD_PATH in err, err
    assert "-                maxItems: 9" in err, err  # the diff shows what changed

    assert crd.main(["--check", str(tmp_path / "missing.yaml")]) == 1
    assert "is missing" in capsys.readouterr().err

    fresh = tmp_path / "fresh.yaml"
    assert crd.main(["--output", str(fresh)]) == 0
    assert crd.main(["--check", str(fresh)]) == 0
    assert fresh.read_text() == crd.render()


def test_render_is_deterministic_and_parses_back() -> None:
    assert crd.render() == crd.render()
    assert yaml.safe_load(crd.render()) == crd.agent_crd()


def test_schema_is_structural() -> None:
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "nullable"}
    for path, node in walk(schema()):
        assert "type" in node, f"{path} has no type"
        assert not forbidden & node.keys(), f"{path} has {forbidden & node.keys()}"
        assert node.get("additionalProperties") is not False, path
        assert "default" not in node or node["default"] is not None, path
        if node["type"] == "object" and "properties" in node:
            assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if path != ".metadata":  # the API server allows no description there
            assert node.get("description"), f"{path} has no description (kubectl explain)"
    text = crd.render()
    assert "$ref" not in text and "title:" not in text


def test_schema_carries_the_models_rules() -> None:
    root = schema()
    assert root["required"] == ["spec"]
    spec = root["properties"]["spec"]
    assert spec["required"] == ["startNode"]
    (immutable,) = spec["x-kubernetes-validations"]
    assert immutable["message"] == crd.IMMUTABLE_SPEC_MESSAGE
    for name in spec["properties"]:  # every field is immutable, but the two lists that grow
        assert (f"self.{name} == oldSelf.{name}" in immutable["rule"]) == (
            name not in ("signals", "resumes")), name
        assert (f"has(self.{name}) == has(oldSelf.{name})" in immutable["rule"]) == (
            name not in ("signals", "resumes")), name
    for name, limit in (("signals", MAX_SIGNALS), ("resumes", MAX_RESUMES)):
        grows = spec["properties"][name]
        assert (grows["type"], grows["default"], grows["maxItems"]) == ("array", [], limit)
        assert grows["x-kubernetes-list-type"] == "map"
        assert grows["x-kubernetes-list-map-keys"] == ["id"]
        assert "id" in grows["items"]["required"]
        (entry_rule,) = grows["items"]["x-kubernetes-validations"]
        assert entry_rule == {"rule": "self == oldSelf",
                              "message": crd.ENTRY_CHANGED_MESSAGE.format(field=name)}
        (list_rule,) = grows["x-kubernetes-validations"]
        assert list_rule["message"] == crd.APPEND_ONLY_MESSAGE.format(field=name)
        assert "size(self) >= size(oldSelf)" in list_rule["rule"]
    signal = spec["properties"]["signals"]["items"]["properties"]
    assert signal["payload"]["type"] == "object"
    assert signal["payload"]["x-kubernetes-preserve-unknown-fields"] is True
    resume = spec["properties"]["resumes"]["items"]
    assert resume["required"] == ["id", "fromNode"]
    assert resume["properties"]["contextPatch"]["x-kubernetes-preserve-unknown-fields"] is True
    payload = spec["properties"]["payload"]
    assert payload["type"] == "object" and payload["x-kubernetes-preserve-unknown-fields"]
    context = spec["properties"]["context"]
    assert context["type"] == "object"
    assert context["x-kubernetes-preserve-unknown-fields"] is True
    assert context["maxProperties"] == MAX_CONTEXT_PROPERTIES
    assert f"At most {MAX_CONTEXT_PROPERTIES} top-level keys" in context["description"]
    pool = spec["properties"]["pool"]
    assert (pool["pattern"], pool["default"], pool["maxLength"]) == (POOL_PATTERN, "default", 63)
    assert spec["properties"]["ttlSecondsAfterFinished"] == {
        "description": spec["properties"]["ttlSecondsAfterFinished"]["description"],
        "type": "integer", "minimum": 0}

    status = root["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Cancelled"]
    assert status["startTime"]["format"] == "date-time"
    assert status["signalsSent"] == {"description": status["signalsSent"]["description"],
                                     "type": "integer", "minimum": 0}
    assert status["resumesHandled"]["type"] == "integer"
    assert status["history"]["maxItems"] == HISTORY_LIMIT
    assert status["history"]["items"]["properties"]["time"]["format"] == "date-time"
    assert status["history"]["items"]["properties"]["phase"]["enum"] == status["phase"]["enum"]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]  # a list-map key must be required
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_the_models_literals_match_the_constants() -> None:
    assert Agent.model_fields["apiVersion"].default == API_VERSION
    assert Agent.model_fields["kind"].default == KIND


def test_the_model_enforces_the_context_limit_too() -> None:
    from pydantic import ValidationError

    AgentSpec(startNode="A", context={f"k{i}": i for i in range(MAX_CONTEXT_PROPERTIES)})
    with pytest.raises(ValidationError):
        AgentSpec(startNode="A", context={f"k{i}": i for i in range(MAX_CONTEXT_PROPERTIES + 1)})


def test_names_subresource_and_printer_columns() -> None:
    spec = crd.agent_crd()["spec"]
    assert crd.agent_crd()["metadata"]["name"] == "agents.commandnet.io"
    assert spec["group"] == "commandnet.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == SHORT_NAMES == ["ag"]
    assert spec["names"]["categories"] == CATEGORIES
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("Pool", "string", ".spec.pool"),
        ("Phase", "string", ".status.phase"),
        ("Node", "string", ".status.currentNode"),
        ("Step", "integer", ".status.step"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


def test_structural_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError, match="x: anyOf with 2 non-null choices"):
        crd.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {}, "x")
    with pytest.raises(ValueError, match="'const' is not supported"):
        crd.structural({"type": "string", "const": "a"}, {}, "y")
    with pytest.raises(ValueError, match="no type"):
        crd.structural({"description": "anything"}, {}, "z")
    # The referring field's description wins over the referenced model's docstring.
    got = crd.structural({"anyOf": [{"$ref": "#/$defs/P"}, {"type": "null"}], "default": None,
                          "description": "field"},
                         {"P": {"type": "string", "enum": ["a"], "description": "model",
                                "title": "P"}})
    assert got == {"description": "field", "type": "string", "enum": ["a"]}
    assert crd.structural({"type": "integer", "exclusiveMinimum": 0}, {}) == {
        "type": "integer", "minimum": 0, "exclusiveMinimum": True}


def test_kopf_peering_crd_matches_what_kopf_uses() -> None:
    from kopf._cogs.structs import references  # what the installed kopf looks for

    selector = references.CLUSTER_PEERINGS_K
    (doc,) = list(yaml.safe_load_all(PEERING_CRD.read_text()))
    spec = doc["spec"]
    assert doc["metadata"]["name"] == f"{selector.any_name}.{selector.group}"
    assert spec["group"] == selector.group and spec["scope"] == "Cluster"
    assert spec["names"]["plural"] == selector.any_name
    assert spec["names"]["kind"] == "ClusterKopfPeering"
    (version,) = spec["versions"]
    assert version["name"] == selector.version and version["served"] and version["storage"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["type"] == "object" and status["x-kubernetes-preserve-unknown-fields"] is True

    (peering,) = list(yaml.safe_load_all(PEERING_OBJECT.read_text()))
    assert peering["apiVersion"] == f"{selector.group}/{selector.version}"
    assert peering["kind"] == "ClusterKopfPeering"
    assert peering["metadata"]["name"] == "commandnet"
    assert "namespace" not in peering["metadata"]
