"""Translation between protobuf messages and domain records. No logic here."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import timedelta

from opscore_proto.v1 import common_pb2, dispatch_pb2, lifecycle_pb2, workflow_pb2

from opscore import workstream as ws
from opscore.api.errors import status_code
from opscore.errors import InvalidArgument
from opscore.models import (
    Agent,
    AgentEvent,
    RetryPolicy,
    StateTransition,
    Task,
    TaskAttempt,
    TaskError,
)
from opscore.observability.tracecontext import attempt_traceparent

# Servicers reach the value helpers through this module: one import for all translation.
from opscore.protovalues import dur, from_dur, from_ts, payload, set_ts, struct, ts
from opscore.subscription import Ack
from opscore.taskspec import RetryPolicySpec, TaskSpec
from opscore.workflow.models import Session, StoredEvent, TaskRun

# ---------------------------------------------------------------- lifecycle


def agent(a: Agent) -> lifecycle_pb2.Agent:
    return lifecycle_pb2.Agent(
        agent_id=a.agent_id,
        name=a.name,
        version=a.version,
        capabilities=a.capabilities,
        contact_endpoint=a.contact_endpoint,
        metadata=a.metadata,
        state=int(a.state),  # type: ignore[arg-type]
        state_details=struct(a.state_details),
        register_time=ts(a.register_time),
        state_change_time=ts(a.state_change_time),
        last_seen_time=ts(a.last_seen_time),
        deregistered=a.deregistered,
        open_subscriptions=a.open_subscriptions,
    )


def transition(t: StateTransition) -> lifecycle_pb2.StateTransition:
    return lifecycle_pb2.StateTransition(
        agent_id=t.agent_id,
        from_state=int(t.from_state),  # type: ignore[arg-type]
        to_state=int(t.to_state),  # type: ignore[arg-type]
        details=struct(t.details),
        observe_time=ts(t.observe_time),
        record_time=ts(t.record_time),
        source=t.source,
        out_of_order=t.out_of_order,
        sequence=t.sequence,
    )


def agent_event_bytes(e: AgentEvent) -> bytes:
    return agent_event(e).SerializeToString()


def session_event_bytes(event: StoredEvent) -> bytes:
    """A WatchSessionResponse around a stored SessionEvent, without decoding it:
    field 1 (`event`), length-delimited, is the stored bytes as they are."""
    return b"\x0a" + _varint(len(event.body)) + event.body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def agent_event(e: AgentEvent) -> lifecycle_pb2.WatchAgentsResponse:
    return lifecycle_pb2.WatchAgentsResponse(
        event_type=int(e.event_type),  # type: ignore[arg-type]
        agent=agent(e.agent),
        transition=transition(e.transition) if e.transition else None,
        event_time=ts(e.event_time),
    )


# ---------------------------------------------------------------- dispatch


@functools.lru_cache(maxsize=1024)
def retry_policy(p: RetryPolicy) -> common_pb2.RetryPolicy:
    return common_pb2.RetryPolicy(
        max_attempts=p.max_attempts,
        initial_backoff=dur(p.initial_backoff),
        backoff_multiplier=p.backoff_multiplier,
        max_backoff=dur(p.max_backoff),
    )


_NO_RETRY_POLICY = RetryPolicySpec()  # frozen: one shared by every request without one


def retry_policy_spec(
    msg: object, field: str = "retry_policy", prefix: str = ""
) -> RetryPolicySpec:
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return _NO_RETRY_POLICY
    p: common_pb2.RetryPolicy = getattr(msg, field)
    where = f"{prefix}{field}."
    return RetryPolicySpec(
        max_attempts=p.max_attempts,
        initial_backoff=from_dur(p, "initial_backoff", where),
        backoff_multiplier=p.backoff_multiplier,
        max_backoff=from_dur(p, "max_backoff", where),
    )


def task_error(e: TaskError | None) -> common_pb2.TaskError | None:
    if e is None:
        return None
    return common_pb2.TaskError(message=e.message, type=e.type, details=struct(e.details))


def from_task_error(msg: object, field: str = "error", prefix: str = "") -> TaskError:
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return TaskError("")
    e: common_pb2.TaskError = getattr(msg, field)
    return TaskError(e.message, e.type, payload(e, "details", f"{prefix}{field}."))


def task(t: Task) -> dispatch_pb2.Task:
    msg = dispatch_pb2.Task()
    fill_task(msg, t)
    return msg


def fill_assignment(msg: dispatch_pb2.TaskAssignment, t: Task) -> None:
    """The assignment of `t`'s current attempt, with the attempt span's context."""
    fill_task(msg.task, t)
    if t.trace_context:
        msg.trace_context["traceparent"] = attempt_traceparent(t.trace_context, t.attempt)


def task_attempt(a: TaskAttempt) -> dispatch_pb2.TaskAttempt:
    msg = dispatch_pb2.TaskAttempt(
        task_id=a.task_id,
        attempt=a.attempt,
        agent_id=a.agent_id,
        outcome=int(a.outcome),  # type: ignore[arg-type]
        assign_time=ts(a.assign_time),
        end_time=ts(a.end_time),
        error=task_error(a.error),
        progress=struct(a.progress),
    )
    if a.trace_context:
        msg.trace_context["traceparent"] = a.trace_context
    return msg


def fill_task(msg: dispatch_pb2.Task, t: Task) -> None:
    """Write `t` into `msg`, a new Task (or the empty task field of a response).

    Every task of every response passes here, and protobuf's constructors copy
    each submessage they are given: a Task built whole, then put in an
    assignment, a server message and a response, was copied three times over.
    Written in place, with the stored payloads parsed straight into their fields
    and fields left at their defaults untouched, it costs about a third."""
    msg.task_id = t.task_id
    if t.name:
        msg.name = t.name
    msg.capability = t.capability
    if t.agent_id:
        msg.agent_id = t.agent_id
    if t.input is not None:
        msg.input.MergeFromString(t.input)
    if t.priority:
        msg.priority = t.priority
    msg.retry_policy.MergeFromString(_retry_policy_bytes(t.retry_policy))
    msg.timeout.MergeFromString(_dur_bytes(t.timeout))
    if t.heartbeat_timeout is not None:
        msg.heartbeat_timeout.MergeFromString(_dur_bytes(t.heartbeat_timeout))
    if t.idempotency_key:
        msg.idempotency_key = t.idempotency_key
    msg.state = t.state  # type: ignore[assignment]
    if t.attempt:
        msg.attempt = t.attempt
    if t.assigned_agent_id:
        msg.assigned_agent_id = t.assigned_agent_id
    if t.lease_expire_time is not None:
        set_ts(msg.lease_expire_time, t.lease_expire_time)
    if t.schedule_time is not None:
        set_ts(msg.schedule_time, t.schedule_time)
    if t.output is not None:
        msg.output.MergeFromString(t.output)
    if t.last_error is not None:
        e = t.last_error
        msg.last_error.message = e.message
        msg.last_error.type = e.type
        if e.details is not None:
            msg.last_error.details.MergeFromString(e.details)
    if t.progress is not None:
        msg.progress.MergeFromString(t.progress)
    if t.session_id:
        msg.session_id = t.session_id
    if t.workflow_task_id:
        msg.workflow_task_id = t.workflow_task_id
    if t.cancel_requested:
        msg.cancel_requested = True
    set_ts(msg.create_time, t.create_time)
    set_ts(msg.update_time, t.update_time)
    if t.finish_time is not None:
        set_ts(msg.finish_time, t.finish_time)
    if t.trace_context:
        msg.trace_context["traceparent"] = t.trace_context


@functools.lru_cache(maxsize=1024)
def _retry_policy_bytes(p: RetryPolicy) -> bytes:
    return retry_policy(p).SerializeToString()


@functools.lru_cache(maxsize=1024)
def _dur_bytes(td: timedelta) -> bytes:
    return dur(td).SerializeToString()  # type: ignore[union-attr]


def task_spec(r: dispatch_pb2.EnqueueTaskRequest, prefix: str = "") -> TaskSpec:
    return TaskSpec(
        name=r.name,
        capability=r.capability,
        agent_id=r.agent_id,
        input=payload(r, "input", prefix),
        priority=r.priority,
        schedule_time=from_ts(r, "schedule_time", prefix),
        delay=from_dur(r, "delay", prefix),
        retry_policy=retry_policy_spec(r, prefix=prefix),
        timeout=from_dur(r, "timeout", prefix),
        heartbeat_timeout=from_dur(r, "heartbeat_timeout", prefix),
        idempotency_key=r.idempotency_key,
    )


# ---------------------------------------------------------------- workflow


def session(
    s: Session, *, with_runs: bool = True, budget: int | None = None
) -> workflow_pb2.Session:
    """With `budget`, the runs' outputs (and error details) stop being included once
    they would take more than that many bytes; those runs say `output_omitted`."""
    left = budget if budget is not None else -1
    if left >= 0:
        left -= _size(s.input, s.output, s.error.details if s.error else None)
    runs = []
    if with_runs:
        for r in s.runs.values():
            heavy = _size(r.output, r.error.details if r.error else None)
            keep = budget is None or heavy <= left
            if keep and budget is not None:
                left -= heavy
            runs.append(task_run(r, with_output=keep))
    msg = workflow_pb2.Session(
        session_id=s.session_id,
        definition_id=s.definition_id,
        definition_version=s.definition_version,
        state=int(s.state),  # type: ignore[arg-type]
        input=struct(s.input),
        output=struct(s.output),
        error=task_error(s.error),
        task_runs=runs,
        agent_id=s.agent_id,
        idempotency_key=s.idempotency_key,
        create_time=ts(s.create_time),
        update_time=ts(s.update_time),
        finish_time=ts(s.finish_time),
    )
    if s.trace_context:
        msg.trace_context["traceparent"] = s.trace_context
    return msg


def _size(*payloads: bytes | None) -> int:
    return sum(len(p) for p in payloads if p) + 128


def task_run(r: TaskRun, *, with_output: bool = True) -> workflow_pb2.TaskRun:
    error = r.error
    if error is not None and not with_output:
        error = TaskError(error.message, error.type)
    return workflow_pb2.TaskRun(
        workflow_task_id=r.workflow_task_id,
        task_id=r.task_id,
        state=int(r.state),  # type: ignore[arg-type]
        attempt=r.attempt,
        output=struct(r.output) if with_output else None,
        error=task_error(error),
        start_time=ts(r.start_time),
        finish_time=ts(r.finish_time),
        output_omitted=not with_output and bool(r.output or (r.error and r.error.details)),
    )


# ---------------------------------------------------------------- work stream


def connect_items(
    messages: Iterable[dispatch_pb2.AgentMessage],
    refused: Mapping[int, InvalidArgument] | None = None,
) -> list[ws.Item]:
    """The items of a ConnectRequest. An item whose fields are invalid (or whose
    index is in `refused`, already found invalid) becomes `Refused` in its place,
    so it is answered in order and the stream goes on."""
    items: list[ws.Item] = []
    for i, m in enumerate(messages):
        if refused and i in refused:
            items.append(ws.Refused(m.id, refused[i]))
            continue
        kind = m.WhichOneof("message")
        try:
            items.append(_connect_item(m, kind))
        except InvalidArgument as exc:
            items.append(ws.Refused(m.id, exc))
    return items


def _connect_item(m: dispatch_pb2.AgentMessage, kind: str | None) -> ws.Item:
    if kind == "completion":
        x = m.completion
        return ws.Completion(m.id, x.task_id, x.attempt, payload(x, "output", "completion."))
    if kind == "failure":
        f = m.failure
        return ws.Failure(
            m.id, f.task_id, f.attempt, from_task_error(f, prefix="failure."), f.non_retryable
        )
    if kind == "heartbeat":
        h = m.heartbeat
        return ws.Heartbeat(m.id, h.task_id, h.attempt, payload(h, "progress", "heartbeat."))
    if kind == "state_report":
        r = m.state_report
        return ws.StateReport(
            m.id,
            r.state,
            payload(r, "details", "state_report."),
            from_ts(r, "observe_time", "state_report."),
        )
    if kind == "capacity":
        return ws.Capacity(m.id, m.capacity.max_in_flight)
    raise InvalidArgument(
        "the message sets none of completion, failure, heartbeat, state_report, capacity",
        field="message",
    )


def fill_ack(out: dispatch_pb2.AgentMessageResult, a: Ack) -> None:
    out.id = a.id
    if a.task_state:
        out.task_state = a.task_state  # type: ignore[assignment]
    if a.lease_expire_time is not None:
        set_ts(out.lease_expire_time, a.lease_expire_time)
    if a.cancel_requested:
        out.cancel_requested = True
    err = a.error
    if err is not None:
        out.code = status_code(err).value[0]
        out.message = err.message
        out.reason = err.reason
        if isinstance(err, InvalidArgument) and err.violations:
            out.field = err.violations[0].field
