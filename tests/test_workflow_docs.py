"""The workflow pages (docs/workflows/) and their runnable examples (examples/workflows/): each
page shows its example file verbatim and what it prints, and each example runs and prints what
its feature promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "workflows"
EXAMPLES = ROOT / "examples" / "workflows"
PAGES = {"payloads": "payloads", "timers": "timers", "signals": "signals",
         "fan-out": "fan_out", "resume": "resume", "cancellation": "cancellation",
         "safe-deploys": "safe_deploys"}

# What each example must print (regular expressions, each matched against one line, in order).
EXPECTED = {
    "payloads": [
        r"checkout: \['2 x tea'\] total=7\.00 payload=None",
        r"cart-1: succeeded at Checkout",
        r"cart-2 refused: payload of node 'Add' does not validate as .*AddItem",
    ],
    "timers": [
        r"parked: node=Remind step=1 due=True steps in flight=0",
        r"reminder-1: succeeded after >=0\.3 s",
        r"log: reminded: stand up",
        r"  step 1: Schedule -> Remind \(step\)",
        r"  step 2: Remind -> None \(step\)",
    ],
    "signals": [
        r"exp-1: signal before the wait -> kept",
        r"exp-1: approved by ana",
        r"exp-2: signal mail-42 from bob -> delivered",
        r"exp-2: signal mail-42 from mallory -> duplicate",
        r"exp-2: approved by bob",
        r"exp-3: succeeded at Expired",
        r"  step 1: Submit -> Approved \(step\)",
        r"  step 2: Approved -> Expired \(timeout\)",
        r"  step 3: Expired -> None \(step\)",
    ],
    "fan_out": [
        r"  crawl-1/1/0: succeeded at Fetch size=1000",
        r"  crawl-1/1/1: succeeded at Fetch size=1100",
        r"  crawl-1/1/2: failed at Fetch size=0 ConnectionError: c\.example/404: not found",
        r"crawl-1 \(collect\): succeeded, total=2100, broken=\['c\.example/404'\]",
        r"branch crawl-1/1/0: parent=crawl-1 status=succeeded",
        r"crawl-2 \(fail_fast\): failed: branch 'crawl-2/1/2' failed: ConnectionError: "
        r"c\.example/404: not found",
    ],
    "resume": [
        r"tx-1: failed at Credit: RuntimeError: closed-account refuses the credit",
        r"refused: patched context of agent 'tx-1' does not validate as Transfer: .*",
        r"resumed: True",
        r"tx-1: succeeded, log=\['debited 50', 'credited 50 to savings'\], note=None",
        r"  step 1: Debit -> Credit \(step\)",
        r"  step 2: Credit -> Credit \(resume\)",
        r"  step 3: Credit -> None \(step\)",
        r"resume a succeeded agent: False",
    ],
    "cancellation": [
        r"timer: parked at Done",
        r"waiter: parked at Done",
        r"parent: parked at Join",
        r"timer: cancelled \(no longer needed\)",
        r"waiter: cancelled \(no longer needed\)",
        r"parent: cancelled \(no longer needed\)",
        r"parent/1/0: cancelled \(cancelled: its parent was cancelled\)",
        r"parent/1/1: cancelled \(cancelled: its parent was cancelled\)",
        r"parent/1/2: cancelled \(cancelled: its parent was cancelled\)",
        r"branch steps still running: 0",
        r"signal refused: signal 'go' refused: agent 'waiter' has ended",
        r"cancel again: False",
    ],
    "safe_deploys": [
        r"graph versions differ: True",
        r"a1: waiting at Hold, graph version <v1>",
        r"a2: waiting at Hold, graph version <v1>",
        r"warning: agent 'a1' is at node 'Hold', which this worker's graphs lack \(graph version "
        r"<v2> here, <v1> there\): handing the step back for a worker that has it",
        r"a1: running at Hold, attempts=0",
        r"a1: succeeded, log=\['start:v1', 'hold:v1', 'done:v1'\]",
        r"a2: failed at Hold, reason NodeRemoved",
        r"  error: node 'Hold' was removed: agent 'a2' reached it under graph version <v1>, and "
        r"in 0\.5s \(node_grace\) no worker with the node took the step; this worker runs "
        r"version <v2>",
        r"  history: \[\('Start', 'Hold'\)\]",
        r"a2: resumed at Done: True",
        r"a2: succeeded, log=\['start:v1', 'done:v2'\]",
        r"a3: succeeded, log=\['start:v2', 'done:v2'\], graph version <v2>",
    ],
}


def blocks(page: str, language: str) -> list[str]:
    text = (DOCS / f"{page}.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def run(example: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / f"{example}.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_each_example_runs_and_prints_what_its_feature_promises(example: str) -> None:
    lines = run(example).splitlines()
    assert len(lines) == len(EXPECTED[example]), lines
    for line, pattern in zip(lines, EXPECTED[example], strict=True):
        assert re.fullmatch(pattern, line), (pattern, line)


@pytest.mark.parametrize(("page", "example"), sorted(PAGES.items()))
def test_each_page_shows_its_example_file_verbatim(page: str, example: str) -> None:
    code = (EXAMPLES / f"{example}.py").read_text()
    shown = blocks(page, "python")
    assert shown, f"docs/workflows/{page}.md has no python block"
    assert shown[-1] == code, (  # the API sketches come first; the example is the last block
        f"docs/workflows/{page}.md does not show examples/workflows/{example}.py as it is")


@pytest.mark.parametrize(("page", "example"), sorted(PAGES.items()))
def test_each_page_shows_what_its_example_prints(page: str, example: str) -> None:
    shown = blocks(page, "text")
    assert shown, f"docs/workflows/{page}.md has no text block with the output"
    assert shown[-1] == run(example)


def test_every_example_has_a_page_and_the_index_and_readme_link_them_all() -> None:
    assert set(PAGES.values()) <= {p.stem for p in EXAMPLES.glob("*.py")}
    index = (DOCS / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert f"({page}.md)" in index, f"docs/workflows/README.md does not link {page}.md"
        assert f"(docs/workflows/{page}.md)" in readme, f"README.md does not link {page}.md"
    for link in re.findall(r"\]\(([\w-]+\.md)\)", "".join(
            (DOCS / f"{page}.md").read_text() for page in PAGES) + index):
        assert (DOCS / link).exists(), f"a page links {link}, which does not exist"


def test_the_pages_name_the_api_they_document() -> None:
    """Each page names its directive or call, and the names exist in the package."""
    import commandnet
    from commandnet.engine import Engine

    names = {"timers": ["Sleep"], "signals": ["WaitSignal", "SignalOutcome"],
             "fan-out": ["FanOut", "BranchResult"], "payloads": ["Node"]}
    for page, exported in names.items():
        text = (DOCS / f"{page}.md").read_text()
        for name in exported:
            assert f"`{name}" in text and hasattr(commandnet, name), (page, name)
    for page, method in {"signals": "signal", "resume": "resume",
                         "cancellation": "cancel_agent", "safe-deploys": "resume"}.items():
        assert f"engine.{method}(" in (DOCS / f"{page}.md").read_text()
        assert callable(getattr(Engine, method))
    for page, command in {"signals": "commandnet signal", "resume": "commandnet resume",
                          "cancellation": "commandnet cancel",
                          "payloads": "commandnet trigger",
                          "safe-deploys": "commandnet worker"}.items():
        assert command in (DOCS / f"{page}.md").read_text(), (page, command)


def test_the_safe_deploys_page_names_what_exists() -> None:
    """The grace setting, the error, the version function and the status reason it documents."""
    import dataclasses
    import inspect

    from commandnet.adapters.nats_status import failure_reason
    from commandnet.engine import Engine
    from commandnet.records import AgentRecord
    from commandnet.worker.settings import WorkerSettings
    from commandnet.workflow import deploys

    text = (DOCS / "safe-deploys.md").read_text()
    for name in ("NodeRemovedError", "version_of"):
        assert f"`commandnet.workflow.deploys.{name}" in text and hasattr(deploys, name), name
    assert inspect.signature(Engine).parameters["node_grace"].default == 600.0
    assert "node_grace=600.0" in text and "`COMMANDNET_NODE_GRACE`" in text
    assert WorkerSettings.model_fields["node_grace"].default == 600.0
    assert "graph_version" in {f.name for f in dataclasses.fields(AgentRecord)}
    assert "`AgentRecord.graph_version`" in text
    assert failure_reason("failed", "node 'X' was removed: agent 'a' reached it") == "NodeRemoved"
    assert "`NodeRemoved`" in text


def test_the_documented_command_line_flags_exist() -> None:
    from click.testing import CliRunner

    from commandnet.cli.main import cli

    for command, flags in {"signal": ["--payload", "--id"],
                           "resume": ["--from", "--context-patch"],
                           "trigger": ["--payload"], "cancel": ["--reason"],
                           "worker": ["--node-grace"]}.items():
        result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for flag in flags:
            assert flag in result.output, (command, flag)
