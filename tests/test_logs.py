"""The log formatters: every field a collector parses, on their cached fast path."""

from __future__ import annotations

import enum
import json
import logging
import sys
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from opscore.logs import JsonFormatter, TextFormatter

# 2000-01-01 .. 2100-01-01 in whole seconds, and a millisecond within each.
SECONDS = st.integers(946_684_800, 4_102_444_800)
MILLIS = st.integers(0, 999)


class Color(enum.Enum):
    RED = 1


def record(created: float, msecs: int, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.getLogger("opscore.rpc").makeRecord(
        "opscore.rpc", logging.INFO, "", 0, "rpc %s", ("done",), exc_info, extra=extra
    )
    rec.created = created
    rec.msecs = float(msecs)
    return rec


def expected_time(second: int, ms: int) -> str:
    moment = datetime.fromtimestamp(second, UTC) + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds")


@given(st.lists(st.tuples(SECONDS, MILLIS), min_size=1, max_size=8))
def test_json_time_matches_isoformat_across_seconds(stamps: list[tuple[int, int]]) -> None:
    # One formatter for the whole list: its per-second cache must follow the
    # second of each line, whatever order lines come in.
    fmt = JsonFormatter()
    for second, ms in [*stamps, *stamps]:
        line = json.loads(fmt.format(record(second + ms / 1000, ms)))
        assert line["time"] == expected_time(second, ms)


def test_json_line_carries_every_field() -> None:
    when = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)
    rec = record(
        when.timestamp() + 0.5,
        500,
        exc=True,
        method="/opscore.v1.DispatchService/CompleteTask",
        code="OK",
        duration_ms=0.41,
        principal=None,
        when=when,
        color=Color.RED,
        _private="hidden",
    )
    line = json.loads(JsonFormatter().format(rec))
    assert line["time"] == "2026-12-01T23:59:59.500+00:00"
    assert line["level"] == "INFO"
    assert line["logger"] == "opscore.rpc"
    assert line["message"] == "rpc done"
    assert line["method"] == "/opscore.v1.DispatchService/CompleteTask"
    assert line["code"] == "OK"
    assert line["duration_ms"] == 0.41
    assert line["principal"] is None
    # What JSON cannot hold is written as its str(), never an error.
    assert line["when"] == str(when)
    assert line["color"] == "Color.RED"
    assert "_private" not in line and "pathname" not in line and "msecs" not in line
    assert line["traceback"].startswith("Traceback") and "ValueError: boom" in line["traceback"]


def test_text_line_has_time_level_message_and_extras() -> None:
    fmt = TextFormatter()
    second = int(datetime(2026, 12, 1, 8, 5, 3, tzinfo=UTC).timestamp())
    first = fmt.format(record(second + 0.042, 42, code="OK"))
    assert first == "08:05:03.042 INFO    opscore.rpc: rpc done  code=OK"
    # The next second, through the same cache.
    second_line = fmt.format(record(second + 1.007, 7))
    assert second_line == "08:05:04.007 INFO    opscore.rpc: rpc done"
