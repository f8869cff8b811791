"""``commandnet demo`` (what ``make demo`` runs): in one process, and with worker processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("workers", [0, 2])
def test_demo_runs_every_agent_to_a_final_node(tmp_path: Path, workers: int) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "commandnet.cli.main", "demo", "--agents", "30", "--workers",
         str(workers), "--dir", str(tmp_path), "--seed", "7"],
        capture_output=True, text=True, timeout=300, env={"COLUMNS": "120", "PATH": ""},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(r"│ (succeeded|failed)\s*│ (\w+)\s*│\s*(\d+) │", out.stdout)
    assert sum(int(count) for _, _, count in rows) == 30, out.stdout
    assert {node for _, node, _ in rows} <= {"Fulfil", "Rejected", "Charge"}
    assert "transitions/s" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
