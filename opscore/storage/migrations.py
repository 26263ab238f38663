"""A backend's numbered migrations (`<backend>/migrations/NNNN_name.sql`), as
shipped with the package. Each backend applies them its own way
(sqlite/migrate.py, postgres/migrate.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def shipped(package: str, what: str) -> list[Migration]:
    """The migrations in `package`'s migrations/ folder, in order; numbered 1..n
    without a gap, or RuntimeError (`what` names the backend in it)."""
    found: list[Migration] = []
    for entry in (resources.files(package) / "migrations").iterdir():
        name = entry.name
        if name.endswith(".sql"):
            found.append(Migration(int(name.split("_", 1)[0]), name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{what} migrations are not numbered 1..n: {[m.name for m in found]}")
    return found
