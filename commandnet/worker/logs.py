"""Structured logging for the worker: one JSON object a line (or plain text), secrets redacted.

Log collectors (Loki, Cloud Logging, Elasticsearch) parse one JSON object per line; fields given
with ``extra={...}`` become top-level keys. Every record passes a filter that replaces known
secret values (passwords from the environment or from URLs) with ``***``, so a driver error that
quotes a DSN cannot leak one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from ..observer import Observer, StatusInfo, TransitionInfo

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RedactingFilter(logging.Filter):
    """Replaces each secret in a record's message (and arguments) with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        return True

    def _scrub(self, text: str) -> str:
        return redact(text, self.secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in ``secrets`` replaced by ``***`` (longest first)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def setup_logging(
    level: str = "INFO",
    fmt: str = "json",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every logger to one handler on ``stream`` (stderr) in ``fmt``; returns the handler.

    Replaces handlers configured earlier (the CLI group's ``basicConfig``).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Drivers are chatty at INFO/DEBUG; keep them at WARNING unless DEBUG was asked for.
    for noisy in ("asyncio", "nats", "asyncpg"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level.upper() == "DEBUG"
                                          else logging.WARNING)
    return handler


class LogObserver(Observer):
    """Logs each committed transition (DEBUG) and each final status (INFO) with structured
    fields: ``agent_id``, ``step``, ``node``, ``to_node``, ``status``, ``duration``."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("commandnet.agents")

    async def on_transition(self, info: TransitionInfo) -> None:
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("agent %s step %d: %s -> %s", info.agent_id, info.step,
                           info.from_node, info.to_node or "end", extra={
                               "agent_id": info.agent_id, "step": info.step,
                               "node": info.from_node, "to_node": info.to_node,
                               "duration": round(info.duration, 6), "attempts": info.attempts})

    async def on_status(self, info: StatusInfo) -> None:
        if info.status.is_final:
            self.log.info("agent %s %s at node %s, step %d", info.agent_id, info.status.value,
                          info.node, info.step, extra={
                              "agent_id": info.agent_id, "status": info.status.value,
                              "node": info.node, "step": info.step, "error": info.error})
