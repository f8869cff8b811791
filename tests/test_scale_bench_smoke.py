"""A tiny run of the scale benchmark's code path, so that ``make bench-scale`` cannot rot.

Real durable PostgreSQL and NATS (started by the bench itself), 2 real worker processes; 200
agents instead of 100,000. No figure is asserted beyond what must hold at any size: every agent
finished with an exact history, no message was stored twice, and each part of the report is
there.
"""

from __future__ import annotations

import pytest

from bench.scale import STEPS, TABLES, print_report, run_scale

pytestmark = pytest.mark.slow

AGENTS = 200


def test_the_scale_bench_runs_every_agent_to_the_end_and_reports_it() -> None:
    r = run_scale(AGENTS, sample_every=0.5, idle_after=1.0)

    assert r["agents"] == AGENTS and r["steps"] == STEPS and r["workers"] == 2
    check = r["agents_check"]
    assert check["by_status"] == {"succeeded": AGENTS}
    assert check["all_finished_exactly"] is True
    assert check["transitions"] == AGENTS * STEPS
    assert check["outbox_rows_left"] == 0
    # Backlog arrival: every agent was triggered before a worker ran one.
    assert r["in_flight"]["running_when_triggered"] == AGENTS
    assert r["in_flight"]["stream_messages_when_triggered"] == AGENTS
    assert r["trigger"]["agents_per_s"] > 0 and r["transitions_per_s"] > 0

    assert set(r["rss"]) == {"worker0", "worker1"}
    for summary in r["rss"].values():
        assert summary["samples"] >= 1 and 0 < summary["first_mb"] <= summary["peak_mb"]
    assert r["series"] and all("workers_rss_mb" in s for s in r["series"])

    assert set(r["tables"]) == {"empty", "triggered", "finished"}
    for stage in r["tables"].values():
        assert set(stage) == set(TABLES)
    end = r["tables"]["finished"]
    assert end["history"]["total_mb"] > 0 and end["agents"]["index_mb"]

    repair = r["repair"]
    assert repair["transitions"] == AGENTS * STEPS
    # Nothing stalls in a run this short: each trigger stores its first step's event, and no
    # step is stored twice (later steps may be handed over in the worker, never stored).
    assert AGENTS <= repair["stream_messages_stored"] <= AGENTS * STEPS
    assert repair["extra_stream_messages"] <= 0
    assert repair["stalled_republish"]["rows"] == 0
    assert repair["agents_republished_by_reconciler"] == 0
    assert repair["worker_metrics"]["transitions"] == AGENTS * STEPS
    assert repair["worker_metrics"]["dead_letters"] == 0
    assert r["statements_by_total_time"]

    print_report(r)  # the rich tables render from the same dict
