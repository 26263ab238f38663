"""The one object the engines tell what happens to tasks and sessions.

The dispatch and workflow engines call it at their few core moves (a task is
created, assigned, an attempt ends, a task retries or finishes, a session starts
or finishes), which every RPC and stream share; retention tells it what it
removed. The base class does nothing, so
an engine built without observability pays one method call per move. The
server passes `opscore.observability.hub.Hub` when metrics or tracing are on.

Calls are synchronous, made inside the engine's atomic section: an observer
must not raise, block, or change engine state (the trace hooks return a value
the engine stores instead).
"""

from __future__ import annotations

from opscore.models import Task, TaskAttempt
from opscore.workflow.models import Session


class EngineObserver:
    """No-op defaults; see the module docstring."""

    def task_enqueued(self, task: Task, parent_trace: str) -> str:
        """A task was created. `parent_trace` is the traceparent its spans belong
        under ("" for the current context: the enqueuing RPC). Returns the
        task's own traceparent, which the engine stores on it ("" untraced)."""
        return ""

    def task_assigned(self, task: Task, waited_seconds: float) -> None:
        """`task` was just leased (attempt and agent set); it had been ready for
        `waited_seconds` (schedule-to-start)."""

    def attempt_ended(self, task: Task, attempt: TaskAttempt) -> None:
        """An attempt ended; `attempt` is its history record. Called before the
        task's state moves on (retry or finish)."""

    def task_retrying(self, task: Task) -> None:
        """A failed attempt is followed by another after the backoff."""

    def task_finished(self, task: Task) -> None:
        """`task` reached its final state (COMPLETED, FAILED or CANCELLED)."""

    def session_started(self, session: Session) -> str:
        """A session started. Returns its traceparent ("" untraced)."""
        return ""

    def session_finished(self, session: Session) -> None:
        """`session` reached its final state."""

    def rows_pruned(self, table: str, rows: int) -> None:
        """Retention removed `rows` rows of `table` (opscore/retention.py)."""


NO_OBSERVER = EngineObserver()
