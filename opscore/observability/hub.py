"""One observer for the engines when both metrics and tracing are on."""

from __future__ import annotations

from opscore.models import Task, TaskAttempt
from opscore.observability.observer import NO_OBSERVER, EngineObserver
from opscore.workflow.models import Session


class _Both(EngineObserver):
    """Metrics first (they return nothing), then tracing (its return is kept)."""

    def __init__(self, metrics: EngineObserver, tracing: EngineObserver) -> None:
        self.metrics = metrics
        self.tracing = tracing

    def task_enqueued(self, task: Task, parent_trace: str) -> str:
        self.metrics.task_enqueued(task, parent_trace)
        return self.tracing.task_enqueued(task, parent_trace)

    def task_assigned(self, task: Task, waited_seconds: float) -> None:
        self.metrics.task_assigned(task, waited_seconds)
        self.tracing.task_assigned(task, waited_seconds)

    def attempt_ended(self, task: Task, attempt: TaskAttempt) -> None:
        self.metrics.attempt_ended(task, attempt)
        self.tracing.attempt_ended(task, attempt)

    def task_retrying(self, task: Task) -> None:
        self.metrics.task_retrying(task)
        self.tracing.task_retrying(task)

    def task_finished(self, task: Task) -> None:
        self.metrics.task_finished(task)
        self.tracing.task_finished(task)

    def session_started(self, session: Session) -> str:
        self.metrics.session_started(session)
        return self.tracing.session_started(session)

    def session_finished(self, session: Session) -> None:
        self.metrics.session_finished(session)
        self.tracing.session_finished(session)

    def rows_pruned(self, table: str, rows: int) -> None:
        self.metrics.rows_pruned(table, rows)


def combine(metrics: EngineObserver | None, tracing: EngineObserver | None) -> EngineObserver:
    """The observer to hand the engines: the no-op one when nothing is on, so an
    unobserved server pays one empty method call per move."""
    if metrics is not None and tracing is not None:
        return _Both(metrics, tracing)
    return metrics or tracing or NO_OBSERVER
