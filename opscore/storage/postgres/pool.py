"""Connections to PostgreSQL: settings from a URL, the pool, and a LISTEN helper.

    settings = PgSettings.from_url("postgresql://opscore@db:5432/opscore?pool_size=20")
    pool = await create_pool(settings)
    listener = Listener(settings, ["opscore_tasks"], on_notify, on_reconnect=rescan)
    await listener.start()

Settings are explicit and have defaults (DEFAULTS); each may be given in the URL's
query or by the caller, the caller winning (a command-line option beats the URL).
The URL's other query parameters are libpq's (sslmode, target_session_attrs, ...)
or run-time parameters of the server's sessions (application_name, search_path).

The password never reaches a log line, an error or a repr: it is taken out of the
URL at once and handed to the driver apart. Every error describes the server by
`PgSettings.display` (user@host:port/db) and says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import asyncpg

from opscore.errors import ConfigError, Unavailable

log = logging.getLogger("opscore.storage.postgres")

SCHEMES = ("postgresql", "postgres")

# name -> (default, kind, lower bound, upper bound); durations in seconds.
DEFAULTS: dict[str, tuple[float, str, float, float]] = {
    # Connections each replica's pool may open (PostgreSQL's max_connections must
    # cover every replica's pool plus one LISTEN connection each).
    "pool_size": (10, "int", 1, 1000),
    "pool_min_size": (1, "int", 0, 1000),
    # Longest a statement may run on the server before it is cancelled; the client
    # gives up a little later still (a server that no longer answers). 0: no limit.
    "statement_timeout": (30.0, "duration", 0, 24 * 3600),
    # Longest a new connection may take, TLS and authentication included.
    "connect_timeout": (5.0, "duration", 0.001, 600),
    # Waits between attempts to reconnect: doubling from min to max, with jitter.
    "reconnect_backoff_min": (0.1, "duration", 0.001, 600),
    "reconnect_backoff_max": (5.0, "duration", 0.001, 3600),
    # A replica that has not heartbeaten for this long is dead: the others forget
    # its streams (its agents then have agent_timeout to reconnect elsewhere).
    # Replicas heartbeat five times per period.
    "replica_timeout": (10.0, "duration", 0.5, 3600),
}
# How much longer than statement_timeout the client waits for an answer.
CLIENT_TIMEOUT_MARGIN = 5.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class PgSettings:
    """Where the database is and how to talk to it. The password is never shown."""

    # The URL without password and without Ops-Core's own parameters. Not shown
    # either: its query may hold other secrets (sslpassword).
    dsn: str = field(repr=False)
    display: str  # user@host:port/db, for logs and errors
    user: str
    database: str
    pool_size: int
    pool_min_size: int
    statement_timeout: float
    connect_timeout: float
    reconnect_backoff_min: float
    reconnect_backoff_max: float
    replica_timeout: float = 10.0
    password: str | None = field(default=None, repr=False)
    server_settings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_url(cls, url: str, **overrides: float | int | str | None) -> PgSettings:
        """Parse a postgresql:// (or postgres://) URL. `overrides` (any of DEFAULTS,
        None meaning "not given") win over the URL's query; the defaults fill in."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ConfigError(
                f"not a PostgreSQL URL (scheme {parts.scheme or 'missing'!r}): use "
                "postgresql://user@host:5432/dbname"
            )
        userinfo, _, hosts = parts.netloc.rpartition("@")
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user)
        password = unquote(raw_password) if colon else None
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if "password" in query:
            password = query.pop("password")
        user = user or query.pop("user", "")
        # libpq's name for it; as a URL parameter asyncpg would send it to the server.
        if "connect_timeout" in query and overrides.get("connect_timeout") is None:
            overrides["connect_timeout"] = query["connect_timeout"]
        query.pop("connect_timeout", None)
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown PostgreSQL settings: {sorted(unknown)}")
        values: dict[str, float] = {}
        for name, (default, kind, low, high) in DEFAULTS.items():
            raw = overrides.get(name)
            source = "setting"
            if raw is None and name in query:
                raw, source = query[name], "URL parameter"
            query.pop(name, None)
            values[name] = default if raw is None else _parse(name, raw, kind, low, high, source)
        if values["pool_min_size"] > values["pool_size"]:
            raise ConfigError(
                f"PostgreSQL pool_min_size ({values['pool_min_size']:g}) is larger than "
                f"pool_size ({values['pool_size']:g})"
            )
        if values["reconnect_backoff_min"] > values["reconnect_backoff_max"]:
            raise ConfigError(
                "PostgreSQL reconnect_backoff_min is larger than reconnect_backoff_max"
            )
        database = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or user
        host_text = hosts or query.get("host", "") or os.environ.get("PGHOST", "localhost")
        display = f"{user + '@' if user else ''}{host_text}/{database}"
        # Sessions name themselves in pg_stat_activity unless the URL says otherwise.
        server_settings = {"application_name": query.pop("application_name", "opscore")}
        dsn = f"{parts.scheme}://{quote(user, safe='') + '@' if user else ''}{hosts}{parts.path}"
        if query:
            dsn += "?" + urlencode(query)
        return cls(
            dsn=dsn,
            display=display,
            user=user,
            database=database,
            pool_size=int(values["pool_size"]),
            pool_min_size=int(values["pool_min_size"]),
            statement_timeout=values["statement_timeout"],
            connect_timeout=values["connect_timeout"],
            reconnect_backoff_min=values["reconnect_backoff_min"],
            reconnect_backoff_max=values["reconnect_backoff_max"],
            replica_timeout=values["replica_timeout"],
            password=password,
            server_settings=server_settings,
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """What asyncpg.connect and create_pool take, for one connection."""
        server_settings = dict(self.server_settings)
        server_settings["statement_timeout"] = str(int(self.statement_timeout * 1000))
        return {
            "dsn": self.dsn,
            "password": self.password,
            "timeout": self.connect_timeout,
            "command_timeout": (
                self.statement_timeout + CLIENT_TIMEOUT_MARGIN if self.statement_timeout else None
            ),
            "server_settings": server_settings,
        }


def _parse(name: str, raw: object, kind: str, low: float, high: float, source: str) -> float:
    """One setting's value, or a ConfigError that names it and says what is allowed."""
    what = f"PostgreSQL {source} {name}={raw!r}"
    value: float
    if kind == "int":
        try:
            value = int(str(raw))
        except ValueError:
            raise ConfigError(f"{what} is not a whole number") from None
        if not low <= value <= high:
            raise ConfigError(f"{what} must be between {low:g} and {high:g}")
        return value
    if isinstance(raw, int | float):
        value = float(raw)
    else:
        match = _DURATION.match(str(raw))
        if match is None:
            raise ConfigError(
                f"{what} is not a duration: give seconds (5, 0.5) or a number with a "
                "unit (250ms, 5s, 2min, 1h)"
            )
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{what} must be between {low:g}s and {high:g}s")
    return value


# --------------------------------------------------------------------------- errors


class DatabaseUnavailable(Unavailable):
    """PostgreSQL cannot be reached or refuses us. `permanent` when retrying cannot
    help until someone changes something (a wrong password, a missing database)."""

    reason = "DATABASE_UNAVAILABLE"

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})


def is_connection_error(exc: BaseException) -> bool:
    """The connection or the server went away (or never came): the statement may or
    may not have been applied, and a caller must not acknowledge it as done."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.PostgresConnectionError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate in _DISCONNECT_STATES
    # asyncpg's word for a connection it has already seen close.
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


def connect_error(exc: BaseException, settings: PgSettings) -> DatabaseUnavailable | None:
    """A precise error for a failure to connect, or None if `exc` is something else."""
    where = settings.display
    message: str
    permanent = False
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        message = (
            f"PostgreSQL at {where} refused the connection: is it running and "
            "listening on that address and port?"
        )
    elif isinstance(exc, TimeoutError):
        message = (
            f"PostgreSQL at {where} did not answer within {settings.connect_timeout:g}s "
            "(connect_timeout): is the host up and reachable?"
        )
    elif isinstance(exc, socket.gaierror):
        message = f"PostgreSQL host in {where} could not be resolved: {exc.strerror}"
    elif isinstance(exc, asyncpg.InvalidPasswordError):
        message = (
            f"PostgreSQL at {where} rejected the password of user {settings.user!r}: "
            "fix the password (URL, PGPASSWORD or ~/.pgpass)"
        )
        permanent = True
    elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        message = f"PostgreSQL at {where} refused user {settings.user!r}: {_server_text(exc)}"
        permanent = True
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        message = (
            f"PostgreSQL at {where} has no database {settings.database!r}: create it "
            "(createdb) or fix the URL"
        )
        permanent = True
    elif isinstance(exc, asyncpg.TooManyConnectionsError):
        message = (
            f"PostgreSQL at {where} has no connection slots left ({_server_text(exc)}): "
            "lower pool_size or raise the server's max_connections"
        )
    elif isinstance(exc, asyncpg.CannotConnectNowError):
        message = f"PostgreSQL at {where} is not accepting connections yet: {_server_text(exc)}"
    elif isinstance(exc, OSError):
        message = f"cannot reach PostgreSQL at {where}: {exc.strerror or exc}"
    elif is_connection_error(exc):
        message = f"lost the connection to PostgreSQL at {where}: {exc}"
    else:
        return None
    return DatabaseUnavailable(message, permanent=permanent)


def _server_text(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)


# --------------------------------------------------------------------------- connecting


async def connect(settings: PgSettings) -> asyncpg.Connection:
    """One connection (migrations, LISTEN), or a DatabaseUnavailable that says why not."""
    try:
        return await asyncpg.connect(**settings.connect_kwargs())
    except Exception as exc:
        error = connect_error(exc, settings)
        if error is None:
            raise
        raise error from None


async def create_pool(settings: PgSettings) -> asyncpg.Pool:
    """The pool every statement of a replica runs on. Its first connections are
    opened now, so a wrong URL or an unreachable server fails here, clearly.

    Later, connections that broke (a database restart) are replaced as they are
    next acquired; a statement on one that was broken fails with an error for
    which is_connection_error() is true.
    """
    try:
        pool = await asyncpg.create_pool(
            min_size=settings.pool_min_size,
            max_size=settings.pool_size,
            **settings.connect_kwargs(),
        )
    except Exception as exc:
        error = connect_error(exc, settings)
        if error is None:
            raise
        raise error from None
    log.info(
        "connected to PostgreSQL",
        extra={"database": settings.display, "pool_size": settings.pool_size},
    )
    return pool


class Backoff:
    """Waits between attempts: doubling from `first` to `cap`, each one shortened by
    up to `jitter` at random so that replicas cut off together do not retry in step."""

    def __init__(self, first: float, cap: float, *, jitter: float = 0.25) -> None:
        self.first, self.cap, self.jitter = first, cap, jitter
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * (1 - self.jitter * random.random())

    def reset(self) -> None:
        self._next = self.first


# --------------------------------------------------------------------------- LISTEN

KEEPALIVE_INTERVAL = 10.0
_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class Listener:
    """One dedicated connection LISTENing on named channels, kept alive.

    `on_notify(channel, payload)` is called for every notification, in order. When
    the connection is lost (the server restarted, the network failed) the listener
    calls `on_disconnect(error)`, reconnects with backoff for as long as it runs,
    LISTENs again on every channel, and then calls `on_reconnect()`: the caller
    re-reads whatever state a notification could have told it about, because
    notifications sent while it was disconnected are lost. Changes committed after
    LISTEN succeeded arrive as notifications; those before it are found by that
    re-read; so together nothing is missed.

    A connection that is idle is pinged every `keepalive` seconds (a lost network
    closes nothing); one that does not answer within connect_timeout is dropped.
    Callbacks run on the event loop and must not block; an exception in one is
    logged and does not stop the listener.
    """

    def __init__(
        self,
        settings: PgSettings,
        channels: Iterable[str],
        on_notify: Callable[[str, str], None],
        *,
        on_reconnect: Callable[[], None] | None = None,
        on_disconnect: Callable[[DatabaseUnavailable], None] | None = None,
        keepalive: float = KEEPALIVE_INTERVAL,
    ) -> None:
        self.settings = settings
        self.channels: set[str] = set()
        for channel in channels:
            self.channels.add(_check_channel(channel))
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.on_disconnect = on_disconnect
        self.keepalive = keepalive
        self.reconnects = 0
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()  # a new one per connection: see _open
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def start(self) -> None:
        """Connect and LISTEN, or raise DatabaseUnavailable; then keep it so."""
        if self._task is not None:
            return
        await self._open()
        self._task = asyncio.create_task(self._run(), name="opscore-pg-listener")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    async def listen(self, channel: str) -> None:
        """LISTEN on one more channel (now if connected, else on reconnecting)."""
        self.channels.add(_check_channel(channel))
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(Exception):  # a lost connection re-LISTENs all
                await conn.add_listener(channel, self._deliver)

    async def unlisten(self, channel: str) -> None:
        self.channels.discard(channel)
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(Exception):
                await conn.remove_listener(channel, self._deliver)

    # ---- internals

    async def _open(self) -> None:
        conn = await connect(self.settings)
        try:
            for channel in sorted(self.channels):
                await conn.add_listener(channel, self._deliver)
        except BaseException as exc:
            conn.terminate()
            error = connect_error(exc, self.settings)
            if error is None:
                raise
            raise error from None
        # Its own event: a late termination callback of the previous connection
        # must not look like the loss of this one.
        lost = self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        self._conn = conn
        self._connected.set()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        if conn is not None and not conn.is_closed():
            conn.terminate()  # no goodbye: it may be half dead

    async def _run(self) -> None:
        while not self._stopping.is_set():
            error = await self._watch()
            await self._close()
            log.warning(
                "lost the PostgreSQL LISTEN connection; reconnecting",
                extra={"database": self.settings.display, "error": error.message},
            )
            self._call(self.on_disconnect, error)
            await self._reconnect()

    async def _watch(self) -> DatabaseUnavailable:
        """Wait until the connection is lost; ping it while it is idle."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.keepalive)
                return DatabaseUnavailable(
                    f"the connection to PostgreSQL at {self.settings.display} was closed"
                )
            except TimeoutError:
                pass
            conn = self._conn
            assert conn is not None
            try:
                await conn.fetchval("SELECT 1", timeout=self.settings.connect_timeout)
            except Exception as exc:
                return connect_error(exc, self.settings) or DatabaseUnavailable(
                    f"PostgreSQL at {self.settings.display} did not answer a ping: {exc}"
                )

    async def _reconnect(self) -> None:
        backoff = Backoff(self.settings.reconnect_backoff_min, self.settings.reconnect_backoff_max)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.next())
            if self._stopping.is_set():
                return
            try:
                await self._open()
            except Exception as exc:  # whatever it is, this loop must go on
                text = exc.message if isinstance(exc, DatabaseUnavailable) else repr(exc)
                log.info(
                    "PostgreSQL still unreachable",
                    extra={"database": self.settings.display, "error": text},
                )
                continue
            self.reconnects += 1
            log.info(
                "PostgreSQL LISTEN connection is back",
                extra={"database": self.settings.display, "reconnects": self.reconnects},
            )
            self._call(self.on_reconnect)
            return

    def _deliver(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._call(self.on_notify, channel, payload)

    def _call(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("a PostgreSQL listener callback failed")


def _check_channel(channel: str) -> str:
    if not _CHANNEL.match(channel):
        raise ValueError(
            f"LISTEN channel {channel!r} must be a lower-case identifier of at most 63 "
            "characters (letters, digits, _)"
        )
    return channel
