"""U+0000 (NUL) in request strings: refused at the edge on every RPC, on both
backends (opscore/api/nul.py says why). Payloads keep theirs byte for byte."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, struct_pb2
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2 as lpb

from tests.conftest import Harness, expect_error
from tests.support.hostile import (
    ErrorLog,
    Method,
    capture_error_log,
    contract_methods,
    health_status,
    raw_call,
    round_trip,
)
from tests.test_dispatch import enqueue
from tests.test_workstream import complete, connect

pytestmark = pytest.mark.backends("sqlite", "postgres")

NUL = "a\x00b"
FD = descriptor.FieldDescriptor
_PAYLOADS = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")


def _string_fields(
    desc: descriptor.Descriptor, prefix: str = "", seen: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(field names from the root, the path the server names) for every string
    field reachable from `desc`, payloads excepted; map fields once by value and
    once by key."""
    for fd in desc.fields:
        path = f"{prefix}{fd.name}"
        if fd.type == FD.TYPE_STRING:
            yield (fd.name,), f"{path}[0]" if fd.is_repeated else path
        elif fd.type != FD.TYPE_MESSAGE or fd.message_type.full_name in _PAYLOADS:
            continue
        elif fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["key"].type == FD.TYPE_STRING:
                yield (fd.name, "<key>"), f"{path} key {NUL!r}"
            value = fd.message_type.fields_by_name["value"]
            if value.type == FD.TYPE_STRING:
                yield (fd.name, "<value>"), f"{path}['k']"
        elif fd.message_type.full_name not in seen:  # no recursion through a cycle
            inner = f"{path}[0]." if fd.is_repeated else f"{path}."
            for names, where in _string_fields(
                fd.message_type, inner, (*seen, fd.message_type.full_name)
            ):
                yield (fd.name, *names), where


def _with_nul(cls: type[message.Message], names: tuple[str, ...]) -> message.Message:
    root = cls()
    msg: Any = root
    for i, name in enumerate(names[:-1]):
        fd = msg.DESCRIPTOR.fields_by_name[name]
        if fd.message_type.GetOptions().map_entry:
            mapping = getattr(msg, name)
            if names[i + 1] == "<value>":
                mapping["k"] = NUL
            elif fd.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                mapping.get_or_create(NUL)
            else:
                mapping[NUL] = _map_value(fd)
            return root
        msg = getattr(msg, name).add() if fd.is_repeated else getattr(msg, name)
    last = msg.DESCRIPTOR.fields_by_name[names[-1]]
    if last.is_repeated:
        getattr(msg, names[-1]).append(NUL)
    else:
        setattr(msg, names[-1], NUL)
    return root


def _map_value(fd: descriptor.FieldDescriptor) -> Any:
    value = fd.message_type.fields_by_name["value"]
    return "v" if value.type == FD.TYPE_STRING else 0


def _cases() -> Iterator[tuple[Method, tuple[str, ...], str]]:
    for method in contract_methods():
        if method.client_streaming:
            continue  # the work stream: test_work_stream_item_with_a_nul_is_refused_in_place
        for names, where in _string_fields(method.input):
            yield method, names, where


CASES = list(_cases())


def test_the_cases_cover_the_contract():
    """The generator finds string fields on every method that has any, nested
    and map ones included (a generator that found none would test nothing)."""
    wheres = {where for _, _, where in CASES}
    assert len(CASES) > 60, len(CASES)
    assert "tasks[0].name" in wheres  # EnqueueTasks: repeated message
    assert "metadata['k']" in wheres and f"metadata key {NUL!r}" in wheres
    assert any(w.startswith("error.") for w in wheres)  # FailTask's TaskError


async def test_every_string_field_of_every_rpc_refuses_a_nul(harness: Harness):
    with capture_error_log() as log:
        for method, names, where in CASES:
            body = _with_nul(method.request_class(), names).SerializeToString()
            outcome = await raw_call(
                harness.channel, method.path, body, streaming=method.server_streaming
            )
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (
                f"{method.path} with a NUL in {where}: {outcome}"
            )
            assert f"{where} contains the NUL character" in outcome.details, (
                f"{method.path}: {outcome.details!r} does not name {where}"
            )
        assert await health_status(harness.channel) == "SERVING"
        await asyncio.wait_for(round_trip(harness.channel), 20)
        assert not log.records, ErrorLog.describe(log.records)


async def test_a_nul_fails_only_its_own_call_not_those_sharing_its_commit(harness: Harness):
    """On PostgreSQL a NUL that reached the database failed the whole group commit
    and sent the server to rebuild its state; now it never gets that far."""
    await harness.register("n1", ["c"])
    with capture_error_log() as log:
        poisoned = harness.lifecycle.RegisterAgent(
            lpb.RegisterAgentRequest(agent_id="n2", name=NUL)
        )
        normal = [enqueue(harness, capability="c") for _ in range(20)]
        results = await asyncio.gather(poisoned, *normal, return_exceptions=True)
        assert isinstance(results[0], grpc.aio.AioRpcError)
        assert results[0].code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(isinstance(r, pb.Task) for r in results[1:]), results[1:]
        assert not log.records, ErrorLog.describe(log.records)
    await expect_error(
        harness.lifecycle.GetAgent(lpb.GetAgentRequest(agent_id="n2")), grpc.StatusCode.NOT_FOUND
    )


async def test_payloads_keep_their_nul_characters_byte_for_byte(harness: Harness):
    payload = struct_pb2.Struct()
    payload.update({"text": NUL, NUL: [NUL, {"deep": "\x00"}]})
    task = await enqueue(harness, capability="c", input=payload)
    stored = (await harness.dispatch.GetTask(pb.GetTaskRequest(task_id=task.task_id))).task
    assert stored.input == payload
    assert stored.input.fields[NUL].list_value.values[0].string_value == NUL


async def test_work_stream_item_with_a_nul_is_refused_in_place(harness: Harness):
    """A refused item never ends the stream: the item with the NUL is answered
    INVALID_ARGUMENT in its place, the one after it is accepted."""
    await harness.register("w1", ["c"])
    work = await connect(harness, "w1")
    await enqueue(harness, capability="c")
    task = await work.assignment()
    bad = pb.AgentMessage(failure=pb.TaskFailure(task_id=task.task_id, attempt=task.attempt))
    bad.failure.error.message = NUL
    ids = await work.send(bad, complete(task))
    first, second = await work.result(), await work.result()
    assert (first.id, first.code) == (ids[0], grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert first.reason == "NUL_CHARACTER" and first.field == "failure.error.message"
    assert (second.id, second.code, second.task_state) == (
        ids[1],
        0,
        pb.TaskState.TASK_STATE_COMPLETED,
    )
    assert work.error is None and not work.done.is_set()
    await work.close()


async def test_work_stream_hello_with_a_nul_ends_the_stream_precisely(harness: Harness):
    call = harness.dispatch.Connect()
    await call.write(pb.ConnectRequest(hello=pb.ConnectHello(agent_id=NUL)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.agent_id contains the NUL character" in (info.value.details() or "")
