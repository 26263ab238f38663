from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc.aio
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import dispatch_pb2_grpc

from opscore import security
from opscore.api import convert as c
from opscore.api import nul
from opscore.api.interceptors import (
    HoldsNul,
    Undecodable,
    note_call,
    stream_ready,
    undecodable_error,
)
from opscore.dispatch import DispatchEngine
from opscore.errors import InvalidArgument, OpsCoreError, Unavailable
from opscore.models import TaskFilter
from opscore.subscription import Ack, Assignment, Cancellation, StreamEnd, StreamItem
from opscore.workstream import WorkStream


class DispatchServicer(dispatch_pb2_grpc.DispatchServiceServicer):
    def __init__(self, engine: DispatchEngine) -> None:
        self.engine = engine

    async def EnqueueTask(
        self, request: pb.EnqueueTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnqueueTaskResponse:
        task, created = await self.engine.enqueue(c.task_spec(request))
        resp = pb.EnqueueTaskResponse(created=created)
        c.fill_task(resp.task, task)
        return resp

    async def EnqueueTasks(
        self, request: pb.EnqueueTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnqueueTasksResponse:
        results = await self.engine.enqueue_many([c.task_spec(r) for r in request.tasks])
        resp = pb.EnqueueTasksResponse()
        add = resp.results.add
        for t, new in results:
            c.fill_task(add(created=new).task, t)
        return resp

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

    async def Connect(
        self, requests: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ConnectResponse]:
        stream = requests.__aiter__()
        first = await anext(stream, None)
        if first is None:
            return  # the client half-closed before saying hello
        first, _ = _connect_request(first)
        if not first.HasField("hello") or first.messages:
            raise InvalidArgument(
                "the first message of a work stream must carry hello, and only hello",
                field="hello",
                reason="MALFORMED_REQUEST",
            )
        hello = first.hello
        security.require_agent(hello.agent_id, "hello.agent_id")
        sub = await self.engine.subscribe(
            hello.agent_id, list(hello.capabilities), hello.max_in_flight
        )
        work = WorkStream(self.engine, sub)
        reader = asyncio.create_task(_read(stream, work), name="opscore-connect-reader")
        in_hand: list[StreamItem] = []
        sent = {"assignments": 0, "cancellations": 0, "results": 0, "responses": 0}
        try:
            await stream_ready(context)
            yield pb.ConnectResponse(
                accepted=pb.ConnectAccepted(
                    agent=c.agent(self.engine.lifecycle.snapshot(sub.agent)),
                    agent_timeout=c.dur(self.engine.lifecycle.agent_timeout),
                    max_in_flight=sub.max_in_flight,
                )
            )
            budget = self.engine.response_budget
            while True:
                in_hand = await sub.take()
                waited: asyncio.Future[None] | None = None
                # Messages are written into the response in place: built apart
                # and handed to it, each would be copied whole again.
                out = pb.ConnectResponse()
                n = size = 0
                for commit, message in in_hand:
                    if commit is not None and commit is not waited:
                        commit.result()  # settled (take()): raises if the commit failed
                        waited = commit
                    if isinstance(message, StreamEnd):
                        if n:
                            yield out
                        in_hand = []
                        if message.error is not None:
                            raise message.error
                        return
                    cost = _cost(message)
                    if n and size + cost > budget:
                        sent["responses"] += 1
                        yield out
                        out = pb.ConnectResponse()
                        n = size = 0
                    _write_server_message(out.messages.add(), message)
                    sent[_KIND[type(message)]] += 1
                    n += 1
                    size += cost
                sent["responses"] += 1
                yield out
                in_hand = []
        finally:
            reader.cancel()
            self.engine.unsubscribe(sub, in_hand)
            # One line per stream, at its end: what it carried, not a line per message.
            note_call(agent_id=work.agent_id, items_received=work.received, **sent)

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        task = await self.engine.complete(
            request.task_id, request.agent_id, request.attempt, c.payload(request, "output")
        )
        resp = pb.CompleteTaskResponse()
        c.fill_task(resp.task, task)
        return resp

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
        resp = pb.FailTaskResponse()
        c.fill_task(resp.task, task)
        return resp

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
        resp = pb.GetTaskResponse()
        c.fill_task(resp.task, await self.engine.get(request.task_id))
        return resp

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
        resp = pb.ListTasksResponse(next_page_token=page.next_page_token)
        add = resp.tasks.add
        for t in page.items:
            c.fill_task(add(), t)
        return resp

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
        resp = pb.CancelTaskResponse()
        c.fill_task(resp.task, task)
        return resp


async def _read(stream: AsyncIterator[pb.ConnectRequest], work: WorkStream) -> None:
    """The agent's side of a work stream: handle each message's items in order.
    Reading pauses while the agent does not read what it is sent, so a client
    that floods without reading holds back only itself."""
    sub = work.sub
    try:
        async for received in stream:
            request, refused = _connect_request(received)
            if request.HasField("hello"):
                raise InvalidArgument(
                    "hello may only be sent in the first message of a work stream",
                    field="hello",
                    reason="MALFORMED_REQUEST",
                )
            await work.handle(c.connect_items(request.messages, refused))
            if not sub.drained.is_set():
                await sub.drained.wait()
        end: StreamEnd = StreamEnd(None)  # half-closed: answer what came, then OK
    except asyncio.CancelledError:
        raise
    except OpsCoreError as exc:
        end = StreamEnd(exc)
    except Exception as exc:  # the call broke under us (client gone, transport error)
        end = StreamEnd(Unavailable(f"work stream read failed: {exc}"))
    sub.push((None, end))  # after the answers queued before it, which wait for their commit


def _connect_request(
    received: pb.ConnectRequest | Undecodable | HoldsNul,
) -> tuple[pb.ConnectRequest, dict[int, InvalidArgument]]:
    """A work-stream message as read, and its items to refuse for a NUL in their
    strings (each answered in its place; a NUL outside the items ends the stream)."""
    if isinstance(received, Undecodable):
        raise undecodable_error("/opscore.v1.DispatchService/Connect", received)
    if not isinstance(received, HoldsNul):
        return received, {}
    request: pb.ConnectRequest = received.message
    if request.HasField("hello") and (path := nul.nul_field(request.hello, "hello.")):
        raise nul.nul_error(path)
    refused: dict[int, InvalidArgument] = {}
    for i, m in enumerate(request.messages):
        if path := nul.nul_field(m):  # named within the item, as its other errors are
            refused[i] = nul.nul_error(path)
    return request, refused


_KIND = {Assignment: "assignments", Cancellation: "cancellations", Ack: "results"}


def _cost(message: Assignment | Cancellation | Ack) -> int:
    """About what a message costs on the wire, to split batches to fit."""
    if isinstance(message, Assignment):
        return 512 + len(message.task.input or b"")
    if isinstance(message, Cancellation):
        return 128 + len(message.reason)
    return 128 + (len(message.error.message) if message.error else 0)


def _write_server_message(out: pb.ServerMessage, message: Assignment | Cancellation | Ack) -> None:
    if isinstance(message, Assignment):
        c.fill_assignment(out.assignment, message.task)
    elif isinstance(message, Cancellation):
        _write_cancellation(out.cancellation, message)
    else:
        c.fill_ack(out.result, message)


def _write_cancellation(out: pb.TaskCancellation, message: Cancellation) -> None:
    out.task_id = message.task_id
    out.attempt = message.attempt
    out.reason = message.reason


def _stream_message(message: Assignment | Cancellation) -> pb.SubscribeTasksResponse:
    out = pb.SubscribeTasksResponse()
    if isinstance(message, Assignment):
        c.fill_assignment(out.assignment, message.task)
    else:
        _write_cancellation(out.cancellation, message)
    return out
