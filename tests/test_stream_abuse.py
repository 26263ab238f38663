"""Stream abuse under dispatch load (issue 9): many clients open every streaming
RPC with random 5-100 ms deadlines, cancel mid-burst, never read, drop their
connections, while an enqueue -> complete loop runs. The server is a subprocess,
so a crash (finding 1 was a SIGSEGV) is a dead process and its log tail, not a
dead test runner.

Properties: the process never dies, health stays SERVING, no stream ends with
INTERNAL or UNKNOWN, nothing acknowledged is lost (every acknowledged enqueue is
completed or still open, no acknowledged completion is lost or repeated) and
the server still drains cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opscore_proto.v1 import common_pb2, dispatch_pb2_grpc, lifecycle_pb2_grpc, workflow_pb2_grpc
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import lifecycle_pb2 as lpb
from opscore_proto.v1 import workflow_pb2 as wpb

from tests.support.hostile import health_status
from tests.support.ledger import (
    OPEN_STATES,
    TS,
    Client,
    Ledger,
    agent_loop,
    connect,
    dur,
    struct,
)
from tests.support.procserver import ServerProcess, running_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.backends("sqlite", "postgres"),
]

ABUSE_SECONDS = float(os.environ.get("OPSCORE_ABUSE_SECONDS", "12"))
ABUSERS = 12
ABUSE_AGENTS = [f"abuser-{i}" for i in range(4)]
RETRY = {"max_attempts": 100, "initial_backoff": dur(0.1), "max_backoff": dur(0.5)}
FAULT_ENV = {"PYTHONFAULTHANDLER": "1"}
ALLOWED_ENDS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # The per-agent subscription cap, with cancelled streams not yet cleaned up.
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass
class Tally:
    opened: Counter[str] = field(default_factory=Counter)
    ends: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    bad: list[str] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)


def open_stream(
    channel: grpc.aio.Channel, kind: str, rng: random.Random, sessions: list[str]
) -> Any:
    deadline = rng.uniform(0.005, 0.1)
    if kind == "SubscribeTasks":
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        request = dpb.SubscribeTasksRequest(
            agent_id=rng.choice(ABUSE_AGENTS), max_in_flight=rng.choice([1, 8, 1000])
        )
        return stub.SubscribeTasks(request, timeout=deadline)
    if kind == "WatchAgents":
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        return stub.WatchAgents(lpb.WatchAgentsRequest(), timeout=deadline)
    if kind == "WatchSession":
        stub = workflow_pb2_grpc.WorkflowServiceStub(channel)
        request = wpb.WatchSessionRequest(
            session_id=rng.choice(sessions), after_sequence=rng.choice([0, 0, 1, 3])
        )
        return stub.WatchSession(request, timeout=deadline)
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=deadline)


KINDS = ("SubscribeTasks", "WatchAgents", "WatchSession", "Health.Watch")


async def abuser(
    target: str, seed: int, stop: asyncio.Event, sessions: list[str], tally: Tally
) -> None:
    """Open streams and misbehave, until told to stop: read a few messages of a
    burst and cancel, never read until the deadline, or drop the connection."""
    rng = random.Random(seed)
    local = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    channel = grpc.aio.insecure_channel(target, options=local)
    try:
        while not stop.is_set():
            kind = rng.choice(KINDS)
            call = open_stream(channel, kind, rng, sessions)
            tally.opened[kind] += 1
            mode = rng.choice(("cancel", "never-read", "drop-connection"))
            try:
                if mode == "never-read":
                    await call.code()  # the deadline ends it; nothing is read
                else:
                    for _ in range(rng.randint(0, 3)):
                        msg = await call.read()
                        if msg is grpc.aio.EOF:
                            break
                        tally.messages += 1
                    if mode == "cancel":
                        call.cancel()
                    else:
                        await channel.close(grace=None)
                        channel = grpc.aio.insecure_channel(target, options=local)
                code = await call.code()
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code not in ALLOWED_ENDS:
                    tally.bad.append(f"{kind}/{mode}: {code.name} {err.details()}")
            except asyncio.CancelledError:
                if stop.is_set():
                    raise
                code = grpc.StatusCode.CANCELLED
            tally.ends[f"{kind}:{code.name}"] += 1
            if code not in ALLOWED_ENDS:
                tally.bad.append(f"{kind}/{mode} ended {code.name}")
    finally:
        await channel.close(grace=None)


async def enqueuer(client: Client, ledger: Ledger, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        # Most work goes to the loader; some to the abusers, who drop it.
        capability = "abuse" if n % 5 == 0 else "load"
        resp = await client.dispatch.EnqueueTask(
            dpb.EnqueueTaskRequest(
                capability=capability,
                name=f"job-{n}",
                input=struct(n=n),
                timeout=dur(2),
                retry_policy=common_pb2.RetryPolicy(**RETRY),
            )
        )
        ledger.enqueued.append(resp.task.task_id)


async def noisy(client: Client, stop: asyncio.Event) -> None:
    """State changes, so that WatchAgents streams have bursts to send."""
    states = (lpb.AgentState.AGENT_STATE_ACTIVE, lpb.AgentState.AGENT_STATE_IDLE)
    details = struct(pad="n" * 1000)
    i = 0
    while not stop.is_set():
        i += 1
        await client.lifecycle.ReportState(
            lpb.ReportStateRequest(agent_id="noisy", state=states[i % 2], details=details)
        )


async def monitor(server: ServerProcess, client: Client, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        status = await health_status(client.channel, timeout=2)
        if server.proc.poll() is not None or status != "SERVING":
            tally.health_failures.append(
                f"t={time.monotonic():.1f} exit={server.proc.poll()} health={status}"
            )
            if server.proc.poll() is not None:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def test_streams_abused_under_dispatch_load(tmp_path: Path, db_url: str):
    ledger = Ledger()
    tally = Tally()
    with running_server(tmp_path, "--agent-timeout", "2", env=FAULT_ENV, db_path=db_url) as server:
        async with connect(server) as client:
            await client.register("loader", ["load"])
            await client.register("noisy", ["none"])
            for agent in ABUSE_AGENTS:
                await client.register(agent, ["abuse"])
            # A backlog for the abusers' bursts: they take up to 1000 at once.
            backlog = [
                dpb.EnqueueTaskRequest(
                    capability="abuse",
                    name=f"burst-{i}",
                    timeout=dur(2),
                    retry_policy=common_pb2.RetryPolicy(**RETRY),
                )
                for i in range(1000)
            ]
            for r in (
                await client.dispatch.EnqueueTasks(dpb.EnqueueTasksRequest(tasks=backlog))
            ).results:
                ledger.enqueued.append(r.task.task_id)
            # Sessions for WatchSession: their first step goes to the abusers.
            wf = workflow_pb2_grpc.WorkflowServiceStub(client.channel)
            await wf.CreateWorkflowDefinition(
                wpb.CreateWorkflowDefinitionRequest(
                    source="id: abuse\ntasks:\n- id: a\n  capability: abuse\n"
                    "- id: b\n  capability: load\n  depends_on: [a]\n"
                )
            )
            sessions = [
                (
                    await wf.StartWorkflow(wpb.StartWorkflowRequest(definition_id="abuse"))
                ).session.session_id
                for _ in range(5)
            ]

            reader = await client.subscribe("loader", max_in_flight=8)
            stop = asyncio.Event()
            loader = asyncio.create_task(agent_loop(client, ledger, "loader", reader))
            try:
                load = [
                    asyncio.create_task(enqueuer(client, ledger, stop)),
                    asyncio.create_task(noisy(client, stop)),
                ]
                watch = asyncio.create_task(monitor(server, client, stop, tally))
                abusers = [
                    asyncio.create_task(abuser(server.target, seed, stop, sessions, tally))
                    for seed in range(ABUSERS)
                ]
                everything = [*load, watch, *abusers]
                await asyncio.wait(
                    everything, timeout=ABUSE_SECONDS, return_when=asyncio.FIRST_EXCEPTION
                )
                stop.set()
                results = await asyncio.gather(*everything, return_exceptions=True)
                crashed = server.proc.poll()
                assert crashed is None, f"server died (exit {crashed})\n{server.log_tail(80)}"
                errors = [r for r in results if isinstance(r, BaseException)]
                assert not errors, f"load or abuse loop failed: {errors[:3]!r}"
                assert not tally.health_failures, tally.health_failures[:5]
                assert not tally.bad, f"{len(tally.bad)} streams ended badly: {tally.bad[:5]}"
                assert sum(tally.opened.values()) > 100, tally.opened
                assert await health_status(client.channel) == "SERVING"
            finally:
                await reader.close()
                with contextlib.suppress(BaseException):
                    await loader
            final = {t.task_id: t for t in await client.all_tasks()}
        # After all that, it still drains cleanly.
        assert server.terminate() == 0, server.log_tail()

    problems = ledger.problems(final)
    ended_otherwise = [
        (i, TS.Name(final[i].state))
        for i in ledger.enqueued
        if i in final and final[i].state not in (*OPEN_STATES, TS.TASK_STATE_COMPLETED)
    ]
    assert not ended_otherwise, (
        f"acknowledged tasks neither open nor completed: {ended_otherwise[:5]}"
    )
    assert not problems, "\n".join(problems)
    assert ledger.completed, "the loader completed nothing"
    print(
        f"\nstream abuse: {sum(tally.opened.values())} streams {dict(tally.opened)}, "
        f"{tally.messages} messages read, {len(ledger.enqueued)} tasks enqueued, "
        f"{len(ledger.completed)} completed; ends {dict(tally.ends)}"
    )
