"""A tiny HTTP/1.1 server on the worker's event loop: ``/healthz``, ``/readyz``, ``/metrics``.

Standard library ``asyncio`` only: probes and scrapes are a few small GETs a minute, so no web
framework is worth its weight. Answering at all proves the event loop is responsive, which is
what ``/healthz`` promises; ``/readyz`` asks the worker (store and bus reachable, consuming, not
draining). Each request gets one response and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("commandnet.worker.http")

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
"""Returns (ready, reason); the reason is the response body."""

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 503: "Service Unavailable"}
_READ_TIMEOUT = 5.0
_CHECK_TIMEOUT = 3.0


class ProbeServer:
    """Serves the probes and the metrics of one worker process."""

    def __init__(self, host: str, port: int, ready: ReadyCheck,
                 registry: CollectorRegistry) -> None:
        self.host, self.port = host, port
        self.ready = ready
        self.registry = registry
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; with port 0 the chosen port is in ``self.port`` afterwards."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("probes and metrics on http://%s:%d", self.host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except TimeoutError:
                await _respond(writer, 408, b"timeout\n", head_only=False)
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                await _respond(writer, 400, b"bad request\n", head_only=False)
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"GET or HEAD only\n", head_only=False)
                return
            status, body, ctype = await self._route(target)
            await _respond(writer, status, body, head_only=method == "HEAD", ctype=ctype)
        except Exception:
            log.exception("probe request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            return 200, b"ok\n", text
        if path == "/readyz":
            try:
                ok, reason = await asyncio.wait_for(self.ready(), _CHECK_TIMEOUT)
            except TimeoutError:
                ok, reason = False, f"readiness check took longer than {_CHECK_TIMEOUT}s"
            except Exception as exc:
                ok, reason = False, f"readiness check failed: {type(exc).__name__}: {exc}"
            return (200 if ok else 503), f"{reason}\n".encode(), text
        if path == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        return 404, b"not found: try /healthz, /readyz or /metrics\n", text


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *, head_only: bool,
                   ctype: str = "text/plain; charset=utf-8") -> None:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n")
    writer.write(head.encode("latin-1") + (b"" if head_only else body))
    await writer.drain()
