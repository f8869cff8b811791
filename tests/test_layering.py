"""Imports run one way (issue 7, item 13): the command line sits on top; the worker and the
adapters never import it; ``adapters/nats.py`` and ``adapters/nats_status.py`` do not import
each other both ways. Checked on the source (every import statement, ``TYPE_CHECKING`` and
function-level ones included), so an arrow back up fails here before it bites at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "commandnet"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            # ``from . import x`` / ``from .pkg import mod`` may name modules too.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def package_modules() -> dict[str, set[str]]:
    """Every library module of the package and what it imports.

    ``__main__`` modules are entry points (``python -m commandnet.worker`` runs the CLI's
    worker command): nothing imports them, so they sit on top whatever folder holds them.
    """
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))
            if p.name != "__main__.py"}


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_scan_resolves_relative_imports() -> None:
    modules = package_modules()
    assert "commandnet.engine" in modules["commandnet.worker.process"]
    assert "commandnet.loading" in modules["commandnet.worker.process"]
    assert "commandnet.adapters.nats_status" in modules["commandnet.adapters.nats"]


@pytest.mark.parametrize("lower", ["commandnet.worker", "commandnet.adapters",
                                   "commandnet.loading"])
def test_nothing_below_the_command_line_imports_it(lower: str) -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in package_modules().items() if under(module, lower)
        for target in targets if under(target, "commandnet.cli"))
    assert offenders == [], "arrows back up to commandnet.cli:\n" + "\n".join(offenders)


def test_the_graph_loader_is_below_cli_and_worker() -> None:
    modules = package_modules()
    assert "commandnet.cli.loading" not in modules
    assert not any(under(t, "commandnet.worker") or under(t, "commandnet.cli")
                   for m, targets in modules.items() if under(m, "commandnet.loading")
                   for t in targets)


def test_nats_and_nats_status_do_not_import_each_other() -> None:
    modules = package_modules()
    bus, status = "commandnet.adapters.nats", "commandnet.adapters.nats_status"
    assert not (status in modules[bus] and bus in modules[status]), (
        "adapters/nats.py and adapters/nats_status.py import each other")
    assert bus not in modules[status], "the status mirror must not depend on the bus module"
