"""DispatchService.Connect, the work stream: every rule of the unary result calls
holds on it, item by item, and both shapes interoperate."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from opscore_proto.v1 import common_pb2
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

from tests.conftest import Harness, eventually, expect_error
from tests.test_dispatch import dur, enqueue, struct, subscribe

pytestmark = pytest.mark.backends("sqlite", "postgres")


TS = pb.TaskState
OK = 0
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Work:
    """A client's work stream: send items, await what the server sends."""

    def __init__(self, h: Harness, agent_id: str, max_in_flight: int = 1, **hello: Any) -> None:
        self.agent_id = agent_id
        self.call = h.dispatch.Connect()
        self.hello = pb.ConnectHello(agent_id=agent_id, max_in_flight=max_in_flight, **hello)
        self.accepted: pb.ConnectAccepted | None = None
        self.messages: asyncio.Queue[pb.ServerMessage] = asyncio.Queue()
        self.responses = 0
        self.error: grpc.aio.AioRpcError | None = None
        self.done = asyncio.Event()
        self._ids = itertools.count(1)
        self._pump: asyncio.Task[None] | None = None

    async def open(self) -> Work:
        await self.call.write(pb.ConnectRequest(hello=self.hello))
        first = await self.call.read()
        assert first is not grpc.aio.EOF and first.HasField("accepted"), first
        self.accepted = first.accepted
        for m in first.messages:
            self.messages.put_nowait(m)
        self._pump = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    return
                self.responses += 1
                for m in resp.messages:
                    await self.messages.put(m)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    async def next(self, kind: str | None = None, timeout: float = 10.0) -> pb.ServerMessage:
        m = await asyncio.wait_for(self.messages.get(), timeout)
        if kind is not None:
            assert m.WhichOneof("message") == kind, m
        return m

    async def assignment(self) -> pb.Task:
        return (await self.next("assignment")).assignment.task

    async def send(self, *items: pb.AgentMessage) -> list[int]:
        ids = []
        for item in items:
            if not item.id:
                item.id = next(self._ids)
            ids.append(item.id)
        await self.call.write(pb.ConnectRequest(messages=list(items)))
        return ids

    async def collect(self, n: int) -> dict[str, list[pb.ServerMessage]]:
        """The next `n` messages by kind (when their relative order may vary)."""
        out: dict[str, list[pb.ServerMessage]] = {}
        for _ in range(n):
            m = await self.next()
            kind = m.WhichOneof("message")
            out.setdefault(kind, []).append(getattr(m, kind))
        return out

    async def result(self, timeout: float = 10.0) -> pb.AgentMessageResult:
        return (await self.next("result", timeout)).result

    async def close(self) -> None:
        self.call.cancel()
        if self._pump is not None:
            with contextlib.suppress(BaseException):
                await self._pump


def complete(task: pb.Task, **output: object) -> pb.AgentMessage:
    return pb.AgentMessage(
        completion=pb.TaskCompletion(
            task_id=task.task_id, attempt=task.attempt, output=struct(**output)
        )
    )


def fail(task: pb.Task, message: str = "boom", non_retryable: bool = False) -> pb.AgentMessage:
    return pb.AgentMessage(
        failure=pb.TaskFailure(
            task_id=task.task_id,
            attempt=task.attempt,
            error=common_pb2.TaskError(message=message, type="Boom"),
            non_retryable=non_retryable,
        )
    )


async def connect(h: Harness, agent_id: str, max_in_flight: int = 1, **hello: Any) -> Work:
    return await Work(h, agent_id, max_in_flight, **hello).open()


async def test_hello_accepted_then_assign_complete_acknowledged(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    assert work.accepted.agent.agent_id == "w1"
    assert work.accepted.agent.state == lpb.AGENT_STATE_IDLE
    assert work.accepted.max_in_flight == 1
    assert work.accepted.agent_timeout.seconds == 30
    task = await enqueue(harness, capability="c", input=struct(x=1))
    got = await work.assignment()
    assert got.task_id == task.task_id and got.attempt == 1
    (sent,) = await work.send(complete(got, y=2))
    ack = await work.result()
    assert (ack.id, ack.code, ack.task_state) == (sent, OK, TS.TASK_STATE_COMPLETED)
    stored = (await harness.dispatch.GetTask(pb.GetTaskRequest(task_id=task.task_id))).task
    assert stored.state == TS.TASK_STATE_COMPLETED and stored.output["y"] == 2
    await work.close()


async def test_refused_item_answers_its_status_and_the_stream_goes_on(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    await enqueue(harness, capability="c")
    task = await work.assignment()
    wrong = pb.Task(task_id=task.task_id, attempt=task.attempt + 1)
    unknown = pb.Task(task_id="no-such-task", attempt=1)
    nan = pb.AgentMessage(
        completion=pb.TaskCompletion(
            task_id=task.task_id,
            attempt=task.attempt,
            output=struct_pb2.Struct(fields={"x": struct_pb2.Value(number_value=math.nan)}),
        )
    )
    empty = pb.AgentMessage()
    ids = await work.send(complete(wrong), complete(unknown), nan, empty, complete(task))
    acks = [await work.result() for _ in ids]
    assert [a.id for a in acks] == ids, "results come in the order the items were sent"
    assert (acks[0].code, acks[0].reason) == (FAILED_PRECONDITION, "LEASE_LOST")
    assert acks[1].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert acks[2].code == INVALID_ARGUMENT and acks[2].field == "completion.output"
    assert "not finite" in acks[2].message
    assert acks[3].code == INVALID_ARGUMENT and acks[3].field == "message"
    assert (acks[4].code, acks[4].task_state) == (OK, TS.TASK_STATE_COMPLETED)
    assert work.error is None and not work.done.is_set()
    await work.close()


async def test_repeated_completion_is_idempotent_and_a_different_one_is_refused(
    harness: Harness,
):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    await enqueue(harness, capability="c")
    task = await work.assignment()
    await work.send(complete(task, v=1))
    assert (await work.result()).code == OK
    await work.send(complete(task, v=1))  # a retry after a lost answer
    again = await work.result()
    assert (again.code, again.task_state) == (OK, TS.TASK_STATE_COMPLETED)
    await work.send(complete(task, v=2))
    other = await work.result()
    assert (other.code, other.reason) == (FAILED_PRECONDITION, "TASK_FINISHED")
    await work.close()


async def test_failures_retry_or_fail_for_good(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    policy = common_pb2.RetryPolicy(max_attempts=3, initial_backoff=dur(0))
    await enqueue(harness, capability="c", retry_policy=policy)
    first = await work.assignment()
    await work.send(fail(first))
    # The retry is ready at once and takes the freed slot: its assignment may
    # come before the failure's result (both follow the same commit).
    got = await work.collect(2)
    assert got["result"][0].code == OK
    second = got["assignment"][0].task
    assert (second.task_id, second.attempt) == (first.task_id, 2)
    await work.send(fail(second, non_retryable=True))
    ack = await work.result()
    assert (ack.code, ack.task_state) == (OK, TS.TASK_STATE_FAILED)
    await work.close()


async def test_heartbeat_extends_lease_and_reports_cancellation(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    task = await enqueue(harness, capability="c", heartbeat_timeout=dur(30))
    held = await work.assignment()
    await work.send(
        pb.AgentMessage(
            heartbeat=pb.TaskHeartbeat(
                task_id=held.task_id, attempt=held.attempt, progress=struct(pct=50)
            )
        )
    )
    ack = await work.result()
    assert ack.code == OK and not ack.cancel_requested
    assert ack.lease_expire_time.ToDatetime() >= held.lease_expire_time.ToDatetime()
    stored = (await harness.dispatch.GetTask(pb.GetTaskRequest(task_id=task.task_id))).task
    assert stored.progress["pct"] == 50
    await harness.dispatch.CancelTask(pb.CancelTaskRequest(task_id=task.task_id, reason="stop"))
    cancel = (await work.next("cancellation")).cancellation
    assert (cancel.task_id, cancel.attempt, cancel.reason) == (task.task_id, 1, "stop")
    await work.send(
        pb.AgentMessage(heartbeat=pb.TaskHeartbeat(task_id=held.task_id, attempt=held.attempt))
    )
    assert (await work.result()).cancel_requested
    await work.close()


async def test_both_shapes_interoperate(harness: Harness):
    await harness.register("w1", ["c"])
    # Assigned on the work stream, completed with the unary call.
    work = await connect(harness, "w1")
    await enqueue(harness, capability="c")
    held = await work.assignment()
    done = await harness.dispatch.CompleteTask(
        pb.CompleteTaskRequest(task_id=held.task_id, agent_id="w1", attempt=held.attempt)
    )
    assert done.task.state == TS.TASK_STATE_COMPLETED
    await work.close()
    # Assigned on SubscribeTasks, completed on a work stream of the same agent.
    sub = await subscribe(harness, "w1")
    await enqueue(harness, capability="c")
    held = (await sub.next()).assignment.task
    work = await connect(harness, "w1", max_in_flight=0)
    await work.send(complete(held))
    assert (await work.result()).task_state == TS.TASK_STATE_COMPLETED
    await sub.close()
    await work.close()


async def test_max_in_flight_and_capacity_changes(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1", max_in_flight=2)
    for _ in range(5):
        await enqueue(harness, capability="c")
    a, b = await work.assignment(), await work.assignment()
    assert work.messages.empty()
    engine = harness.server.dispatch
    (sub,) = engine._subs_by_agent["w1"]
    assert len(sub.in_flight) == 2
    # Pause: completing frees slots, but nothing new comes.
    await work.send(pb.AgentMessage(capacity=pb.StreamCapacity(max_in_flight=0)), complete(a))
    assert (await work.result()).code == OK
    assert (await work.result()).code == OK
    await asyncio.sleep(0.2)
    assert work.messages.empty() and len(sub.in_flight) == 1
    # Resume with room for three: three arrive, one of them in the same batch.
    await work.send(pb.AgentMessage(capacity=pb.StreamCapacity(max_in_flight=4)))
    out = await work.collect(4)
    assert [r.code for r in out["result"]] == [OK]
    got = [a.task for a in out["assignment"]]
    assert len({t.task_id for t in got} | {b.task_id}) == 4
    await work.send(pb.AgentMessage(capacity=pb.StreamCapacity(max_in_flight=1001)))
    bad = await work.result()
    assert bad.code == INVALID_ARGUMENT and "max_in_flight" in bad.field
    await work.close()


async def test_state_reports_gate_dispatch(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    report = pb.AgentMessage(state_report=pb.AgentStateReport(state=lpb.AGENT_STATE_ERROR))
    await work.send(report)
    assert (await work.result()).code == OK
    agent = (await harness.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="w1"))).agent
    assert agent.state == lpb.AGENT_STATE_ERROR
    await enqueue(harness, capability="c")
    await asyncio.sleep(0.2)
    assert work.messages.empty(), "an agent in ERROR gets no tasks"
    await work.send(pb.AgentMessage(state_report=pb.AgentStateReport(state=lpb.AGENT_STATE_IDLE)))
    out = await work.collect(2)
    assert out["result"][0].code == OK and len(out["assignment"]) == 1
    await work.send(
        pb.AgentMessage(state_report=pb.AgentStateReport(state=lpb.AGENT_STATE_OFFLINE))
    )
    refused = await work.result()
    assert refused.code == INVALID_ARGUMENT and refused.field == "state"
    await work.close()


async def test_batches_carry_several_items_each_way(harness: Harness):
    await harness.register("w1", ["c"])
    for _ in range(20):
        await enqueue(harness, capability="c")
    work = await connect(harness, "w1", max_in_flight=20)
    tasks = [await work.assignment() for _ in range(20)]
    assert work.responses < 20, "queued tasks go out several per message"
    ids = await work.send(*[complete(t) for t in tasks])
    acks = [await work.result() for _ in ids]
    assert [a.id for a in acks] == ids and all(a.code == OK for a in acks)
    listed = await harness.dispatch.ListTasks(pb.ListTasksRequest(state=TS.TASK_STATE_COMPLETED))
    assert len(listed.tasks) == 20
    await work.close()


async def test_one_log_line_per_stream_with_what_it_carried(harness: Harness, caplog):
    await harness.register("w1", ["c"])
    caplog.set_level(logging.INFO, logger="opscore.rpc")
    work = await connect(harness, "w1", max_in_flight=5)
    for _ in range(5):
        await enqueue(harness, capability="c")
    tasks = [await work.assignment() for _ in range(5)]
    await work.send(*[complete(t) for t in tasks[:4]], fail(tasks[4], non_retryable=True))
    assert [(await work.result()).code for _ in range(5)] == [OK] * 5
    # No line per message while the stream is open...
    assert not [r for r in caplog.records if getattr(r, "method", "").endswith("/Connect")]
    await work.call.done_writing()
    await work.done.wait()

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "method", "").endswith("/Connect")]

    await eventually(lines, what="the stream's log line")
    (line,) = lines()
    # ...and one at its end, with what it carried.
    assert line.code == "OK" and line.agent_id == "w1"
    assert (line.items_received, line.assignments, line.results, line.cancellations) == (
        5,
        5,
        5,
        0,
    )
    assert 1 <= line.responses <= 1 + 5 + 5, line.responses


async def test_protocol_errors_end_the_stream_precisely(harness: Harness):
    await harness.register("w1", ["c"])
    call = harness.dispatch.Connect()
    await call.write(pb.ConnectRequest(messages=[pb.AgentMessage(id=1)]))
    await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "hello")
    work = await connect(harness, "w1")
    await work.call.write(pb.ConnectRequest(hello=work.hello))
    await work.done.wait()
    assert work.error is not None and work.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in work.error.details()
    for hello, code in (
        (pb.ConnectHello(agent_id="ghost"), grpc.StatusCode.NOT_FOUND),
        (pb.ConnectHello(agent_id="w1", max_in_flight=5000), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ConnectHello(agent_id="w1", capabilities=["x"]), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        call = harness.dispatch.Connect()
        await call.write(pb.ConnectRequest(hello=hello))
        await expect_error(call.read(), code)


async def test_garbage_bytes_end_the_stream_with_invalid_argument(harness: Harness):
    await harness.register("w1", ["c"])
    raw = harness.channel.stream_stream(
        "/opscore.v1.DispatchService/Connect",
        request_serializer=None,
        response_deserializer=pb.ConnectResponse.FromString,
    )
    call = raw()
    await call.write(pb.ConnectRequest(hello=pb.ConnectHello(agent_id="w1")).SerializeToString())
    first = await call.read()
    assert first.HasField("accepted")
    await call.write(b"\xff\xff\xff\xff garbage")
    err = await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert "not a valid message" in err.details()
    # The server is fine and the agent may connect again.
    work = await connect(harness, "w1")
    await work.close()


async def test_half_close_answers_then_ends_ok_and_keeps_the_lease(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1", max_in_flight=2)
    await enqueue(harness, capability="c")
    await enqueue(harness, capability="c")
    a, b = await work.assignment(), await work.assignment()
    await work.send(complete(a))
    await work.call.done_writing()
    assert (await work.result()).code == OK
    await work.done.wait()
    assert work.error is None, work.error
    assert await work.call.code() == grpc.StatusCode.OK
    held = (await harness.dispatch.GetTask(pb.GetTaskRequest(task_id=b.task_id))).task
    assert held.state == TS.TASK_STATE_ASSIGNED and held.assigned_agent_id == "w1"


async def test_reconnect_keeps_leases_and_sends_them_again(harness: Harness):
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    await enqueue(harness, capability="c")
    held = await work.assignment()
    await work.close()
    again = await connect(harness, "w1")
    resent = await again.assignment()
    assert (resent.task_id, resent.attempt) == (held.task_id, held.attempt)
    await again.send(complete(resent))
    assert (await again.result()).task_state == TS.TASK_STATE_COMPLETED
    await again.close()


@pytest.mark.parametrize("agent_timeout", [timedelta(seconds=0.5)])
async def test_lease_ends_when_the_stream_dies_and_the_agent_goes_offline(
    make_harness, agent_timeout: timedelta
):
    h = await make_harness(agent_timeout=agent_timeout)
    await h.register("w1", ["c"])
    await h.register("w2", ["c"])
    work = await connect(h, "w1")
    task = await enqueue(h, capability="c")
    await work.assignment()
    await work.close()
    other = await connect(h, "w2")
    moved = await other.assignment()
    assert (moved.task_id, moved.attempt) == (task.task_id, 2)
    agent = (await h.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="w1"))).agent
    assert agent.state == lpb.AGENT_STATE_OFFLINE
    await other.close()


async def test_a_client_that_never_reads_stalls_only_itself(harness: Harness):
    await harness.register("flood", ["f"])  # its own capability: it takes no good work
    await harness.register("good", ["c"])
    flood = harness.dispatch.Connect()
    await flood.write(pb.ConnectRequest(hello=pb.ConnectHello(agent_id="flood")))
    # Thousands of refused items, never reading the answers.
    bogus = pb.ConnectRequest(
        messages=[
            pb.AgentMessage(id=i, completion=pb.TaskCompletion(task_id="nope", attempt=1))
            for i in range(500)
        ]
    )

    async def pour() -> None:
        with contextlib.suppress(Exception):
            for _ in range(200):
                await flood.write(bogus)

    pouring = asyncio.create_task(pour())
    good = await connect(harness, "good")
    for _ in range(20):
        await enqueue(harness, capability="c")
        task = await good.assignment()
        await good.send(complete(task))
        assert (await good.result(timeout=5)).code == OK
    await good.close()
    flood.cancel()
    pouring.cancel()
    with contextlib.suppress(BaseException):
        await pouring
    engine = harness.server.dispatch
    await eventually(
        lambda: "flood" not in engine._subs_by_agent or not engine._subs_by_agent["flood"]
    )
