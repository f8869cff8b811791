"""The core (modules directly inside commandnet/) stays small and depends on pydantic only."""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

CORE = sorted((Path(__file__).resolve().parents[1] / "commandnet").glob("*.py"))
LIMIT = 1000


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def test_core_is_at_most_1000_lines_of_code() -> None:
    counts = {path.name: code_lines(path) for path in CORE}
    assert sum(counts.values()) <= LIMIT, f"core has {sum(counts.values())} code lines: {counts}"
    assert len(counts) >= 10  # the count saw the real modules


def test_core_imports_only_the_standard_library_and_pydantic() -> None:
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "pydantic", \
                    f"{path.name} imports {name}"


def test_operator_folder_does_not_shadow_the_standard_library() -> None:
    import operator

    assert operator.__file__ is not None and "site-packages" not in operator.__file__
    assert Path(operator.__file__).parent.name.startswith("python3")
