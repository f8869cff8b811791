"""The operator's rules without a cluster: status merging, admission, the status board and
the settings. (On a real API server: e2e/test_operator.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from commandnet import GraphAnalyzer
from commandnet.loading import describe_pool
from commandnet_operator.admission import Refused, check_agent
from commandnet_operator.link import StatusBoard, is_agent_made
from commandnet_operator.resource import HISTORY_LIMIT, MAX_CONTEXT_BYTES, agent_id
from commandnet_operator.settings import OperatorSettings
from commandnet_operator.status import bus_shown_down, changed, merge, with_bus
from e2e.graphs import Hello, Six1

GRAPH = describe_pool("e2e", [GraphAnalyzer.validate(Hello), GraphAnalyzer.validate(Six1)])


def value(status: str, node: str, step: int, **extra: object) -> dict[str, object]:
    return {"status": status, "node": node, "step": step,
            "updated_at": "2026-12-02T10:00:00+00:00", **extra}


PENDING = {"phase": "Pending", "agentId": "ns/a/u", "conditions": []}


def test_a_running_value_moves_a_pending_agent_to_running_with_history() -> None:
    new = merge(PENDING, value("running", "Work", 1), generation=1)
    assert (new["phase"], new["currentNode"], new["step"]) == ("Running", "Work", 1)
    assert new["history"] == [{"step": 1, "node": "Work", "phase": "Running",
                               "time": "2026-12-02T10:00:00Z"}]
    running = next(c for c in new["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("True", "NodeRunning")
    assert changed(PENDING, new).keys() == {"phase", "currentNode", "step", "history",
                                            "conditions", "observedGeneration"}


def test_an_older_value_never_moves_the_status_back() -> None:
    at_two = merge(PENDING, value("running", "Done", 2), 1)
    assert merge(at_two, value("running", "Work", 1), 1) is at_two
    done = merge(at_two, value("succeeded", "Done", 3), 1)
    assert merge(done, value("running", "Done", 3), 1) is done  # finished stays finished
    assert merge(done, value("failed", "Done", 3, error="x"), 1) is done
    assert merge(done, value("running", "Done", 2), 1) is done


def test_a_failure_carries_its_reason_and_error_into_conditions() -> None:
    failed = merge(PENDING, value("failed", "Nope", 0, reason="UnknownNode",
                                  error="unknown node 'Nope'"), 1)
    assert failed["phase"] == "Failed" and failed["error"] == "unknown node 'Nope'"
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert (cond["status"], cond["reason"]) == ("True", "UnknownNode")
    assert failed["completionTime"] == "2026-12-02T10:00:00Z"
    long = merge(PENDING, value("failed", "A", 1, error="e" * 10_000), 1)
    assert len(long["error"]) <= 2048


def test_history_is_bounded() -> None:
    status: dict[str, object] = dict(PENDING)
    for step in range(1, 40):
        status = merge(status, value("running", f"N{step}", step), 1)
    history = status["history"]
    assert isinstance(history, list) and len(history) == HISTORY_LIMIT
    assert history[-1]["step"] == 39


def test_bus_condition_is_set_when_down_and_cleared_when_back() -> None:
    running = merge(PENDING, value("running", "Work", 1), 1)
    assert with_bus(running, True) is running  # never reported down: nothing to say
    down = with_bus(running, False)
    cond = next(c for c in down["conditions"] if c["type"] == "BusAvailable")
    assert (cond["status"], cond["reason"]) == ("False", "BusUnavailable")
    back = with_bus(down, True)
    cond = next(c for c in back["conditions"] if c["type"] == "BusAvailable")
    assert (cond["status"], cond["reason"]) == ("True", "BusReconnected")
    done = merge(running, value("succeeded", "Done", 3), 1)
    assert with_bus(done, False) is done  # a finished Agent does not care
    finished_in_outage = merge(down, value("succeeded", "Done", 3), 1)
    cleared = with_bus(finished_in_outage, True)  # it finished while the link was down
    cond = next(c for c in cleared["conditions"] if c["type"] == "BusAvailable")
    assert (cond["status"], cond["reason"]) == ("True", "BusReconnected")
    # Its follower stays until the condition is cleared; then it may return.
    assert bus_shown_down(finished_in_outage) and bus_shown_down(down)
    assert not bus_shown_down(cleared) and not bus_shown_down(done)


def test_admission_refuses_an_unknown_node_listing_the_nodes() -> None:
    with pytest.raises(Refused) as caught:
        check_agent({"startNode": "Nope", "pool": "e2e", "context": {"name": "x"}}, GRAPH)
    assert caught.value.reason == "UnknownNode"
    assert "spec.startNode" in str(caught.value) and "Hello, Six1" in str(caught.value)


def test_admission_names_the_context_field_at_fault() -> None:
    with pytest.raises(Refused) as caught:
        check_agent({"startNode": "Six3", "context": {"name": "x", "delay": "soon"}}, GRAPH)
    assert caught.value.reason == "InvalidContext"
    assert str(caught.value).startswith("spec.context.delay:"), caught.value
    with pytest.raises(Refused, match="'name' is a required property"):
        check_agent({"startNode": "Hello", "context": {}}, GRAPH)
    check_agent({"startNode": "Work", "context": {"name": "x", "delay": 0.5}}, GRAPH)


def test_admission_admits_a_pool_without_a_graph_but_not_an_oversized_context() -> None:
    check_agent({"startNode": "Anything", "context": {"free": "form"}}, None)
    with pytest.raises(Refused) as caught:
        check_agent({"startNode": "Hello", "context": {"blob": "x" * MAX_CONTEXT_BYTES}}, None)
    assert caught.value.reason == "ContextTooLarge"


async def test_status_board_keeps_early_values_and_bounds_unclaimed_ones() -> None:
    board = StatusBoard(unclaimed_limit=2)
    board.put("ns/a/1", {"step": 1})  # before its daemon watches
    board.put("ns/b/2", {"step": 1})
    board.put("ns/c/3", {"step": 1})  # evicts ns/a/1
    event = board.watch("ns/c/3")
    assert board.values["ns/c/3"] == {"step": 1}
    assert "ns/a/1" not in board.values and board.watch("ns/a/1") is not None
    assert "ns/a/1" not in board.values
    board.put("ns/c/3", {"step": 2})
    await asyncio.wait_for(event.wait(), 1)
    assert board.values["ns/c/3"] == {"step": 2}
    board.unwatch("ns/c/3")
    assert "ns/c/3" not in board.values


def test_agent_ids_are_unique_per_uid_and_recognised() -> None:
    made = agent_id("team", "order-1", "5b0c")
    assert made == "team/order-1/5b0c" and is_agent_made(made)
    assert not is_agent_made("order-1")


def test_settings_share_the_workers_bus_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDNET_BUS_URL", "nats://app@nats.example:4222")
    monkeypatch.setenv("COMMANDNET_BUS_PASSWORD", "s3cret")
    monkeypatch.setenv("COMMANDNET_NAMESPACES", '["a", "b"]')
    settings = OperatorSettings()
    url, connection = settings.bus_connection()
    assert url == "nats://nats.example:4222" and connection["auth"].password == "s3cret"
    assert settings.namespaces == ["a", "b"] and "s3cret" in settings.secrets()


def test_operator_help_lists_its_settings_and_bad_settings_are_named() -> None:
    cmd = [sys.executable, "-m", "commandnet_operator"]
    shown = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    for name in ("COMMANDNET_BUS_URL", "COMMANDNET_BUS_PASSWORD", "COMMANDNET_CANCEL_TIMEOUT",
                 "COMMANDNET_STATUS_WINDOW", "COMMANDNET_WEBHOOK_SERVICE"):
        assert name in shown.stdout, shown.stdout
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "COMMANDNET_STATUS_WINDOW": "soon"})
    assert bad.returncode != 0 and "status_window" in bad.stderr, bad.stderr


def test_the_operator_imports_no_store_driver_and_no_worker_process() -> None:
    probe = ("import sys, commandnet_operator.main, commandnet_operator.handlers; "
             "print(sorted(m for m in sys.modules if m.startswith(("
             "'asyncpg', 'sqlite3', 'commandnet.adapters.postgres', "
             "'commandnet.adapters.sqlite', 'commandnet.worker.process'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]", out


def test_a_webhook_certificate_is_given_whole_or_not_at_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMANDNET_WEBHOOK_CERT_FILE", "/certs/tls.crt")
    with pytest.raises(ValueError, match="together, or none of them"):
        OperatorSettings()


@pytest.mark.parametrize(("configuration", "managed"), [
    ("commandnet.io", "commandnet.io"),  # the default: kopf creates and keeps them current
    ("", None),  # the Helm chart owns them: kopf serves the webhook only
])
async def test_an_empty_webhook_configuration_leaves_the_configurations_unmanaged(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, configuration: str,
        managed: str | None) -> None:
    import kopf

    from commandnet_operator.handlers import configure

    monkeypatch.setenv("COMMANDNET_WEBHOOK_CONFIGURATION", configuration)
    monkeypatch.setenv("COMMANDNET_WEBHOOK_CERT_DIR", str(tmp_path))
    ours = OperatorSettings()
    started: list[bool] = []
    memo = SimpleNamespace(settings=ours, link=SimpleNamespace(start=lambda: started.append(True)))
    settings = kopf.OperatorSettings()
    await configure(settings=settings, memo=memo)
    assert settings.admission.managed == managed
    assert settings.admission.server is not None  # served either way
    assert started == [True]
