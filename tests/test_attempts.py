"""Attempt history (issue 13): every attempt of a task kept, readable through
ListTaskAttempts, the SDK and `opscore tasks get`."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf import json_format
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

from opscore.client import OpsCoreClient
from tests.conftest import Harness, eventually, expect_error
from tests.test_cli import opscore
from tests.test_dispatch import assignment, complete, dur, enqueue, get, struct, subscribe

pytestmark = pytest.mark.backends("sqlite", "postgres")


OUT = pb.TaskAttemptOutcome


async def attempts(h: Harness, task_id: str, **kw: object) -> pb.ListTaskAttemptsResponse:
    return await h.dispatch.ListTaskAttempts(pb.ListTaskAttemptsRequest(task_id=task_id, **kw))


def details(msg: object) -> dict[str, object]:
    return json_format.MessageToDict(msg)  # type: ignore[arg-type]


async def test_history_across_failure_lease_expiry_and_success(harness):
    await harness.register("a1", ["c"])
    policy = common_pb2.RetryPolicy(max_attempts=3, initial_backoff=dur(0))
    t = await enqueue(
        harness, capability="c", retry_policy=policy, heartbeat_timeout=dur(0.3), timeout=dur(60)
    )
    assert (await attempts(harness, t.task_id)).attempts == []  # queued: none yet
    sub = await subscribe(harness, "a1")

    first = await assignment(sub)
    running = (await attempts(harness, t.task_id)).attempts
    assert [(a.attempt, a.outcome, a.agent_id) for a in running] == [
        (1, OUT.TASK_ATTEMPT_OUTCOME_RUNNING, "a1")
    ]
    assert running[0].HasField("assign_time") and not running[0].HasField("end_time")
    trace = 'Traceback (most recent call last):\n  File "h.py", line 1\nValueError: bad input\n'
    await harness.dispatch.FailTask(
        pb.FailTaskRequest(
            task_id=t.task_id,
            agent_id="a1",
            attempt=first.attempt,
            error=common_pb2.TaskError(
                message="bad input", type="ValueError", details=struct(traceback=trace)
            ),
        )
    )
    # Attempt 2: progress reported, then silence until the heartbeat lease passes.
    second = await assignment(sub)
    await harness.dispatch.HeartbeatTask(
        pb.HeartbeatTaskRequest(
            task_id=t.task_id, agent_id="a1", attempt=second.attempt, progress=struct(step=2)
        )
    )
    third = await assignment(sub)
    assert third.attempt == 3
    await harness.dispatch.HeartbeatTask(
        pb.HeartbeatTaskRequest(
            task_id=t.task_id, agent_id="a1", attempt=3, progress=struct(step=3)
        )
    )
    await complete(harness, third, "a1", ok=True)

    got = (await attempts(harness, t.task_id)).attempts
    assert [(a.attempt, a.outcome) for a in got] == [
        (3, OUT.TASK_ATTEMPT_OUTCOME_COMPLETED),
        (2, OUT.TASK_ATTEMPT_OUTCOME_LEASE_EXPIRED),
        (1, OUT.TASK_ATTEMPT_OUTCOME_FAILED),
    ]
    done, expired, failed = got
    assert not done.HasField("error") and details(done.progress) == {"step": 3}
    assert expired.error.type == "LeaseExpired" and details(expired.progress) == {"step": 2}
    assert failed.error.type == "ValueError" and failed.error.message == "bad input"
    assert details(failed.error.details) == {"traceback": trace}
    assert not failed.HasField("progress")
    for a in got:
        assert a.agent_id == "a1" and a.task_id == t.task_id
        assert a.end_time.ToDatetime() >= a.assign_time.ToDatetime()
    assert got[2].end_time.ToDatetime() <= got[1].assign_time.ToDatetime()

    # Kept across a restart: the records were committed with the changes.
    await sub.close()
    await harness.restart()
    again = (await attempts(harness, t.task_id)).attempts
    assert [(a.attempt, a.outcome, a.error.type) for a in again] == [
        (a.attempt, a.outcome, a.error.type) for a in got
    ]


async def test_agent_offline_and_deregistered_end_attempts(make_harness):
    h = await make_harness(agent_timeout=timedelta(milliseconds=300))
    await h.register("gone", ["c"])
    await h.register("dereg", ["c"])
    policy = common_pb2.RetryPolicy(max_attempts=5, initial_backoff=dur(0))
    t = await enqueue(h, capability="c", retry_policy=policy)

    sub = await subscribe(h, "gone")
    await assignment(sub)
    await sub.close()  # the stream ends; no further sign of life: OFFLINE after 300 ms

    async def offline() -> bool:
        got = await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="gone"))
        return got.agent.state == lpb.AGENT_STATE_OFFLINE

    await eventually(offline, what="agent OFFLINE")
    sub2 = await subscribe(h, "dereg")
    second = await assignment(sub2)
    assert second.attempt == 2
    await h.lifecycle.DeregisterAgent(lpb.DeregisterAgentRequest(agent_id="dereg"))
    await sub2.close()
    await h.register("last", ["c"])
    sub3 = await subscribe(h, "last")
    third = await assignment(sub3)
    await complete(h, third, "last")
    got = (await attempts(h, t.task_id)).attempts
    assert [(a.attempt, a.agent_id, a.outcome, a.error.type) for a in got] == [
        (3, "last", OUT.TASK_ATTEMPT_OUTCOME_COMPLETED, ""),
        (2, "dereg", OUT.TASK_ATTEMPT_OUTCOME_AGENT_DEREGISTERED, "AgentDeregistered"),
        (1, "gone", OUT.TASK_ATTEMPT_OUTCOME_AGENT_OFFLINE, "AgentOffline"),
    ]
    await sub3.close()


async def test_cancel_while_assigned_is_an_attempt_outcome(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="c")
    await assignment(sub)
    await harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=t.task_id))
    got = (await attempts(harness, t.task_id)).attempts
    assert [(a.attempt, a.outcome) for a in got] == [(1, OUT.TASK_ATTEMPT_OUTCOME_CANCELLED)]
    queued = await enqueue(harness, capability="nobody")
    await harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=queued.task_id))
    assert (await attempts(harness, queued.task_id)).attempts == []  # never assigned
    await sub.close()


async def test_paging_and_errors(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    policy = common_pb2.RetryPolicy(max_attempts=4, initial_backoff=dur(0))
    t = await enqueue(harness, capability="c", retry_policy=policy)
    for n in (1, 2, 3):
        a = await assignment(sub)
        assert a.attempt == n
        await harness.dispatch.FailTask(
            pb.FailTaskRequest(
                task_id=t.task_id,
                agent_id="a1",
                attempt=n,
                error=common_pb2.TaskError(message=f"boom {n}"),
            )
        )
    await assignment(sub)  # attempt 4 running
    seen, token, pages = [], "", 0
    while True:
        page = await attempts(harness, t.task_id, page_size=1, page_token=token)
        pages += 1
        seen += [(a.attempt, a.outcome) for a in page.attempts]
        token = page.next_page_token
        if not token:
            break
    assert pages == 4
    assert seen == [
        (4, OUT.TASK_ATTEMPT_OUTCOME_RUNNING),
        (3, OUT.TASK_ATTEMPT_OUTCOME_FAILED),
        (2, OUT.TASK_ATTEMPT_OUTCOME_FAILED),
        (1, OUT.TASK_ATTEMPT_OUTCOME_FAILED),
    ]
    await expect_error(
        attempts(harness, "no-such-task"), grpc.StatusCode.NOT_FOUND, "does not exist"
    )
    await expect_error(
        attempts(harness, t.task_id, page_token="garbage"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    await expect_error(
        attempts(harness, t.task_id, page_size=-1), grpc.StatusCode.INVALID_ARGUMENT, "page_size"
    )
    await expect_error(attempts(harness, ""), grpc.StatusCode.INVALID_ARGUMENT, "task_id")
    await sub.close()


async def test_sdk_and_cli_show_the_traceback(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="c", retry_policy=common_pb2.RetryPolicy(max_attempts=1))
    a = await assignment(sub)
    trace = "Traceback (most recent call last):\n  File \"agent.py\", line 7\nKeyError: 'city'\n"
    await harness.dispatch.FailTask(
        pb.FailTaskRequest(
            task_id=t.task_id,
            agent_id="a1",
            attempt=a.attempt,
            error=common_pb2.TaskError(
                message="'city'", type="KeyError", details=struct(traceback=trace)
            ),
        )
    )
    assert (await get(harness, t.task_id)).state == pb.TASK_STATE_FAILED
    async with OpsCoreClient(harness.target) as client:
        found = [x async for x in client.iter_task_attempts(t.task_id)]
        page = await client.list_task_attempts(t.task_id, page_size=1)
    assert [x.outcome for x in found] == [OUT.TASK_ATTEMPT_OUTCOME_FAILED]
    assert page.items[0].error.type == "KeyError" and page.next_page_token == ""

    shown = await opscore("tasks", "get", t.task_id, target=harness.target)
    assert shown.code == 0, shown
    assert "attempts" in shown.out and "FAILED" in shown.out
    assert "attempt 1 traceback (a1):" in shown.out
    assert "KeyError: 'city'" in shown.out and 'File "agent.py", line 7' in shown.out
    listed = await opscore("tasks", "attempts", t.task_id, "--json", target=harness.target)
    assert listed.code == 0, listed
    [record] = listed.json()
    assert record["outcome"] == "TASK_ATTEMPT_OUTCOME_FAILED"
    assert record["error"]["details"]["traceback"] == trace
    await sub.close()
