"""DispatchService rules, each against real subscriptions on an in-process server."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

from tests.conftest import Harness, StreamReader, eventually, expect_error

pytestmark = pytest.mark.backends("sqlite", "postgres")


TS = pb.TaskState


def dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def struct(**kw: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


async def enqueue(h: Harness, **kw: object) -> pb.Task:
    resp = await h.dispatch.EnqueueTask(pb.EnqueueTaskRequest(**kw))
    return resp.task


async def subscribe(
    h: Harness, agent_id: str, max_in_flight: int = 1, capabilities: list[str] | None = None
) -> StreamReader:
    """Open a subscription and wait until the server has it."""
    engine = h.server.dispatch
    before = {s.sub_id for s in engine._subs_by_agent.get(agent_id, ())}
    reader = StreamReader(
        h.dispatch.SubscribeTasks(
            pb.SubscribeTasksRequest(
                agent_id=agent_id, max_in_flight=max_in_flight, capabilities=capabilities or []
            )
        )
    )
    await eventually(
        lambda: (
            {s.sub_id for s in engine._subs_by_agent.get(agent_id, ())} - before
            or reader.done.is_set()
        ),
        what=f"subscription of {agent_id}",
    )
    return reader


async def assignment(reader: StreamReader, timeout: float = 10.0) -> pb.Task:
    msg = await reader.next(timeout)
    assert msg.WhichOneof("message") == "assignment", msg
    return msg.assignment.task


async def complete(h: Harness, task: pb.Task, agent_id: str, **out: object) -> pb.Task:
    resp = await h.dispatch.CompleteTask(
        pb.CompleteTaskRequest(
            task_id=task.task_id, agent_id=agent_id, attempt=task.attempt, output=struct(**out)
        )
    )
    return resp.task


async def get(h: Harness, task_id: str) -> pb.Task:
    return (await h.dispatch.GetTask(pb.GetTaskRequest(task_id=task_id))).task


# ------------------------------------------------------------------ enqueue


async def test_enqueue_validation(harness):
    D = harness.dispatch
    cases = [
        (pb.EnqueueTaskRequest(), "exactly one of capability and agent_id"),
        (pb.EnqueueTaskRequest(capability="c", agent_id="a"), "exactly one"),
        (pb.EnqueueTaskRequest(capability="bad cap"), "capability"),
        (pb.EnqueueTaskRequest(capability="c", delay=dur(-1)), "delay must not be negative"),
        (pb.EnqueueTaskRequest(capability="c", timeout=dur(0)), "timeout must be positive"),
        (
            pb.EnqueueTaskRequest(
                capability="c", retry_policy=common_pb2.RetryPolicy(max_attempts=101)
            ),
            "retry_policy.max_attempts",
        ),
        (
            pb.EnqueueTaskRequest(
                capability="c", retry_policy=common_pb2.RetryPolicy(backoff_multiplier=0.5)
            ),
            "backoff_multiplier",
        ),
        (
            pb.EnqueueTaskRequest(capability="c", input=struct(blob="x" * (1024 * 1024 + 10))),
            "input is",
        ),
    ]
    for req, text in cases:
        await expect_error(D.EnqueueTask(req), grpc.StatusCode.INVALID_ARGUMENT, text)
    await expect_error(
        D.EnqueueTask(pb.EnqueueTaskRequest(agent_id="ghost")), grpc.StatusCode.NOT_FOUND, "ghost"
    )
    listed = await D.ListTasks(pb.ListTasksRequest())
    assert list(listed.tasks) == []


async def test_enqueue_defaults_and_get(harness):
    t = await enqueue(harness, capability="c", name="n", input=struct(x=1))
    assert t.state == TS.TASK_STATE_QUEUED
    assert t.retry_policy.max_attempts == 3
    assert t.retry_policy.initial_backoff.seconds == 1
    assert t.retry_policy.backoff_multiplier == 2.0
    assert t.retry_policy.max_backoff.seconds == 60
    assert t.timeout.seconds == 300
    assert not t.HasField("heartbeat_timeout")
    got = await get(harness, t.task_id)
    assert got.input["x"] == 1 and got.name == "n"
    await expect_error(
        harness.dispatch.GetTask(pb.GetTaskRequest(task_id="nope")), grpc.StatusCode.NOT_FOUND
    )


async def test_idempotency_key_returns_existing_task(harness):
    first = await harness.dispatch.EnqueueTask(
        pb.EnqueueTaskRequest(capability="c", idempotency_key="k1")
    )
    again = await harness.dispatch.EnqueueTask(
        pb.EnqueueTaskRequest(capability="c", idempotency_key="k1", name="other")
    )
    assert first.created and not again.created
    assert again.task.task_id == first.task.task_id
    # Concurrent duplicates create one task.
    results = await asyncio.gather(
        *(
            harness.dispatch.EnqueueTask(
                pb.EnqueueTaskRequest(capability="c", idempotency_key="k2")
            )
            for _ in range(10)
        )
    )
    assert len({r.task.task_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    # Still honoured after the task finished and the server restarted.
    await harness.register("w", ["c"])
    sub = await subscribe(harness, "w")
    t = await assignment(sub)
    await complete(harness, t, "w")
    await sub.close()
    await harness.restart()
    after = await harness.dispatch.EnqueueTask(
        pb.EnqueueTaskRequest(capability="c", idempotency_key=t.idempotency_key or "k1")
    )
    assert not after.created


async def test_batch_enqueue_is_all_or_nothing(harness):
    bad = pb.EnqueueTasksRequest(
        tasks=[pb.EnqueueTaskRequest(capability="c"), pb.EnqueueTaskRequest(capability="")]
    )
    await expect_error(
        harness.dispatch.EnqueueTasks(bad), grpc.StatusCode.INVALID_ARGUMENT, "tasks[1]"
    )
    assert list((await harness.dispatch.ListTasks(pb.ListTasksRequest())).tasks) == []
    ok = await harness.dispatch.EnqueueTasks(
        pb.EnqueueTasksRequest(
            tasks=[pb.EnqueueTaskRequest(capability="c", name=str(i)) for i in range(50)]
        )
    )
    assert [r.task.name for r in ok.results] == [str(i) for i in range(50)]
    await expect_error(
        harness.dispatch.EnqueueTasks(pb.EnqueueTasksRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must not be empty",
    )


# ------------------------------------------------------------------ routing


async def test_capability_routing_and_pinning(harness):
    await harness.register("alpha", ["a"])
    await harness.register("beta", ["b"])
    sa, sb = await subscribe(harness, "alpha", 10), await subscribe(harness, "beta", 10)
    ta = await enqueue(harness, capability="a")
    tb = await enqueue(harness, capability="b")
    pinned = await enqueue(harness, agent_id="beta")
    assert (await assignment(sa)).task_id == ta.task_id
    got_b = {(await assignment(sb)).task_id, (await assignment(sb)).task_id}
    assert got_b == {tb.task_id, pinned.task_id}
    # Nobody has capability "c": it stays queued.
    tc = await enqueue(harness, capability="c")
    await sa.expect_quiet(0.2)
    assert (await get(harness, tc.task_id)).state == TS.TASK_STATE_QUEUED
    await sa.close()
    await sb.close()


async def test_subscription_capabilities_must_be_registered(harness):
    await harness.register("a1", ["x"])
    reader = StreamReader(
        harness.dispatch.SubscribeTasks(pb.SubscribeTasksRequest(agent_id="a1", capabilities=["y"]))
    )
    await reader.done.wait()
    assert reader.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    reader = StreamReader(harness.dispatch.SubscribeTasks(pb.SubscribeTasksRequest(agent_id="zz")))
    await reader.done.wait()
    assert reader.error.code() == grpc.StatusCode.NOT_FOUND
    reader = StreamReader(
        harness.dispatch.SubscribeTasks(pb.SubscribeTasksRequest(agent_id="a1", max_in_flight=-1))
    )
    await reader.done.wait()
    assert reader.error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_narrowed_subscription_only_gets_its_capabilities(harness):
    await harness.register("a1", ["x", "y"])
    sx = await subscribe(harness, "a1", 5, capabilities=["x"])
    ty = await enqueue(harness, capability="y")
    tx = await enqueue(harness, capability="x")
    assert (await assignment(sx)).task_id == tx.task_id
    await sx.expect_quiet(0.2)
    sy = await subscribe(harness, "a1", 5, capabilities=["y"])
    assert (await assignment(sy)).task_id == ty.task_id
    await sx.close()
    await sy.close()


async def test_agent_state_gates_dispatch(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1", 5)

    async def idle() -> bool:
        agent = (await harness.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="a1"))).agent
        return agent.state == lpb.AGENT_STATE_IDLE

    # Subscribing moves it from INITIALIZING (a stream sends nothing when it opens,
    # so the change is awaited: on PostgreSQL reads see it once it is committed).
    await eventually(idle, what="IDLE after subscribing")
    for blocked in (lpb.AGENT_STATE_ERROR, lpb.AGENT_STATE_FINISHED):
        await harness.lifecycle.ReportState(lpb.ReportStateRequest(agent_id="a1", state=blocked))
        t = await enqueue(harness, capability="c")
        await sub.expect_quiet(0.2)
        assert (await get(harness, t.task_id)).state == TS.TASK_STATE_QUEUED
        await harness.lifecycle.ReportState(
            lpb.ReportStateRequest(agent_id="a1", state=lpb.AGENT_STATE_ACTIVE)
        )
        assert (await assignment(sub)).task_id == t.task_id
    await sub.close()


async def test_max_in_flight_is_respected(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1", max_in_flight=2)
    tasks = [await enqueue(harness, capability="c", name=str(i)) for i in range(5)]
    first = [await assignment(sub), await assignment(sub)]
    await sub.expect_quiet(0.2)
    assert [t.name for t in first] == ["0", "1"]
    await complete(harness, first[0], "a1")
    third = await assignment(sub)
    assert third.name == "2"
    await sub.expect_quiet(0.1)
    states = [(await get(harness, t.task_id)).state for t in tasks]
    assert states.count(TS.TASK_STATE_ASSIGNED) == 2
    await sub.close()


async def test_several_subscriptions_of_one_agent_have_their_own_room(harness):
    await harness.register("a1", ["c"])
    s1 = await subscribe(harness, "a1", 1)
    s2 = await subscribe(harness, "a1", 2)
    for i in range(4):
        await enqueue(harness, capability="c", name=str(i))
    got1 = [await assignment(s1)]
    got2 = [await assignment(s2), await assignment(s2)]
    await s1.expect_quiet(0.1)
    await s2.expect_quiet(0.1)
    assert len(got1) + len(got2) == 3
    assert {t.name for t in got1 + got2} == {"0", "1", "2"}
    await s1.close()
    await s2.close()


async def test_priority_then_fifo(harness):
    await harness.register("a1", ["c"])
    names = []
    for name, prio in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 1)]:
        await enqueue(harness, capability="c", name=name, priority=prio)
        names.append(name)
    sub = await subscribe(harness, "a1", 1)
    order = []
    for _ in names:
        t = await assignment(sub)
        order.append(t.name)
        await complete(harness, t, "a1")
    assert order == ["high1", "high2", "mid", "low1", "low2"]
    await sub.close()


async def test_delay_and_schedule_time(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1", 5)
    start = datetime.now(UTC)
    delayed = await enqueue(harness, capability="c", delay=dur(0.3), name="delayed")
    assert delayed.state == TS.TASK_STATE_SCHEDULED
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(start + timedelta(seconds=0.15))
    scheduled = await enqueue(harness, capability="c", schedule_time=at, name="at")
    now_task = await enqueue(harness, capability="c", name="now")
    first = await assignment(sub)
    assert first.task_id == now_task.task_id
    second = await assignment(sub)
    t2 = datetime.now(UTC)
    third = await assignment(sub)
    t3 = datetime.now(UTC)
    assert (second.name, third.name) == ("at", "delayed")
    assert t2 - start >= timedelta(seconds=0.15)
    assert t3 - start >= timedelta(seconds=0.3)
    assert scheduled.schedule_time.ToDatetime(tzinfo=UTC) == at.ToDatetime(tzinfo=UTC)
    await sub.close()


# ------------------------------------------------------------------ results


async def test_complete_fencing_and_idempotent_repeat(harness):
    await harness.register("a1", ["c"])
    await harness.register("a2", ["c"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="c")
    got = await assignment(sub)
    assert got.attempt == 1 and got.assigned_agent_id == "a1"
    assert got.lease_expire_time.seconds > 0
    D = harness.dispatch
    await expect_error(
        D.CompleteTask(pb.CompleteTaskRequest(task_id=t.task_id, agent_id="a2", attempt=1)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "leased to another attempt, not to 'a2' attempt 1",
    )
    # The refusal names no other agent: an agent learns nothing about who holds it.
    err = await expect_error(
        D.CompleteTask(pb.CompleteTaskRequest(task_id=t.task_id, agent_id="a2", attempt=1)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "'a1'" not in err.details()
    await expect_error(
        D.CompleteTask(pb.CompleteTaskRequest(task_id=t.task_id, agent_id="a1", attempt=2)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert (await get(harness, t.task_id)).state == TS.TASK_STATE_ASSIGNED
    done = await complete(harness, got, "a1", answer=42)
    assert done.state == TS.TASK_STATE_COMPLETED and done.output["answer"] == 42
    again = await complete(harness, got, "a1", answer=42)
    assert again.state == TS.TASK_STATE_COMPLETED and again.finish_time == done.finish_time
    await expect_error(
        D.CompleteTask(
            pb.CompleteTaskRequest(
                task_id=t.task_id, agent_id="a1", attempt=1, output=struct(answer=43)
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "already finished",
    )
    await expect_error(
        D.CompleteTask(pb.CompleteTaskRequest(task_id="missing", agent_id="a1", attempt=1)),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        D.CompleteTask(pb.CompleteTaskRequest(task_id=t.task_id, agent_id="a1", attempt=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "attempt",
    )
    await sub.close()


async def test_retry_with_backoff_then_fail_permanently(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    policy = common_pb2.RetryPolicy(
        max_attempts=3, initial_backoff=dur(0.1), backoff_multiplier=2.0, max_backoff=dur(0.15)
    )
    t = await enqueue(harness, capability="c", retry_policy=policy)
    ready_at = None
    for attempt in (1, 2, 3):
        got = await assignment(sub)
        assert got.attempt == attempt
        if ready_at is not None:
            # Not before the backoff passed (server times: no client-side latency).
            assert got.update_time.ToDatetime(UTC) >= ready_at
        resp = await harness.dispatch.FailTask(
            pb.FailTaskRequest(
                task_id=t.task_id,
                agent_id="a1",
                attempt=attempt,
                error=common_pb2.TaskError(message=f"boom {attempt}", type="ValueError"),
            )
        )
        expected = TS.TASK_STATE_FAILED if attempt == 3 else TS.TASK_STATE_SCHEDULED
        assert resp.task.state == expected
        if attempt < 3:
            # Backoff 0.1 s after attempt 1, then min(0.2, max 0.15) after attempt 2.
            failed = resp.task.update_time.ToDatetime(UTC)
            ready_at = resp.task.schedule_time.ToDatetime(UTC)
            assert ready_at - failed == timedelta(seconds=0.1 if attempt == 1 else 0.15)
    final = await get(harness, t.task_id)
    assert final.last_error.message == "boom 3" and final.last_error.type == "ValueError"
    await expect_error(
        harness.dispatch.FailTask(pb.FailTaskRequest(task_id=t.task_id, agent_id="a1", attempt=3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "error.message",
    )
    await sub.close()


async def test_non_retryable_failure_fails_at_once(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="c")
    got = await assignment(sub)
    req = pb.FailTaskRequest(
        task_id=t.task_id,
        agent_id="a1",
        attempt=got.attempt,
        error=common_pb2.TaskError(message="bad input"),
        non_retryable=True,
    )
    resp = await harness.dispatch.FailTask(req)
    assert resp.task.state == TS.TASK_STATE_FAILED and resp.task.attempt == 1
    repeat = await harness.dispatch.FailTask(req)
    assert repeat.task.state == TS.TASK_STATE_FAILED
    await sub.close()


async def test_lease_expiry_retries_elsewhere(harness):
    await harness.register("slow", ["c"])
    await harness.register("fast", ["c"])
    s_slow = await subscribe(harness, "slow")
    t = await enqueue(
        harness,
        capability="c",
        timeout=dur(0.2),
        retry_policy=common_pb2.RetryPolicy(initial_backoff=dur(0)),
    )
    first = await assignment(s_slow)
    assert first.attempt == 1
    s_fast = await subscribe(harness, "fast")
    second = await assignment(s_fast)
    assert second.task_id == t.task_id and second.attempt == 2
    assert second.last_error.type == "LeaseExpired"
    # The late result of attempt 1 is refused and changes nothing.
    await expect_error(complete(harness, first, "slow"), grpc.StatusCode.FAILED_PRECONDITION)
    done = await complete(harness, second, "fast")
    assert done.state == TS.TASK_STATE_COMPLETED and done.assigned_agent_id == "fast"
    await s_slow.close()
    await s_fast.close()


async def test_heartbeats_keep_a_long_task_alive(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="c", heartbeat_timeout=dur(0.3), timeout=dur(30))
    got = await assignment(sub)
    lease0 = got.lease_expire_time.ToDatetime(tzinfo=UTC)
    assert lease0 - datetime.now(UTC) <= timedelta(seconds=0.3)
    # Heartbeat across well over the heartbeat timeout; each extends the lease.
    for i in range(6):
        hb = await harness.dispatch.HeartbeatTask(
            pb.HeartbeatTaskRequest(
                task_id=t.task_id, agent_id="a1", attempt=1, progress=struct(step=i)
            )
        )
        assert hb.cancel_requested is False
        await asyncio.sleep(0.1)  # the agent "works" between heartbeats
    current = await get(harness, t.task_id)
    assert current.state == TS.TASK_STATE_ASSIGNED and current.attempt == 1
    assert current.progress["step"] == 5
    # Silence: the lease expires and the attempt ends.
    retried = await eventually(
        lambda: _attempt_at_least(harness, t.task_id, 2), what="retry after missed heartbeat"
    )
    assert retried.last_error.type == "LeaseExpired"
    await sub.close()


async def _attempt_at_least(h: Harness, task_id: str, n: int) -> pb.Task | None:
    t = await get(h, task_id)
    return t if t.attempt >= n or t.state == TS.TASK_STATE_SCHEDULED else None


# ------------------------------------------------------------------ cancel


async def test_cancel_queued_and_assigned(harness):
    await harness.register("a1", ["c"])
    q = await enqueue(harness, capability="c", delay=dur(60))
    resp = await harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=q.task_id))
    assert resp.task.state == TS.TASK_STATE_CANCELLED
    sub = await subscribe(harness, "a1")
    t = await enqueue(harness, capability="c")
    got = await assignment(sub)
    await harness.dispatch.CancelTask(
        pb.CancelTaskRequest(task_id=t.task_id, reason="changed mind")
    )
    msg = await sub.next()
    assert msg.WhichOneof("message") == "cancellation"
    assert msg.cancellation.task_id == t.task_id and msg.cancellation.reason == "changed mind"
    hb = await harness.dispatch.HeartbeatTask(
        pb.HeartbeatTaskRequest(task_id=t.task_id, agent_id="a1", attempt=got.attempt)
    )
    assert hb.cancel_requested is True
    await expect_error(complete(harness, got, "a1"), grpc.StatusCode.FAILED_PRECONDITION, "cancel")
    again = await harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=t.task_id))
    assert again.task.state == TS.TASK_STATE_CANCELLED
    # The slot was freed: the next task flows.
    t2 = await enqueue(harness, capability="c")
    got2 = await assignment(sub)
    assert got2.task_id == t2.task_id
    await complete(harness, got2, "a1")
    await expect_error(
        harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=t2.task_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "COMPLETED",
    )
    await sub.close()


# ------------------------------------------------------------------ liveness


async def test_disconnected_agent_goes_offline_and_its_task_moves(make_harness):
    h = await make_harness(agent_timeout=timedelta(milliseconds=300))
    await h.register("gone", ["c"])
    await h.register("other", ["c"])
    s1 = await subscribe(h, "gone")
    t = await enqueue(
        h, capability="c", retry_policy=common_pb2.RetryPolicy(initial_backoff=dur(0))
    )
    first = await assignment(s1)
    await s1.close()
    s2 = await subscribe(h, "other")
    second = await assignment(s2)
    assert second.task_id == t.task_id and second.attempt == first.attempt + 1
    assert second.last_error.type == "AgentOffline"
    agent = (await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="gone"))).agent
    assert agent.state == lpb.AGENT_STATE_OFFLINE
    await s2.close()


async def test_reconnect_in_time_keeps_the_lease(make_harness):
    h = await make_harness(agent_timeout=timedelta(seconds=5))
    await h.register("a1", ["c"])
    s1 = await subscribe(h, "a1")
    t = await enqueue(h, capability="c")
    got = await assignment(s1)
    await s1.close()
    s2 = await subscribe(h, "a1")
    # The kept lease is sent again on the new stream, same attempt, and fills
    # its only slot: nothing else is sent.
    again = await assignment(s2)
    assert (again.task_id, again.attempt) == (got.task_id, got.attempt)
    other = await enqueue(h, capability="c")
    await s2.expect_quiet(0.2)
    done = await complete(h, got, "a1")
    assert done.state == TS.TASK_STATE_COMPLETED and done.attempt == 1
    assert (await assignment(s2)).task_id == other.task_id
    assert t.task_id != other.task_id
    await s2.close()


async def test_deregister_ends_stream_and_retries_task(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    t = await enqueue(
        harness, capability="c", retry_policy=common_pb2.RetryPolicy(initial_backoff=dur(0))
    )
    await assignment(sub)
    await harness.lifecycle.DeregisterAgent(lpb.DeregisterAgentRequest(agent_id="a1"))
    await asyncio.wait_for(sub.done.wait(), 5)
    assert sub.error is None  # clean end of stream
    task = await get(harness, t.task_id)
    assert task.state == TS.TASK_STATE_QUEUED and task.last_error.type == "AgentDeregistered"


# ------------------------------------------------------------------ list / restart


async def test_list_filters_and_paging(harness):
    await harness.register("p", [])
    for i in range(7):
        await enqueue(harness, capability="x" if i % 2 else "y", name=str(i))
    await enqueue(harness, agent_id="p", name="pinned")
    D = harness.dispatch
    xs = await D.ListTasks(pb.ListTasksRequest(capability="x"))
    assert [t.name for t in xs.tasks] == ["5", "3", "1"]
    pinned = await D.ListTasks(pb.ListTasksRequest(agent_id="p"))
    assert [t.name for t in pinned.tasks] == ["pinned"]
    names, token = [], ""
    while True:
        page = await D.ListTasks(pb.ListTasksRequest(page_size=3, page_token=token))
        names += [t.name for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert names == ["pinned", "6", "5", "4", "3", "2", "1", "0"]
    queued = await D.ListTasks(pb.ListTasksRequest(state=TS.TASK_STATE_QUEUED))
    assert len(queued.tasks) == 8
    await expect_error(
        D.ListTasks(pb.ListTasksRequest(state=77)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_list_by_each_final_state_pages_newest_first(harness):
    """FAILED and CANCELLED are read through a partial index of their own,
    COMPLETED from the table: each state lists exactly its tasks, newest first,
    across pages."""
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    D = harness.dispatch
    want: dict[int, list[str]] = {TS.TASK_STATE_COMPLETED: [], TS.TASK_STATE_FAILED: []}
    want[TS.TASK_STATE_CANCELLED] = []
    for i in range(9):
        if i % 3 == 2:  # cancelled while it waits, so that it is never assigned
            t = await enqueue(harness, capability="c", name=f"t{i}", delay=dur(600))
            await D.CancelTask(pb.CancelTaskRequest(task_id=t.task_id))
            want[TS.TASK_STATE_CANCELLED].insert(0, t.name)
            continue
        t = await enqueue(harness, capability="c", name=f"t{i}")
        got = await assignment(sub)
        assert got.task_id == t.task_id
        if i % 3 == 0:
            await complete(harness, got, "a1")
            want[TS.TASK_STATE_COMPLETED].insert(0, t.name)
        else:
            await D.FailTask(
                pb.FailTaskRequest(
                    task_id=t.task_id,
                    agent_id="a1",
                    attempt=got.attempt,
                    error=common_pb2.TaskError(message="no"),
                    non_retryable=True,
                )
            )
            want[TS.TASK_STATE_FAILED].insert(0, t.name)
    queued = await enqueue(harness, capability="other", name="queued")
    for state, names in want.items():
        listed, token = [], ""
        while True:
            page = await D.ListTasks(
                pb.ListTasksRequest(state=state, page_size=2, page_token=token)
            )
            assert all(t.state == state for t in page.tasks)
            listed += [t.name for t in page.tasks]
            token = page.next_page_token
            if not token:
                break
        assert listed == names, TS.Name(state)
    open_ = await D.ListTasks(pb.ListTasksRequest(state=TS.TASK_STATE_QUEUED))
    assert [t.task_id for t in open_.tasks] == [queued.task_id]
    await sub.close()


async def test_list_by_agent_merges_pinned_and_assigned_newest_first(harness):
    """The agent filter takes tasks pinned to the agent and tasks it was assigned
    (each side read from its own index): one order, no task twice, paged."""
    h = harness
    await h.register("p", ["c"])
    await h.register("q", ["c"])
    D = h.dispatch
    names: list[str] = []
    sub = await subscribe(h, "p", max_in_flight=10, capabilities=["c"])
    for i in range(4):
        await enqueue(h, capability="c", name=f"run{i}")  # p takes it: assigned
        await assignment(sub)
        await enqueue(h, agent_id="q", name=f"other{i}")  # pinned elsewhere
        await enqueue(h, agent_id="p", name=f"pin{i}")  # pinned to p and taken by it
        await assignment(sub)
        names = [f"pin{i}", f"run{i}", *names]
    await sub.close()
    await enqueue(h, agent_id="p", name="waiting")  # pinned, not assigned (yet)
    names.insert(0, "waiting")

    got, token = [], ""
    while True:
        page = await D.ListTasks(pb.ListTasksRequest(agent_id="p", page_size=3, page_token=token))
        assert len(page.tasks) <= 3
        got += [t.name for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert got == names
    assigned = await D.ListTasks(
        pb.ListTasksRequest(agent_id="p", state=TS.TASK_STATE_ASSIGNED, page_size=100)
    )
    assert [t.name for t in assigned.tasks] == [n for n in names if n != "waiting"]
    others = await D.ListTasks(pb.ListTasksRequest(agent_id="q"))
    assert [t.name for t in others.tasks] == [f"other{i}" for i in reversed(range(4))]


async def test_restart_keeps_queue_order_leases_and_schedules(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1")
    held = await enqueue(harness, capability="c", name="held")
    got = await assignment(sub)
    for name, prio in [("b", 0), ("a", 3), ("c", 0)]:
        await enqueue(harness, capability="c", name=name, priority=prio)
    later = await enqueue(harness, capability="c", name="later", delay=dur(0.5))
    await sub.close()
    await harness.restart()
    task = await get(harness, held.task_id)
    assert task.state == TS.TASK_STATE_ASSIGNED
    assert task.lease_expire_time == got.lease_expire_time
    sub = await subscribe(harness, "a1", max_in_flight=1)
    # The kept lease is re-sent and occupies the slot until the agent finishes it.
    resent = await assignment(sub)
    assert (resent.task_id, resent.attempt) == (got.task_id, got.attempt)
    await complete(harness, got, "a1")
    order = []
    for _ in range(4):
        t = await assignment(sub)
        order.append(t.name)
        await complete(harness, t, "a1")
    assert order == ["a", "b", "c", "later"]
    assert later.state == TS.TASK_STATE_SCHEDULED
    await sub.close()


# ------------------------------------------------------------------ concurrency


@pytest.mark.timeout(120)
async def test_many_agents_many_tasks_exactly_once(harness):
    """Every task completes exactly once, and no subscription ever holds more than its
    max_in_flight, while agents fail, disconnect and reconnect at random."""
    n_agents, n_tasks = 12, 600
    caps = ["c0", "c1", "c2"]
    rng = random.Random(7)
    for i in range(n_agents):
        await harness.register(f"w{i}", caps if i % 3 == 0 else [caps[i % 3]])
    completions: dict[str, int] = {}
    violations: list[str] = []
    engine = harness.server.dispatch
    done = asyncio.Event()

    async def worker(agent_id: str, limit: int) -> None:
        while not done.is_set():
            call = harness.dispatch.SubscribeTasks(
                pb.SubscribeTasksRequest(agent_id=agent_id, max_in_flight=limit)
            )
            held: set[str] = set()
            budget = rng.randint(5, 40)  # then disconnect and come back
            pending: set[asyncio.Task] = set()

            async def finish(task: pb.Task, held: set[str] = held) -> None:
                await asyncio.sleep(0)
                # The agent gives the slot up when it sends the result: the server
                # may assign the next task before this call's reply arrives.
                held.discard(task.task_id)
                try:
                    if rng.random() < 0.1:
                        await harness.dispatch.FailTask(
                            pb.FailTaskRequest(
                                task_id=task.task_id,
                                agent_id=agent_id,
                                attempt=task.attempt,
                                error=common_pb2.TaskError(message="flaky"),
                            )
                        )
                    else:
                        resp = await harness.dispatch.CompleteTask(
                            pb.CompleteTaskRequest(
                                task_id=task.task_id, agent_id=agent_id, attempt=task.attempt
                            )
                        )
                        if resp.task.state == TS.TASK_STATE_COMPLETED:
                            completions[task.task_id] = completions.get(task.task_id, 0) + 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                finally:
                    if len(completions) == n_tasks:
                        done.set()

            try:
                async for msg in call:
                    if msg.WhichOneof("message") != "assignment":
                        continue
                    task = msg.assignment.task
                    held.add(task.task_id)
                    if len(held) > limit:
                        violations.append(f"{agent_id} holds {len(held)} > {limit}")
                    for sub_id, (aid, n, cap) in engine.in_flight_by_subscription().items():
                        if n > cap:
                            violations.append(f"server: {aid} sub {sub_id} holds {n} > {cap}")
                    pending.add(asyncio.create_task(finish(task)))
                    budget -= 1
                    if budget <= 0 or done.is_set():
                        break
            except grpc.aio.AioRpcError:
                pass
            finally:
                call.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    workers = [asyncio.create_task(worker(f"w{i}", 1 + i % 4)) for i in range(n_agents)]
    policy = common_pb2.RetryPolicy(max_attempts=100, initial_backoff=dur(0.01))
    ids: list[str] = []
    for start in range(0, n_tasks, 100):
        resp = await harness.dispatch.EnqueueTasks(
            pb.EnqueueTasksRequest(
                tasks=[
                    pb.EnqueueTaskRequest(
                        capability=caps[(start + i) % 3], retry_policy=policy, timeout=dur(2)
                    )
                    for i in range(100)
                ]
            )
        )
        ids += [r.task.task_id for r in resp.results]
    await asyncio.wait_for(done.wait(), 90)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    assert not violations, violations[:5]
    assert set(completions) == set(ids)
    assert all(count == 1 for count in completions.values())
    completed = 0
    token = ""
    while True:
        page = await harness.dispatch.ListTasks(
            pb.ListTasksRequest(state=TS.TASK_STATE_COMPLETED, page_size=1000, page_token=token)
        )
        completed += len(page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert completed == n_tasks


async def test_cancellation_arrives_before_the_task_that_takes_its_slot(harness):
    await harness.register("a1", ["c"])
    sub = await subscribe(harness, "a1", max_in_flight=1)
    first = await enqueue(harness, capability="c", name="first")
    await enqueue(harness, capability="c", name="second")
    got = await assignment(sub)
    assert got.task_id == first.task_id
    await harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=first.task_id))
    msg = await sub.next()
    assert msg.WhichOneof("message") == "cancellation" and msg.cancellation.task_id == got.task_id
    assert (await assignment(sub)).name == "second"
    await sub.close()


@pytest.mark.backends("sqlite")  # holds SQLite's write lock to stall the commit
async def test_a_cancelled_call_does_not_fail_the_others_in_its_commit(harness):
    """Calls share one commit; a client giving up on one must not cancel the rest."""
    import sqlite3

    await harness.register("a1")
    blocker = sqlite3.connect(harness.config.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the server's next commit waits for this lock
    try:
        calls = [
            harness.lifecycle.ReportState(
                lpb.ReportStateRequest(agent_id="a1", state=lpb.AGENT_STATE_IDLE)
            )
            for _ in range(10)
        ]
        await eventually(
            lambda: harness.server.storage.agents["a1"].history_seq >= 11,
            what="all ten reports applied in memory, waiting for their commit",
        )
        for call in calls[:5]:
            call.cancel()
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    results = await asyncio.gather(*calls[5:])
    assert all(r.agent.state == lpb.AGENT_STATE_IDLE for r in results)
    hist = await harness.lifecycle.ListStateTransitions(
        lpb.ListStateTransitionsRequest(agent_id="a1", page_size=100)
    )
    assert len(hist.transitions) == 11  # the cancelled calls' changes were committed too
