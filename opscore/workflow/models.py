"""Session records. Enum values equal the protobuf enum numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

from opscore.models import TaskError
from opscore.payload import Payload


class SessionState(IntEnum):
    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5


FINAL_SESSION_STATES = frozenset(
    {SessionState.COMPLETED, SessionState.FAILED, SessionState.CANCELLED}
)


class RunState(IntEnum):
    UNSPECIFIED = 0
    WAITING = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5
    REPLACED = 6
    SKIPPED = 7


class EventType(IntEnum):
    UNSPECIFIED = 0
    SESSION_STARTED = 1
    TASK_QUEUED = 2
    TASK_ASSIGNED = 3
    TASK_RETRYING = 4
    TASK_COMPLETED = 5
    TASK_FAILED = 6
    FALLBACK_STARTED = 7
    TASK_CANCELLED = 8
    SESSION_COMPLETED = 9
    SESSION_FAILED = 10
    SESSION_CANCELLED = 11


TERMINAL_EVENTS = frozenset(
    {EventType.SESSION_COMPLETED, EventType.SESSION_FAILED, EventType.SESSION_CANCELLED}
)


@dataclass(slots=True)
class TaskRun:
    workflow_task_id: str
    position: int
    task_id: str = ""
    state: RunState = RunState.WAITING
    attempt: int = 0
    output: Payload = None
    error: TaskError | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None


@dataclass(slots=True)
class Session:
    session_id: str
    definition_id: str
    definition_version: int
    state: SessionState
    input: Payload
    agent_id: str
    idempotency_key: str
    create_time: datetime
    update_time: datetime
    output: Payload = None
    error: TaskError | None = None
    finish_time: datetime | None = None
    # In definition order; empty when read from a listing.
    runs: dict[str, TaskRun] = field(default_factory=dict)
    # W3C `traceparent` of the session's start span ("" without tracing): its
    # tasks' spans are children of it. Set once at start, stored.
    trace_context: str = ""

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_SESSION_STATES


@dataclass(slots=True, frozen=True)
class StoredEvent:
    """A session event as stored: its sequence and serialized SessionEvent."""

    session_id: str
    sequence: int
    body: bytes
    terminal: bool
