"""OpenTelemetry traces: a span per RPC, and one trace per task and per session.

Built only when tracing is configured (`--otlp-endpoint`, or an exporter handed
to the server by a test); otherwise the server never imports this module, the
interceptor has no tracer and the engines' observer has no trace hooks, so no
span, context or carrier is ever made.

The shape of a task's trace (docs/operations.md shows it):

- `task.enqueue` (PRODUCER), a child of the enqueuing RPC's span (which
  continues the caller's `traceparent` metadata, or starts a new trace), or of
  the session's `session.start` span for a workflow task. Ended at once, so a
  task that never runs still shows up. Its context is stored on the task
  (`Task.trace_context`).
- `task.attempt` (CONSUMER) per attempt, a child of `task.enqueue`, from
  assignment to the attempt's end, with the agent, the outcome and the error.
  Its span id is derived from the task's context and the attempt number
  (tracecontext.attempt_span_id), so the assignment can carry it before the span
  exists, a re-sent assignment carries the same one, and the span is recorded
  when the attempt ends, even after a server restart. The agent's handler span
  (the SDK's Agent: `task.handle`) is its child.
- `task.result`, a child of `task.enqueue`, when the task reaches its final state.

A session: `session.start` (a child of StartWorkflow's RPC span) with every task
of the session under it, and `session.end` when it finishes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from opscore.models import AttemptOutcome, Task, TaskAttempt, TaskState
from opscore.observability import tracecontext
from opscore.observability.observer import EngineObserver
from opscore.workflow.models import Session, SessionState

log = logging.getLogger("opscore.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = ("traceparent", "tracestate")

# Server-side gRPC codes that mark an RPC span as an error (OpenTelemetry's RPC
# semantic conventions): the others are the client's doing.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _IdGenerator(RandomIdGenerator):
    """Random ids, except the one span id a caller asks for next (an attempt span
    whose id was handed to the agent before the span existed)."""

    def __init__(self) -> None:
        self._forced = threading.local()

    def generate_span_id(self) -> int:
        forced = getattr(self._forced, "span_id", None)
        if forced is not None:
            self._forced.span_id = None
            return int(forced)
        return super().generate_span_id()

    def force_next(self, span_id: int | None) -> None:
        self._forced.span_id = span_id


class _Borrowed(SpanExporter):
    """An exporter owned by someone else: shutting this server down leaves it open."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self) -> None:
        return None


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1e9)


def traceparent_of(span: trace.Span) -> str:
    sc = span.get_span_context()
    if not sc.is_valid:
        return ""
    return tracecontext.format_traceparent(
        f"{sc.trace_id:032x}", f"{sc.span_id:016x}", f"{int(sc.trace_flags):02x}"
    )


def _context_of(traceparent: str) -> Context | None:
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


class Tracing:
    """The server's tracer provider (its own, not the global one) and exporter."""

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        exporter: SpanExporter | None = None,
        service_version: str = "",
    ) -> None:
        attributes: dict[str, Any] = {}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "opscore"
        if service_version:
            attributes["service.version"] = service_version
        self.ids = _IdGenerator()
        self.provider = TracerProvider(resource=Resource.create(attributes), id_generator=self.ids)
        if exporter is not None:
            # Given directly (tests, tools): spans are handed over as they end,
            # and the exporter outlives this server (its owner shuts it down).
            self.provider.add_span_processor(SimpleSpanProcessor(_Borrowed(exporter)))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # Batched on the SDK's own thread: the event loop never waits for the collector.
            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
            )
        self.tracer = self.provider.get_tracer("opscore.server", service_version or None)
        self._log_filter: _TraceIdFilter | None = None

    def install_log_correlation(self) -> None:
        """Add trace_id/span_id of the current span to every log line."""
        self._log_filter = _TraceIdFilter()
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._log_filter)

    def shutdown(self) -> None:
        if self._log_filter is not None:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._log_filter)
        self.provider.shutdown()  # flushes what is batched


class _TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            sc = trace.get_current_span().get_span_context()
            if sc.is_valid:
                record.trace_id = f"{sc.trace_id:032x}"
                record.span_id = f"{sc.span_id:016x}"
        return True


# --------------------------------------------------------------------------- RPCs


class RpcSpan:
    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span, token: object) -> None:
        self.span = span
        self.token = token

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"


class RpcTracer:
    """The interceptor's part: a SERVER span per RPC, current while it runs."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracer = tracing.tracer

    def start(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> RpcSpan:
        carrier = {k: v for k, v in metadata if k in _TRACE_HEADERS and isinstance(v, str)}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return RpcSpan(span, token)

    def end(self, handle: RpcSpan, code: grpc.StatusCode, request_id: str) -> None:
        span = handle.span
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("opscore.request_id", request_id)
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        try:
            otel_context.detach(handle.token)
        except Exception:  # a stream closed from another context: nothing to restore
            log.debug("trace context not detached", exc_info=True)


# --------------------------------------------------------------------------- engines


_ERROR_OUTCOMES = frozenset(
    {
        AttemptOutcome.FAILED,
        AttemptOutcome.LEASE_EXPIRED,
        AttemptOutcome.AGENT_OFFLINE,
        AttemptOutcome.AGENT_DEREGISTERED,
    }
)


def _task_attributes(task: Task) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "opscore",
        "opscore.task.id": task.task_id,
        "opscore.task.capability": task.capability,
    }
    if task.name:
        attrs["opscore.task.name"] = task.name
    if task.agent_id:
        attrs["opscore.task.pinned_agent_id"] = task.agent_id
    if task.session_id:
        attrs["opscore.session.id"] = task.session_id
        attrs["opscore.workflow_task.id"] = task.workflow_task_id
    return attrs


class TracingObserver(EngineObserver):
    def __init__(self, tracing: Tracing) -> None:
        self._tracer = tracing.tracer
        self._ids = tracing.ids

    def task_enqueued(self, task: Task, parent_trace: str) -> str:
        span = self._tracer.start_span(
            "task.enqueue",
            context=_context_of(parent_trace),
            kind=SpanKind.PRODUCER,
            attributes={
                **_task_attributes(task),
                "messaging.operation.type": "create",
                "opscore.task.priority": task.priority,
                "opscore.task.max_attempts": task.retry_policy.max_attempts,
            },
        )
        span.end()
        return traceparent_of(span)

    def attempt_ended(self, task: Task, attempt: TaskAttempt) -> None:
        if not task.trace_context:
            return
        span_id = tracecontext.attempt_span_id(task.trace_context, attempt.attempt)
        attrs = {
            **_task_attributes(task),
            "messaging.operation.type": "process",
            "opscore.task.attempt": attempt.attempt,
            "opscore.agent.id": attempt.agent_id,
            "opscore.attempt.outcome": attempt.outcome.name,
        }
        if attempt.error is not None:
            attrs["error.type"] = attempt.error.type or "Error"
            attrs["opscore.error.message"] = attempt.error.message
        self._ids.force_next(int(span_id, 16))
        try:
            span = self._tracer.start_span(
                "task.attempt",
                context=_context_of(task.trace_context),
                kind=SpanKind.CONSUMER,
                attributes=attrs,
                start_time=_ns(attempt.assign_time),
            )
        finally:
            self._ids.force_next(None)
        if attempt.outcome in _ERROR_OUTCOMES:
            message = attempt.error.message if attempt.error else attempt.outcome.name
            span.set_status(Status(StatusCode.ERROR, message))
        span.end(end_time=_ns(attempt.end_time) if attempt.end_time else None)

    def task_finished(self, task: Task) -> None:
        if not task.trace_context:
            return
        attrs = {
            **_task_attributes(task),
            "messaging.operation.type": "settle",
            "opscore.task.state": task.state.name,
            "opscore.task.attempts": task.attempt,
        }
        if task.finish_time is not None:
            attrs["opscore.task.total_seconds"] = (
                task.finish_time - task.create_time
            ).total_seconds()
        span = self._tracer.start_span(
            "task.result", context=_context_of(task.trace_context), attributes=attrs
        )
        if task.state == TaskState.FAILED:
            err = task.last_error
            span.set_status(Status(StatusCode.ERROR, err.message if err else "failed"))
        span.end()

    def session_started(self, session: Session) -> str:
        span = self._tracer.start_span(
            "session.start",
            attributes={
                "opscore.session.id": session.session_id,
                "opscore.definition.id": session.definition_id,
                "opscore.definition.version": session.definition_version,
            },
        )
        span.end()
        return traceparent_of(span)

    def session_finished(self, session: Session) -> None:
        if not session.trace_context:
            return
        attrs: dict[str, Any] = {
            "opscore.session.id": session.session_id,
            "opscore.session.state": session.state.name,
        }
        if session.finish_time is not None:
            attrs["opscore.session.total_seconds"] = (
                session.finish_time - session.create_time
            ).total_seconds()
        span = self._tracer.start_span(
            "session.end", context=_context_of(session.trace_context), attributes=attrs
        )
        if session.state == SessionState.FAILED:
            err = session.error
            span.set_status(Status(StatusCode.ERROR, err.message if err else "failed"))
        span.end()
