"""Health, draining, shutdown and per-RPC logging (DESIGN §6)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opscore_proto.v1 import dispatch_pb2, dispatch_pb2_grpc, lifecycle_pb2_grpc
from opscore_proto.v1 import lifecycle_pb2 as pb

from tests.conftest import StreamReader, eventually, expect_error
from tests.support.procserver import running_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = (
    "opscore.v1.LifecycleService",
    "opscore.v1.DispatchService",
    "opscore.v1.WorkflowService",
)


async def wait_subscribed(lifecycle: Any, agent_id: str, reader: StreamReader) -> None:
    """A subscription moves an INITIALIZING agent to IDLE: wait for that."""

    async def idle() -> bool:
        if reader.done.is_set():
            raise AssertionError(f"subscription ended early: {reader.error!r}")
        got = await lifecycle.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
        return got.agent.state == pb.AgentState.AGENT_STATE_IDLE

    await eventually(idle, what=f"subscription of {agent_id}")


async def next_message(reader: StreamReader, timeout: float = 5.0) -> Any:
    """The stream's next message; fails at once (with the status) if it ended."""
    got = asyncio.ensure_future(reader.queue.get())
    ended = asyncio.ensure_future(reader.done.wait())
    try:
        await asyncio.wait({got, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
        if not got.done():
            got.cancel()
    if got.done() and not got.cancelled():
        return got.result()
    if reader.done.is_set() and reader.queue.empty():
        raise AssertionError(f"stream ended without the expected message: {reader.error!r}")
    raise AssertionError(f"no message within {timeout}s")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The server's JSON log lines (anything else on stderr is skipped)."""
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


# ------------------------------------------------------------------ in process


async def test_health_serving_for_server_and_each_service(harness):
    health = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", *SERVICES):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == SERVING, service
    await expect_error(
        health.Check(health_pb2.HealthCheckRequest(service="opscore.v1.NoSuchService")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_stop_drains_watchers_and_streams_without_waiting_out_grace(make_harness):
    h = await make_harness(drain_grace=timedelta(seconds=30))
    await h.register("a1", ["c"])
    health = health_pb2_grpc.HealthStub(h.channel)
    watch = StreamReader(health.Watch(health_pb2.HealthCheckRequest(service="")))
    first = await next_message(watch)
    assert first.status == SERVING
    sub = StreamReader(h.dispatch.SubscribeTasks(dispatch_pb2.SubscribeTasksRequest(agent_id="a1")))
    await wait_subscribed(h.lifecycle, "a1", sub)

    loop = asyncio.get_running_loop()
    started = loop.time()
    stopping = asyncio.create_task(h.server.stop())

    # Health says NOT_SERVING while the server drains.
    statuses = [first.status]
    while statuses[-1] != NOT_SERVING:
        statuses.append((await next_message(watch)).status)
    # The subscription ends with UNAVAILABLE so the agent reconnects elsewhere.
    await asyncio.wait_for(sub.done.wait(), 5)
    assert isinstance(sub.error, grpc.aio.AioRpcError), sub.error
    assert sub.error.code() == grpc.StatusCode.UNAVAILABLE, sub.error
    assert sub.queue.empty()
    # Parked streams (the health watch included) do not hold stop() for the grace.
    await stopping
    elapsed = loop.time() - started
    assert elapsed < 5, f"stop() took {elapsed:.1f}s with parked streams open"
    await watch.close()


async def test_unexpected_exception_is_internal_with_generic_message(harness, monkeypatch, caplog):
    await harness.register("a1")

    def broken(agent_id: str) -> Any:
        raise RuntimeError("secret detail")

    # Fault injection: the one place a test replaces a piece of the server.
    monkeypatch.setattr(harness.server.lifecycle, "get", broken)
    caplog.set_level(logging.ERROR, logger="opscore.rpc")
    call = harness.lifecycle.GetAgent(
        pb.GetAgentRequest(agent_id="a1"), metadata=(("x-request-id", "rid-boom"),)
    )
    err = await expect_error(call, grpc.StatusCode.INTERNAL, "request id", "rid-boom")
    assert "secret detail" not in err.details()
    assert "RuntimeError" not in err.details()
    records = [
        r
        for r in caplog.records
        if r.name == "opscore.rpc" and r.levelno >= logging.ERROR and r.exc_info
    ]
    assert records, f"no ERROR with a traceback logged: {caplog.records}"
    rec = records[0]
    assert isinstance(rec.exc_info[1], RuntimeError)
    assert "secret detail" in str(rec.exc_info[1])
    assert getattr(rec, "request_id", None) == "rid-boom"
    assert getattr(rec, "method", None) == "/opscore.v1.LifecycleService/GetAgent"
    # The server keeps serving other calls.
    monkeypatch.undo()
    got = await harness.lifecycle.GetAgent(pb.GetAgentRequest(agent_id="a1"))
    assert got.agent.agent_id == "a1"


# ------------------------------------------------------------------ subprocess


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_sigterm_drains_and_exits_zero(tmp_path):
    with running_server(tmp_path) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
            dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
            await lifecycle.RegisterAgent(pb.RegisterAgentRequest(agent_id="a1"))
            sub = StreamReader(
                dispatch.SubscribeTasks(dispatch_pb2.SubscribeTasksRequest(agent_id="a1"))
            )
            await wait_subscribed(lifecycle, "a1", sub)
            started = time.monotonic()
            code = await asyncio.to_thread(server.terminate)
            elapsed = time.monotonic() - started
            assert code == 0, server.log_tail()
            await asyncio.wait_for(sub.done.wait(), 5)
            assert isinstance(sub.error, grpc.aio.AioRpcError), sub.error
            assert sub.error.code() == grpc.StatusCode.UNAVAILABLE, sub.error
        # Well inside the default 10 s grace: the open stream did not hold the exit.
        assert elapsed < 8, f"SIGTERM took {elapsed:.1f}s\n{server.log_tail()}"
        messages = [line.get("message") for line in read_log(server.log_path)]
        assert "draining" in messages, server.log_tail()
        assert "stopped" in messages, server.log_tail()
        assert messages.index("draining") < messages.index("stopped")


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_every_rpc_logs_one_json_line(tmp_path):
    with running_server(tmp_path) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
            call = lifecycle.RegisterAgent(
                pb.RegisterAgentRequest(agent_id="logged-agent"),
                metadata=(("x-request-id", "rid-42"),),
            )
            await call
            assert dict(await call.trailing_metadata())["x-request-id"] == "rid-42"
            failing = lifecycle.GetAgent(
                pb.GetAgentRequest(agent_id="ghost"), metadata=(("x-request-id", "rid-43"),)
            )
            await expect_error(failing, grpc.StatusCode.NOT_FOUND)
            # Without x-request-id the server makes one up and returns it.
            plain = lifecycle.ListAgents(pb.ListAgentsRequest())
            await plain
            generated = dict(await plain.trailing_metadata()).get("x-request-id")
            assert generated

        def rpc_lines(rid: str) -> list[dict[str, Any]]:
            return [
                line
                for line in read_log(server.log_path)
                if line.get("request_id") == rid and line.get("message") == "rpc"
            ]

        await eventually(lambda: all(rpc_lines(r) for r in ("rid-42", "rid-43", generated)))
        (ok,) = rpc_lines("rid-42")
        assert ok["method"] == "/opscore.v1.LifecycleService/RegisterAgent"
        assert ok["code"] == "OK"
        assert ok["agent_id"] == "logged-agent"
        assert isinstance(ok["duration_ms"], (int, float)) and ok["duration_ms"] >= 0
        assert ok["peer"] and "127.0.0.1" in ok["peer"]
        assert ok["level"] == "INFO" and ok["logger"] == "opscore.rpc"
        (bad,) = rpc_lines("rid-43")
        assert bad["method"] == "/opscore.v1.LifecycleService/GetAgent"
        assert bad["code"] == "NOT_FOUND"
        assert bad["agent_id"] == "ghost"
        (listed,) = rpc_lines(generated)
        assert listed["method"] == "/opscore.v1.LifecycleService/ListAgents"
        assert listed["code"] == "OK"
        assert listed.get("agent_id") is None
