"""Tooling for the hostile-input tests (issue 9): the contract's methods found from
the descriptors, raw-bytes calls, error-log capture, and the checks that a server
survived (health, an enqueue -> subscribe -> complete round trip, SQLite
integrity, process RSS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor, message, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opscore_proto.v1 import (
    dispatch_pb2,
    dispatch_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    workflow_pb2,
)

# ------------------------------------------------------------------ the contract

SERVICES: tuple[descriptor.ServiceDescriptor, ...] = (
    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"],
    dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"],
    workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
)


@dataclass(frozen=True)
class Method:
    """One RPC of the contract, as the descriptors describe it."""

    service: str
    name: str
    path: str
    input: descriptor.Descriptor
    output: descriptor.Descriptor
    server_streaming: bool
    client_streaming: bool = False

    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.input)

    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.output)

    def __str__(self) -> str:
        return self.path


def contract_methods() -> list[Method]:
    """Every RPC of LifecycleService, DispatchService and WorkflowService. A method
    added to a proto shows up here (and so in every test iterating over it)."""
    out = []
    for svc in SERVICES:
        for m in svc.methods:
            # Only bidirectional streams have a streamed request in the contract.
            assert m.server_streaming or not m.client_streaming, f"{m.full_name}: not covered"
            out.append(
                Method(
                    service=svc.full_name,
                    name=m.name,
                    path=f"/{svc.full_name}/{m.name}",
                    input=m.input_type,
                    output=m.output_type,
                    server_streaming=m.server_streaming,
                    client_streaming=m.client_streaming,
                )
            )
    return out


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


# ------------------------------------------------------------------ raw calls


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status code and details (OK for a success)."""

    code: grpc.StatusCode
    details: str = ""
    messages: int = 0

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details[:300]}"


async def call_outcome(call: Any, *, streaming: bool, max_messages: int = 3) -> Outcome:
    """Await a unary call, or read up to `max_messages` of a stream and cancel it.
    Returns how it ended instead of raising."""
    try:
        if not streaming:
            await call
            return Outcome(grpc.StatusCode.OK)
        n = 0
        async for _ in call:
            n += 1
            if n >= max_messages:
                call.cancel()
                return Outcome(grpc.StatusCode.OK, "stream cancelled by the client", n)
        return Outcome(grpc.StatusCode.OK, "stream ended", n)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details() or "")
    except asyncio.CancelledError:
        return Outcome(grpc.StatusCode.CANCELLED, "cancelled")


async def work_stream_outcome(call: Any, first: object, later: object) -> Outcome:
    """Send `first`, and `later` once the server has answered, as an agent does;
    read up to three messages, then cancel. Writing while the server refuses the
    first message trips a grpc.aio client bug (grpc/grpc#36066) that reports
    INTERNAL "Internal error from Core" in place of the server's status."""
    n = 0
    try:
        await call.write(first)
        while n < 3:
            response = await call.read()
            if response is grpc.aio.EOF:
                return Outcome(await call.code(), await call.details() or "", n)
            n += 1
            if n == 1:
                await call.write(later)
        call.cancel()
        return Outcome(grpc.StatusCode.OK, "stream cancelled by the client", n)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details() or "", n)
    except asyncio.InvalidStateError:  # ended before `later` could be written
        return Outcome(await call.code(), await call.details() or "", n)


async def raw_call(
    channel: grpc.aio.Channel,
    path: str,
    body: bytes,
    *,
    streaming: bool,
    timeout: float = 5.0,
    metadata: tuple[tuple[str, str], ...] | None = None,
    request_stream: bool = False,
) -> Outcome:
    """Send `body` as it is (identity serializer) to method `path`. On a request
    stream it is the first message and, once the server has answered it, the
    second."""
    if request_stream:
        bidi = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        return await work_stream_outcome(bidi(timeout=timeout, metadata=metadata), body, body)
    if streaming:
        stub = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
    else:
        stub = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    call = stub(body, timeout=timeout, metadata=metadata)
    return await call_outcome(call, streaming=streaming)


BAD_STATUSES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


# ------------------------------------------------------------------ server log


class ErrorLog(logging.Handler):
    """Collects ERROR records and any record with a traceback from the server's
    loggers: opscore.*, asyncio (exceptions in callbacks and timers) and grpc
    (exceptions raised inside grpc's own request handling)."""

    LOGGERS = ("opscore", "asyncio", "grpc")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def mark(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> list[logging.LogRecord]:
        return self.records[mark:]

    @staticmethod
    def describe(records: list[logging.LogRecord], limit: int = 3) -> str:
        out = []
        for r in records[:limit]:
            text = f"{r.levelname} {r.name}: {r.getMessage()}"
            if r.exc_info and r.exc_info[1] is not None:
                text += f" [{type(r.exc_info[1]).__name__}: {str(r.exc_info[1])[:200]}]"
            out.append(text)
        more = f" (+{len(records) - limit} more)" if len(records) > limit else ""
        return "; ".join(out) + more


@contextlib.contextmanager
def capture_error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    loggers = [logging.getLogger(name) for name in ErrorLog.LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


# ------------------------------------------------------------------ survival checks


def integrity(db_path: str | Path) -> str:
    """`PRAGMA integrity_check` of the file, read through a separate connection."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows)


async def health_status(channel: grpc.aio.Channel, timeout: float = 2.0) -> str:
    """The health status for "" by name, or the error code's name."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return f"error {err.code().name}: {err.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


async def round_trip(
    channel: grpc.aio.Channel,
    *,
    metadata: tuple[tuple[str, str], ...] | None = None,
    timeout: float = 10.0,
) -> dispatch_pb2.Task:
    """A normal enqueue -> subscribe -> complete round trip on a fresh agent and
    capability. Raises AssertionError (or the RPC error) if any step fails."""
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
    tag = uuid.uuid4().hex[:10]
    agent_id, capability = f"rt-{tag}", f"rt-cap-{tag}"
    await lifecycle.RegisterAgent(
        lifecycle_pb2.RegisterAgentRequest(agent_id=agent_id, capabilities=[capability]),
        timeout=timeout,
        metadata=metadata,
    )
    stream = dispatch.SubscribeTasks(
        dispatch_pb2.SubscribeTasksRequest(agent_id=agent_id), timeout=timeout, metadata=metadata
    )
    try:
        await asyncio.wait_for(stream.initial_metadata(), timeout)
        enq = await dispatch.EnqueueTask(
            dispatch_pb2.EnqueueTaskRequest(capability=capability, name="round-trip"),
            timeout=timeout,
            metadata=metadata,
        )
        msg = await asyncio.wait_for(stream.read(), timeout)
        assert msg is not grpc.aio.EOF, "subscription ended before the assignment"
        got = msg.assignment.task
        assert got.task_id == enq.task.task_id, (got.task_id, enq.task.task_id)
        done = await dispatch.CompleteTask(
            dispatch_pb2.CompleteTaskRequest(
                task_id=got.task_id, agent_id=agent_id, attempt=got.attempt
            ),
            timeout=timeout,
            metadata=metadata,
        )
        assert done.task.state == dispatch_pb2.TaskState.TASK_STATE_COMPLETED, done.task
        return done.task
    finally:
        stream.cancel()


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
