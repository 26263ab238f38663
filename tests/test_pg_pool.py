"""PostgreSQL connection plumbing (opscore/storage/postgres/pool.py): settings from a
URL, the pool, precise connection errors, and the LISTEN helper across restarts,
against the real throwaway cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from opscore.config import from_sources
from opscore.errors import ConfigError
from opscore.storage.postgres import backend as pg_backend
from opscore.storage.postgres.backend import PostgresStorage
from opscore.storage.postgres.pool import (
    DEFAULTS,
    Backoff,
    DatabaseUnavailable,
    Listener,
    PgSettings,
    connect,
    connect_error,
    create_pool,
    is_connection_error,
)
from tests.conftest import eventually
from tests.support.pg import PASSWORD, PASSWORD_USER, PgCluster
from tests.support.procserver import free_port

WAIT = 30.0  # outer bound of every wait below

# --------------------------------------------------------------------------- settings


def test_defaults_are_explicit() -> None:
    s = PgSettings.from_url("postgresql://opscore@db.example:5432/opscore")
    for name, (default, *_rest) in DEFAULTS.items():
        assert getattr(s, name) == default
    assert s.dsn == "postgresql://opscore@db.example:5432/opscore"
    assert s.display == "opscore@db.example:5432/opscore"
    assert (s.user, s.database, s.password) == ("opscore", "opscore", None)
    assert s.server_settings == {"application_name": "opscore"}


def test_settings_from_the_url_query_and_the_caller() -> None:
    url = (
        "postgres://u@h1:5432,h2:5433/db?pool_size=20&pool_min_size=2&statement_timeout=250ms"
        "&connect_timeout=3&reconnect_backoff_min=50ms&reconnect_backoff_max=2s"
        "&sslmode=disable&application_name=replica-a&target_session_attrs=read-write"
    )
    s = PgSettings.from_url(url)
    assert (s.pool_size, s.pool_min_size) == (20, 2)
    assert s.statement_timeout == 0.25
    assert s.connect_timeout == 3.0
    assert (s.reconnect_backoff_min, s.reconnect_backoff_max) == (0.05, 2.0)
    assert s.server_settings == {"application_name": "replica-a"}
    # Ours are taken out; libpq's stay for the driver.
    assert (
        s.dsn == "postgres://u@h1:5432,h2:5433/db?sslmode=disable&target_session_attrs=read-write"
    )
    assert s.display == "u@h1:5432,h2:5433/db"
    # The caller (a command-line option) wins; None means "not given".
    s = PgSettings.from_url(url, pool_size=5, statement_timeout="2min", connect_timeout=None)
    assert (s.pool_size, s.statement_timeout, s.connect_timeout) == (5, 120.0, 3.0)
    kwargs = PgSettings.from_url(url).connect_kwargs()
    assert kwargs["server_settings"]["statement_timeout"] == "250"
    assert kwargs["timeout"] == 3.0
    assert kwargs["command_timeout"] > 0.25  # the client waits a little longer than the server


@pytest.mark.parametrize(
    ("url", "overrides", "message"),
    [
        ("mysql://u@h/db", {}, "not a PostgreSQL URL"),
        ("h:5432/db", {}, "not a PostgreSQL URL"),
        ("postgresql://u@h/db?pool_size=0", {}, "URL parameter pool_size='0' must be between 1"),
        ("postgresql://u@h/db?pool_size=ten", {}, "pool_size='ten' is not a whole number"),
        ("postgresql://u@h/db", {"pool_size": 5000}, "setting pool_size=5000 must be between"),
        ("postgresql://u@h/db?statement_timeout=fast", {}, "statement_timeout='fast' is not a"),
        ("postgresql://u@h/db?connect_timeout=0", {}, "connect_timeout='0' must be between"),
        ("postgresql://u@h/db?pool_size=2&pool_min_size=3", {}, "pool_min_size (3) is larger"),
        (
            "postgresql://u@h/db?reconnect_backoff_min=10s&reconnect_backoff_max=1s",
            {},
            "reconnect_backoff_min is larger",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(url: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PgSettings.from_url(url, **overrides)
    assert message in str(caught.value)


def test_the_password_is_kept_apart() -> None:
    s = PgSettings.from_url("postgresql://opscore:s%40cret-1@db:5432/opscore?sslmode=require")
    assert s.password == "s@cret-1"
    for text in (s.dsn, s.display, repr(s), str(s)):
        assert "cret-1" not in text
    s = PgSettings.from_url("postgresql://db/opscore?user=opscore&password=hunter2")
    assert (s.user, s.password) == ("opscore", "hunter2")
    assert "hunter2" not in s.dsn + repr(s)


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    b = Backoff(0.1, 0.5)
    delays = [b.next() for _ in range(6)]
    for delay, nominal in zip(delays, [0.1, 0.2, 0.4, 0.5, 0.5, 0.5], strict=True):
        assert nominal * 0.75 <= delay <= nominal
    b.reset()
    assert b.next() <= 0.1


# --------------------------------------------------------------------------- the pool


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(PgSettings.from_url(pg_url, pool_size=4, statement_timeout="300ms"))
    try:
        yield p
    finally:
        await p.close()


async def test_pool_sessions_carry_the_settings(pool: asyncpg.Pool) -> None:
    assert await pool.fetchval("SHOW statement_timeout") == "300ms"
    assert await pool.fetchval("SHOW application_name") == "opscore"
    assert pool.get_max_size() == 4
    with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
        await pool.execute("SELECT pg_sleep(5)")
    # Four statements at once: the pool opens up to its size.
    values = await asyncio.gather(*(pool.fetchval("SELECT $1::int", i) for i in range(4)))
    assert values == [0, 1, 2, 3]


async def test_pool_recovers_by_itself_after_an_immediate_restart(
    pg: PgCluster, pg_url: str
) -> None:
    settings = PgSettings.from_url(pg_url, pool_size=3, pool_min_size=3)
    pool = await create_pool(settings)
    try:
        await pool.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        pg.restart()  # -m immediate: every connection of the pool is cut
        errors = []
        for _ in range(5):
            try:
                assert await pool.fetchval("SELECT x FROM t") == 1
                break
            except Exception as exc:
                errors.append(exc)
        else:
            raise AssertionError(f"the pool did not recover: {errors!r}")
        assert all(is_connection_error(e) for e in errors), errors
        # Every connection works again.
        assert await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(3))) == [1] * 3
    finally:
        await pool.close()


async def test_while_the_server_is_down_statements_fail_as_connection_errors(
    pg: PgCluster, pg_url: str
) -> None:
    settings = PgSettings.from_url(pg_url, pool_size=2)
    pool = await create_pool(settings)
    try:
        pg.stop()
        try:
            with pytest.raises(Exception) as caught:
                await pool.fetchval("SELECT 1")
            assert is_connection_error(caught.value), repr(caught.value)
            error = connect_error(caught.value, settings)
            assert error is not None and f"127.0.0.1:{pg.port}" in error.message
            assert not error.permanent
        finally:
            pg.start()
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


# --------------------------------------------------------------------------- errors


async def _refused(settings: PgSettings) -> DatabaseUnavailable:
    with pytest.raises(DatabaseUnavailable) as caught:
        await create_pool(settings)
    return caught.value


async def test_a_refusing_server_is_named() -> None:
    port = free_port()  # nothing listens there
    err = await _refused(PgSettings.from_url(f"postgresql://opscore@127.0.0.1:{port}/opscore"))
    assert f"PostgreSQL at opscore@127.0.0.1:{port}/opscore refused the connection" in err.message
    assert not err.permanent


async def test_a_server_that_never_answers_times_out_by_name() -> None:
    # Accepts TCP connections (the kernel's backlog) but never speaks.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        settings = PgSettings.from_url(
            f"postgresql://u@127.0.0.1:{port}/db?connect_timeout=300ms&sslmode=disable"
        )
        err = await asyncio.wait_for(_refused(settings), WAIT)
        assert f"PostgreSQL at u@127.0.0.1:{port}/db did not answer within 0.3s" in err.message
    finally:
        silent.close()


async def test_an_unknown_host_is_named() -> None:
    err = await _refused(PgSettings.from_url("postgresql://u@no-such-host.invalid:5432/db"))
    assert "no-such-host.invalid" in err.message and "resolved" in err.message


async def test_a_wrong_password_is_named_and_never_shown(
    pg: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-pass-6f1c"
    url = pg.url(user=PASSWORD_USER).replace(PASSWORD, wrong)
    err = await _refused(PgSettings.from_url(url))
    assert err.permanent
    assert f"rejected the password of user '{PASSWORD_USER}'" in err.message
    assert f"127.0.0.1:{pg.port}" in err.message
    # The right one connects; neither appears in any log line or error.
    pool = await create_pool(PgSettings.from_url(pg.url(user=PASSWORD_USER)))
    await pool.close()
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (wrong, PASSWORD):
        assert secret not in logged
        assert secret not in str(err) and secret not in repr(err.__cause__)


async def test_a_missing_database_is_named(pg: PgCluster) -> None:
    err = await _refused(PgSettings.from_url(pg.url("no_such_db")))
    assert err.permanent
    assert "has no database 'no_such_db'" in err.message


async def test_too_many_connections_is_named(pg: PgCluster, pg_url: str) -> None:
    # Superusers ignore connection limits: a role of its own, allowed one.
    role = f"limited_{pg_url.rsplit('/', 1)[1]}"
    pg.sql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    try:
        url = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@")
        first = await connect(PgSettings.from_url(url))
        try:
            err = await _refused(PgSettings.from_url(url))
            assert "has no connection slots left" in err.message
            assert "too many connections" in err.message  # the server's own words
            assert not err.permanent
        finally:
            await first.close()
    finally:
        pg.sql(f"DROP ROLE {role}")


# --------------------------------------------------------------------------- LISTEN


class Recorder:
    """What a Listener told its caller, as awaitable events."""

    def __init__(self) -> None:
        self.notes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.reconnected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.reconnects = 0
        self.disconnects: list[DatabaseUnavailable] = []

    def on_notify(self, channel: str, payload: str) -> None:
        self.notes.put_nowait((channel, payload))

    def on_reconnect(self) -> None:
        self.reconnects += 1
        self.reconnected.set()

    def on_disconnect(self, error: DatabaseUnavailable) -> None:
        self.disconnects.append(error)
        self.disconnected.set()

    async def next(self) -> tuple[str, str]:
        return await asyncio.wait_for(self.notes.get(), WAIT)


@contextlib.asynccontextmanager
async def listening(settings: PgSettings, *channels: str, **kw: float) -> AsyncIterator[Any]:
    rec = Recorder()
    listener = Listener(
        settings,
        channels,
        rec.on_notify,
        on_reconnect=rec.on_reconnect,
        on_disconnect=rec.on_disconnect,
        **kw,
    )
    await listener.start()
    try:
        yield listener, rec
    finally:
        await listener.stop()


async def _notify(url: str, channel: str, payload: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
    finally:
        await conn.close()


async def test_listener_delivers_notifications_in_order(pg_url: str) -> None:
    settings = PgSettings.from_url(pg_url)
    async with listening(settings, "opscore_a", "opscore_b") as (listener, rec):
        assert listener.connected
        sender = await asyncpg.connect(pg_url)
        try:
            for i in range(20):
                await sender.execute("SELECT pg_notify($1, $2)", f"opscore_{'ab'[i % 2]}", str(i))
            got = [await rec.next() for _ in range(20)]
            assert got == [(f"opscore_{'ab'[i % 2]}", str(i)) for i in range(20)]
            await listener.listen("opscore_c")
            await listener.unlisten("opscore_a")
            await sender.execute("SELECT pg_notify('opscore_a', 'dropped')")
            await sender.execute("SELECT pg_notify('opscore_c', 'new')")
            assert await rec.next() == ("opscore_c", "new")
        finally:
            await sender.close()
        assert rec.notes.empty() and rec.reconnects == 0


def test_channel_names_are_checked() -> None:
    settings = PgSettings.from_url("postgresql://u@h/db")
    with pytest.raises(ValueError, match="lower-case identifier"):
        Listener(settings, ["bad channel; DROP"], lambda c, p: None)


async def test_listener_reconnects_after_an_immediate_restart(pg: PgCluster, pg_url: str) -> None:
    settings = PgSettings.from_url(
        pg_url, reconnect_backoff_min="20ms", reconnect_backoff_max="200ms"
    )
    async with listening(settings, "opscore_wake") as (listener, rec):
        await _notify(pg_url, "opscore_wake", "before")
        assert await rec.next() == ("opscore_wake", "before")
        pg.restart()  # -m immediate
        await asyncio.wait_for(rec.reconnected.wait(), WAIT)
        assert rec.disconnected.is_set() and rec.disconnects
        assert f"127.0.0.1:{pg.port}" in rec.disconnects[0].message
        assert listener.connected and listener.reconnects == rec.reconnects == 1
        # LISTEN again on the new connection: notifications flow as before.
        await _notify(pg_url, "opscore_wake", "after")
        assert await rec.next() == ("opscore_wake", "after")


async def test_listener_waits_out_an_outage_and_listens_on_channels_added_meanwhile(
    pg: PgCluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.storage.postgres")
    settings = PgSettings.from_url(
        pg_url, reconnect_backoff_min="20ms", reconnect_backoff_max="100ms"
    )
    async with listening(settings, "opscore_one") as (listener, rec):
        pg.stop()
        try:
            await asyncio.wait_for(rec.disconnected.wait(), WAIT)
            assert not listener.connected
            await listener.listen("opscore_two")  # recorded, LISTENed on reconnecting
            # Attempts fail while it is down; none is reported as a reconnection.
            await eventually(
                lambda: sum("still unreachable" in r.getMessage() for r in caplog.records) >= 3,
                timeout=WAIT,
                what="three failed reconnection attempts",
            )
            assert not rec.reconnected.is_set() and not listener.connected
        finally:
            pg.start()
        await asyncio.wait_for(rec.reconnected.wait(), WAIT)
        assert listener.reconnects == 1
        await _notify(pg_url, "opscore_two", "x")
        await _notify(pg_url, "opscore_one", "y")
        assert [await rec.next(), await rec.next()] == [("opscore_two", "x"), ("opscore_one", "y")]


class FreezingProxy:
    """TCP proxy to PostgreSQL that can stop forwarding without closing anything:
    what a lost network looks like to the client."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # hold it: no data, no close
                dst.write(data)
                await dst.drain()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            up_writer.close()


async def test_listener_drops_a_connection_that_stops_answering(pg: PgCluster, pg_url: str):
    proxy = FreezingProxy(pg.port)
    await proxy.start()
    try:
        url = pg_url.replace(f"127.0.0.1:{pg.port}", f"127.0.0.1:{proxy.port}")
        settings = PgSettings.from_url(
            url, connect_timeout="300ms", reconnect_backoff_min="20ms", reconnect_backoff_max="50ms"
        )
        async with listening(settings, "opscore_wake", keepalive=0.2) as (listener, rec):
            proxy.frozen.set()  # nothing closes; only the keepalive ping can notice
            await asyncio.wait_for(rec.disconnected.wait(), WAIT)
            assert "did not answer" in rec.disconnects[0].message
            proxy.frozen.clear()
            await asyncio.wait_for(rec.reconnected.wait(), WAIT)
            await _notify(pg_url, "opscore_wake", "through")
            assert await rec.next() == ("opscore_wake", "through")
            assert listener.connected
    finally:
        await proxy.close()


async def test_stopping_the_listener_closes_its_connection(pg: PgCluster, pg_url: str) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    settings = PgSettings.from_url(pg_url + "?application_name=opscore_listener_test")
    async with listening(settings, "opscore_x") as (listener, _rec):
        count = (
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE datname = '{dbname}' AND application_name = 'opscore_listener_test'"
        )
        assert pg.sql(count) == "1"
    assert not listener.connected
    await listener.stop()  # twice is fine
    # The server's backend exits just after the socket closes.
    await eventually(lambda: pg.sql(count) == "0", what="the LISTEN backend to exit")


async def test_a_connection_never_released_does_not_hold_the_store_closing(
    pg: PgCluster, pg_migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg's Pool.close() waits for every connection to come back, without
    # end; one lost to a query cancelled at the wrong moment once held a test
    # server's stop past its 120 s timeout. Here the lost connection is made so.
    monkeypatch.setattr(pg_backend, "CLOSE_STEP_TIMEOUT", 0.5)
    dbname = pg_migrated_url.rsplit("/", 1)[1]
    store = PostgresStorage(pg_migrated_url + "?application_name=opscore_close_test")
    await store.open()
    assert store._pool is not None
    await store._pool.acquire()
    await asyncio.wait_for(store.close(), WAIT)
    count = (
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE datname = '{dbname}' AND application_name = 'opscore_close_test'"
    )
    await eventually(lambda: pg.sql(count) == "0", what="the pool's backends to exit")


def test_sqlite_only_settings_are_refused_with_postgresql():
    url = "postgresql://opscore@db:5432/opscore"
    with pytest.raises(ConfigError, match="--sync applies to SQLite only"):
        from_sources({"db": url, "sync": "normal"}, env={})
    with pytest.raises(ConfigError, match="--max-db-bytes applies to SQLite only"):
        from_sources({"db": url}, env={"OPSCORE_MAX_DB_BYTES": "1000000"})
    assert from_sources({"db": url}, env={}).db == url
    assert from_sources({"db": "x.db", "sync": "normal"}, env={}).sync == "normal"
