"""What every local server launcher shares: a free port, dying with its parent, cleanup at exit."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to send ``signum`` to the child when we die (kill -9).

    None off Linux, and off the main thread: the kernel fires it when the *thread* that forked
    exits, which for a worker thread (``asyncio.to_thread``) would be at once.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None

    def request() -> None:  # pragma: no cover - runs in the child between fork and exec
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, signum)  # PR_SET_PDEATHSIG

    return request


class LocalServer(ABC):
    """A server subprocess owned by this process; stopped at exit if still running."""

    process: subprocess.Popen[bytes] | None
    log_file: Path
    _live: set[LocalServer] = set()

    @abstractmethod
    def start(self) -> Self:
        """Start and wait (bounded) until the server answers."""

    @abstractmethod
    def stop(self, *, keep: bool = False, timeout: float = 10.0) -> None:
        """Stop gracefully; remove a temporary data folder unless ``keep``."""

    @abstractmethod
    def kill(self) -> None:
        """Stop as a crash would; the data stays for :meth:`start`."""

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or, with ``crash``, kill) and start again on the same ports and data."""
        if crash:
            self.kill()
        else:
            self.stop(keep=True)
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _launched(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        LocalServer._live.add(self)

    def _terminate(self, signum: int, timeout: float) -> None:
        """Send ``signum``, wait up to ``timeout`` s, then SIGKILL; forget the process."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.process = None
        LocalServer._live.discard(self)

    def serve_until_interrupted(self, banner: Callable[[], str]) -> int:
        """Start, print ``banner()``, and run until Ctrl-C or SIGTERM (for ``python -m``)."""

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        self.start()
        print(banner(), flush=True)
        try:
            assert self.process is not None
            self.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(LocalServer._live):
        with contextlib.suppress(Exception):
            server.stop()
