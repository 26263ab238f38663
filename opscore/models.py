"""Domain records shared by the engines and storage. No gRPC, no SQL.

Enum values equal the protobuf enum numbers so translation is a cast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any, Generic, TypeVar

from opscore.payload import Payload


class AgentState(IntEnum):
    UNSPECIFIED = 0
    INITIALIZING = 1
    IDLE = 2
    ACTIVE = 3
    ERROR = 4
    FINISHED = 5
    OFFLINE = 6


# States in which an agent receives tasks.
DISPATCHABLE_STATES = frozenset({AgentState.IDLE, AgentState.ACTIVE})


class AgentEventType(IntEnum):
    UNSPECIFIED = 0
    REGISTERED = 1
    UPDATED = 2
    STATE_CHANGED = 3
    OFFLINE = 4
    DEREGISTERED = 5


@dataclass(slots=True)
class Agent:
    agent_id: str
    name: str
    version: str
    capabilities: tuple[str, ...]
    contact_endpoint: str
    metadata: dict[str, str]
    state: AgentState
    state_details: Payload
    register_time: datetime
    state_change_time: datetime
    last_seen_time: datetime
    deregistered: bool = False
    # State before going OFFLINE, restored when the agent comes back by heartbeat.
    state_before_offline: AgentState = AgentState.UNSPECIFIED
    history_seq: int = 0
    # Not stored: the number of open SubscribeTasks streams.
    open_subscriptions: int = 0


@dataclass(slots=True, frozen=True)
class StateTransition:
    agent_id: str
    sequence: int
    from_state: AgentState
    to_state: AgentState
    details: Payload
    observe_time: datetime
    record_time: datetime
    source: str
    out_of_order: bool


@dataclass(slots=True, frozen=True)
class AgentEvent:
    event_type: AgentEventType
    agent: Agent
    transition: StateTransition | None
    event_time: datetime


class TaskState(IntEnum):
    UNSPECIFIED = 0
    SCHEDULED = 1
    QUEUED = 2
    ASSIGNED = 3
    COMPLETED = 4
    FAILED = 5
    CANCELLED = 6


FINAL_TASK_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_backoff: timedelta = timedelta(seconds=1)
    backoff_multiplier: float = 2.0
    max_backoff: timedelta = timedelta(seconds=60)

    def backoff(self, failed_attempt: int) -> timedelta:
        """Wait before the attempt after `failed_attempt` (1-based), never above
        max_backoff. Computed in floats and capped before any timedelta exists, so
        no multiplier or attempt number can overflow."""
        cap = self.max_backoff.total_seconds()
        seconds = self.initial_backoff.total_seconds()
        try:
            seconds *= self.backoff_multiplier ** max(0, failed_attempt - 1)
        except OverflowError:
            seconds = cap
        return timedelta(seconds=min(seconds, cap))


@dataclass(slots=True, frozen=True)
class TaskError:
    message: str
    type: str = ""
    details: Payload = None


DEFAULT_TASK_TIMEOUT = timedelta(seconds=300)


@dataclass(slots=True)
class Task:
    task_id: str
    name: str
    capability: str
    agent_id: str
    input: Payload
    priority: int
    retry_policy: RetryPolicy
    timeout: timedelta
    heartbeat_timeout: timedelta | None
    idempotency_key: str
    state: TaskState
    create_time: datetime
    update_time: datetime
    attempt: int = 0
    assigned_agent_id: str = ""
    lease_expire_time: datetime | None = None
    # Hard end of the current attempt (assignment + timeout); heartbeats never
    # extend the lease past it.
    attempt_deadline: datetime | None = None
    schedule_time: datetime | None = None
    output: Payload = None
    last_error: TaskError | None = None
    progress: Payload = None
    session_id: str = ""
    workflow_task_id: str = ""
    cancel_requested: bool = False
    finish_time: datetime | None = None
    # FIFO order among ready tasks of equal priority; assigned when the task
    # becomes QUEUED, stored so a restart keeps the order.
    ready_seq: int = 0
    # W3C `traceparent` of the task's enqueue span ("" without tracing). Set
    # once at creation by the engine's observer and stored with the task.
    trace_context: str = ""

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_TASK_STATES

    @property
    def assign_time(self) -> datetime | None:
        """When the current (or last) attempt was assigned. Derived, not stored:
        the attempt's hard deadline is set to exactly assignment + timeout."""
        if self.attempt_deadline is None:
            return None
        return self.attempt_deadline - self.timeout


def _field_copier(cls: type[Any]) -> Callable[[Any], Any]:
    """A shallow copy of an instance of the slots dataclass `cls`, field by field.

    dataclasses.replace() runs __init__ through fields() and costs about 3 us for
    a Task, which is copied for every reply and assignment; this costs 0.25 us.
    Compiled once from the class's own field names, as dataclasses itself does.
    """
    body = "".join(f"    new.{f.name} = obj.{f.name}\n" for f in fields(cls))
    source = f"def copy(obj):\n    new = _new(_cls)\n{body}    return new\n"
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    exec(source, namespace)  # our own field names only
    return namespace["copy"]  # type: ignore[no-any-return]


copy_task: Callable[[Task], Task] = _field_copier(Task)


class AttemptOutcome(IntEnum):
    """How an attempt ended; values equal TaskAttemptOutcome's."""

    UNSPECIFIED = 0
    RUNNING = 1
    COMPLETED = 2
    FAILED = 3
    LEASE_EXPIRED = 4
    AGENT_OFFLINE = 5
    AGENT_DEREGISTERED = 6
    CANCELLED = 7


@dataclass(slots=True, frozen=True)
class TaskAttempt:
    """One lease of a task held by one agent, kept once it ended."""

    task_id: str
    attempt: int
    agent_id: str
    outcome: AttemptOutcome
    assign_time: datetime
    end_time: datetime | None
    error: TaskError | None = None
    progress: Payload = None
    # The attempt span's traceparent, derived from the task's (not stored).
    trace_context: str = ""


@dataclass(slots=True, frozen=True)
class TaskFilter:
    state: TaskState = TaskState.UNSPECIFIED
    capability: str = ""
    agent_id: str = ""
    session_id: str = ""


T = TypeVar("T")


@dataclass(slots=True)
class Page(Generic[T]):
    items: list[T] = field(default_factory=list)
    next_page_token: str = ""
