"""``make bench``: print throughput and step latency, and write them to bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core import run_all

RESULTS = Path(__file__).with_name("results.json")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--only", choices=["core", "distributed"], default=None)
    args = parser.parse_args()
    report: dict[str, object] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg": os.getloadavg()},
        "graph": "10-node linear chain, trivial nodes",
    }
    if args.only in (None, "core"):
        report["core"] = asyncio.run(run_all(args.agents))
        _table("core (one process, in-memory bus)", report["core"])  # type: ignore[arg-type]
        _versus(report["core"].get("vs_pydantic_graph", {}))  # type: ignore[attr-defined]
    if args.only in (None, "distributed"):
        try:
            from .distributed import run_distributed
        except ImportError as exc:
            report["distributed"] = {"error": f"not available: {exc}"}
        else:
            report["distributed"] = run_distributed(args.agents)
            _table("distributed (PostgreSQL + JetStream)", report["distributed"])  # type: ignore[arg-type]
            _summary(report["distributed"].get("summary", {}))  # type: ignore[attr-defined]
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous.update(report)
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    Console().print(f"written to {RESULTS}")


def _table(title: str, cases: dict[str, dict[str, object]]) -> None:
    table = Table(title=title)
    table.add_column("case", no_wrap=True)
    for column in ("arrivals", "transitions/s", "p50 step ms", "p99 step ms", "seconds"):
        table.add_column(column, justify="right")
    for name, row in cases.items():
        if not isinstance(row, dict) or "transitions_per_s" not in row:
            continue
        table.add_row(name, str(row.get("arrivals_per_s", "")),
                      str(row["transitions_per_s"]), str(row.get("step_latency_ms_p50", "")),
                      str(row.get("step_latency_ms_p99", "")), str(row["seconds"]))
    Console().print(table)


def _summary(summary: dict[str, object]) -> None:
    if not summary:
        return
    table = Table(title=f"distributed: commandnet (2 workers) vs the reference, "
                        f"{summary['turns']} turns")
    for column in ("figure", "median of turns", "each turn"):
        table.add_column(column, justify="right")
    table.add_row("throughput ratio", str(summary["ratio_to_reference"]),
                  " ".join(map(str, summary["ratio_to_reference_each_turn"])))  # type: ignore[call-overload]
    table.add_row("worker CPU ms/transition", str(summary["worker_cpu_ms_per_transition"]),
                  " ".join(map(str, summary["worker_cpu_ms_per_transition_each_turn"])))  # type: ignore[call-overload]
    table.add_row("statements/transition", str(summary["statements_per_transition"]), "")
    Console().print(table)
    for target, met in summary["targets"].items():  # type: ignore[attr-defined]
        Console().print(f"target {target}: {'met' if met else 'NOT met'}")


def _versus(versus: dict[str, object]) -> None:
    if "error" in versus:
        Console().print(f"vs pydantic-graph: {versus['error']}")
        return
    targets: dict[str, float] = versus.get("targets", {})  # type: ignore[assignment]
    table = Table(title=f"transitions/s relative to {versus.get('baseline')} (same run)")
    for column in ("case", "best vs best", "median of rounds", "each round", "target"):
        table.add_column(column, justify="right")
    for name in ("memory", "sqlite_normal", "sqlite_full"):
        row = versus.get(name)
        if isinstance(row, dict):
            label = name + (" (the default)" if name == "sqlite_normal" else "")
            table.add_row(label, f"{row['best_vs_best']}x", f"{row['median_of_rounds']}x",
                          " ".join(f"{r}x" for r in row["each_round"]),
                          f">= {targets[name]}x" if name in targets else "")
    Console().print(table)


if __name__ == "__main__":
    main()
