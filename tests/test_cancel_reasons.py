"""A cancellation's reason stays visible: on the task (last_error type "Cancelled"),
on the attempt it ended, on the session, its task runs and events, after a
restart, and in the CLI."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import duration_pb2
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import workflow_pb2 as pb

from tests.conftest import Harness, StreamReader
from tests.support.cli import opscore

pytestmark = pytest.mark.backends("sqlite", "postgres")

Outcome = dpb.TaskAttemptOutcome
RS = pb.TaskRunState
E = pb.SessionEventType


def reason_of(error: common_pb2.TaskError) -> tuple[str, str]:
    return error.type, error.message


async def enqueue(h: Harness, **kw: Any) -> dpb.Task:
    resp = await h.dispatch.EnqueueTask(dpb.EnqueueTaskRequest(capability="c", **kw))
    return resp.task


async def agent_holding(h: Harness, agent_id: str = "a1") -> StreamReader:
    """A subscribed agent for capability c; its stream is read in the background."""
    await h.register(agent_id, ["c"])
    call = h.dispatch.SubscribeTasks(dpb.SubscribeTasksRequest(agent_id=agent_id, max_in_flight=4))
    await call.initial_metadata()  # the server has the subscription
    return StreamReader(call)


async def next_of(reader: StreamReader, kind: str) -> Any:
    msg = await reader.next()
    assert msg.WhichOneof("message") == kind, msg
    return getattr(msg, kind)


async def attempts(h: Harness, task_id: str) -> list[dpb.TaskAttempt]:
    resp = await h.dispatch.ListTaskAttempts(dpb.ListTaskAttemptsRequest(task_id=task_id))
    return list(resp.attempts)


async def get_task(h: Harness, task_id: str) -> dpb.Task:
    return (await h.dispatch.GetTask(dpb.GetTaskRequest(task_id=task_id))).task


# ------------------------------------------------------------------ tasks


async def test_a_queued_task_keeps_its_reason_across_a_restart(harness):
    task = await enqueue(harness)
    resp = await harness.dispatch.CancelTask(
        dpb.CancelTaskRequest(task_id=task.task_id, reason="not needed any more")
    )
    expected = ("Cancelled", "not needed any more")
    assert reason_of(resp.task.last_error) == expected
    assert reason_of((await get_task(harness, task.task_id)).last_error) == expected
    listed = await harness.dispatch.ListTasks(dpb.ListTasksRequest(state=dpb.TASK_STATE_CANCELLED))
    assert [reason_of(t.last_error) for t in listed.tasks] == [expected]
    await harness.restart()
    assert reason_of((await get_task(harness, task.task_id)).last_error) == expected
    # Cancelling again changes nothing, the reason included.
    again = await harness.dispatch.CancelTask(
        dpb.CancelTaskRequest(task_id=task.task_id, reason="other")
    )
    assert reason_of(again.task.last_error) == expected


async def test_without_a_reason_the_default_one(harness):
    task = await enqueue(harness)
    resp = await harness.dispatch.CancelTask(dpb.CancelTaskRequest(task_id=task.task_id))
    assert reason_of(resp.task.last_error) == ("Cancelled", "cancelled by request")


async def test_an_assigned_task_keeps_it_on_the_attempt_too(harness):
    reader = await agent_holding(harness)
    task = await enqueue(harness)
    held = (await next_of(reader, "assignment")).task
    assert held.task_id == task.task_id
    await harness.dispatch.CancelTask(
        dpb.CancelTaskRequest(task_id=task.task_id, reason="operator says stop")
    )
    cancellation = await next_of(reader, "cancellation")
    assert cancellation.reason == "operator says stop"
    (attempt,) = await attempts(harness, task.task_id)
    assert attempt.outcome == Outcome.TASK_ATTEMPT_OUTCOME_CANCELLED
    assert reason_of(attempt.error) == ("Cancelled", "operator says stop")
    assert reason_of((await get_task(harness, task.task_id)).last_error) == (
        "Cancelled",
        "operator says stop",
    )
    await reader.close()


async def test_a_failed_attempt_keeps_its_own_error(harness):
    """The cancellation replaces last_error; the failure stays in the history."""
    reader = await agent_holding(harness)
    task = await enqueue(
        harness,
        retry_policy=common_pb2.RetryPolicy(
            max_attempts=3, initial_backoff=duration_pb2.Duration(seconds=3600)
        ),
    )
    held = (await next_of(reader, "assignment")).task
    failed = await harness.dispatch.FailTask(
        dpb.FailTaskRequest(
            task_id=task.task_id,
            agent_id="a1",
            attempt=held.attempt,
            error=common_pb2.TaskError(message="disk full", type="OSError"),
        )
    )
    assert failed.task.state == dpb.TASK_STATE_SCHEDULED
    await harness.dispatch.CancelTask(dpb.CancelTaskRequest(task_id=task.task_id, reason="give up"))
    assert reason_of((await get_task(harness, task.task_id)).last_error) == ("Cancelled", "give up")
    (attempt,) = await attempts(harness, task.task_id)
    assert attempt.outcome == Outcome.TASK_ATTEMPT_OUTCOME_FAILED
    assert reason_of(attempt.error) == ("OSError", "disk full")
    await reader.close()


# ------------------------------------------------------------------ sessions


async def start_session(h: Harness) -> pb.Session:
    definition = pb.WorkflowDefinition(
        id="two",
        tasks=[
            pb.WorkflowTask(id="first", capability="c"),
            pb.WorkflowTask(id="second", capability="c", depends_on=["first"]),
        ],
    )
    await h.workflow.CreateWorkflowDefinition(
        pb.CreateWorkflowDefinitionRequest(definition=definition)
    )
    resp = await h.workflow.StartWorkflow(pb.StartWorkflowRequest(definition_id="two"))
    return resp.session


async def events(h: Harness, session_id: str) -> list[pb.SessionEvent]:
    out = []
    async for resp in h.workflow.WatchSession(
        pb.WatchSessionRequest(session_id=session_id), timeout=20
    ):
        out.append(resp.event)
    return out


async def test_a_cancelled_session_keeps_its_reason_everywhere(harness):
    reader = await agent_holding(harness)
    s = await start_session(harness)
    held = (await next_of(reader, "assignment")).task
    resp = await harness.workflow.CancelSession(
        pb.CancelSessionRequest(session_id=s.session_id, reason="wrong input")
    )
    expected = ("Cancelled", "wrong input")
    assert reason_of(resp.session.error) == expected
    assert (await next_of(reader, "cancellation")).reason == "wrong input"

    await harness.restart()
    got = (await harness.workflow.GetSession(pb.GetSessionRequest(session_id=s.session_id))).session
    assert got.state == pb.SESSION_STATE_CANCELLED and reason_of(got.error) == expected
    runs = {r.workflow_task_id: r for r in got.task_runs}
    assert runs["first"].state == RS.TASK_RUN_STATE_CANCELLED
    assert runs["second"].state == RS.TASK_RUN_STATE_CANCELLED
    assert reason_of(runs["first"].error) == expected  # was running
    assert reason_of(runs["second"].error) == expected  # was waiting
    listed = await harness.workflow.ListSessions(pb.ListSessionsRequest())
    assert [reason_of(x.error) for x in listed.sessions] == [expected]

    task = await get_task(harness, held.task_id)
    assert reason_of(task.last_error) == expected
    (attempt,) = await attempts(harness, held.task_id)
    assert reason_of(attempt.error) == expected

    story = await events(harness, s.session_id)
    by_type = {e.event_type: e for e in story}
    assert reason_of(by_type[E.SESSION_EVENT_TYPE_TASK_CANCELLED].error) == expected
    assert reason_of(by_type[E.SESSION_EVENT_TYPE_SESSION_CANCELLED].error) == expected
    await reader.close()


async def test_a_session_task_cancelled_on_its_own_fails_the_session_with_the_reason(harness):
    reader = await agent_holding(harness)
    s = await start_session(harness)
    held = (await next_of(reader, "assignment")).task
    await harness.dispatch.CancelTask(
        dpb.CancelTaskRequest(task_id=held.task_id, reason="bad data")
    )
    story = await events(harness, s.session_id)
    assert story[-1].event_type == E.SESSION_EVENT_TYPE_SESSION_FAILED
    got = (await harness.workflow.GetSession(pb.GetSessionRequest(session_id=s.session_id))).session
    assert got.state == pb.SESSION_STATE_FAILED
    assert reason_of(got.error) == ("Cancelled", "task 'first' was cancelled: bad data")
    runs = {r.workflow_task_id: r for r in got.task_runs}
    assert reason_of(runs["first"].error) == ("Cancelled", "bad data")
    await reader.close()


# ------------------------------------------------------------------ the CLI


async def test_the_cli_shows_the_reason(harness):
    t = harness.target
    task = await enqueue(harness)
    r = await opscore("tasks", "cancel", task.task_id[:12], "--reason", "not needed", target=t)
    assert r.code == 0 and r.out.strip() == f"cancelled task {task.task_id}: not needed", r
    r = await opscore("tasks", "get", task.task_id, target=t)
    assert r.code == 0 and "not needed" in r.out and "last error" not in r.out, r
    r = await opscore("tasks", "get", task.task_id, "--json", target=t)
    assert r.json()["last_error"]["message"] == "not needed"
    assert r.json()["last_error"]["type"] == "Cancelled"

    s = await start_session(harness)
    r = await opscore("sessions", "cancel", s.session_id, "--reason", "rethink", target=t)
    assert r.code == 0 and r.out.strip().endswith(": rethink"), r
    r = await opscore("sessions", "get", s.session_id, target=t)
    assert r.code == 0 and "rethink" in r.out, r
    r = await opscore("sessions", "watch", s.session_id, target=t)  # replays the story
    assert r.code == 1 and "session cancelled: rethink" in r.out, r
    r = await opscore("sessions", "get", s.session_id, "--json", target=t)
    assert r.json()["error"] == {"message": "rethink", "type": "Cancelled", "details": None}
