"""Storage: one interface (opscore.storage.api) the engines use, one package per
backend (opscore.storage.sqlite, opscore.storage.postgres)."""

from opscore.storage.api import Storage, Tx

__all__ = ["Storage", "Tx", "open_storage"]


def open_storage(url: str, **options: object) -> Storage:
    """The backend for a --db value: a PostgreSQL URL, or an SQLite file path
    (also as `sqlite:PATH` or `sqlite:///PATH`). `replica_address` (the address
    this server serves, shown to operators) means something only to PostgreSQL,
    where several replicas share the database."""
    address = options.pop("replica_address", "")
    if url.startswith(("postgresql://", "postgres://")):
        from opscore.storage.postgres.backend import PostgresStorage

        return PostgresStorage(url, replica_address=str(address), **options)  # type: ignore[arg-type,return-value]
    from opscore.storage.sqlite.backend import SQLiteStorage

    path = url
    for prefix in ("sqlite:///", "sqlite://", "sqlite:"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    return SQLiteStorage(path, **options)  # type: ignore[arg-type,return-value]
