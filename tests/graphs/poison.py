"""A graph with a poison step: ``Begin -> Danger | Fine``; ``Danger`` kills or breaks its worker.

``Job.mode`` picks what ``Danger`` does on every attempt: ``exit`` calls ``os._exit(137)`` (as an
OOM kill or a segfault would end the process: no cleanup, no exception), ``system_exit`` raises
``SystemExit(3)``, ``interrupt`` raises ``KeyboardInterrupt``, ``base`` raises :class:`Poison`,
a ``BaseException`` that is neither. Each attempt first appends ``<pid>`` to ``runs_file``, so a
test sees how often and where it ran. ``mode="ok"`` agents take ``Fine`` and succeed.
``Danger`` has 2 attempts.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel

from commandnet import Node, RetryPolicy

MAX_ATTEMPTS = 2


class Job(BaseModel):
    mode: Literal["ok", "exit", "system_exit", "interrupt", "base"] = "ok"
    runs_file: str = ""


class Poison(BaseException):
    """Neither an Exception nor SystemExit/KeyboardInterrupt: escapes ``except Exception``."""


class Begin(Node[Job]):
    async def run(self, ctx: Job) -> type[Danger] | type[Fine]:
        return Fine if ctx.mode == "ok" else Danger


class Danger(Node[Job], retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, initial_interval=0.05,
                                          jitter=0)):
    async def run(self, ctx: Job) -> type[Fine]:
        _append_pid(ctx.runs_file)  # before anything else: the death leaves this trace
        if ctx.mode == "exit":
            os._exit(137)
        if ctx.mode == "system_exit":
            raise SystemExit(3)
        if ctx.mode == "interrupt":
            raise KeyboardInterrupt
        raise Poison(f"poison step of a {ctx.mode!r} job")


class Fine(Node[Job]):
    async def run(self, ctx: Job) -> None:
        return None


def _append_pid(path: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
