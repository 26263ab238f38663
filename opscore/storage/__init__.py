"""Storage: the schema, its migrations and every SQL statement live here."""

from opscore.storage.store import SCHEMA_VERSION, Store, apply_migrations, migrations

__all__ = ["SCHEMA_VERSION", "Store", "apply_migrations", "migrations"]
