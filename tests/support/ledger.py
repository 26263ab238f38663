"""Crash accounting, shared by the crash tests, the stream-abuse test and
`make chaos`: a client for a subprocess server, and a Ledger of what the server
acknowledged (enqueues, completions, failures) to check a restarted server
against."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2, json_format, struct_pb2
from opscore_proto.v1 import common_pb2, dispatch_pb2_grpc, lifecycle_pb2_grpc
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

from tests.conftest import StreamReader, eventually
from tests.support.procserver import ServerProcess

TS = pb.TaskState
OPEN_STATES = (TS.TASK_STATE_SCHEDULED, TS.TASK_STATE_QUEUED, TS.TASK_STATE_ASSIGNED)


def dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def struct(**kw: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


def as_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(s)


def when(ts: Any) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Client:
    channel: grpc.aio.Channel
    lifecycle: lifecycle_pb2_grpc.LifecycleServiceStub
    dispatch: dispatch_pb2_grpc.DispatchServiceStub

    async def get(self, task_id: str) -> pb.Task:
        return (await self.dispatch.GetTask(pb.GetTaskRequest(task_id=task_id))).task

    async def register(self, agent_id: str, capabilities: list[str]) -> None:
        await self.lifecycle.RegisterAgent(
            lpb.RegisterAgentRequest(agent_id=agent_id, capabilities=capabilities)
        )

    async def subscribe(self, agent_id: str, max_in_flight: int = 1) -> StreamReader:
        """Open a subscription and wait until the server has it (the agent is IDLE)."""
        reader = StreamReader(
            self.dispatch.SubscribeTasks(
                pb.SubscribeTasksRequest(agent_id=agent_id, max_in_flight=max_in_flight)
            )
        )

        async def idle() -> bool:
            if reader.done.is_set():
                raise AssertionError(f"subscription of {agent_id} ended: {reader.error!r}")
            got = await self.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id=agent_id))
            return got.agent.state == lpb.AgentState.AGENT_STATE_IDLE

        await eventually(idle, what=f"subscription of {agent_id}")
        return reader

    async def all_tasks(self) -> list[pb.Task]:
        tasks, token = [], ""
        while True:
            page = await self.dispatch.ListTasks(
                pb.ListTasksRequest(page_size=1000, page_token=token)
            )
            tasks += page.tasks
            token = page.next_page_token
            if not token:
                return tasks

    async def open_tasks(self) -> int:
        counts = await asyncio.gather(
            *(
                self.dispatch.ListTasks(pb.ListTasksRequest(state=s, page_size=1000))
                for s in OPEN_STATES
            )
        )
        return sum(len(c.tasks) for c in counts)


@contextlib.asynccontextmanager
async def connect(server: ServerProcess) -> AsyncIterator[Client]:
    # A local subchannel pool: otherwise the new channel would share the old one's
    # connection to the killed server, still backing off after refused connects.
    options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(server.target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        yield Client(
            channel,
            lifecycle_pb2_grpc.LifecycleServiceStub(channel),
            dispatch_pb2_grpc.DispatchServiceStub(channel),
        )


async def kill(server: ServerProcess) -> None:
    code = await asyncio.to_thread(server.kill)
    assert code == -9, f"server was not killed but exited with {code}\n{server.log_tail()}"


async def assignment(reader: StreamReader, timeout: float = 15.0) -> pb.Task:
    msg = await reader.next(timeout)
    assert msg.WhichOneof("message") == "assignment", msg
    return msg.assignment.task


class Ledger:
    """What the clients were told, so it can be checked against the restarted server."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []  # acknowledged EnqueueTask
        self.assigned: dict[str, list[int]] = {}  # every assignment received
        self.sent: dict[str, tuple[int, dict[str, Any]]] = {}  # last CompleteTask sent
        # Acknowledged first-time completions: (attempt, output) per task. A second
        # entry for one task would mean it was completed twice.
        self.completed: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        # Acknowledged retryable failures: the attempts that ended with FailTask.
        self.failed: dict[str, list[int]] = {}
        self.reassigned_after_completion: list[tuple[str, int]] = []
        self.errors: list[tuple[str, int, grpc.StatusCode]] = []  # failed Complete/FailTask

    def problems(self, final: dict[str, pb.Task]) -> list[str]:
        """What the final state of the tasks (by id, after every restart) says was
        lost or accepted twice. Empty when the server kept every promise."""
        out = []
        missing = [t for t in self.enqueued if t not in final]
        if missing:
            out.append(f"{len(missing)} acknowledged enqueues missing: {missing[:5]}")
        twice = {t: v for t, v in self.completed.items() if len(v) != 1}
        if twice:
            out.append(f"{len(twice)} tasks completed more than once: {list(twice.items())[:5]}")
        if self.reassigned_after_completion:
            out.append(
                "tasks dispatched again after an acknowledged completion: "
                f"{self.reassigned_after_completion[:5]}"
            )
        for task_id, entries in self.completed.items():
            t = final.get(task_id)
            attempt, output = entries[0]
            if t is None or t.state != TS.TASK_STATE_COMPLETED:
                state = TS.Name(t.state) if t is not None else "missing"
                out.append(f"acknowledged completion of {task_id} lost: task is {state}")
            elif (t.attempt, as_dict(t.output)) != (attempt, output):
                out.append(f"{task_id}: stored result {t.attempt} differs from acknowledged one")
            if task_id in self.failed and attempt in self.failed[task_id]:
                out.append(f"{task_id}: attempt {attempt} acknowledged as failed and completed")
        return out


async def next_message(reader: StreamReader) -> Any:
    """The stream's next message; raises the stream's error once it has ended."""
    while True:
        if not reader.queue.empty():
            return reader.queue.get_nowait()
        if reader.done.is_set():
            raise reader.error or AssertionError("subscription ended")
        got = asyncio.ensure_future(reader.queue.get())
        ended = asyncio.ensure_future(reader.done.wait())
        await asyncio.wait({got, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if got.done():
            return got.result()
        got.cancel()


async def agent_loop(
    client: Client,
    ledger: Ledger,
    agent_id: str,
    reader: StreamReader,
    hold: int = 0,
    fail: Callable[[pb.Task], bool] | None = None,
) -> None:
    """Complete assignments concurrently, recording the outcome, until the
    subscription ends (raising its error). The agent works on `hold` tasks at a time:
    it completes the oldest one it has only when a newer one arrives past that.
    Tasks for which `fail` says so get a retryable FailTask instead."""
    pending: set[asyncio.Task[None]] = set()
    in_hand: deque[pb.Task] = deque()

    async def complete(task: pb.Task) -> None:
        output = {"task": task.task_id, "attempt": task.attempt}
        ledger.sent[task.task_id] = (task.attempt, output)
        try:
            resp = await client.dispatch.CompleteTask(
                pb.CompleteTaskRequest(
                    task_id=task.task_id,
                    agent_id=agent_id,
                    attempt=task.attempt,
                    output=struct(**output),
                )
            )
        except grpc.aio.AioRpcError as err:
            ledger.errors.append((task.task_id, task.attempt, err.code()))
            return
        assert resp.task.state == TS.TASK_STATE_COMPLETED
        ledger.completed.setdefault(task.task_id, []).append((task.attempt, output))

    async def fail_once(task: pb.Task) -> None:
        try:
            await client.dispatch.FailTask(
                pb.FailTaskRequest(
                    task_id=task.task_id,
                    agent_id=agent_id,
                    attempt=task.attempt,
                    error=common_pb2.TaskError(message="chaos says no", type="Chaos"),
                )
            )
        except grpc.aio.AioRpcError as err:
            ledger.errors.append((task.task_id, task.attempt, err.code()))
            return
        ledger.failed.setdefault(task.task_id, []).append(task.attempt)

    def settle(task: pb.Task) -> asyncio.Task[None]:
        if fail is not None and fail(task):
            return asyncio.create_task(fail_once(task))
        return asyncio.create_task(complete(task))

    try:
        while True:
            msg = await next_message(reader)
            assert msg.WhichOneof("message") == "assignment", msg
            task = msg.assignment.task
            if task.task_id in ledger.completed:
                ledger.reassigned_after_completion.append((task.task_id, task.attempt))
            ledger.assigned.setdefault(task.task_id, []).append(task.attempt)
            in_hand.append(task)
            while len(in_hand) > hold:
                pending.add(settle(in_hand.popleft()))
    finally:
        await asyncio.gather(*pending)


async def no_open(client: Client, loop: asyncio.Task[None]) -> bool:
    if loop.done():
        raise AssertionError(f"agent loop ended: {loop.exception()!r}")
    return await client.open_tasks() == 0
