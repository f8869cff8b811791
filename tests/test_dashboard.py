"""The Grafana dashboard (charts/commandnet/dashboards/commandnet.json) and the metrics behind it.

Every PromQL expression of the dashboard (panel queries and variable queries) is parsed by a real
PromQL parser, and every metric it names must be one the code exports: the sample names of the
worker's and the operator's prometheus-client registries, derived from each metric family's type
(a counter ``x`` is scraped as ``x_total``, a histogram as ``x_bucket``/``x_sum``/``x_count``), so
renaming a metric, or changing its type, fails here. Counters and histogram parts must be read
through a range function (``rate``); gauges must not be. The chart must ship this very file.

The metrics the dashboard added (``commandnet_worker_info``, ``commandnet_pool_backlog_messages``)
are tested on the real NATS server the fixtures start, the backlog through a worker in-process.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import promql_parser as promql
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

import commandnet
from commandnet import AgentStatus
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.messages import StepEvent
from commandnet.worker import PrometheusObserver, Worker, WorkerSettings
from commandnet_operator.metrics import REGISTRY as OPERATOR_REGISTRY
from e2e.testbed import run_tool, tool_env
from tests.graphs import gate
from tests.graphs.procs import http_get

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "commandnet"
DASHBOARD = CHART / "dashboards" / "commandnet.json"

# Functions that take a range vector of a counter (or of a histogram's parts).
COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}
# What the issue asks the dashboard to show, as the metrics that carry it.
REQUIRED = {
    "transitions/s": "commandnet_transitions_total",
    "step latency": "commandnet_step_duration_seconds_bucket",
    "failures": "commandnet_step_failures_total",
    "retries": "commandnet_step_retries_total",
    "backlog": "commandnet_pool_backlog_messages",
    "in-flight": "commandnet_steps_in_flight",
    "lease conflicts": "commandnet_lease_conflicts_total",
}


# ------------------------------------------------------------------ what the code exports


def exported(registry: CollectorRegistry) -> dict[str, str]:
    """Sample name → kind ("counter", "gauge", "histogram part"...) of every metric in
    ``registry``, from the families' types (a labelled metric with no child yet has no sample,
    but its family still names it)."""
    names: dict[str, str] = {}
    for family in registry.collect():
        kind = family.type
        if kind == "counter":
            names[f"{family.name}_total"] = "counter"
        elif kind in ("histogram", "gaugehistogram"):
            for suffix in ("_bucket", "_count", "_sum"):
                names[family.name + suffix] = "counter" if kind == "histogram" else "gauge"
        elif kind == "summary":
            names[f"{family.name}_count"] = names[f"{family.name}_sum"] = "counter"
            names[family.name] = "gauge"  # its quantile samples
        elif kind == "info":
            names[f"{family.name}_info"] = "gauge"
        else:  # gauge, stateset, unknown
            names[family.name] = "gauge"
    return names


@pytest.fixture(scope="module")
def metrics() -> dict[str, str]:
    worker = exported(PrometheusObserver().registry)
    operator = exported(OPERATOR_REGISTRY)
    assert worker and operator and not set(worker) & set(operator)
    return {**worker, **operator}


# ---------------------------------------------------------------- the dashboard's queries


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable (the selector inside
    ``label_values(selector, label)``)."""
    found = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
             for p in panels(doc) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {q!r}"
        found.append((f"variable {var['name']!r}", m[1]))
    return found


def substitute(expr: str) -> str:
    """Grafana's variables as a Prometheus server would receive them: intervals as durations,
    the others (used in label matchers) as the "All" regex."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}",
                  "5m", expr)
    return re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", ".*", expr)


def selectors(node: Any, in_range_function: str | None = None
              ) -> Iterator[tuple[str, str | None]]:
    """(metric name, the range function reading it, if any) of every selector under ``node``."""
    if isinstance(node, promql.VectorSelector):
        name = node.name or next((m.value for m in node.matchers.matchers
                                  if m.name == "__name__"), None)
        assert name, f"a selector without a metric name: {node}"
        yield name, in_range_function
    elif isinstance(node, promql.MatrixSelector):
        yield from selectors(node.vector_selector, in_range_function)
    elif isinstance(node, promql.Call):
        fn = node.func.name
        for arg in node.args:
            yield from selectors(arg, fn if fn.endswith("_over_time") or fn in COUNTER_FUNCTIONS
                                 else in_range_function)
    elif isinstance(node, promql.AggregateExpr):
        if node.param is not None:
            yield from selectors(node.param)
        yield from selectors(node.expr, in_range_function)
    elif isinstance(node, promql.BinaryExpr):
        yield from selectors(node.lhs, in_range_function)
        yield from selectors(node.rhs, in_range_function)
    elif isinstance(node, (promql.ParenExpr, promql.UnaryExpr, promql.SubqueryExpr)):
        yield from selectors(node.expr, in_range_function)
    else:
        assert isinstance(node, (promql.NumberLiteral, promql.StringLiteral)), (
            f"unexpected PromQL node {type(node).__name__}: {node}")


def problems(exprs: list[tuple[str, str]], known: dict[str, str]) -> list[str]:
    """What is wrong with ``exprs`` against the exported ``known`` metrics."""
    found = []
    for where, expr in exprs:
        try:
            tree = promql.parse(substitute(expr))
        except ValueError as exc:
            found.append(f"{where}: does not parse ({exc}): {expr}")
            continue
        for name, fn in selectors(tree):
            kind = known.get(name)
            if kind is None:
                found.append(f"{where}: {name} is not a metric the worker or operator exports")
            elif kind == "counter" and fn not in COUNTER_FUNCTIONS:
                found.append(f"{where}: counter {name} read without rate()/increase()")
            elif kind == "gauge" and fn in COUNTER_FUNCTIONS:
                found.append(f"{where}: gauge {name} read with {fn}()")
    return found


def test_every_query_names_a_metric_the_code_exports(metrics: dict[str, str]) -> None:
    exprs = queries(load())
    assert len(exprs) > 20
    assert problems(exprs, metrics) == []


def test_the_check_catches_a_renamed_or_retyped_metric(metrics: dict[str, str]) -> None:
    """The check above is not vacuous: a rename, a type change and a typo are all caught."""
    renamed = {k: v for k, v in metrics.items() if k != "commandnet_lease_conflicts_total"}
    exprs = queries(load())
    assert any("commandnet_lease_conflicts_total is not a metric" in p
               for p in problems(exprs, renamed))
    retyped = {**metrics, "commandnet_transitions_total": "gauge"}
    assert any("gauge commandnet_transitions_total read with rate()" in p
               for p in problems(exprs, retyped))
    assert problems([("x", "sum(commandnet_steps_in_flight"), ("y", "commandnet_step_in_flight")],
                    metrics) == [
        "x: does not parse (unclosed left parenthesis): sum(commandnet_steps_in_flight",
        "y: commandnet_step_in_flight is not a metric the worker or operator exports"]


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(expr for _, expr in queries(load()))
    missing = {what: name for what, name in REQUIRED.items() if name not in exprs}
    assert not missing


def test_every_panel_reads_the_chosen_data_source_pools_and_namespaces() -> None:
    doc = load()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pool"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert "commandnet_worker_info" in variables[name]["definition"]
    source = {"type": "prometheus", "uid": "${datasource}"}
    titles = set()
    for panel in panels(doc):
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == source, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            expr = target["expr"]
            assert 'namespace=~"$namespace"' in expr, f"{panel['title']}: {expr}"
            if "commandnet_operator_" not in expr:  # worker metrics: per pool
                assert 'pool=~"$pool"' in expr, f"{panel['title']}: {expr}"
    assert len(titles) == len([p for p in panels(doc) if p["type"] != "row"]), "titles repeat"
    # Panels do not overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels(doc):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine


def test_docs_describe_every_panel() -> None:
    page = (ROOT / "docs" / "dashboards.md").read_text()
    for panel in panels(load()):
        if panel["type"] != "row":
            assert f"**{panel['title']}**" in page, f"docs/dashboards.md: {panel['title']!r}"


def test_the_chart_ships_this_file(tmp_path: Path) -> None:
    out = run_tool("helm", "template", "rel", str(CHART), "--namespace", "apps",
                   "--set", "connection.existingSecret=c",
                   "--set", "grafana.dashboards.enabled=true",
                   "--show-only", "templates/grafana-dashboard.yaml",
                   env=tool_env(tmp_path), cwd=ROOT).stdout
    config_map = yaml.safe_load(out)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["commandnet.json"]) == load()


# ---------------------------------------------------------------- the metrics behind it


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str,
                     limit: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_the_backlog_gauge_reads_the_pools_jetstream_consumer(
        make_bus: Callable[..., Any]) -> None:
    bus = make_bus(pool="backlog")
    await bus.connect()
    await bus.ensure_consumer()
    for i in range(5):
        await bus.publish(StepEvent(agent_id=f"a{i}", step=0))
    metrics = PrometheusObserver(backlog_interval=0.05)
    reg = metrics.registry
    assert metrics.watch_backlog(bus)

    def backlog(pending: int, ack_pending: int) -> Callable[[], bool]:
        return lambda: (
            sample(reg, "commandnet_pool_backlog_messages", pool="backlog", state="pending"),
            sample(reg, "commandnet_pool_backlog_messages", pool="backlog",
                   state="ack_pending")) == (pending, ack_pending)

    await eventually(backlog(5, 0), "5 pending messages")
    # Two delivered and not acknowledged yet: they move to ack-pending, as KEDA counts them.
    psub = await bus.jetstream().pull_subscribe_bind(bus.consumer, stream=bus.stream)
    taken = await psub.fetch(2, timeout=10)
    await eventually(backlog(3, 2), "3 pending and 2 ack-pending")
    for msg in taken:
        await msg.ack()
    await eventually(backlog(3, 0), "the acknowledged ones gone")
    await psub.unsubscribe()
    await metrics.close()  # Engine.stop calls it: no stale number after the worker stops
    assert sample(reg, "commandnet_pool_backlog_messages", pool="backlog", state="pending") is None


async def test_the_backlog_series_goes_while_the_consumer_cannot_be_read(
        make_bus: Callable[..., Any]) -> None:
    bus = make_bus(pool="gone")
    await bus.connect()
    await bus.ensure_consumer()
    metrics = PrometheusObserver(backlog_interval=0.05)
    reg = metrics.registry
    assert metrics.watch_backlog(bus)
    await eventually(lambda: sample(reg, "commandnet_pool_backlog_messages", pool="gone",
                                    state="pending") == 0, "the backlog read")
    await bus.jetstream().delete_consumer(bus.stream, bus.consumer)
    await eventually(lambda: sample(reg, "commandnet_pool_backlog_messages", pool="gone",
                                    state="pending") is None, "the series to be dropped")
    await bus.ensure_consumer()
    await eventually(lambda: sample(reg, "commandnet_pool_backlog_messages", pool="gone",
                                    state="pending") == 0, "the series back")
    await metrics.close()


async def test_an_in_memory_bus_reports_no_backlog() -> None:
    metrics = PrometheusObserver()
    assert metrics.watch_backlog(InMemoryEventBus()) is False
    assert "commandnet_pool_backlog_messages{" not in metrics_text(metrics.registry)


def metrics_text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


async def test_a_worker_names_its_pool_and_reports_its_backlog(
        tmp_path: Path, make_bus: Callable[..., Any]) -> None:
    """A worker on JetStream, in-process: /metrics carries commandnet_worker_info{pool} and
    the pool's backlog while steps wait (one slot, three agents held at a gate), then 0."""
    pool = "dash"
    settings = WorkerSettings(graph=["tests.graphs.gate:Hold"], store_url="memory://",
                              bus_url="memory://", http_host="127.0.0.1", http_port=0,
                              max_in_flight=1, pool=pool)
    metrics = PrometheusObserver(backlog_interval=0.1)
    w = Worker(settings, metrics=metrics, store=InMemoryPersistence(), bus=make_bus(pool=pool))
    running = asyncio.create_task(w.run())
    release = tmp_path / "release"

    async def scrape() -> str:
        status, body = await asyncio.to_thread(http_get, w.http.port, "/metrics")
        assert status == 200
        return body

    def value(body: str, state: str) -> float | None:
        m = re.search(rf'^commandnet_pool_backlog_messages\{{pool="{pool}",state="{state}"\}} '
                      r"(\S+)$", body, re.M)
        return float(m[1]) if m else None

    async def backlog_is(total: int) -> bool:
        body = await scrape()
        pending, ack_pending = value(body, "pending"), value(body, "ack_pending")
        return pending is not None and ack_pending is not None and pending + ack_pending == total

    try:
        async def ready() -> bool:
            return (await w.ready())[0]

        await eventually(ready, "worker ready", 60)
        version = commandnet.__version__
        assert (f'commandnet_worker_info{{pool="{pool}",version="{version}"}} 1.0'
                in await scrape())
        for i in range(3):
            ctx = gate.Gate(started_file=str(tmp_path / f"s{i}"), release_file=str(release))
            await w.engine.trigger_agent(f"g{i}", gate.Hold, ctx)
        await eventually(lambda: backlog_is(3), "a backlog of 3 (1 running, 2 waiting)")
        assert w.engine.in_flight == 1
        release.touch()
        for i in range(3):
            rec = await w.engine.wait_for(f"g{i}", timeout=60)
            assert rec.status is AgentStatus.SUCCEEDED
        await eventually(lambda: backlog_is(0), "the backlog drained")
        w.request_stop("test")
        assert await asyncio.wait_for(running, 60) == 0
    finally:
        running.cancel()
    assert sample(metrics.registry, "commandnet_pool_backlog_messages", pool=pool,
                  state="pending") is None, "the backlog must stop with the worker"
