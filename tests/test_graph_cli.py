"""``commandnet graph pkg.mod:Start --format json|mermaid`` on a bundled graph (CliRunner)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from commandnet import GraphAnalyzer
from commandnet.cli.main import cli
from commandnet.examples import orders

TARGET = "commandnet.examples.orders:Intake"
EDGES = {
    "Intake": ["RiskCheck"],
    "RiskCheck": ["Charge", "ManualReview", "Rejected"],
    "ManualReview": ["Charge", "Rejected"],
    "Charge": ["Pick"],
    "Rejected": [],
    "Pick": ["Pack", "PickItem"],
    "Pack": ["Fulfil"],
    "PickItem": [],
    "Fulfil": [],
}
# The edges that are not plain moves carry their kind in the picture.
LABELS = {("Pick", "Pack"): "join", ("Pick", "PickItem"): "branch", ("Pack", "Fulfil"): "sleep"}


def test_graph_json_is_the_adjacency_dict() -> None:
    result = CliRunner().invoke(cli, ["graph", TARGET, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == EDGES
    assert json.loads(result.output) == GraphAnalyzer.build_graph(orders.Intake)
    # json is the default format
    plain = CliRunner().invoke(cli, ["graph", TARGET])
    assert plain.exit_code == 0 and json.loads(plain.output) == EDGES


def test_graph_mermaid_is_a_state_diagram_of_every_edge() -> None:
    result = CliRunner().invoke(cli, ["graph", TARGET, "--format", "mermaid"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.strip().splitlines()]
    assert lines[0] == "stateDiagram-v2"
    assert lines[1] == "[*] --> Intake"
    expected = {f"{source} --> {target}" + (f": {LABELS[source, target]}"
                                            if (source, target) in LABELS else "")
                for source, targets in EDGES.items() for target in targets}
    expected |= {"Fulfil --> [*]", "Rejected --> [*]", "PickItem --> [*]"}
    assert set(lines[2:]) == expected and len(lines[2:]) == len(expected), lines


def test_graph_of_a_bad_target_names_it() -> None:
    result = CliRunner().invoke(cli, ["graph", "commandnet.examples.orders:Nope"])
    assert result.exit_code != 0
    assert "commandnet.examples.orders:Nope" in result.output and "Nope" in result.output
    bad_format = CliRunner().invoke(cli, ["graph", TARGET, "--format", "dot"])
    assert bad_format.exit_code == 2 and "dot" in bad_format.output
