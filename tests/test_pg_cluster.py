"""The throwaway PostgreSQL cluster the PostgreSQL tests run on (tests/support/pg.py)."""

from __future__ import annotations

import asyncio
import os
import pwd
import sys
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.support.pg import (
    SERVER_USER,
    PgCluster,
    find_bindir,
)


def _dbname(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def test_settings_fit_for_tests(pg: PgCluster) -> None:
    rows = pg.sql(
        "SELECT name || '=' || setting FROM pg_settings WHERE name IN "
        "('fsync', 'synchronous_commit', 'max_connections', 'listen_addresses', "
        "'unix_socket_directories', 'shared_buffers', 'TimeZone') ORDER BY name"
    ).splitlines()
    settings = dict(r.split("=", 1) for r in rows)
    assert settings["fsync"] == "on"
    assert settings["synchronous_commit"] == "on"
    assert settings["max_connections"] == "200"
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == str(pg.socket_dir)
    assert int(settings["shared_buffers"]) * 8192 <= 64 * 1024 * 1024
    assert settings["TimeZone"] == "UTC"
    assert (pg.socket_dir / f".s.PGSQL.{pg.port}").exists()


def test_server_runs_as_an_unprivileged_user(pg: PgCluster) -> None:
    pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    owner = os.stat(f"/proc/{pid}").st_uid
    assert owner != 0
    expected = pwd.getpwnam(SERVER_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
    assert owner == expected


def test_each_test_gets_its_own_empty_database(pg: PgCluster, pg_url: str) -> None:
    name = _dbname(pg_url)
    assert pg.sql("SELECT count(*) FROM pg_class WHERE relname = 'mine'", name) == "0"
    pg.sql("CREATE TABLE mine (x int)", name)
    other = pg.create_database()
    try:
        assert pg.sql("SELECT count(*) FROM pg_class WHERE relname = 'mine'", other) == "0"
    finally:
        pg.drop_database(other)
    assert other not in pg.sql("SELECT datname FROM pg_database").splitlines()


def test_immediate_restart_keeps_committed_rows_and_the_port(pg: PgCluster, pg_url: str) -> None:
    name = _dbname(pg_url)
    port = pg.port
    pg.sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)", name)
    pid_before = (pg.data_dir / "postmaster.pid").read_text().split()[0]
    recoveries = pg.log_path.read_text().count("automatic recovery in progress")
    pg.restart()  # -m immediate: no shutdown checkpoint, WAL replay at start
    assert pg.port == port
    assert (pg.data_dir / "postmaster.pid").read_text().split()[0] != pid_before
    assert pg.sql("SELECT x FROM kept", name) == "42"
    # It was a crash for the server: it replayed its WAL to get the row back.
    assert pg.log_path.read_text().count("automatic recovery in progress") == recoveries + 1


def test_stop_and_start(pg: PgCluster, pg_url: str) -> None:
    pg.stop()
    assert not pg.running
    pg.start()
    assert pg.running
    assert pg.sql("SELECT 1", _dbname(pg_url)) == "1"


def test_binaries_are_found_off_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian installs them under /usr/lib/postgresql/N/bin, not on the PATH.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = find_bindir()
    assert found is not None and (found / "initdb").exists()
    assert Path("/usr/lib/postgresql") in found.parents


REPO_ROOT = Path(__file__).resolve().parents[1]


async def test_a_killed_test_process_leaves_no_server_behind() -> None:
    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from tests.support.pg import PgCluster\n"
        "c = PgCluster().start()\n"
        "pid = (c.data_dir / 'postmaster.pid').read_text().split()[0]\n"
        "print(c.root, pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -9, err.decode()
    root, pid = out.decode().split()

    def gone() -> bool:
        try:  # a zombie (exited, not yet reaped by init) counts as gone
            running = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            running = False
        return not running and not Path(root).exists()

    await eventually(gone, timeout=30, what="the orphaned cluster to be stopped and removed")
