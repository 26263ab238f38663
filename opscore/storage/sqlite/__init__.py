"""The SQLite backend: one process owns the file and keeps the open state in memory."""

from opscore.storage.sqlite.backend import SQLiteStorage
from opscore.storage.sqlite.store import SCHEMA_VERSION, Store, apply_migrations, migrations

__all__ = ["SCHEMA_VERSION", "SQLiteStorage", "Store", "apply_migrations", "migrations"]
