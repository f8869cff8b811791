"""Processes of the test bed: each component in its own process group (so one kill takes all of
it), bound to the test process (PR_SET_PDEATHSIG) unless detached, every wait bounded."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from e2e.testbed.errors import ClusterError, PortInUseError


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Child side of Popen: ask the kernel to SIGKILL us when the test process dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def kill_group(pgid: int, grace: float = 10.0) -> None:
    """TERM the process group, wait up to `grace` seconds, then KILL it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Members may be zombies of ours; reap what we can and check the leader's state.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(-pgid, os.WNOHANG)
    return pid_alive(pgid)


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # set for components adopted from state.json (CLI `down`)

    @property
    def running(self) -> bool:
        if self.proc is not None:
            # A killed multi-threaded process shows as a zombie ("Z") a moment before the
            # kernel lets us reap it: count it as gone already.
            return self.proc.poll() is None and pid_alive(self.proc.pid)
        return self.pid is not None and pid_alive(self.pid)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"    {line}" for line in text[-lines:])

    def describe_exit(self) -> str:
        code = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=5)
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        return (
            f"{self.name} (pid {self.proc.pid if self.proc else self.pid}) has exited ({how}); "
            f"last lines of {self.log}:\n{self.log_tail()}"
        )


def cmdline_mentions(pid: int, text: str) -> bool:
    """True if the process's command line contains `text` (guards against a reused pid)."""
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


def pids_running(exe_name: str, needle: str = "") -> list[int]:
    """Pids whose argv[0] ends with `exe_name` and whose command line contains `needle`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].decode(errors="replace").endswith(exe_name) and needle.encode() in b" ".join(
            argv
        ) and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def launch(name: str, argv: list[str], logs: Path, cwd: Path, *, detach: bool = False,
           env: dict[str, str] | None = None) -> Component:
    """Start `argv` in its own process group, output to `logs`/`name`.log; unless `detach`, the
    kernel kills it when this process dies."""
    log = logs / f"{name}.log"
    comp = Component(name, argv, log)
    with log.open("ab") as out:
        comp.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            env=env,
            start_new_session=True,  # own process group: kill_group() takes all of it
            preexec_fn=None if detach else die_with_parent,
        )
    return comp


def stop_component(comp: Component) -> None:
    """End a component's process group and reap it."""
    pid = comp.proc.pid if comp.proc else comp.pid
    if pid is not None:
        kill_group(pid)
    if comp.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            comp.proc.wait(timeout=5)


def check_alive(comp: Component) -> None:
    """Raise (PortInUseError when it could not bind) if the component has exited."""
    if not comp.running:
        text = comp.log_tail(400)
        msg = comp.describe_exit()
        if "address already in use" in text:
            raise PortInUseError(f"{comp.name} could not bind its port: {msg}")
        raise ClusterError(msg)


def wait_for(what: str, probe: Callable[[], tuple[bool, str]], timeout: float,
             watch: Sequence[Component], interval: float = 0.25) -> None:
    """Call probe() until it reports success; fail (never hang) after `timeout` seconds or as
    soon as a watched component has died, saying what was being waited for and its last answer."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        for comp in watch:
            check_alive(comp)
        ok, last = probe()
        if ok:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"  {c.name} log ({c.log}):\n{c.log_tail()}" for c in watch)
            raise ClusterError(
                f"gave up after {timeout:.0f} s waiting for {what}; last answer: {last}\n{tails}"
            )
        time.sleep(interval)


def http_ok(url: str, context: ssl.SSLContext | None = None) -> tuple[bool, str]:
    """A health probe for ``wait_for``: HTTP 200, and what was seen (the lines of a failing
    check naming what "failed", as the API server's /readyz lists them)."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            body = resp.read(2000).decode(errors="replace")
            return resp.status == 200, f"HTTP {resp.status}: {body.strip()[:300]}"
    except urllib.error.HTTPError as exc:
        body = exc.read(4000).decode(errors="replace")
        failed = [ln for ln in body.splitlines() if "failed" in ln]
        return False, f"HTTP {exc.code}: {'; '.join(failed) or body.strip()[:300]}"
    except (OSError, ssl.SSLError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def host_ip() -> str:
    """The host's primary non-loopback IPv4 address (pods reach the API server there; a pod's
    127.0.0.1 is its own). COMMANDNET_KUBE_HOST_IP overrides it."""
    if ip := os.environ.get("COMMANDNET_KUBE_HOST_IP"):
        return ip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing: it only picks a route
            ip = str(s.getsockname()[0])
        except OSError:
            ip = ""
    if not ip or ip.startswith("127."):
        raise ClusterError(
            "no non-loopback IPv4 address with a route: pods could not reach the API server; "
            "set COMMANDNET_KUBE_HOST_IP"
        )
    return ip


class AllOrNothing:
    """`start()` runs `_start()` and, when that fails part way, `stop()`: a half-started
    component never outlives its error (the node, kube-proxy, metrics-server, KEDA)."""

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError
