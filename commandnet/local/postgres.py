"""A throwaway PostgreSQL cluster for tests, benchmarks and the demo.

``initdb`` into a folder, a free loopback TCP port and a unix socket in that folder, trust
authentication (nothing listens beyond loopback). Defaults are durable (``fsync`` and
``synchronous_commit`` on) because benchmarks must measure real commits; ``durable=False`` turns
``fsync`` and ``full_page_writes`` off for tests: a commit still reaches the kernel before it is
acknowledged, so the cluster survives its server being killed (fault tests), not a power cut.

The server binaries come from ``$COMMANDNET_PG_BIN``, ``pg_config --bindir``, Debian's
``/usr/lib/postgresql/<version>/bin``, then ``PATH``; when missing, the error names the package.
PostgreSQL refuses to run as root, so under root the cluster runs as the ``postgres`` system user
(or ``nobody``) and its folder must be reachable by that user (a fresh temporary folder is).

For tests of production connection settings: ``password`` gives the superuser a password and
makes TCP connections authenticate with SCRAM (``password_encryption=scram-sha-256``); ``tls``
turns ``ssl=on`` with that server certificate (copied into the cluster folder, as PostgreSQL
wants its key owned by the server's user), ``require_tls`` refuses TCP connections without TLS,
``client_certs`` demands a client certificate signed by ``tls.ca`` as well. The unix socket
keeps trust authentication, so the launcher's own tools (psql, pg_isready) need no secret.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import CommandNetError
from .certs import TlsFiles
from .process import LocalServer, die_with_parent, free_port

PACKAGE = "postgresql"
SUPERUSER = "commandnet"


class PostgresServerError(CommandNetError):
    """The local PostgreSQL cluster could not be created, started or stopped."""


class PostgresNotFoundError(PostgresServerError):
    """No PostgreSQL server binaries: install the Debian package ``postgresql``."""


def find_pg_bin() -> Path:
    """The folder holding ``initdb``, ``postgres`` and ``pg_ctl``."""
    explicit = os.environ.get("COMMANDNET_PG_BIN")
    if explicit:
        if (Path(explicit) / "initdb").is_file():
            return Path(explicit)
        raise PostgresNotFoundError(f"COMMANDNET_PG_BIN={explicit!r} holds no initdb")
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted((p for p in debian.iterdir() if p.name.isdigit()),
                          key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in versions]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PostgresNotFoundError(
        "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found in pg_config --bindir, "
        f"{debian}/<version>/bin nor on PATH: install the Debian package {PACKAGE!r} "
        f"(apt-get install {PACKAGE}) or set COMMANDNET_PG_BIN"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the cluster as when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresServerError("running as root and neither user 'postgres' nor 'nobody' "
                              "exists: PostgreSQL refuses to run as root")


class PostgresServer(LocalServer):
    """One PostgreSQL cluster in ``base_dir`` (data in ``data/``, socket and log beside it).

    ``base_dir`` None: a temporary folder removed by :meth:`stop` (``keep=True`` keeps it). The
    port stays fixed across :meth:`restart`, so clients reconnect to the same DSN. Blocking calls:
    from async code run them with ``asyncio.to_thread``.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        durable: bool = True,
        max_connections: int = 200,
        bin_dir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 60.0,
        password: str | None = None,
        tls: TlsFiles | None = None,
        require_tls: bool = False,
        client_certs: bool = False,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else find_pg_bin()
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(
            tempfile.mkdtemp(prefix="commandnet-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir
        self.log_file = self.base_dir / "postgres.log"
        self.host = host
        self.port = port or free_port(host)
        self.durable = durable
        self.max_connections = max_connections
        self.ready_timeout = ready_timeout
        self.user = _run_as()
        self.password = password
        self.tls = tls
        self.require_tls = require_tls
        self.client_certs = client_certs
        if (require_tls or client_certs) and tls is None:
            raise PostgresServerError("require_tls and client_certs need tls (a certificate)")
        self.process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    def dsn(self, database: str = "postgres", *, unix_socket: bool = False) -> str:
        """A libpq/asyncpg URL for ``database`` over TCP (or the unix socket, a little faster)."""
        if unix_socket:
            return (f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}"
                    f"&port={self.port}")
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The DSN of the ``postgres`` maintenance database."""
        return self.dsn()

    # ------------------------------------------------------------------ lifecycle

    def _subprocess_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"stdin": subprocess.DEVNULL}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return kwargs

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _check_reachable(self) -> None:
        if self.user is None:
            return
        for parent in self.base_dir.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001 and parent.stat().st_uid != self.user.pw_uid:
                raise PostgresServerError(
                    f"{self.base_dir}: running as root, the cluster runs as user "
                    f"{self.user.pw_name!r}, who cannot enter {parent} (mode "
                    f"{oct(mode & 0o777)}); give no folder (a temporary one is used) or one "
                    "under a world-searchable path")

    def initdb(self) -> None:
        """Create the cluster (once; a no-op when the data folder exists)."""
        if (self.data_dir / "PG_VERSION").is_file():
            return
        self._check_reachable()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base_dir)
        os.chmod(self.base_dir, 0o700)
        result = subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=300, cwd=self.base_dir,
            **self._subprocess_kwargs(),  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            raise PostgresServerError(
                f"initdb into {self.data_dir} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self) -> PostgresServer:
        """Create the cluster if needed, start the server, wait (bounded) until it accepts."""
        if self.running:
            return self
        self.initdb()
        settings = {
            "listen_addresses": self.host, "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(self.max_connections),
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "synchronous_commit": "on",
            "shared_buffers": "128MB", "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if self.password is not None or self.tls is not None:
            settings.update(self._auth_settings())
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            # SIGQUIT on our death: an immediate shutdown, as a crash would be.
            self._launched(subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self.base_dir,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGQUIT),
                **self._subprocess_kwargs(),  # type: ignore[call-overload]
            ))
        try:
            self._wait_ready()
            if self.password is not None:
                literal = self.password.replace("'", "''")
                self._psql("postgres", "SET password_encryption = 'scram-sha-256'; "
                           f"ALTER ROLE {SUPERUSER} PASSWORD '{literal}'", quiet_log=True)
        except BaseException:
            self.kill()
            raise
        return self

    def _auth_settings(self) -> dict[str, str]:
        """Write ``pg_hba.conf`` (and copy the TLS files) for the password/TLS options."""
        method = "scram-sha-256" if self.password is not None else "trust"
        cert = " clientcert=verify-ca" if self.client_certs else ""
        lines = ["local all all trust"]
        for net in ("127.0.0.1/32", "::1/128"):
            if self.tls is not None:
                lines.append(f"hostssl all all {net} {method}{cert}")
            if self.require_tls:
                lines.append(f"hostnossl all all {net} reject")
            else:
                lines.append(f"host all all {net} {method}")
        hba = self.base_dir / "pg_hba.conf"
        hba.write_text("\n".join(lines) + "\n")
        self._chown(hba)
        settings = {"hba_file": str(hba), "password_encryption": "scram-sha-256"}
        if self.tls is not None:
            folder = self.base_dir / "tls"
            folder.mkdir(exist_ok=True)
            self._chown(folder)
            for name, source in (("server.crt", self.tls.cert), ("server.key", self.tls.key),
                                 ("ca.crt", self.tls.ca)):
                target = folder / name
                shutil.copyfile(source, target)
                os.chmod(target, 0o600)
                self._chown(target)
            settings.update(ssl="on", ssl_cert_file=str(folder / "server.crt"),
                            ssl_key_file=str(folder / "server.key"),
                            ssl_ca_file=str(folder / "ca.crt"))
        return settings

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pg_isready = self.bin_dir / "pg_isready"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PostgresServerError(
                    f"postgres on port {self.port} exited with code "
                    f"{self.process.returncode} while starting:\n{self.log_tail()}")
            check = subprocess.run(
                [str(pg_isready), "-q", "-h", str(self.socket_dir), "-p", str(self.port),
                 "-U", SUPERUSER, "-d", "postgres"], capture_output=True, timeout=30)
            if check.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    f"postgres on port {self.port} not ready within {self.ready_timeout:g}s:\n"
                    f"{self.log_tail()}")
            time.sleep(0.05)


    def stop(self, *, keep: bool = False, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint); remove a temporary folder
        unless ``keep``."""
        self._terminate(signal.SIGINT, timeout)
        if self._owns_dir and not keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, crash recovery at the next start).

        The postmaster itself is not SIGKILLed: its backends would outlive it and keep the
        port and shared memory busy. SIGQUIT makes every process exit at once, as a crash does.
        """
        self._terminate(signal.SIGQUIT, 30.0)


    def create_database(self, name: str) -> str:
        """Create database ``name`` (its name must be a plain identifier); its DSN."""
        if not name.replace("_", "").isalnum():
            raise PostgresServerError(f"database name {name!r} must be letters, digits and _")
        self._psql("postgres", f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its clients."""
        if not name.replace("_", "").isalnum():
            raise PostgresServerError(f"database name {name!r} must be letters, digits and _")
        self._psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _psql(self, database: str, sql: str, *, quiet_log: bool = False) -> str:
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
             str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-c", sql], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            shown = "a statement setting a password" if quiet_log else repr(sql)
            raise PostgresServerError(f"psql {shown} failed: {result.stderr.strip()}")
        return result.stdout


    def __repr__(self) -> str:
        return f"PostgresServer({self.url}, dir={self.base_dir}, running={self.running})"


def main(argv: list[str] | None = None) -> int:
    """``python -m commandnet.local.postgres``: run a throwaway cluster until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m commandnet.local.postgres",
                                     description="Run a throwaway PostgreSQL on loopback.")
    parser.add_argument("--dir", help="cluster folder (default: a temporary one, removed)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
    parser.add_argument("--fast", action="store_true", help="fsync off (tests only)")
    args = parser.parse_args(argv)
    server = PostgresServer(args.dir, port=args.port, durable=not args.fast)
    return server.serve_until_interrupted(lambda: (
        f"postgres {server.url} (socket {server.dsn(unix_socket=True)}, folder "
        f"{server.base_dir}); Ctrl-C stops it"))


if __name__ == "__main__":
    sys.exit(main())
