"""Row codecs shared by the backends: each table's columns, and a record to and
from a row of them. Times are integer microseconds since the epoch, durations
integer microseconds, payloads bytes; SQLite and PostgreSQL store the same."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from opscore.clock import from_micros, to_micros
from opscore.models import (
    Agent,
    AgentState,
    AttemptOutcome,
    RetryPolicy,
    StateTransition,
    Task,
    TaskAttempt,
    TaskError,
    TaskState,
)
from opscore.workflow.models import RunState, Session, SessionState, TaskRun

_US = timedelta(microseconds=1)


def us(td: timedelta | None) -> int | None:
    return None if td is None else td // _US


def td(us: int | None) -> timedelta | None:
    return None if us is None else us * _US


AGENT_COLS = (
    "agent_id, name, version, capabilities, contact_endpoint, metadata, state, "
    "state_details, register_time, state_change_time, last_seen_time, deregistered, "
    "state_before_offline, history_seq"
)
# What an upsert of an existing agent rewrites: all but its id and register time.
AGENT_UPDATED = tuple(
    c for c in (x.strip() for x in AGENT_COLS.split(",")) if c not in ("agent_id", "register_time")
)


def agent_row(a: Agent) -> tuple[Any, ...]:
    return (
        a.agent_id,
        a.name,
        a.version,
        json.dumps(list(a.capabilities)),
        a.contact_endpoint,
        json.dumps(a.metadata, sort_keys=True),
        int(a.state),
        a.state_details,
        to_micros(a.register_time),
        to_micros(a.state_change_time),
        to_micros(a.last_seen_time),
        int(a.deregistered),
        int(a.state_before_offline),
        a.history_seq,
    )


def agent_from_row(r: Sequence[Any]) -> Agent:
    return Agent(
        agent_id=r[0],
        name=r[1],
        version=r[2],
        capabilities=tuple(json.loads(r[3])),
        contact_endpoint=r[4],
        metadata=json.loads(r[5]),
        state=AgentState(r[6]),
        state_details=r[7],
        register_time=from_micros(r[8]),  # type: ignore[arg-type]
        state_change_time=from_micros(r[9]),  # type: ignore[arg-type]
        last_seen_time=from_micros(r[10]),  # type: ignore[arg-type]
        deregistered=bool(r[11]),
        state_before_offline=AgentState(r[12]),
        history_seq=r[13],
    )


TRANSITION_COLS = (
    "agent_id, sequence, from_state, to_state, details, observe_time, record_time, "
    "source, out_of_order"
)


def transition_row(t: StateTransition) -> tuple[Any, ...]:
    return (
        t.agent_id,
        t.sequence,
        int(t.from_state),
        int(t.to_state),
        t.details,
        to_micros(t.observe_time),
        to_micros(t.record_time),
        t.source,
        int(t.out_of_order),
    )


def transition_from_row(r: Sequence[Any]) -> StateTransition:
    return StateTransition(
        agent_id=r[0],
        sequence=r[1],
        from_state=AgentState(r[2]),
        to_state=AgentState(r[3]),
        details=r[4],
        observe_time=from_micros(r[5]),  # type: ignore[arg-type]
        record_time=from_micros(r[6]),  # type: ignore[arg-type]
        source=r[7],
        out_of_order=bool(r[8]),
    )


TASK_FIXED = (
    "task_id, name, capability, agent_id, input, priority, max_attempts, "
    "initial_backoff_us, backoff_multiplier, max_backoff_us, timeout_us, "
    "heartbeat_timeout_us, idempotency_key, session_id, workflow_task_id, create_time"
)
TASK_MUTABLE = (
    "state",
    "attempt",
    "assigned_agent_id",
    "lease_expire_time",
    "attempt_deadline",
    "schedule_time",
    "output",
    "error_message",
    "error_type",
    "error_details",
    "progress",
    "cancel_requested",
    "update_time",
    "finish_time",
    "ready_seq",
)
# Added by migration 0004; last, so the positions of the others stay put.
TASK_ADDED = "trace_context"
TASK_COLS = TASK_FIXED + ", " + ", ".join(TASK_MUTABLE) + ", " + TASK_ADDED

# The partial indexes over tasks.state, by the states each holds. A query
# filtered by state repeats the index's predicate as a literal: from `state = ?`
# alone a planner cannot tell that the value falls inside it, and then reads the
# whole table newest first to find a few rows. COMPLETED has no index on
# purpose: it is the usual end, so a page of it is found at once newest first,
# and an entry per completed task would cost the commit that completes it (12-18%
# more of the commit's CPU in a replay, against none measurable for FAILED and
# CANCELLED, which are rare).
_TASK_STATE_INDEXES = (
    (frozenset({TaskState.SCHEDULED, TaskState.QUEUED, TaskState.ASSIGNED}), "state IN (1, 2, 3)"),
    (frozenset({TaskState.FAILED, TaskState.CANCELLED}), "state IN (5, 6)"),
)
# PostgreSQL's (its migration 0010): ASSIGNED is left out of the index of open
# tasks, so that a task makes one entry in it, not two (every update of a task
# row there writes a new entry in each index whose predicate it meets). A page
# of ASSIGNED reads the leases' index and sorts: there are as many as agents
# hold, not a backlog.
_PG_TASK_STATE_INDEXES = (
    (frozenset({TaskState.SCHEDULED, TaskState.QUEUED}), "state IN (1, 2)"),
    (frozenset({TaskState.ASSIGNED}), "state = 3"),
    _TASK_STATE_INDEXES[1],
)


def task_state_index_term(state: TaskState, *, postgres: bool = False) -> str | None:
    """The literal predicate of the partial index that holds `state`, if any."""
    return _index_term(_PG_TASK_STATE_INDEXES if postgres else _TASK_STATE_INDEXES, state)


# The same for sessions (SessionState): the open ones, and the rare ends FAILED
# and CANCELLED; COMPLETED has none.
_SESSION_STATE_INDEXES = (
    (frozenset({SessionState.PENDING, SessionState.RUNNING}), "state IN (1, 2)"),
    (frozenset({SessionState.FAILED, SessionState.CANCELLED}), "state IN (4, 5)"),
)


def session_state_index_term(state: int) -> str | None:
    """The literal predicate of the partial index of sessions that holds `state`."""
    return _index_term(_SESSION_STATE_INDEXES, state)


def _index_term(indexes: tuple[tuple[frozenset[Any], str], ...], state: int) -> str | None:
    for states, term in indexes:
        if state in states:
            return term
    return None


def task_row(t: Task) -> tuple[Any, ...]:
    rp = t.retry_policy
    err = t.last_error
    return (
        t.task_id,
        t.name,
        t.capability,
        t.agent_id,
        t.input,
        t.priority,
        rp.max_attempts,
        us(rp.initial_backoff),
        rp.backoff_multiplier,
        us(rp.max_backoff),
        us(t.timeout),
        us(t.heartbeat_timeout),
        t.idempotency_key or None,
        t.session_id,
        t.workflow_task_id,
        to_micros(t.create_time),
        int(t.state),
        t.attempt,
        t.assigned_agent_id,
        to_micros(t.lease_expire_time),
        to_micros(t.attempt_deadline),
        to_micros(t.schedule_time),
        t.output,
        err.message if err else None,
        err.type if err else None,
        err.details if err else None,
        t.progress,
        int(t.cancel_requested),
        to_micros(t.update_time),
        to_micros(t.finish_time),
        t.ready_seq,
        t.trace_context or None,
    )


def task_from_row(r: Sequence[Any]) -> Task:
    return Task(
        task_id=r[0],
        name=r[1],
        capability=r[2],
        agent_id=r[3],
        input=r[4],
        priority=r[5],
        retry_policy=RetryPolicy(r[6], td(r[7]), r[8], td(r[9])),  # type: ignore[arg-type]
        timeout=td(r[10]),  # type: ignore[arg-type]
        heartbeat_timeout=td(r[11]),
        idempotency_key=r[12] or "",
        session_id=r[13],
        workflow_task_id=r[14],
        create_time=from_micros(r[15]),  # type: ignore[arg-type]
        state=TaskState(r[16]),
        attempt=r[17],
        assigned_agent_id=r[18],
        lease_expire_time=from_micros(r[19]),
        attempt_deadline=from_micros(r[20]),
        schedule_time=from_micros(r[21]),
        output=r[22],
        last_error=TaskError(r[23], r[24] or "", r[25]) if r[23] is not None else None,
        progress=r[26],
        cancel_requested=bool(r[27]),
        update_time=from_micros(r[28]),  # type: ignore[arg-type]
        finish_time=from_micros(r[29]),
        ready_seq=r[30],
        trace_context=r[31] or "",
    )


SESSION_COLS = (
    "session_id, definition_id, definition_version, state, input, output, error_message, "
    "error_type, error_details, agent_id, idempotency_key, create_time, update_time, finish_time, "
    "trace_context"
)
SESSION_NCOLS = 15


def session_row(x: Session) -> tuple[Any, ...]:
    err = x.error
    return (
        x.session_id,
        x.definition_id,
        x.definition_version,
        int(x.state),
        x.input,
        x.output,
        err.message if err else None,
        err.type if err else None,
        err.details if err else None,
        x.agent_id,
        x.idempotency_key or None,
        to_micros(x.create_time),
        to_micros(x.update_time),
        to_micros(x.finish_time),
        x.trace_context or None,
    )


def session_from_row(r: Sequence[Any]) -> Session:
    return Session(
        session_id=r[0],
        definition_id=r[1],
        definition_version=r[2],
        state=SessionState(r[3]),
        input=r[4],
        output=r[5],
        error=TaskError(r[6], r[7] or "", r[8]) if r[6] is not None else None,
        agent_id=r[9],
        idempotency_key=r[10] or "",
        create_time=from_micros(r[11]),  # type: ignore[arg-type]
        update_time=from_micros(r[12]),  # type: ignore[arg-type]
        finish_time=from_micros(r[13]),
        trace_context=r[14] or "",
    )


RUN_COLS = (
    "session_id, workflow_task_id, position, task_id, state, attempt, output, error_message, "
    "error_type, error_details, start_time, finish_time"
)


def run_row(session_id: str, run: TaskRun) -> tuple[Any, ...]:
    err = run.error
    return (
        session_id,
        run.workflow_task_id,
        run.position,
        run.task_id,
        int(run.state),
        run.attempt,
        run.output,
        err.message if err else None,
        err.type if err else None,
        err.details if err else None,
        to_micros(run.start_time),
        to_micros(run.finish_time),
    )


def run_from_row(r: Sequence[Any]) -> TaskRun:
    return TaskRun(
        workflow_task_id=r[1],
        position=r[2],
        task_id=r[3],
        state=RunState(r[4]),
        attempt=r[5],
        output=r[6],
        error=TaskError(r[7], r[8] or "", r[9]) if r[7] is not None else None,
        start_time=from_micros(r[10]),
        finish_time=from_micros(r[11]),
    )


ATTEMPT_COLS = (
    "task_id, attempt, agent_id, outcome, assign_time, end_time, error_message, error_type, "
    "error_details, progress"
)


def attempt_row(a: TaskAttempt) -> tuple[Any, ...]:
    err = a.error
    return (
        a.task_id,
        a.attempt,
        a.agent_id,
        int(a.outcome),
        to_micros(a.assign_time),
        to_micros(a.end_time),
        err.message if err else None,
        err.type if err else None,
        err.details if err else None,
        a.progress,
    )


def attempt_from_row(r: Sequence[Any]) -> TaskAttempt:
    return TaskAttempt(
        task_id=r[0],
        attempt=r[1],
        agent_id=r[2],
        outcome=AttemptOutcome(r[3]),
        assign_time=from_micros(r[4]),  # type: ignore[arg-type]
        end_time=from_micros(r[5]),
        error=TaskError(r[6], r[7] or "", r[8]) if r[6] is not None else None,
        progress=r[9],
    )
