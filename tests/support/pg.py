"""A throwaway PostgreSQL cluster for tests, benchmarks and scripts.

    with pg_cluster() as pg:              # initdb into a temp dir, start, ..., stop, remove
        url = pg.url(pg.create_database())
        ...
        pg.restart()                      # pg_ctl restart -m immediate: an outage
        pg.stop(); pg.start()             # a longer one

Tests use the fixtures instead: `pg` (the cluster, started once per session),
`pg_url` (a fresh, empty database per test, dropped afterwards) and
`pg_migrated_url` (the same, already at the latest schema: a copy of a template
migrated once per session). They are plain
pytest fixtures, registered for the whole suite by tests/conftest.py
(`pytest_plugins`). Never import them into a test module: pytest would make that
module a session fixture of its own, and so a second cluster.

The cluster is Debian's PostgreSQL (initdb and pg_ctl on the PATH, or under
/usr/lib/postgresql/N/bin), on a free port on 127.0.0.1 only, with its unix socket
in the temp dir. Settings are those of a small durable server: fsync and
synchronous_commit stay on (tests check durability), shared_buffers is small,
max_connections is 200 (several replicas with pools in one test). Logins are
trusted on loopback, except for the role PASSWORD_USER, which must give
PASSWORD (scram-sha-256), so that authentication failures can be tested.

postgres refuses to run as root: as root (CI) every server command runs as the
`postgres` OS user (Debian's postgresql package creates it) through `runuser`,
and the temp dir is handed to it; otherwise as the current user.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from opscore.storage.postgres.migrate import migrate
from opscore.storage.postgres.pool import PgSettings, connect
from tests.support.procserver import free_port

SUPERUSER = "postgres"
PASSWORD_USER = "opscore_pw"
PASSWORD = "not-a-secret-0"
SERVER_USER = "postgres"  # the OS user the server runs as when we are root
COMMAND_TIMEOUT = 60.0

SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'32MB'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_wal_size": "'256MB'",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}

_names = itertools.count(1)

# Runs beside the test process: when that process is gone, however it went (a
# SIGKILL, a CI timeout), the pipe it held closes and this stops the cluster and
# deletes it, so no server outlives its tests. Waits on the pipe, not a timer.
_REAPER = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
subprocess.run(sys.argv[2:], capture_output=True, timeout=120)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
        reverse=True,
    )
    return versions[0].parent if versions else None


class PgCluster:
    """One initdb'd data directory and the server running on it."""

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        bindir = bindir or find_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL is not installed: no initdb on the PATH nor under "
                "/usr/lib/postgresql/*/bin. Run `make test` (it installs Debian's "
                "postgresql as root), or `apt-get install postgresql`"
            )
        self.bindir = bindir
        self.settings = {**SETTINGS, **(settings or {})}
        self.host = "127.0.0.1"
        self.port = 0
        self.root: Path | None = None
        self._migrated_template: str | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root and there is no '{SERVER_USER}' OS user to run "
                    "PostgreSQL as (postgres refuses root); install Debian's postgresql "
                    "package, which creates it"
                ) from None
            self._as = ["runuser", "-u", SERVER_USER, "--"]

    # ---- paths

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "cluster not created"
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "cluster not created"
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "cluster not created"
        return self.root / "postgres.log"

    # ---- lifecycle

    def create(self) -> PgCluster:
        """initdb into a new temp dir (owned by the server's OS user)."""
        if self.root is not None:
            return self
        self.root = Path(tempfile.mkdtemp(prefix="opscore-pg-"))
        self._reaper = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _REAPER,
                str(self.root),
                *self._as,
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                "immediate",
                "-w",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            # Out of the terminal's process group: a Ctrl-C reaches pytest, whose
            # teardown stops the cluster; the reaper stays for what that misses.
            start_new_session=True,
        )
        self.socket_dir.mkdir()
        if self._as:
            entry = pwd.getpwnam(SERVER_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                *self._as,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                # The files initdb writes need no fsync: a crash of the test machine
                # loses the cluster anyway. The running server keeps fsync on.
                "--no-sync",
                "--no-instructions",
            ]
        )
        hba = self.data_dir / "pg_hba.conf"
        self._write_as_server(
            hba,
            "local all all trust\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n",
        )
        return self

    def start(self) -> PgCluster:
        """Start the server (creating the cluster first if needed); waits until it
        accepts connections. Keeps its port across stops and restarts."""
        self.create()
        if self.running:
            return self
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
                self._write_conf()
            try:
                self._pg_ctl("start", "-l", str(self.log_path))
            except RuntimeError:
                # Another process may have taken the free port in between; try another.
                if attempt < 2 and "could not bind" in self.log_tail(20):
                    continue
                raise
            break
        if not (self.data_dir / ".roles-created").exists():
            self.sql(
                f"CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'",
            )
            self._write_as_server(self.data_dir / ".roles-created", "")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (clean) or "immediate" (like a crash: no checkpoint)."""
        if self.root is None or not self.running:
            return
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "immediate") -> None:
        """Stop ("immediate" by default: every connection is cut at once, recovery at
        start) and start again on the same port; returns once it accepts connections."""
        if not self.running:
            self.start()
            return
        self._pg_ctl("restart", "-m", mode, "-l", str(self.log_path))

    def destroy(self) -> None:
        """Stop the server and delete the cluster."""
        if self.root is None:
            return
        try:
            self.stop()
        except RuntimeError:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self._migrated_template = None
            self._release_reaper()

    def _release_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper.stdin is not None:
            reaper.stdin.close()  # it finds nothing left to do and exits
            try:
                reaper.wait(timeout=COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                reaper.kill()
                reaper.wait()

    @property
    def running(self) -> bool:
        if self.root is None:
            return False
        status = subprocess.run(
            [*self._as, str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        return status.returncode == 0

    # ---- databases

    def url(self, dbname: str = "postgres", *, user: str = SUPERUSER, **query: str) -> str:
        """A postgresql:// URL for `dbname` over TCP on loopback."""
        password = f":{quote(PASSWORD)}" if user == PASSWORD_USER else ""
        url = f"postgresql://{quote(user)}{password}@{self.host}:{self.port}/{quote(dbname)}"
        return f"{url}?{urlencode(query)}" if query else url

    def create_database(self, name: str | None = None, *, template: str = "template0") -> str:
        """CREATE DATABASE (a copy of `template`); returns its name."""
        name = name or f"t{os.getpid()}_{next(_names)}_{uuid.uuid4().hex[:6]}"
        _check_identifier(name)
        _check_identifier(template)
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def create_migrated_database(self) -> str:
        """A database at the latest PostgreSQL schema: a copy of a template migrated
        once per cluster (CREATE DATABASE copies it in milliseconds)."""
        if self._migrated_template is None:

            async def build(url: str) -> None:
                conn = await connect(PgSettings.from_url(url))
                try:
                    await migrate(conn)
                finally:
                    await conn.close()

            name = self.create_database(f"opscore_template_{os.getpid()}")
            # Run in a thread: the caller may be inside a running event loop.
            with ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, build(self.url(name))).result()
            self._migrated_template = name
        return self.create_database(template=self._migrated_template)

    def drop_database(self, name: str) -> None:
        _check_identifier(name)
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run SQL with psql as the superuser; returns its unaligned output."""
        out = self._run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                statement,
            ]
        )
        return out.strip()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (FileNotFoundError, AssertionError):
            return "(no postgres log)"
        return "\n".join(text.splitlines()[-lines:])

    # ---- internals

    def _write_conf(self) -> None:
        values = {
            **self.settings,
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
        }
        # postgresql.auto.conf is read last and wins over postgresql.conf.
        body = "".join(f"{key} = {value}\n" for key, value in values.items())
        self._write_as_server(self.data_dir / "postgresql.auto.conf", body)

    def _write_as_server(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._as:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o600)

    def _pg_ctl(self, command: str, *args: str) -> None:
        self._run(
            [
                *self._as,
                str(self.bindir / "pg_ctl"),
                command,
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(COMMAND_TIMEOUT)),
                "-s",
                *args,
            ]
        )

    def _run(self, argv: list[str]) -> str:
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                stdin=subprocess.DEVNULL,
                # The server's own dir is the only one its user may enter.
                cwd=self.root or "/",
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(argv)} timed out\n{self.log_tail()}") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n"
                f"--- postgres log ---\n{self.log_tail()}"
            )
        return done.stdout


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _check_identifier(name: str) -> None:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain database name: {name!r}")


@contextlib.contextmanager
def pg_cluster(**kwargs: object) -> Iterator[PgCluster]:
    """A started throwaway cluster, stopped and deleted on exit."""
    cluster = PgCluster(**kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """The session's cluster. A test that stops or restarts it must leave it running."""
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg: PgCluster) -> Iterator[str]:
    """A fresh, empty database of the session's cluster, dropped after the test."""
    if not pg.running:
        pg.start()  # a previous test stopped it and failed before starting it again
    name = pg.create_database()
    yield pg.url(name)
    if not pg.running:
        pg.start()
    pg.drop_database(name)


@pytest.fixture
def pg_migrated_url(pg: PgCluster) -> Iterator[str]:
    """A fresh database already at the latest PostgreSQL schema, dropped after the test."""
    if not pg.running:
        pg.start()
    name = pg.create_migrated_database()
    yield pg.url(name)
    if not pg.running:
        pg.start()
    pg.drop_database(name)
