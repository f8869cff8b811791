"""``commandnet graph pkg.module:Node``: print a graph as JSON or Mermaid."""

from __future__ import annotations

import json

import click

from ..graph import GraphAnalyzer
from ..loading import GraphLoadError, load_graph


@click.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["json", "mermaid"]), default="json",
              show_default=True)
def graph(target: str, fmt: str) -> None:
    """Print the graph reachable from TARGET (pkg.module:StartNode)."""
    try:
        result = GraphAnalyzer.validate(load_graph(target))
    except GraphLoadError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result.to_dict(), indent=2) if fmt == "json" else result.to_mermaid())
