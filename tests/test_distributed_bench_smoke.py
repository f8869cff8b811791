"""A tiny run of the distributed benchmark's code path, so that ``make bench`` cannot rot.

Real durable PostgreSQL and NATS (started by the bench itself), the reference loop, real worker
processes; 20 agents instead of 1,000, and 1 and 2 workers only. No figure is asserted (timings
on a shared machine prove nothing), only that every case ran completely and was counted.
"""

from __future__ import annotations

import pytest

from bench.distributed import STEPS, TURNS, run_distributed

pytestmark = pytest.mark.slow

AGENTS = 20


def test_the_distributed_bench_runs_every_case_end_to_end() -> None:
    results = run_distributed(AGENTS, scaling=(1, 2), paced_agents=10)

    assert results["reference (bare asyncpg)"]["transitions"] == AGENTS * STEPS
    cases = {k: v for k, v in results.items() if k.startswith("commandnet")}
    assert set(cases) == {"commandnet workers=2 saturated", "commandnet workers=2 paced",
                          "commandnet workers=1 saturated"}
    for name, case in cases.items():
        agents = 10 if "paced" in name else AGENTS
        assert case["transitions"] == agents * STEPS, name
        assert case["transitions_per_s"] > 0, name
        assert 0 < case["step_latency_ms_p50"] <= case["step_latency_ms_p99"], name
        kinds = case["sql_calls_per_transition_by_kind"]
        # Without faults, at most one commit statement per transition (moves that arrive
        # together share one), one at least for each agent's last step (it ends the agent),
        # and a lease for each agent's first step at least (later ones run on the lease their
        # commit kept).
        assert 1.0 / STEPS <= kinds["commit"]["per_transition"] <= 1.0, (name, kinds)
        assert kinds["lease"]["per_transition"] >= 1.0 / STEPS, (name, kinds)
        assert case["transactions_per_transition"] > 0, (name, case)
        assert case["cpu_seconds"]["workers"] > 0, (name, case["cpu_seconds"])
    assert results["commandnet workers=2 paced"]["arrivals_per_s"] > 0
    summary = results["summary"]
    assert isinstance(summary["ratio_to_reference"], float)
    assert summary["turns"] == TURNS == len(summary["ratio_to_reference_each_turn"])
