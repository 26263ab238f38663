"""`opscore db`: maintenance of the server's database, with the servers stopped.

These commands talk to no server: they open the database themselves, and
refuse an SQLite file while a server holds it (the same lock `opscore serve`
takes).
"""

from __future__ import annotations

import asyncio
import sys

import click

from opscore.config import DEFAULT_DB
from opscore.errors import ConfigError, OpsCoreError
from opscore.storage import is_postgres, sqlite_path


@click.group()
def db() -> None:
    """The server's database (stop the server first)."""


@db.command()
@click.option(
    "--from",
    "source",
    envvar="OPSCORE_DB",
    show_envvar=True,
    default=DEFAULT_DB,
    show_default=True,
    help="The SQLite file, as given to `opscore serve --db`.",
)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="URL",
    help="An empty PostgreSQL database: postgresql://user@host:5432/dbname.",
)
def copy(source: str, target: str) -> None:
    """Copy every row of an SQLite database into an empty PostgreSQL one.

    The way from one server on a file to replicas on PostgreSQL: stop the
    server, copy, then start the servers with `--db URL`. Agents, their
    history, tasks (queued ones keep their order, leases their deadlines),
    attempts, definitions and sessions (running ones go on) all move; the
    file is left as it was (upgraded to this version's schema if it was
    older). The copy is one transaction: if it fails, the target stays empty
    and it can be run again.
    """
    from opscore.storage.copy import copy_sqlite_to_postgres
    from opscore.storage.postgres.pool import PgSettings

    def progress(table: str, rows: int) -> None:
        click.echo(f"  {table}: {rows} rows...", err=True)

    try:
        display = PgSettings.from_url(target).display
        result = asyncio.run(copy_sqlite_to_postgres(source, target, progress=progress))
    except (ConfigError, OpsCoreError, OSError) as exc:  # OpsCoreError: PostgreSQL unreachable
        click.echo(f"opscore db copy: {exc}", err=True)
        sys.exit(1)
    if result.source_upgraded_from is not None:
        click.echo(f"upgraded {source} from schema version {result.source_upgraded_from}")
    click.echo(f"copied {source} into {display}:")
    for table, rows in result.rows.items():
        click.echo(f"  {table}: {rows}")


@db.command()
@click.option(
    "--db",
    "path",
    envvar="OPSCORE_DB",
    show_envvar=True,
    default=DEFAULT_DB,
    show_default=True,
    help="The database file, as given to `opscore serve --db`.",
)
def vacuum(path: str) -> None:
    """Rewrite an SQLite file compactly, with incremental auto-vacuum from then on.

    A database created by an Ops-Core without retention reuses the space that
    retention frees but never gives it back to the file system; this converts
    it, once (the server does it by itself at start for small files). Takes
    about as long as copying the file, and needs as much free disk space again.
    """
    if is_postgres(path):
        click.echo(
            "opscore db vacuum: PostgreSQL reclaims space with autovacuum; nothing to do",
            err=True,
        )
        sys.exit(2)
    from opscore.storage.sqlite.retention import vacuum as run_vacuum

    path = sqlite_path(path)  # as `opscore serve --db` reads it
    try:
        before, after = run_vacuum(path)
    except ConfigError as exc:
        click.echo(f"opscore db vacuum: {exc}", err=True)
        sys.exit(1)
    click.echo(f"vacuumed {path}: {_mib(before)} -> {_mib(after)}; incremental auto-vacuum is on")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
