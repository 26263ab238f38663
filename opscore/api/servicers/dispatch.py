from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc.aio
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import dispatch_pb2_grpc

from opscore.api import convert as c
from opscore.api.interceptors import stream_ready
from opscore.dispatch import (
    Assignment,
    Cancellation,
    DispatchEngine,
    StreamEnd,
    StreamItem,
)
from opscore.models import TaskFilter


class DispatchServicer(dispatch_pb2_grpc.DispatchServiceServicer):
    def __init__(self, engine: DispatchEngine) -> None:
        self.engine = engine

    async def EnqueueTask(
        self, request: pb.EnqueueTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnqueueTaskResponse:
        task, created = await self.engine.enqueue(c.task_spec(request))
        return pb.EnqueueTaskResponse(task=c.task(task), created=created)

    async def EnqueueTasks(
        self, request: pb.EnqueueTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnqueueTasksResponse:
        results = await self.engine.enqueue_many([c.task_spec(r) for r in request.tasks])
        return pb.EnqueueTasksResponse(
            results=[pb.EnqueueTaskResponse(task=c.task(t), created=new) for t, new in results]
        )

    async def SubscribeTasks(
        self, request: pb.SubscribeTasksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeTasksResponse]:
        sub = await self.engine.subscribe(
            request.agent_id, list(request.capabilities), request.max_in_flight
        )
        await stream_ready(context)
        # An item taken from the outbox but not yet handed to grpc can be given
        # back to the queue if the stream dies; once yielded, only the lease can
        # tell whether it arrived.
        in_hand: list[StreamItem] = []
        try:
            while True:
                item = await sub.next()
                in_hand.append(item)
                commit, message = item
                if commit is not None:
                    await asyncio.shield(commit)
                if isinstance(message, StreamEnd):
                    in_hand.clear()
                    if message.error is not None:
                        raise message.error
                    return
                response = _stream_message(message)
                in_hand.clear()
                yield response
        finally:
            self.engine.unsubscribe(sub, in_hand)

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        task = await self.engine.complete(
            request.task_id, request.agent_id, request.attempt, c.payload(request, "output")
        )
        return pb.CompleteTaskResponse(task=c.task(task))

    async def FailTask(
        self, request: pb.FailTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.FailTaskResponse:
        task = await self.engine.fail(
            request.task_id,
            request.agent_id,
            request.attempt,
            c.from_task_error(request),
            request.non_retryable,
        )
        return pb.FailTaskResponse(task=c.task(task))

    async def HeartbeatTask(
        self, request: pb.HeartbeatTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatTaskResponse:
        lease, cancel = await self.engine.heartbeat(
            request.task_id, request.agent_id, request.attempt, c.payload(request, "progress")
        )
        return pb.HeartbeatTaskResponse(lease_expire_time=c.ts(lease), cancel_requested=cancel)

    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTaskResponse:
        return pb.GetTaskResponse(task=c.task(await self.engine.get(request.task_id)))

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTasksResponse:
        flt = TaskFilter(
            state=request.state,  # type: ignore[arg-type]  (validated by the engine)
            capability=request.capability,
            agent_id=request.agent_id,
            session_id=request.session_id,
        )
        page = await self.engine.list(flt, request.page_size, request.page_token)
        return pb.ListTasksResponse(
            tasks=[c.task(t) for t in page.items], next_page_token=page.next_page_token
        )

    async def ListTaskAttempts(
        self, request: pb.ListTaskAttemptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTaskAttemptsResponse:
        page = await self.engine.list_attempts(
            request.task_id, request.page_size, request.page_token
        )
        return pb.ListTaskAttemptsResponse(
            attempts=[c.task_attempt(a) for a in page.items], next_page_token=page.next_page_token
        )

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        task = await self.engine.cancel(request.task_id, request.reason)
        return pb.CancelTaskResponse(task=c.task(task))


def _stream_message(message: Assignment | Cancellation) -> pb.SubscribeTasksResponse:
    if isinstance(message, Assignment):
        return pb.SubscribeTasksResponse(assignment=c.assignment(message.task))
    return pb.SubscribeTasksResponse(
        cancellation=pb.TaskCancellation(
            task_id=message.task_id, attempt=message.attempt, reason=message.reason
        )
    )
