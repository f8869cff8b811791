"""Issue 7, item 12: production connection settings, each against a real server.

NATS: token, NKey seed file, ``.creds`` file (operator mode), TLS with a CA and a client
certificate. PostgreSQL: SCRAM password, ``sslmode`` with a root certificate, a client
certificate, pool sizes. Every setting comes from the environment through the worker's settings
model (``COMMANDNET_*``), and each has a negative twin showing the server really demands it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from commandnet.adapters.nats import JetStreamBus, StatusReader
from commandnet.adapters.postgres import PostgresPersistence
from commandnet.adapters.urls import bus_from_url, store_from_url
from commandnet.local.certs import CertAuthority
from commandnet.local.nats import NatsServer
from commandnet.local.postgres import SUPERUSER, PostgresServer
from commandnet.worker.settings import SettingsError, WorkerSettings
from tests.fixtures.secure import PASSWORD, TOKEN, AuthNats, CredsNats, Pki
from tests.graphs.procs import clean_env, run_cli

pytestmark = pytest.mark.usefixtures("no_commandnet_env")


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> WorkerSettings:
    """The worker's settings as a pod with these variables would load them."""
    for key, value in env.items():
        monkeypatch.setenv(f"COMMANDNET_{key}", value)
    return WorkerSettings()


def make_bus(settings: WorkerSettings, pool: str | None = None) -> JetStreamBus:
    url, options = settings.bus_connection()
    bus = bus_from_url(url, pool or f"p{uuid.uuid4().hex[:6]}", connect_timeout=2, **options)
    assert isinstance(bus, JetStreamBus)
    return bus


def connections(server: NatsServer) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{server.monitor_url}/connz?auth=true", timeout=5) as reply:
        found: list[dict[str, Any]] = json.load(reply).get("connections") or []
        return found


async def refused(bus: JetStreamBus, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """The bus cannot connect (the client retries for ever), and the logged error says why."""
    caplog.set_level(logging.WARNING, logger="commandnet.nats")
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bus.connect(), 4)
    finally:
        await bus.close()
    errors = [r.getMessage() for r in caplog.records if "nats client error" in r.getMessage()]
    assert any(reason.lower() in e.lower() for e in errors), errors
    caplog.clear()


# ---------------------------------------------------------------------------------- NATS


async def test_nats_tls_client_certificate_and_token(
        monkeypatch: pytest.MonkeyPatch, tls_nats: NatsServer, test_ca: Pki,
        caplog: pytest.LogCaptureFixture) -> None:
    tls = {"BUS_TLS_CA_FILE": str(test_ca.ca.cert), "BUS_TLS_CERT_FILE": str(test_ca.client.cert),
           "BUS_TLS_KEY_FILE": str(test_ca.client.key)}
    settings = settings_from(monkeypatch, BUS_URL=tls_nats.url, BUS_TOKEN=TOKEN, **tls)
    bus = make_bus(settings)
    await bus.connect()
    try:
        await bus.publish_raw(b"{}", bus.events_subject, "tls-1")
        mine = [c for c in connections(tls_nats) if c.get("name") == f"commandnet-{bus.pool}"]
        assert len(mine) == 1 and mine[0]["tls_version"].startswith("1."), mine
        async with StatusReader(settings.bus_connection()[0], bucket=bus.status_bucket,
                                auth=bus.auth) as reader:
            assert await reader.get_status("nobody", bus.pool) is None
    finally:
        await bus.close()

    # Each part is demanded: no client certificate, no CA (system CAs), a wrong token.
    monkeypatch.delenv("COMMANDNET_BUS_TLS_CERT_FILE")
    monkeypatch.delenv("COMMANDNET_BUS_TLS_KEY_FILE")
    await refused(make_bus(WorkerSettings()), caplog, "certificate")
    settings_from(monkeypatch, **tls)
    monkeypatch.delenv("COMMANDNET_BUS_TLS_CA_FILE")
    await refused(make_bus(WorkerSettings()), caplog, "CERTIFICATE_VERIFY_FAILED")
    settings_from(monkeypatch, BUS_TOKEN="not-the-token", **tls)
    await refused(make_bus(WorkerSettings()), caplog, "Authorization Violation")


def test_agent_commands_use_the_tls_settings(tls_nats: NatsServer, test_ca: Pki) -> None:
    pool = f"cli{uuid.uuid4().hex[:6]}"
    env = clean_env(COMMANDNET_BUS_URL=tls_nats.url, COMMANDNET_BUS_TOKEN=TOKEN,
                    COMMANDNET_BUS_TLS_CA_FILE=str(test_ca.ca.cert),
                    COMMANDNET_BUS_TLS_CERT_FILE=str(test_ca.client.cert),
                    COMMANDNET_BUS_TLS_KEY_FILE=str(test_ca.client.key), COMMANDNET_POOL=pool)
    # Clients are publish-only: the pool's streams come from a worker or from `pools ensure`.
    ensured = run_cli(["pools", "ensure", "--connect-timeout", "10"], env=env)
    assert ensured.returncode == 0, ensured.stderr
    sent = run_cli(["trigger", "a1", "--node", "Step0", "--connect-timeout", "10"], env=env)
    assert sent.returncode == 0 and "trigger sent" in sent.stdout, sent.stderr
    missing = run_cli(["status", "nobody", "--connect-timeout", "10"], env=env)
    assert missing.returncode == 1 and "no agent 'nobody' in the status bucket" in missing.stderr
    without = {k: v for k, v in env.items() if "TLS_CERT" not in k and "TLS_KEY" not in k}
    refused_cli = run_cli(["trigger", "a2", "--node", "Step0", "--connect-timeout", "3"],
                          env=without)
    assert refused_cli.returncode == 1 and "cannot reach the bus" in refused_cli.stderr
    assert TOKEN not in sent.stderr + missing.stderr + refused_cli.stderr


async def test_nats_nkey_seed_file(monkeypatch: pytest.MonkeyPatch, auth_nats: AuthNats,
                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_from(monkeypatch, BUS_URL=auth_nats.url,
                             BUS_NKEY_SEED_FILE=str(auth_nats.nkey_seed_file))
    seed = auth_nats.nkey_seed_file.read_text().strip()
    assert seed in settings.secrets()
    bus = make_bus(settings)
    await bus.connect()
    try:
        await bus.publish_raw(b"{}", bus.events_subject, "nkey-1")
        mine = [c for c in connections(auth_nats.server)
                if c.get("name") == f"commandnet-{bus.pool}"]
        assert [c.get("authorized_user") for c in mine] == [auth_nats.nkey_public]
    finally:
        await bus.close()
    from tests.fixtures.secure import make_nkey_user

    _, other_seed = make_nkey_user(tmp_path, "stranger")  # a key the server does not know
    settings_from(monkeypatch, BUS_NKEY_SEED_FILE=str(other_seed))
    await refused(make_bus(WorkerSettings()), caplog, "Authorization Violation")
    settings_from(monkeypatch, BUS_NKEY_SEED_FILE=str(tmp_path / "missing.nk"))
    with pytest.raises(SettingsError, match="COMMANDNET_BUS_NKEY_SEED_FILE="):
        WorkerSettings().bus_connection()


async def test_nats_creds_file_in_operator_mode(
        monkeypatch: pytest.MonkeyPatch, creds_nats: CredsNats,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_from(monkeypatch, BUS_URL=creds_nats.url,
                             BUS_CREDS_FILE=str(creds_nats.creds_file))
    bus = make_bus(settings)
    await bus.connect()  # creates streams and the bucket: JetStream works for this account
    try:
        await bus.publish_raw(b"{}", bus.events_subject, "creds-1")
        assert bus.js is not None
        assert (await bus.js.stream_info(bus.stream)).state.messages == 1
    finally:
        await bus.close()
    seed_line = [line for line in creds_nats.creds_file.read_text().splitlines()
                 if line.startswith("SU")]
    assert seed_line and seed_line[0] in settings.secrets()
    settings_from(monkeypatch, BUS_CREDS_FILE=str(creds_nats.stranger_creds_file))
    await refused(make_bus(WorkerSettings()), caplog, "Authorization Violation")


# ----------------------------------------------------------------------------- PostgreSQL


async def ssl_connections(server: PostgresServer, database: str) -> list[tuple[bool, str]]:
    """(ssl?, client address) of each client connection to ``database`` (read over the
    server's unix socket, which the launcher leaves on trust auth)."""
    conn = await asyncpg.connect(host=str(server.socket_dir), port=server.port,
                                 user=SUPERUSER, database="postgres")
    try:
        rows = await conn.fetch(
            "SELECT s.ssl, host(a.client_addr) AS addr FROM pg_stat_activity a "
            "JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1", database)
    finally:
        await conn.close()
    return [(row["ssl"], row["addr"]) for row in rows]


async def test_postgres_verify_full_password_and_pool_sizes(
        monkeypatch: pytest.MonkeyPatch, secure_postgres: PostgresServer,
        test_ca: Pki) -> None:
    db = f"tls_{uuid.uuid4().hex[:8]}"
    dsn = secure_postgres.create_database(db)
    settings = settings_from(monkeypatch, STORE_URL=dsn, STORE_PASSWORD=PASSWORD,
                             STORE_SSLMODE="verify-full",
                             STORE_SSLROOTCERT=str(test_ca.ca.cert),
                             STORE_POOL_MIN="3", STORE_POOL_MAX="4")
    url, options = settings.store_connection()
    store = store_from_url(url, **options)
    assert isinstance(store, PostgresPersistence)
    assert (store.min_size, store.max_size) == (3, 4)
    await store.setup()
    try:
        assert await store.get_agent("nobody") is None
        # two pools (commits and soft commits) of min_size each, every one over TLS
        assert await ssl_connections(secure_postgres, db) == [(True, "127.0.0.1")] * 6
        # at most max_size per pool however many statements run at once
        await asyncio.gather(*(store.get_agent(f"a{i}") for i in range(40)))
        assert len(await ssl_connections(secure_postgres, db)) <= 8
    finally:
        await store.close()


@pytest.mark.parametrize(("env", "error"), [
    ({"STORE_SSLMODE": "disable"}, "no encryption"),  # the server refuses plain TCP
    ({"STORE_SSLMODE": "verify-full", "STORE_SSLROOTCERT": "OTHER_CA"}, "certificate verify"),
    ({"STORE_SSLMODE": "require", "STORE_PASSWORD": "wrong"}, "password authentication"),
])
async def test_postgres_refuses_what_it_should(
        monkeypatch: pytest.MonkeyPatch, secure_postgres: PostgresServer, tmp_path: Path,
        env: dict[str, str], error: str) -> None:
    if env.get("STORE_SSLROOTCERT") == "OTHER_CA":
        env = {**env, "STORE_SSLROOTCERT": str(CertAuthority(tmp_path).cert)}
    settings = settings_from(monkeypatch, STORE_URL=secure_postgres.dsn("postgres"),
                             **{"STORE_PASSWORD": PASSWORD, **env})
    url, options = settings.store_connection()
    store = store_from_url(url, **options)
    with pytest.raises(Exception, match=error):
        await store.setup()
    await store.close()


async def test_postgres_client_certificate(monkeypatch: pytest.MonkeyPatch,
                                           mtls_postgres: PostgresServer, test_ca: Pki) -> None:
    base = {"STORE_URL": mtls_postgres.dsn("postgres"), "STORE_PASSWORD": PASSWORD,
            "STORE_SSLMODE": "verify-ca", "STORE_SSLROOTCERT": str(test_ca.ca.cert)}
    settings = settings_from(monkeypatch, **base)
    store = store_from_url(*settings.store_connection()[:1], **settings.store_connection()[1])
    with pytest.raises(Exception, match="certificate"):
        await store.setup()
    await store.close()
    settings = settings_from(monkeypatch, STORE_SSLCERT=str(test_ca.client.cert),
                             STORE_SSLKEY=str(test_ca.client.key))
    url, options = settings.store_connection()
    assert "sslcert=" in url and PASSWORD not in url
    store = store_from_url(url, **options)
    await store.setup()
    try:
        assert await store.get_agent("nobody") is None
    finally:
        await store.close()


def test_migrate_uses_the_store_settings(secure_postgres: PostgresServer, test_ca: Pki) -> None:
    db = f"mig_{uuid.uuid4().hex[:8]}"
    dsn = secure_postgres.create_database(db)
    env = clean_env(COMMANDNET_STORE_URL=dsn, COMMANDNET_STORE_PASSWORD=PASSWORD,
                    COMMANDNET_STORE_SSLMODE="verify-full",
                    COMMANDNET_STORE_SSLROOTCERT=str(test_ca.ca.cert))
    done = run_cli(["migrate"], env=env)
    assert done.returncode == 0 and "applied migration" in done.stdout, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    plain = run_cli(["migrate"], env={**env, "COMMANDNET_STORE_SSLMODE": "disable"})
    assert plain.returncode == 1 and "no encryption" in plain.stderr


def test_settings_checks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="store_pool_min"):
        settings_from(monkeypatch, STORE_POOL_MIN="5", STORE_POOL_MAX="2")
    monkeypatch.delenv("COMMANDNET_STORE_POOL_MIN")
    with pytest.raises(SettingsError, match="COMMANDNET_STORE_SSLROOTCERT="):
        settings_from(monkeypatch, STORE_URL="postgresql://u@db/x",
                      STORE_SSLROOTCERT=str(tmp_path / "nope.crt")).store_connection()
    with pytest.raises(SettingsError, match="CA file"):
        settings_from(monkeypatch, BUS_URL="nats://h:4222",
                      BUS_TLS_CA_FILE=str(tmp_path / "nope.crt")).bus_connection()
    summary = json.dumps(settings_from(monkeypatch, BUS_TOKEN=TOKEN).summary(), default=str)
    assert TOKEN not in summary and "bus_tls_ca_file" in summary
