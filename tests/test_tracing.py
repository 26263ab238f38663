"""OpenTelemetry traces (issue 13), collected with the SDK's in-memory exporter:
the server's spans and the SDK Agent's handler spans, in one trace per task and
per session, across a retry and a reconnect (a server restart)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import workflow_pb2 as wpb

from opscore.agent import TRANSPORTS, Agent, TaskContext
from opscore.client import OpsCoreClient, TaskRetry
from opscore.observability.tracecontext import attempt_traceparent, parse
from tests.conftest import eventually
from tests.support.worker import Worker
from tests.test_agent import finished, running
from tests.test_dispatch import enqueue, subscribe

# The application side (the SDK's client and Agent) uses the global tracer
# provider, as an application would; set once for the process. The server has
# its own provider, given the same exporter by each test.
_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_PROVIDER)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(found: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def attr(span: ReadableSpan, key: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(key)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_task_trace_across_a_retry_and_a_reconnect(make_harness, spans, transport):
    h = await make_harness(span_exporter=spans)
    release = asyncio.Event()
    calls: list[int] = []

    agent = Agent("traced", agent_id="tr-1", target=h.target, env={}, transport=transport)

    @agent.task("trace.me")
    async def handle(ctx: TaskContext) -> dict[str, Any]:
        calls.append(ctx.attempt)
        assert parse(ctx.trace_context["traceparent"]) is not None
        if ctx.attempt == 1:
            raise ValueError("first attempt fails")
        await release.wait()
        return {"ok": True}

    caller = trace.get_tracer("test.caller")
    async with OpsCoreClient(h.target) as client, running(agent, client):
        with caller.start_as_current_span("caller") as root:
            task = await client.enqueue_task(
                "trace.me", retry_policy=TaskRetry(max_attempts=3, initial_backoff=0)
            )
        trace_id = root.get_span_context().trace_id
        assert parse(task.trace_context["traceparent"])[0] == f"{trace_id:032x}"
        await eventually(lambda: calls == [1, 2], what="the second attempt to start")
        # A reconnect: the server restarts while attempt 2 runs; the agent
        # reconnects, is re-sent the same lease, and finishes the attempt.
        await h.restart()
        await eventually(
            lambda: h.server is not None and h.server.dispatch.open_subscriptions() == 1,
            what="the agent to reconnect",
        )
        release.set()
        done = await finished(client, task.task_id)
        assert done.state == pb.TASK_STATE_COMPLETED and calls == [1, 2]

    found = spans.get_finished_spans()
    mine = [s for s in found if s.context.trace_id == trace_id]
    [enq] = named(mine, "task.enqueue")
    [rpc] = [s for s in named(mine, "opscore.v1.DispatchService/EnqueueTask")]
    assert parent_id(rpc) == root.get_span_context().span_id  # the caller's trace continued
    assert parent_id(enq) == rpc.context.span_id
    assert attr(enq, "opscore.task.id") == task.task_id
    assert f"{enq.context.span_id:016x}" == task.trace_context["traceparent"][36:52]

    attempts = sorted(named(mine, "task.attempt"), key=lambda s: attr(s, "opscore.task.attempt"))
    assert [attr(s, "opscore.attempt.outcome") for s in attempts] == ["FAILED", "COMPLETED"]
    assert all(parent_id(s) == enq.context.span_id for s in attempts)
    assert all(attr(s, "opscore.agent.id") == "tr-1" for s in attempts)
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].start_time <= attempts[0].end_time <= attempts[1].start_time
    for n, s in enumerate(attempts, 1):
        expected = attempt_traceparent(task.trace_context["traceparent"], n)
        assert f"{s.context.span_id:016x}" == expected[36:52]

    handlers = sorted(named(mine, "task.handle"), key=lambda s: attr(s, "opscore.task.attempt"))
    assert [attr(s, "opscore.task.attempt") for s in handlers] == [1, 2]
    for handler, attempt in zip(handlers, attempts, strict=True):
        assert parent_id(handler) == attempt.context.span_id  # inside the attempt
        assert attempt.start_time <= handler.start_time
    assert handlers[0].status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in handlers[0].events)
    fail_rpcs = named(mine, "opscore.v1.DispatchService/FailTask")
    complete_rpcs = named(mine, "opscore.v1.DispatchService/CompleteTask")
    if transport == "subscribe":
        # The agent's result calls carry its handler span: the server's RPC spans nest in it.
        [fail_rpc], [complete_rpc] = fail_rpcs, complete_rpcs
        assert parent_id(fail_rpc) == handlers[0].context.span_id
        assert parent_id(complete_rpc) == handlers[1].context.span_id
    else:
        # The results went on the work stream: no result RPC at all.
        assert fail_rpcs == [] and complete_rpcs == []

    [result] = named(mine, "task.result")
    assert parent_id(result) == enq.context.span_id
    assert attr(result, "opscore.task.state") == "COMPLETED"
    assert attr(result, "opscore.task.attempts") == 2


async def test_session_is_one_trace_with_its_tasks_inside(make_harness, spans):
    h = await make_harness(span_exporter=spans)
    worker = await Worker(h.channel, "w1", {"step": lambda data, task: {"done": True}}).start()
    definition = wpb.WorkflowDefinition(
        id="two",
        tasks=[
            wpb.WorkflowTask(id="a", capability="step"),
            wpb.WorkflowTask(id="b", capability="step", depends_on=["a"]),
        ],
    )
    started = await h.workflow.StartWorkflow(wpb.StartWorkflowRequest(definition=definition))
    session_id = started.session.session_id
    traceparent = started.session.trace_context["traceparent"]
    trace_id = int(parse(traceparent)[0], 16)

    async def completed() -> bool:
        got = await h.workflow.GetSession(wpb.GetSessionRequest(session_id=session_id))
        return got.session.state == wpb.SESSION_STATE_COMPLETED

    await eventually(completed, what="the session to complete")
    await worker.stop()
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    [start] = named(mine, "session.start")
    [rpc] = named(mine, "opscore.v1.WorkflowService/StartWorkflow")
    assert parent_id(start) == rpc.context.span_id
    enqueues = named(mine, "task.enqueue")
    assert sorted(attr(s, "opscore.workflow_task.id") for s in enqueues) == ["a", "b"]
    assert all(parent_id(s) == start.context.span_id for s in enqueues)
    assert len(named(mine, "task.attempt")) == 2 and len(named(mine, "task.result")) == 2
    [end] = named(mine, "session.end")
    assert parent_id(end) == start.context.span_id
    assert attr(end, "opscore.session.state") == "COMPLETED"


async def test_log_lines_carry_the_trace_id(make_harness, spans, caplog):
    caplog.set_level(logging.INFO, logger="opscore.rpc")
    h = await make_harness(span_exporter=spans)
    t = await enqueue(h, capability="logged")
    [rpc] = named(spans.get_finished_spans(), "opscore.v1.DispatchService/EnqueueTask")
    lines = [r for r in caplog.records if r.name == "opscore.rpc" and "EnqueueTask" in r.method]
    assert [r.trace_id for r in lines] == [f"{rpc.context.trace_id:032x}"]
    assert t.trace_context["traceparent"]


async def test_without_tracing_nothing_is_traced(harness, spans):
    await harness.register("a1", ["plain"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="plain")
    assert dict(t.trace_context) == {}
    msg = await sub.next()
    assert dict(msg.assignment.trace_context) == {} and msg.assignment.task.task_id == t.task_id
    await sub.close()
    assert harness.server.observability.rpc_tracer is None
    assert spans.get_finished_spans() == ()


async def test_assignment_carries_the_attempt_context(make_harness, spans):
    h = await make_harness(span_exporter=spans)
    await h.register("a1", ["c"])
    sub = await subscribe(h, "a1")
    t = await enqueue(h, capability="c")
    msg = await sub.next()
    got = msg.assignment
    assert got.task.trace_context["traceparent"] == t.trace_context["traceparent"]
    assert got.trace_context["traceparent"] == attempt_traceparent(
        t.trace_context["traceparent"], 1
    )
    listed = await h.dispatch.ListTaskAttempts(pb.ListTaskAttemptsRequest(task_id=t.task_id))
    assert listed.attempts[0].trace_context["traceparent"] == got.trace_context["traceparent"]
    await sub.close()


async def test_otlp_export_reaches_a_collector(make_harness):
    """--otlp-endpoint: spans reach a real OTLP/gRPC collector (a minimal one in
    this process) through the real exporter; they are flushed when the server stops."""
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    received: list[str] = []
    got = asyncio.Event()

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    received.extend(s.name for s in ss.spans)
            got.set()
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()
    try:
        h = await make_harness(otlp_endpoint=f"http://127.0.0.1:{port}")
        t = await enqueue(h, capability="exported")
        assert t.trace_context["traceparent"]
        await h.stop()  # flushes the batch
        await asyncio.wait_for(got.wait(), 10)
        assert "task.enqueue" in received
        assert "opscore.v1.DispatchService/EnqueueTask" in received
    finally:
        await collector.stop(None)
