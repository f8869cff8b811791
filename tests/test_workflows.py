"""The GitHub Actions workflows (.github/workflows/) pass actionlint (built by `make tools`).
They cannot run here; the linter is what checks them on every run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ACTIONLINT = REPO / ".tools" / "bin" / "actionlint"
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    if not ACTIONLINT.exists():
        pytest.fail(f"{ACTIONLINT} is missing: run `make tools`", pytrace=False)
    return subprocess.run([str(ACTIONLINT), "-no-color", *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_there_is_an_e2e_kind_workflow_and_it_runs_the_make_target() -> None:
    names = [w.name for w in WORKFLOWS]
    assert "e2e-kind.yml" in names, names
    assert "make e2e-kind" in (REPO / ".github/workflows/e2e-kind.yml").read_text()


def test_the_workflows_pass_actionlint() -> None:
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_refuses_a_broken_workflow(tmp_path: Path) -> None:
    """The control: the linter does read and judge what it is given."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    text = (REPO / ".github/workflows/e2e-kind.yml").read_text()
    broken.write_text(text.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.04\n"
                                   "    timeout-minutes: soon"))
    result = actionlint(broken)
    assert result.returncode != 0 and "timeout-minutes" in result.stdout, result.stdout
