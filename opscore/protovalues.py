"""Protobuf well-known values (Timestamp, Duration, Struct) to and from domain
values, with the checks every request's values get at the edge: in range for the
protobuf spec, and payloads that are JSON-like. No gRPC here: the workflow
definitions use it too."""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from opscore import limits
from opscore.errors import InvalidArgument

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


# ts() and dur() run several times per task on the hot path; protobuf's
# FromDatetime/FromTimedelta are pure Python and several times slower than this.
def ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    seconds, micros = divmod((dt - _EPOCH) // _MICRO, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def set_ts(msg: timestamp_pb2.Timestamp, dt: datetime) -> None:
    """Write `dt` into a message's Timestamp field in place (no copy)."""
    seconds, micros = divmod((dt - _EPOCH) // _MICRO, 1_000_000)
    msg.seconds = seconds
    if micros:
        msg.nanos = micros * 1000


def from_ts(msg: object, field: str, prefix: str = "") -> datetime | None:
    """A request's Timestamp, refused unless it is one the protobuf spec allows."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: timestamp_pb2.Timestamp = getattr(msg, field)
    if not (
        limits.MIN_TIMESTAMP_SECONDS <= value.seconds <= limits.MAX_TIMESTAMP_SECONDS
        and 0 <= value.nanos <= 999_999_999
    ):
        raise InvalidArgument(
            f"{prefix}{field} is not a valid timestamp: seconds must be within years "
            "0001-9999 and nanos within 0..999999999",
            field=prefix + field,
        )
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def dur(td: timedelta | None) -> duration_pb2.Duration | None:
    if td is None:
        return None
    return _dur(td)


@functools.lru_cache(maxsize=1024)
def _dur(td: timedelta) -> duration_pb2.Duration:
    # Cached: a handful of distinct timeouts recur on every task. Callers only
    # pass the message to constructors, which copy it.
    micros = td // _MICRO
    sign = -1 if micros < 0 else 1
    seconds, rest = divmod(abs(micros), 1_000_000)
    return duration_pb2.Duration(seconds=sign * seconds, nanos=sign * rest * 1000)


def from_dur(msg: object, field: str, prefix: str = "") -> timedelta | None:
    """A request's Duration, refused unless the protobuf spec allows it. Each field's
    own bound (a timeout of at most 30 days, ...) is checked by the engines."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: duration_pb2.Duration = getattr(msg, field)
    seconds, nanos = value.seconds, value.nanos
    if not (
        abs(seconds) <= limits.MAX_DURATION_SECONDS
        and -999_999_999 <= nanos <= 999_999_999
        and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))
    ):
        raise InvalidArgument(
            f"{prefix}{field} is not a valid duration: at most "
            f"{limits.MAX_DURATION_SECONDS} seconds, nanos within +-999999999 and of "
            "the same sign as seconds",
            field=prefix + field,
        )
    # FromTimedelta/ToTimedelta lose sign information for tiny negatives; compute
    # from the raw fields so validation sees what the client sent.
    return timedelta(seconds=seconds, microseconds=int(nanos / 1000))


def struct(payload: bytes | None) -> struct_pb2.Struct | None:
    if payload is None:
        return None
    s = struct_pb2.Struct()
    s.ParseFromString(payload)
    return s


def payload(msg: object, field: str, prefix: str = "") -> bytes | None:
    """A request's Struct as stored bytes, refused if it is not JSON-like: nested
    deeper than MAX_PAYLOAD_DEPTH, or holding a NaN or an infinity."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: struct_pb2.Struct = getattr(msg, field)
    data = value.SerializeToString(deterministic=True)
    if _may_not_be_json_like(data):
        problem = _not_json_like(value)
        if problem:
            raise InvalidArgument(f"{prefix}{field} {problem}", field=prefix + field)
    return data


# A double is stored as tag 0x11 (Value.number_value, fixed64) and 8 bytes, little
# endian; NaN and the infinities have all 11 exponent bits set. Every non-finite
# number matches; a match may also be other bytes (inside a string, say).
_MAYBE_NON_FINITE = re.compile(rb"\x11.{6}[\xf0-\xff][\x7f\xff]", re.DOTALL)
# Each level of nesting takes at least 4 bytes (a Value's tag and length, its
# struct_value or list_value tag and length), so a smaller payload cannot be too
# deep; nor can one without a struct_value (0x2a) or list_value (0x32) tag byte.
_TOO_SMALL_TO_NEST = 4 * limits.MAX_PAYLOAD_DEPTH


def _may_not_be_json_like(data: bytes) -> bool:
    """False when the serialized Struct `data` certainly passes _not_json_like:
    the walk over every value (3.3 us for a two-field payload) is then skipped."""
    if _MAYBE_NON_FINITE.search(data) is not None:
        return True
    return len(data) >= _TOO_SMALL_TO_NEST and (b"\x2a" in data or b"\x32" in data)


def _not_json_like(root: struct_pb2.Struct) -> str:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.MAX_PAYLOAD_DEPTH:
            return f"is nested more than {limits.MAX_PAYLOAD_DEPTH} levels deep"
        values = node.fields.values() if isinstance(node, struct_pb2.Struct) else node.values
        for v in values:
            kind = v.WhichOneof("kind")
            if kind == "struct_value":
                stack.append((v.struct_value, depth + 1))
            elif kind == "list_value":
                stack.append((v.list_value, depth + 1))
            elif kind == "number_value" and not math.isfinite(v.number_value):
                return "holds a number that is not finite (NaN or infinity); JSON has none"
    return ""
