"""Conversions between Python values and the protobuf types of the API.

The client accepts Python-native values (dicts for `google.protobuf.Struct`,
`datetime` for timestamps, `timedelta` or seconds for durations, names for
enums) and returns the generated messages; these helpers turn message fields
back into Python values:

    task = await client.get_task(task_id)
    output = to_dict(task.output)            # {"words": 5}
    finished = to_datetime(task, "finish_time")  # aware UTC datetime, or None
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

__all__ = [
    "Seconds",
    "enum_value",
    "from_value",
    "json_like_problem",
    "to_datetime",
    "to_dict",
    "to_duration",
    "to_struct",
    "to_timedelta",
    "to_timestamp",
]

#: A duration: a `timedelta`, or a number of seconds.
Seconds: TypeAlias = timedelta | float | int

# Struct numbers are doubles; integral values within this bound come back as int.
_MAX_SAFE_INT = 2**53


def json_like_problem(value: Any, name: str = "value") -> str | None:
    """Why `value` cannot travel as a `Struct` value, naming the first offending
    key path (`output['when']: datetime is not JSON-like`), or None when it can.

    JSON-like: str keys; str, int, finite float, bool, None, lists (or tuples)
    and dicts of those.
    """
    if value is None or isinstance(value, bool | str | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{name}: {value!r} is not a JSON number"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{name}: key {key!r} is a {type(key).__name__}, not a string"
            problem = json_like_problem(item, f"{name}[{key!r}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = json_like_problem(item, f"{name}[{i}]")
            if problem is not None:
                return problem
        return None
    return f"{name}: {type(value).__name__} is not JSON-like"


def to_struct(
    value: Mapping[str, Any] | struct_pb2.Struct | None, name: str = "value"
) -> struct_pb2.Struct | None:
    """A dict (JSON-like: str keys; str, int, finite float, bool, None, lists,
    dicts) as a `Struct`. None stays None (the field is left unset). Anything
    else raises `TypeError` naming the offending key path under `name`."""
    if value is None:
        return None
    if isinstance(value, struct_pb2.Struct):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a dict, got {type(value).__name__}")
    problem = json_like_problem(value, name)
    if problem is not None:
        raise TypeError(problem)
    s = struct_pb2.Struct()
    try:
        s.update(dict(value))
    except (ValueError, TypeError, AttributeError) as exc:
        raise TypeError(f"{name} is not JSON-like: {exc}") from exc
    return s


def from_value(value: struct_pb2.Value) -> Any:
    """A `google.protobuf.Value` as a Python value; integral numbers become int."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return to_dict(value.struct_value)
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    if kind == "number_value":
        n = value.number_value
        if math.isfinite(n) and n.is_integer() and abs(n) <= _MAX_SAFE_INT:
            return int(n)
        return n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def to_dict(struct: struct_pb2.Struct | None) -> dict[str, Any]:
    """A `Struct` as a dict ({} for an unset or empty one). Numbers are doubles on
    the wire; integral ones come back as int, so `{"n": 3}` round-trips."""
    if struct is None:
        return {}
    return {k: from_value(v) for k, v in struct.fields.items()}


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """An aware `datetime` as a `Timestamp`. Naive datetimes are refused: say
    which timezone you mean (`datetime.now(UTC)`)."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime: pass a timezone-aware one, e.g. datetime.now(UTC)")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def to_datetime(message: Message, field: str) -> datetime | None:
    """The Timestamp `field` of `message` as an aware UTC datetime, or None when
    unset."""
    if not message.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, field)
    return ts.ToDatetime(tzinfo=UTC)


def to_duration(value: Seconds | None) -> duration_pb2.Duration | None:
    """A `timedelta` or a number of seconds as a `Duration`; None stays unset."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise TypeError(f"expected a timedelta or seconds, got {type(value).__name__}")
    td = value if isinstance(value, timedelta) else timedelta(seconds=value)
    d = duration_pb2.Duration()
    d.FromTimedelta(td)
    return d


def to_timedelta(message: Message, field: str) -> timedelta | None:
    """The Duration `field` of `message` as a `timedelta`, or None when unset."""
    if not message.HasField(field):
        return None
    d: duration_pb2.Duration = getattr(message, field)
    return d.ToTimedelta()


def enum_value(enum: Any, prefix: str, value: int | str | None) -> int:
    """An enum given as its number, its full name ("AGENT_STATE_IDLE") or its
    short name in any case ("idle") as its number. None means UNSPECIFIED (0).

    `enum` is a generated enum wrapper (e.g. `lifecycle_pb2.AgentState`),
    `prefix` its value prefix ("AGENT_STATE_").
    """
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        names = [
            n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")
        ]
        raise ValueError(f"unknown value {value!r}; expected one of {', '.join(names)}") from None
