"""Run the example graphs in real processes: ``commandnet worker`` and the agent commands.

Every process started here is killed by :meth:`WorkerProc.stop` (tests call it in ``finally``),
so a failing test leaves nothing behind. Waits are bounded polls with messages, never sleeps
whose length a test depends on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from commandnet.local.process import free_port

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def commandnet_cmd() -> list[str]:
    """How to run the ``commandnet`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "commandnet"
    if script.exists():
        return [str(script)]
    found = shutil.which("commandnet")
    if found:
        return [found]
    return [sys.executable, "-c", "from commandnet.cli.main import main; main()"]




def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without COMMANDNET_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMANDNET_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(check: Callable[[], T | None], timeout: float, what: str | Callable[[], str],
               interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``
    (a callable is asked at that moment, so the message shows the state that timed out)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {said}")
        time.sleep(interval)


def run_cli(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60.0,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run ``commandnet ARGS`` to completion (in the repository root by default)."""
    return subprocess.run([*commandnet_cmd(), *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:PORT/PATH; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


class WorkerProc:
    """A ``commandnet worker`` subprocess with its probe port and a log file."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.args = [*commandnet_cmd(), "worker", "--http-host", "127.0.0.1",
                     "--http-port", str(self.port), *args]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env or clean_env(),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        """Everything the worker wrote so far."""
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        """GET a probe path of this worker."""
        return http_get(self.port, path)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for ``/readyz`` to answer 200 (fails early if the process exits)."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before "
                                     f"ready:\n{self.log}")
            return self.get("/readyz")[0] == 200

        wait_until(ready, timeout, f"worker on port {self.port} to be ready\n{self.log}")

    def terminate(self) -> None:
        """Send SIGTERM (the graceful drain)."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds."""
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Make sure the process is gone (SIGKILL if it still runs) and close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        finally:
            self._log.close()
