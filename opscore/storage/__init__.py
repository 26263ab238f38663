"""Storage: one interface (opscore.storage.api) the engines use, one package per
backend (opscore.storage.sqlite, opscore.storage.postgres)."""

from opscore.storage.api import Storage, Tx

__all__ = ["Storage", "Tx", "is_postgres", "open_storage", "sqlite_path"]


def is_postgres(url: str) -> bool:
    """Whether a --db value names a PostgreSQL database (else an SQLite file)."""
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_path(url: str) -> str:
    """The file of an SQLite --db value: a path, `sqlite:PATH` or `sqlite:///PATH`."""
    for prefix in ("sqlite:///", "sqlite://", "sqlite:"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def open_storage(url: str, **options: object) -> Storage:
    """The backend for a --db value: a PostgreSQL URL, or an SQLite file path
    (also as `sqlite:PATH` or `sqlite:///PATH`). `replica_address` (the address
    this server serves, shown to operators) means something only to PostgreSQL,
    where several replicas share the database."""
    address = options.pop("replica_address", "")
    if is_postgres(url):
        from opscore.storage.postgres.backend import PostgresStorage

        return PostgresStorage(url, replica_address=str(address), **options)  # type: ignore[arg-type,return-value]
    from opscore.storage.sqlite.backend import SQLiteStorage

    return SQLiteStorage(sqlite_path(url), **options)  # type: ignore[arg-type,return-value]
