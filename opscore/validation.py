"""Checks shared by the engines. Each raises InvalidArgument naming the field."""

from __future__ import annotations

import re
from datetime import timedelta

from opscore.errors import InvalidArgument

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CAPABILITY = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")

MAX_PAYLOAD = 1024 * 1024
MAX_DETAILS = 64 * 1024


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


def non_negative(d: timedelta | None, field: str) -> None:
    if d is not None and d < timedelta(0):
        raise InvalidArgument(f"{field} must not be negative", field=field)


def positive(d: timedelta | None, field: str) -> None:
    if d is not None and d <= timedelta(0):
        raise InvalidArgument(f"{field} must be positive when set", field=field)
