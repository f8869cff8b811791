"""The README's quick start runs as written, prints what it promises, and warns about nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("query", "last"), [("clean_logs", "Running task successfully!"),
                                             ("hack_system", "Access Denied.")])
def test_quick_start_runs_as_written(tmp_path: Path, query: str, last: str) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README has no python block under 'Quick start'"
    script = tmp_path / "quickstart.py"
    script.write_text(code.group(1).replace('"clean_logs"', f'"{query}"'))
    out = subprocess.run([sys.executable, "-W", "error", str(script)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines() == [
        "Graph Structure: {'AuthCheck': ['Executing', 'Denied'], 'Executing': [], 'Denied': []}",
        f"[{query}] -> Checking Auth...",
        f"[{query}] -> {last}",
    ]
