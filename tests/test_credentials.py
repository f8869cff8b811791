"""Issue 7, item 8: any password works, and none is logged.

Passwords go to nats-py and asyncpg as credentials, never through a URL, so a password full of
URL characters (``s3cr@t/:+=%x``) authenticates; and no log line of a real worker (start, a NATS
restart and reconnect, stop) nor of the agent commands carries it in any form.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import uuid
from pathlib import Path
from urllib.parse import quote, quote_plus

import nats
import nats.errors
import pytest

from commandnet.adapters.nats import JetStreamBus, StatusReader
from commandnet.adapters.postgres import PostgresPersistence
from commandnet.adapters.urls import bus_from_url, store_from_url
from commandnet.local.postgres import PostgresServer
from commandnet.worker.logs import redact, setup_logging
from commandnet.worker.settings import ConnectionSettings, SettingsError, WorkerSettings
from tests.fixtures.secure import PASSWORD, AuthNats, Pki
from tests.graphs.procs import WorkerProc, clean_env, run_cli, wait_until

pytestmark = pytest.mark.usefixtures("no_commandnet_env")


def password_forms(secret: str, user: str = "cn") -> list[str]:
    """Every way a log line could carry ``secret`` (written here independently of the code)."""
    forms = {
        secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
        quote(secret, safe="").lower(), json.dumps(secret)[1:-1], repr(secret)[1:-1],
        base64.b64encode(secret.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="),
        # HTTP Basic / SASL PLAIN style: user:secret encoded together
        base64.b64encode(f"{user}:{secret}".encode()).decode().rstrip("="),
        base64.b64encode(f"\0{user}\0{secret}".encode()).decode().rstrip("="),
    }
    # a percent-decoding mistake can leave half-decoded forms: each special char alone
    forms |= {secret.replace(c, quote(c, safe="")) for c in "@/:+=%"}
    return sorted(forms)


def leaks(text: str, secret: str = PASSWORD) -> list[str]:
    return [form for form in password_forms(secret) if form in text]


def test_password_forms_are_distinct_and_found() -> None:
    forms = password_forms(PASSWORD)
    assert len(forms) >= 10
    assert leaks(f"connect nats://cn:{quote(PASSWORD, safe='')}@h:1") != []
    assert leaks("nothing here") == []


# ------------------------------------------------------------------- settings and logs


def test_settings_hand_passwords_to_the_clients_not_the_url() -> None:
    s = ConnectionSettings(store_url="postgresql://app@db.example:5432/cn",
                           store_password=PASSWORD, bus_url="nats://cn@nats.example:4222",
                           bus_password=PASSWORD)
    url, options = s.store_connection()
    assert url == "postgresql://app@db.example:5432/cn"
    assert options["password"] == PASSWORD
    bus_url, bus_options = s.bus_connection()
    assert bus_url == "nats://nats.example:4222"
    auth = bus_options["auth"]
    assert (auth.user, auth.password, auth.token) == ("cn", PASSWORD, None)
    assert PASSWORD not in repr(auth) and not leaks(json.dumps(
        WorkerSettings(**s.model_dump()).summary(), default=str))


def test_a_password_written_into_a_url_is_decoded_and_taken_out() -> None:
    encoded = quote(PASSWORD, safe="")
    s = ConnectionSettings(store_url=f"postgresql://app:{encoded}@db:5432/cn",
                           bus_url=f"nats://cn:{encoded}@nats:4222")
    url, options = s.store_connection()
    assert url == "postgresql://app@db:5432/cn" and options["password"] == PASSWORD
    bus_url, bus_options = s.bus_connection()
    assert bus_url == "nats://nats:4222"
    assert (bus_options["auth"].user, bus_options["auth"].password) == ("cn", PASSWORD)
    assert PASSWORD in s.secrets() and encoded in s.secrets()
    # the adapter does the same when handed such a URL directly
    bus = JetStreamBus(f"nats://cn:{encoded}@nats:4222", pool="p")
    assert bus.servers == ["nats://nats:4222"] and bus.auth.password == PASSWORD


def test_password_file_and_mistakes(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD + "\n")
    s = ConnectionSettings(store_url="postgresql://app@db/cn",
                           store_password_file=str(secret_file))
    assert s.store_connection()[1]["password"] == PASSWORD
    assert PASSWORD in s.secrets()
    with pytest.raises(SettingsError, match=r"COMMANDNET_BUS_PASSWORD is set .* names no user"):
        ConnectionSettings(bus_url="nats://nats:4222", bus_password=PASSWORD).bus_connection()
    with pytest.raises(SettingsError, match="COMMANDNET_STORE_PASSWORD_FILE="):
        ConnectionSettings(store_url="postgresql://app@db/cn",
                           store_password_file=str(tmp_path / "missing")).store_connection()
    with pytest.raises(ValueError, match="COMMANDNET_BUS_PASSWORD and COMMANDNET_BUS_PASSWORD"):
        ConnectionSettings(bus_password="a", bus_password_file=str(secret_file))


def test_log_redaction_catches_encoded_forms() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", secrets=[PASSWORD], stream=out)
    log = logging.getLogger("commandnet.test.redaction")
    for form in password_forms(PASSWORD):
        log.warning("driver said: %s (in %r)", form, f"nats://cn:{form}@host:4222")
    try:
        raise RuntimeError(f"login failed: {quote_plus(PASSWORD)}")
    except RuntimeError:
        log.exception("boom")
    text = out.getvalue()
    assert len(text.splitlines()) == len(password_forms(PASSWORD)) + 1
    assert leaks(text) == [], text
    assert "***" in text
    assert redact(f"x {quote(PASSWORD, safe='')} y", [PASSWORD]) == "x *** y"


# ----------------------------------------------------------------- real servers, in process


async def test_nats_password_auth_with_url_hostile_password(auth_nats: AuthNats) -> None:
    url = auth_nats.url.replace("nats://", "nats://cn@")
    good = ConnectionSettings(bus_url=url, bus_password=PASSWORD)
    bus_url, options = good.bus_connection()
    bus = bus_from_url(bus_url, "p", stream=f"CRED_{uuid.uuid4().hex[:6]}",
                       prefix=f"cred{uuid.uuid4().hex[:6]}", **options)
    await bus.connect()
    try:
        assert isinstance(bus, JetStreamBus) and bus.is_connected
    finally:
        await bus.close()
    async with StatusReader(bus_url, bucket=bus.status_bucket, auth=options["auth"]) as r:
        assert await r.get_status("nobody", "p") is None  # bucket made by the bus above
    # The server does check: a wrong password, and the percent-encoded form the old code sent,
    # are both refused.
    for wrong in ("wrong", quote(PASSWORD, safe="")):
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await nats.connect(auth_nats.url, user="cn", password=wrong,
                               allow_reconnect=False, connect_timeout=2)


async def test_postgres_password_auth_with_url_hostile_password(
        secure_postgres: PostgresServer, test_ca: Pki) -> None:
    db = f"cred_{uuid.uuid4().hex[:8]}"
    dsn = secure_postgres.create_database(db)
    settings = ConnectionSettings(store_url=dsn, store_password=PASSWORD,
                                  store_sslmode="verify-full",
                                  store_sslrootcert=str(test_ca.ca.cert))
    url, options = settings.store_connection()
    store = store_from_url(url, **options)
    assert isinstance(store, PostgresPersistence) and PASSWORD not in store.dsn
    await store.setup()
    try:
        assert await store.get_agent("nobody") is None
    finally:
        await store.close()
    wrong = store_from_url(url, **{**options, "password": quote(PASSWORD, safe="")})
    with pytest.raises(Exception, match="password authentication failed"):
        await wrong.setup()
    await wrong.close()


# ------------------------------------------------------------- a real worker, end to end


def test_worker_start_reconnect_and_stop_never_log_the_password(
        tmp_path: Path, auth_nats: AuthNats, secure_postgres: PostgresServer,
        test_ca: Pki) -> None:
    db = f"credw_{uuid.uuid4().hex[:8]}"
    dsn = secure_postgres.create_database(db)
    pool = f"cred{uuid.uuid4().hex[:6]}"
    bus_url = auth_nats.url.replace("nats://", "nats://cn@")
    env = clean_env(
        COMMANDNET_BUS_PASSWORD=PASSWORD, COMMANDNET_STORE_PASSWORD=PASSWORD,
        COMMANDNET_STORE_SSLMODE="verify-full",
        COMMANDNET_STORE_SSLROOTCERT=str(test_ca.ca.cert),
        COMMANDNET_LOG_LEVEL="DEBUG", COMMANDNET_STALL_AFTER="5", COMMANDNET_ACK_WAIT="5",
        COMMANDNET_LEASE_SECONDS="6")
    worker = WorkerProc(["--graph", "tests.graphs.linear:Step0", "--pool", pool,
                         "--store", dsn, "--bus", bus_url], tmp_path / "worker.log", env=env)
    outputs: list[str] = []
    cli = ["--pool", pool, "--bus", bus_url]
    try:
        worker.wait_ready()
        first = run_cli(["trigger", "a1", "--node", "Step0", "--context", '{"visited": []}',
                         *cli, "--wait", "--timeout", "120"], env=env)
        outputs += [first.stdout, first.stderr]
        assert first.returncode == 0, first.stderr + worker.log
        assert json.loads(first.stdout.splitlines()[-1])["status"] == "succeeded"

        auth_nats.server.restart()  # every client disconnects and reconnects
        wait_until(lambda: "nats reconnected" in worker.log, 60,
                   f"the worker to reconnect\n{worker.log}")
        second = run_cli(["trigger", "a2", "--node", "Step0", "--context", '{"visited": []}',
                          *cli, "--wait", "--timeout", "120"], env=env)
        outputs += [second.stdout, second.stderr]
        assert second.returncode == 0, second.stderr + worker.log
        status = run_cli(["status", "a2", *cli, "--json"], env=env)
        outputs += [status.stdout, status.stderr]
        assert json.loads(status.stdout)["status"] == "succeeded", status.stderr
        worker.terminate()
        assert worker.wait(60) == 0, worker.log
    finally:
        worker.stop()
    log = worker.log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) >= 5, log
    reconnected = [entry["msg"] for entry in lines if "nats reconnected" in entry["msg"]]
    port = auth_nats.server.port
    assert reconnected and all(m.endswith(f"127.0.0.1:{port}") for m in reconnected), reconnected
    assert any("disconnected" in entry["msg"] for entry in lines), log
    assert "drained" in log and "consuming pool" in log
    assert leaks(log) == [], log
    assert leaks("\n".join(outputs)) == []
    assert not re.search(r"cn:[^@\s]+@", log), "a user:password@ in the worker log"
