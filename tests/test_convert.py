"""The hand-written conversions must agree with protobuf's own."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opscore_proto.v1 import common_pb2, dispatch_pb2

from opscore import limits, protovalues
from opscore.api import convert
from opscore.errors import InvalidArgument
from opscore.models import RetryPolicy, Task, TaskError, TaskState


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


# ------------------------------------------------------------ tasks, written in place
#
# convert.fill_task writes a task into a response's field directly (no copies,
# defaults left untouched). The oracle below builds the same message the plain
# way, with protobuf's own helpers: presence and every value must agree.

_times = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
) | st.just(datetime(1970, 1, 1, tzinfo=UTC))
_durations = st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=30))
_text = st.text(max_size=12)
_payloads = st.none() | st.dictionaries(_text, st.integers(-5, 5) | _text, max_size=3).map(
    lambda d: _struct_bytes(d)
)


def _struct_bytes(d: dict[str, object]) -> bytes:
    s = struct_pb2.Struct()
    s.update(d)
    return s.SerializeToString(deterministic=True)


@st.composite
def _tasks(draw: st.DrawFn) -> Task:
    return Task(
        task_id=draw(_text),
        name=draw(_text),
        capability=draw(_text),
        agent_id=draw(_text),
        input=draw(_payloads),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
        retry_policy=RetryPolicy(
            draw(st.integers(0, 100)), draw(_durations), draw(st.floats(1, 10)), draw(_durations)
        ),
        timeout=draw(_durations),
        heartbeat_timeout=draw(st.none() | _durations),
        idempotency_key=draw(_text),
        state=draw(st.sampled_from(TaskState)),
        create_time=draw(_times),
        update_time=draw(_times),
        attempt=draw(st.integers(0, 2**31 - 1)),
        assigned_agent_id=draw(_text),
        lease_expire_time=draw(st.none() | _times),
        schedule_time=draw(st.none() | _times),
        output=draw(_payloads),
        last_error=draw(st.none() | st.builds(TaskError, _text, _text, _payloads)),
        progress=draw(_payloads),
        session_id=draw(_text),
        workflow_task_id=draw(_text),
        cancel_requested=draw(st.booleans()),
        finish_time=draw(st.none() | _times),
        trace_context=draw(st.sampled_from(["", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"])),
    )


def _oracle(t: Task) -> dispatch_pb2.Task:
    def ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
        if dt is None:
            return None
        out = timestamp_pb2.Timestamp()
        out.FromDatetime(dt)
        return out

    def dur(td: timedelta | None) -> duration_pb2.Duration | None:
        if td is None:
            return None
        out = duration_pb2.Duration()
        out.FromTimedelta(td)
        return out

    def struct(b: bytes | None) -> struct_pb2.Struct | None:
        return None if b is None else struct_pb2.Struct.FromString(b)

    p = t.retry_policy
    e = t.last_error
    return dispatch_pb2.Task(
        task_id=t.task_id,
        name=t.name,
        capability=t.capability,
        agent_id=t.agent_id,
        input=struct(t.input),
        priority=t.priority,
        retry_policy=common_pb2.RetryPolicy(
            max_attempts=p.max_attempts,
            initial_backoff=dur(p.initial_backoff),
            backoff_multiplier=p.backoff_multiplier,
            max_backoff=dur(p.max_backoff),
        ),
        timeout=dur(t.timeout),
        heartbeat_timeout=dur(t.heartbeat_timeout),
        idempotency_key=t.idempotency_key,
        state=int(t.state),
        attempt=t.attempt,
        assigned_agent_id=t.assigned_agent_id,
        lease_expire_time=ts(t.lease_expire_time),
        schedule_time=ts(t.schedule_time),
        output=struct(t.output),
        last_error=None
        if e is None
        else common_pb2.TaskError(message=e.message, type=e.type, details=struct(e.details)),
        progress=struct(t.progress),
        session_id=t.session_id,
        workflow_task_id=t.workflow_task_id,
        cancel_requested=t.cancel_requested,
        create_time=ts(t.create_time),
        update_time=ts(t.update_time),
        finish_time=ts(t.finish_time),
        trace_context={"traceparent": t.trace_context} if t.trace_context else None,
    )


@settings(max_examples=300, deadline=None)
@given(_tasks())
def test_a_task_written_in_place_is_the_task_built_whole(t: Task):
    want = _oracle(t)
    assert convert.task(t) == want
    # In a response's field, as the servicers write it.
    resp = dispatch_pb2.EnqueueTasksResponse()
    convert.fill_task(resp.results.add().task, t)
    assert resp.results[0].task == want
    assert resp.results[0].HasField("task")


# --------------------------------------------------- payload checks, the fast path
#
# protovalues.payload skips the walk over a payload's values when its bytes show
# it cannot be too deep nor hold a non-finite number. Whatever the payload, it
# must refuse exactly what the walk refuses.

_leaves = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=8)
    # Strings whose bytes look like a non-finite double (tag 0x11, 8 bytes).
    | st.just("\x11abcdef\x7f\x7f")
)
_json = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@st.composite
def _bodies(draw: st.DrawFn) -> dict[str, object]:
    body = draw(st.dictionaries(st.text(max_size=4), _json, max_size=4))
    # A chain around it, from shallow to past the limit.
    for _ in range(draw(st.integers(0, limits.MAX_PAYLOAD_DEPTH + 2))):
        body = {"k": body} if draw(st.booleans()) else {"k": [body]}
    return body


@settings(max_examples=400, deadline=None)
@given(_bodies())
@example({"x": math.nan})
@example({"x": [1, -math.inf]})
@example({"x": {"y": math.inf}, "s": "\x11abcdef\xff\x7f"})
def test_a_payload_is_refused_exactly_when_the_walk_refuses_it(body: dict[str, object]):
    # Filled in place: a copy would be parsed, and deep ones are past upb's limit.
    req = dispatch_pb2.EnqueueTaskRequest()
    req.input.SetInParent()
    req.input.update(body)
    problem = protovalues._not_json_like(req.input)
    if problem:
        with pytest.raises(InvalidArgument, match=re.escape(problem)):
            protovalues.payload(req, "input")
    else:
        assert protovalues.payload(req, "input") == req.input.SerializeToString(deterministic=True)
