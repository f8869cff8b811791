"""``commandnet demo`` (what ``make demo`` runs): in one process, and with worker processes.
Every order fans out (a branch per line item, joined once) and waits on a durable timer."""

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
    assert sum(int(count) for _, _, count in rows) == 30, out.stdout  # orders, not branches
    assert {node for _, node, _ in rows} <= {"Fulfil", "Rejected", "Charge"}
    assert "transitions/s" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    shipped = sum(int(count) for status, node, count in rows
                  if (status, node) == ("succeeded", "Fulfil"))
    assert shipped > 0, out.stdout
    text = re.sub(r"\s+", " ", out.stdout)
    fan_out = re.search(r"fan-out: (\d+) branches \(one per line item, in parallel; (\d+) "
                        r"succeeded\) for (\d+) orders, joined once each: (\d+) joins", text)
    assert fan_out is not None, out.stdout
    branches, succeeded, fanned, joins = map(int, fan_out.groups())
    assert branches == succeeded >= fanned == joins == shipped  # 1 to 3 line items an order
    assert branches > fanned, "some order has more than one line item"
    timers = re.search(r"timers: (\d+) orders parked in the store for the courier \(0\.2 s "
                       r"durable timer, no worker slot held\): ([\d.]+) s from parking", text)
    assert timers is not None, out.stdout
    assert int(timers.group(1)) == shipped and float(timers.group(2)) >= 0.2
