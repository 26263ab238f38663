"""Time helpers: every datetime in Ops-Core is timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_micros(dt: datetime | None) -> int | None:
    """Stored form of a datetime: integer microseconds since the Unix epoch."""
    if dt is None:
        return None
    return (dt - EPOCH) // _MICRO


def from_micros(us: int | None) -> datetime | None:
    if us is None:
        return None
    return EPOCH + us * _MICRO
