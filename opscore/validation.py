"""Checks shared by the engines. Each raises InvalidArgument naming the field."""

from __future__ import annotations

import re
from datetime import timedelta

from opscore import limits
from opscore.errors import InvalidArgument

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CAPABILITY = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")

MAX_PAYLOAD = limits.MAX_PAYLOAD_BYTES
MAX_DETAILS = limits.MAX_DETAILS_BYTES


def require_id(value: str, field: str, *, what: str = "id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if not _ID.match(value):
        raise InvalidArgument(
            f"{field} {value[:64]!r} is not a valid {what}: use 1-128 characters of "
            "letters, digits and . _ : -",
            field=field,
        )
    return value


def capability(value: str, field: str) -> str:
    if not _CAPABILITY.match(value):
        raise InvalidArgument(
            f"{field} {value[:64]!r} is not a valid capability: use 1-128 characters of "
            "letters, digits and . _ : / -",
            field=field,
        )
    return value


def capabilities(values: list[str], field: str, *, limit: int = 64) -> tuple[str, ...]:
    if len(values) > limit:
        raise InvalidArgument(f"{field} has {len(values)} entries; at most {limit}", field=field)
    seen: dict[str, None] = {}
    for i, v in enumerate(values):
        capability(v, f"{field}[{i}]")
        seen[v] = None
    return tuple(seen)


def max_len(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is {len(value)} characters long; at most {limit}", field=field
        )
    return value


def metadata(values: dict[str, str], field: str = "metadata") -> dict[str, str]:
    if len(values) > 64:
        raise InvalidArgument(f"{field} has {len(values)} entries; at most 64", field=field)
    for k, v in values.items():
        if not k:
            raise InvalidArgument(f"{field} has an empty key", field=field)
        max_len(k, f"{field} key {k[:32]!r}", 128)
        max_len(v, f"{field}[{k[:32]!r}]", 1024)
    return dict(values)


def payload_size(data: bytes | None, field: str, limit: int = MAX_PAYLOAD) -> None:
    if data is not None and len(data) > limit:
        raise InvalidArgument(
            f"{field} is {len(data)} bytes serialized; at most {limit}", field=field
        )


def duration(d: timedelta | None, field: str, limit: timedelta, *, positive: bool = False) -> None:
    """A duration that is set must be within 0 (exclusive if `positive`) and `limit`."""
    if d is None:
        return
    if positive and d <= timedelta(0):
        raise InvalidArgument(f"{field} must be positive when set", field=field)
    if d < timedelta(0):
        raise InvalidArgument(f"{field} must not be negative", field=field)
    if d > limit:
        raise InvalidArgument(f"{field} must be at most {_human(limit)}", field=field)


def _human(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size} {unit} ({seconds} s)"
    return f"{seconds} s"
