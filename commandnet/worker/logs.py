"""Structured logging for the worker: one JSON object a line (or plain text), secrets redacted.

Log collectors (Loki, Cloud Logging, Elasticsearch) parse one JSON object per line; fields given
with ``extra={...}`` become top-level keys. Every record passes a filter that replaces known
secret values (passwords from the environment or from URLs) with ``***``, so a driver error that
quotes a DSN cannot leak one: raw, and in the encodings a message may carry them in
(percent-encoded, JSON or repr escaped, base64; :func:`secret_forms`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
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
        self.secrets = _all_forms(secrets)

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
        return _replace(text, self.secrets)


def _percent_pattern(secret: str) -> str:
    """A regex matching ``secret`` with any of its characters percent-encoded or not (either
    hex case; ``+`` for a space), which covers every URL-quoting variant at once."""
    parts = []
    for char in secret:
        if char.isascii() and char.isalnum():
            parts.append(re.escape(char))
            continue
        encoded = "".join(f"%{b:02X}" for b in char.encode())
        options = [re.escape(char), re.escape(encoded), re.escape(encoded.lower())]
        if char == " ":
            options.append(r"\+")
        parts.append("(?:" + "|".join(options) + ")")
    return "".join(parts)


def secret_forms(secret: str) -> set[str]:
    """``secret`` as a message might carry it, besides raw and percent-encoded (which
    :func:`redact` matches with a pattern): escaped as in JSON or a Python repr; base64 and
    URL-safe base64 at each of the three byte alignments (so it is found inside a longer
    encoded blob, such as ``user:secret`` in a Basic auth header)."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1],
             json.dumps(secret, ensure_ascii=False)[1:-1]}
    raw = secret.encode()
    for offset in range(3):
        total = (offset + len(raw)) * 8
        first, last = -(-offset * 8 // 6), total // 6  # characters made of secret bits only
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * offset + raw).decode()
            if offset == 0:
                forms.add(text)  # the whole secret encoded alone, padding included
            middle = text[first:last]
            if len(middle) >= 6:
                forms.add(middle)
    return {f for f in forms if f}


def _all_forms(secrets: Iterable[str]) -> re.Pattern[str] | None:
    """One pattern for every form of every secret (longest alternatives first)."""
    literals: set[str] = set()
    patterns: set[str] = set()
    for secret in secrets:
        if secret:
            literals |= secret_forms(secret)
            patterns.add(_percent_pattern(secret))
    if not literals:
        return None
    alternatives = sorted(patterns, key=len, reverse=True) + [
        re.escape(f) for f in sorted(literals, key=len, reverse=True)]
    return re.compile("|".join(alternatives))


def _replace(text: str, forms: re.Pattern[str] | None) -> str:
    return text if forms is None else forms.sub("***", text)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in ``secrets``, in any of its :func:`secret_forms`, replaced
    by ``***`` (longest first)."""
    return _replace(text, _all_forms(secrets))


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

    async def on_step(self, info: TransitionInfo) -> None:
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
