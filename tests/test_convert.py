"""The hand-written time conversions must agree with protobuf's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from opscore.api import convert


@pytest.mark.parametrize(
    "dt",
    [
        datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
)
def test_timestamp_matches_protobuf(dt):
    ref = timestamp_pb2.Timestamp()
    ref.FromDatetime(dt)
    assert convert.ts(dt) == ref
    assert convert.ts(dt).ToDatetime(tzinfo=UTC) == dt


@pytest.mark.parametrize(
    "td",
    [
        timedelta(seconds=300),
        timedelta(microseconds=1),
        timedelta(milliseconds=-1500),
        timedelta(days=3, seconds=7, microseconds=9),
        timedelta(0),
    ],
)
def test_duration_matches_protobuf(td):
    ref = duration_pb2.Duration()
    ref.FromTimedelta(td)
    assert convert.dur(td) == ref
    assert convert.from_dur(_holder(td), "d") == td


def _holder(td: timedelta) -> object:
    """A message with a Duration field named `d`, for from_dur."""

    class Holder:
        def __init__(self) -> None:
            self.d = convert.dur(td)

        def HasField(self, name: str) -> bool:
            return name == "d"

    return Holder()
