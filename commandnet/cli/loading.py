"""Importing a user's node class from ``pkg.module:Name``, with errors that say what is wrong."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from ..node import Node


def load_node(target: str) -> type[Node[Any]]:
    """The Node subclass named by ``pkg.module:Name`` (the current directory is importable)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"{target!r} is not of the form pkg.module:NodeClass")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import module {module_name!r}: {exc}") from None
    node = getattr(module, attr, None)
    if node is None:
        raise click.BadParameter(f"module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(node, type) and issubclass(node, Node)):
        raise click.BadParameter(f"{target!r} is {node!r}, not a commandnet Node class")
    return node
