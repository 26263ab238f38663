"""The ceiling: bare grpc.aio serving the same message patterns as Ops-Core
with the same opscore_proto messages, but no storage, no durability, no
validation and no logging: one in-memory FIFO handed to subscribers with room.
Both agent shapes: SubscribeTasks (a stream of assignments) answered with unary
CompleteTask calls, and the bidirectional Connect work stream (assignments out,
completions back and an AgentMessageResult for each, batched the way Ops-Core
batches: whatever is ready when the stream is written goes in one message).

    python -m bench.baselines.bare_grpc --listen 127.0.0.1:PORT [--event-loop uvloop]

It also answers RegisterAgent and ListAgents (with open_subscriptions) and the
health check, so the very same load generator processes drive it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from collections import deque
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opscore_proto.v1 import (
    common_pb2,
    dispatch_pb2,
    dispatch_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
)


class Sub:
    __slots__ = ("agent_id", "outbox", "room")

    def __init__(self, agent_id: str, room: int) -> None:
        self.agent_id = agent_id
        self.room = room
        # Tasks (assignments) and, on a work stream, AgentMessageResults.
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()


class State:
    def __init__(self) -> None:
        self.pending: deque[dispatch_pb2.Task] = deque()
        self.with_room: deque[Sub] = deque()
        self.subs: dict[str, Sub] = {}
        self.leased: dict[str, tuple[dispatch_pb2.Task, Sub]] = {}
        self.agents: dict[str, lifecycle_pb2.Agent] = {}

    def offer(self, task: dispatch_pb2.Task) -> None:
        while self.with_room:
            sub = self.with_room[0]
            if sub.room <= 0 or self.subs.get(sub.agent_id) is not sub:
                self.with_room.popleft()
                continue
            self.assign(task, sub)
            if sub.room <= 0:
                self.with_room.popleft()
            return
        self.pending.append(task)

    def assign(self, task: dispatch_pb2.Task, sub: Sub) -> None:
        sub.room -= 1
        task.state = dispatch_pb2.TASK_STATE_ASSIGNED
        task.attempt += 1
        task.assigned_agent_id = sub.agent_id
        task.lease_expire_time.GetCurrentTime()
        task.lease_expire_time.seconds += 300
        self.leased[task.task_id] = (task, sub)
        sub.outbox.put_nowait(task)

    def gained_room(self, sub: Sub) -> None:
        if self.subs.get(sub.agent_id) is not sub:
            return
        sub.room += 1
        if self.pending:
            self.assign(self.pending.popleft(), sub)
        if sub.room > 0 and sub not in self.with_room:
            self.with_room.append(sub)


def _task(req: dispatch_pb2.EnqueueTaskRequest) -> dispatch_pb2.Task:
    # Filled like Ops-Core fills it, so the messages on the wire are the same size.
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return dispatch_pb2.Task(
        task_id=str(uuid.uuid4()),
        name=req.name,
        capability=req.capability,
        agent_id=req.agent_id,
        input=req.input,
        priority=req.priority,
        retry_policy=common_pb2.RetryPolicy(
            max_attempts=3,
            initial_backoff=duration_pb2.Duration(seconds=1),
            backoff_multiplier=2.0,
            max_backoff=duration_pb2.Duration(seconds=60),
        ),
        timeout=duration_pb2.Duration(seconds=300),
        state=dispatch_pb2.TASK_STATE_QUEUED,
        create_time=now,
        update_time=now,
    )


class Dispatch(dispatch_pb2_grpc.DispatchServiceServicer):
    def __init__(self, st: State) -> None:
        self.st = st

    async def EnqueueTask(self, request: Any, context: Any) -> Any:
        task = _task(request)
        out = dispatch_pb2.EnqueueTaskResponse(task=task, created=True)
        self.st.offer(task)
        return out

    async def EnqueueTasks(self, request: Any, context: Any) -> Any:
        results = []
        for r in request.tasks:
            task = _task(r)
            results.append(dispatch_pb2.EnqueueTaskResponse(task=task, created=True))
            self.st.offer(task)
        return dispatch_pb2.EnqueueTasksResponse(results=results)

    async def SubscribeTasks(self, request: Any, context: Any) -> Any:
        st = self.st
        sub = Sub(request.agent_id, 0)
        st.subs[request.agent_id] = sub
        agent = st.agents.get(request.agent_id)
        if agent is not None:
            agent.open_subscriptions += 1
        for _ in range(max(1, request.max_in_flight)):
            st.gained_room(sub)
        try:
            while True:
                task = await sub.outbox.get()
                yield dispatch_pb2.SubscribeTasksResponse(
                    assignment=dispatch_pb2.TaskAssignment(task=task)
                )
        finally:
            if st.subs.get(request.agent_id) is sub:
                del st.subs[request.agent_id]
            if agent is not None:
                agent.open_subscriptions -= 1

    async def Connect(self, request_iterator: Any, context: Any) -> Any:
        st = self.st
        first = await anext(request_iterator.__aiter__(), None)
        if first is None:
            return
        hello = first.hello
        sub = Sub(hello.agent_id, 0)
        st.subs[hello.agent_id] = sub
        agent = st.agents.get(hello.agent_id)
        if agent is not None:
            agent.open_subscriptions += 1
        reader = asyncio.ensure_future(self._read_work(request_iterator, sub))
        try:
            yield dispatch_pb2.ConnectResponse(
                accepted=dispatch_pb2.ConnectAccepted(
                    agent=agent, max_in_flight=max(1, hello.max_in_flight)
                )
            )
            for _ in range(max(1, hello.max_in_flight)):
                st.gained_room(sub)
            while True:
                # Everything ready now goes in one message; a lone item at once.
                items = [await sub.outbox.get()]
                while not sub.outbox.empty():
                    items.append(sub.outbox.get_nowait())
                yield dispatch_pb2.ConnectResponse(messages=[_server_message(x) for x in items])
        finally:
            reader.cancel()
            if st.subs.get(hello.agent_id) is sub:
                del st.subs[hello.agent_id]
            if agent is not None:
                agent.open_subscriptions -= 1

    async def _read_work(self, request_iterator: Any, sub: Sub) -> None:
        async for req in request_iterator:
            for item in req.messages:
                if item.WhichOneof("message") != "completion":
                    sub.outbox.put_nowait(
                        dispatch_pb2.AgentMessageResult(id=item.id, code=12, message="bare")
                    )
                    continue
                c = item.completion
                entry = self.st.leased.pop(c.task_id, None)
                if entry is None:
                    sub.outbox.put_nowait(
                        dispatch_pb2.AgentMessageResult(id=item.id, code=9, reason="LEASE_LOST")
                    )
                    continue
                task, owner = entry
                task.state = dispatch_pb2.TASK_STATE_COMPLETED
                task.output.CopyFrom(c.output)
                task.finish_time.GetCurrentTime()
                sub.outbox.put_nowait(
                    dispatch_pb2.AgentMessageResult(
                        id=item.id, task_state=dispatch_pb2.TASK_STATE_COMPLETED
                    )
                )
                self.st.gained_room(owner)

    async def CompleteTask(self, request: Any, context: Any) -> Any:
        entry = self.st.leased.pop(request.task_id, None)
        if entry is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not leased")
        task, sub = entry
        task.state = dispatch_pb2.TASK_STATE_COMPLETED
        task.output.CopyFrom(request.output)
        task.finish_time.GetCurrentTime()
        self.st.gained_room(sub)
        return dispatch_pb2.CompleteTaskResponse(task=task)


def _server_message(x: Any) -> dispatch_pb2.ServerMessage:
    if isinstance(x, dispatch_pb2.Task):
        return dispatch_pb2.ServerMessage(assignment=dispatch_pb2.TaskAssignment(task=x))
    return dispatch_pb2.ServerMessage(result=x)


class Lifecycle(lifecycle_pb2_grpc.LifecycleServiceServicer):
    def __init__(self, st: State) -> None:
        self.st = st

    async def RegisterAgent(self, request: Any, context: Any) -> Any:
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        agent = lifecycle_pb2.Agent(
            agent_id=request.agent_id or str(uuid.uuid4()),
            name=request.name,
            version=request.version,
            capabilities=request.capabilities,
            state=lifecycle_pb2.AGENT_STATE_INITIALIZING,
            register_time=now,
            state_change_time=now,
            last_seen_time=now,
        )
        self.st.agents[agent.agent_id] = agent
        return lifecycle_pb2.RegisterAgentResponse(agent=agent, created=True)

    async def ListAgents(self, request: Any, context: Any) -> Any:
        agents = list(self.st.agents.values())
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = agents[start : start + size]
        token = str(start + size) if start + size < len(agents) else ""
        return lifecycle_pb2.ListAgentsResponse(agents=page, next_page_token=token)


async def main(listen: str) -> None:
    st = State()
    # As Ops-Core's server: enough pending calls for a fleet opening streams at once.
    server = grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", 20_000),
            ("grpc.server.max_pending_requests_hard_limit", 20_000),
        ]
    )
    dispatch_pb2_grpc.add_DispatchServiceServicer_to_server(Dispatch(st), server)
    lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server(Lifecycle(st), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    server.add_insecure_port(listen)
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = p.parse_args()
    if args.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main(args.listen))
    else:
        asyncio.run(main(args.listen))
