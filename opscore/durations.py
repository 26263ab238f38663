"""Durations as people write them: `30` (seconds), `1.5s`, `1500ms`, `5m`, `2h`, `7d`.

One parser for every place a duration is typed: the CLI's options, the
server's settings (--retention) and its workflow definitions (YAML/JSON).
Protobuf's JSON form of a Duration ("3s", "0.5s", "-1s") is one of these
forms, so definitions written for the contract keep working.

Standard library only: the client package (`pip install opscore`) imports it.
Bounds are not checked here (a timeout and a backoff have different ones); the
sign is kept so that the callers' bound checks can say what is wrong. What a
zero or "off" means is the caller's business too (opscore/config.py).
"""

from __future__ import annotations

import math
from datetime import timedelta

from opscore import limits

#: What the error messages list as accepted.
FORMS = "a number of seconds (30, 1.5) or a number with a unit: 1500ms, 30s, 5m, 2h, 7d"

# "ms" before "s" and "m": the longest suffix that matches is the unit.
_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0))


class DurationError(ValueError):
    """Not a duration; the message says which forms are accepted."""


def parse_duration(value: str | int | float) -> timedelta:
    """`value` as a timedelta (microsecond resolution), or DurationError.

    A string is a number optionally followed by one unit (ms, s, m, h, d; any
    case, spaces around ignored); a bare number means seconds. Negative values
    parse (callers refuse them with their own bound); NaN, infinities and
    values beyond protobuf's Duration range do not.
    """
    if isinstance(value, bool):  # a bool is an int to Python, never a duration
        raise DurationError(f"{value!r} is not a duration; write {FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _seconds(value)
    else:
        raise DurationError(f"a {type(value).__name__} is not a duration; write {FORMS}")
    if not math.isfinite(seconds):
        raise DurationError(f"{_shown(value)} is not a duration; write {FORMS}")
    if abs(seconds) > limits.MAX_DURATION_SECONDS:
        raise DurationError(
            f"{_shown(value)} is out of range: at most {limits.MAX_DURATION_SECONDS} seconds"
        )
    return timedelta(seconds=seconds)


def _seconds(text: str) -> float:
    body = text.strip().lower()
    scale = 1.0
    for unit, size in _UNITS:
        if body.endswith(unit):
            body, scale = body[: -len(unit)].strip(), size
            break
    # float() alone would also take "nan", "inf" and "1_000"; a duration is digits.
    if not body or not all(c in "0123456789.+-e" for c in body):
        raise DurationError(f"{_shown(text)} is not a duration; write {FORMS}")
    try:
        return float(body) * scale
    except ValueError:
        raise DurationError(f"{_shown(text)} is not a duration; write {FORMS}") from None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def show(td: timedelta) -> str:
    """The shortest exact form `parse_duration` reads back: 7d, 36h, 90s, 1500ms."""
    ms = td // timedelta(milliseconds=1)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
