"""The SQLite backend: one process owns the file and keeps the open state in memory."""

from opscore.storage.sqlite.backend import SQLiteStorage
from opscore.storage.sqlite.migrate import SCHEMA_VERSION, apply_migrations, migrations
from opscore.storage.sqlite.store import Store

__all__ = ["SCHEMA_VERSION", "SQLiteStorage", "Store", "apply_migrations", "migrations"]
