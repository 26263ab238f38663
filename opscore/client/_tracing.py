"""OpenTelemetry for the SDK, when it is installed (it is optional for clients).

- Every call carries the caller's current trace context as `traceparent`
  metadata, so the server's RPC span continues the caller's trace.
- The Agent runs each task inside a `task.handle` span whose parent is the
  attempt's span from the assignment (TaskAssignment.trace_context).

Spans go to whatever tracer provider the application configured
(`opentelemetry.trace.set_tracer_provider`); with none, OpenTelemetry's no-op
tracer makes this cost next to nothing, and without the package it is skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised only without the package
    trace = None  # type: ignore[assignment]

_NO_METADATA: tuple[tuple[str, str], ...] = ()


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """`traceparent`/`tracestate` metadata for the current span, if there is one."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return _NO_METADATA
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


@contextlib.contextmanager
def handler_span(task: Any, trace_context: Mapping[str, str], agent_id: str) -> Iterator[Any]:
    """Current for the whole run of one attempt: the handler, its heartbeats and
    the result call all belong to it."""
    if trace is None:
        yield None
        return
    parent = propagate.extract(dict(trace_context)) if trace_context else None
    tracer = trace.get_tracer("opscore.agent")
    with tracer.start_as_current_span(
        "task.handle",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "opscore",
            "messaging.operation.type": "process",
            "opscore.task.id": task.task_id,
            "opscore.task.capability": task.capability,
            "opscore.task.attempt": task.attempt,
            "opscore.agent.id": agent_id,
        },
    ) as span:
        yield span


def record_failure(exc: BaseException) -> None:
    """Mark the current span (the handler's) as failed by `exc`."""
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
