"""Fixture plugins shared by tests/ and e2e/ (each plugin module owns one kind of server)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.fixtures.env", "tests.fixtures.postgres", "tests.fixtures.nats",
                  "tests.fixtures.secure", "e2e.fixtures"]


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """Commands run in-process (click's CliRunner) tune logger levels; keep that per test."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in
                                      list(logging.root.manager.loggerDict))]
    levels = {logger: logger.level for logger in loggers}
    yield
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger not in levels:
            logger.setLevel(logging.NOTSET)  # created during the test
    for logger, level in levels.items():
        logger.setLevel(level)
