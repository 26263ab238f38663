"""A minimal agent built on the raw generated stubs, for engine tests: it subscribes
and runs one handler per capability. (The SDK's Agent has its own tests.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from opscore_proto.v1 import common_pb2, dispatch_pb2_grpc, lifecycle_pb2_grpc
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

Handler = Callable[[dict[str, Any], pb.Task], Awaitable[dict[str, Any]] | dict[str, Any]]


class Fail(Exception):
    def __init__(self, message: str, *, non_retryable: bool = False) -> None:
        super().__init__(message)
        self.non_retryable = non_retryable


class Worker:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        agent_id: str,
        handlers: dict[str, Handler],
        max_in_flight: int = 4,
    ) -> None:
        self.agent_id = agent_id
        self.handlers = handlers
        self.max_in_flight = max_in_flight
        self.lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        self.dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
        self.seen: list[pb.Task] = []
        self.cancelled: list[str] = []
        self.running: dict[str, asyncio.Task[None]] = {}
        self._call: Any = None
        self._loop: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> Worker:
        await self.lifecycle.RegisterAgent(
            lpb.RegisterAgentRequest(agent_id=self.agent_id, capabilities=list(self.handlers))
        )
        self._call = self.dispatch.SubscribeTasks(
            pb.SubscribeTasksRequest(agent_id=self.agent_id, max_in_flight=self.max_in_flight)
        )
        self._loop = asyncio.create_task(self._run())
        # The stream is open once the server sends its initial metadata.
        await self._call.initial_metadata()
        self.subscribed.set()
        return self

    async def _run(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for msg in self._call:
                if msg.WhichOneof("message") == "cancellation":
                    self.cancelled.append(msg.cancellation.task_id)
                    job = self.running.pop(msg.cancellation.task_id, None)
                    if job is not None:
                        job.cancel()
                    continue
                task = msg.assignment.task
                self.seen.append(task)
                self.running[task.task_id] = asyncio.create_task(self._handle(task))

    async def _handle(self, task: pb.Task) -> None:
        # Pinned tasks may carry a capability this worker never registered.
        handler = self.handlers.get(task.capability) or next(iter(self.handlers.values()))
        data = json_format.MessageToDict(task.input)
        try:
            result = handler(data, task)
            if asyncio.iscoroutine(result):
                result = await result
            out = struct_pb2.Struct()
            out.update(result or {})
            await self.dispatch.CompleteTask(
                pb.CompleteTaskRequest(
                    task_id=task.task_id, agent_id=self.agent_id, attempt=task.attempt, output=out
                )
            )
        except asyncio.CancelledError:
            raise
        except Fail as exc:
            await self.dispatch.FailTask(
                pb.FailTaskRequest(
                    task_id=task.task_id,
                    agent_id=self.agent_id,
                    attempt=task.attempt,
                    error=common_pb2.TaskError(message=str(exc), type="Fail"),
                    non_retryable=exc.non_retryable,
                )
            )
        except grpc.aio.AioRpcError:
            pass  # lease lost or cancelled meanwhile: the server decides
        except Exception as exc:  # a broken test handler: fail loudly, do not hang
            await self.dispatch.FailTask(
                pb.FailTaskRequest(
                    task_id=task.task_id,
                    agent_id=self.agent_id,
                    attempt=task.attempt,
                    error=common_pb2.TaskError(message=repr(exc), type=type(exc).__name__),
                    non_retryable=True,
                )
            )
        finally:
            self.running.pop(task.task_id, None)

    async def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
        for job in list(self.running.values()):
            job.cancel()
        if self._loop is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
