"""Importing a user's graph from ``pkg.module:StartNode``, with errors that say what is wrong."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from ..errors import CommandNetError, GraphError
from ..graph import GraphAnalyzer, NodeClass
from ..node import Node


class GraphLoadError(CommandNetError):
    """A ``--graph`` spec cannot be imported, is not a Node class, or its graph is invalid."""


def load_graph(spec: str) -> NodeClass:
    """Import ``pkg.module:StartNode``, check it is a Node class and that its graph is valid.

    The working directory is put on ``sys.path`` first (as uvicorn and celery do), so a
    project's own modules load without installing them.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise GraphLoadError(f"graph {spec!r}: expected the form pkg.module:StartNode")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise GraphLoadError(
                f"graph {spec!r}: no module named {exc.name!r} (is it installed, or is the "
                f"working directory {os.getcwd()!r} the folder that contains it?)"
            ) from None
        raise GraphLoadError(f"graph {spec!r}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # a syntax or import-time error in the user's module
        raise GraphLoadError(
            f"graph {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise GraphLoadError(
                f"graph {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, Node)):
        kind = f"class {obj.__qualname__}" if isinstance(obj, type) else type(obj).__name__
        raise GraphLoadError(
            f"graph {spec!r}: {attr} is a {kind}, not a Node class (subclass commandnet.Node)"
        )
    try:
        GraphAnalyzer.validate(obj)
    except GraphError as exc:
        raise GraphLoadError(f"graph {spec!r}: {exc}") from None
    return obj
