"""The Agent on its work stream (DispatchService.Connect): results batched,
refusals handled as the unary calls' statuses are, shutdown by capacity 0, and
reconnects that neither lose nor repeat a result. Refusals run on both shapes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2

from opscore import workstream
from opscore.agent import TRANSPORTS, Agent, TaskContext
from opscore.client import OpsCoreClient, Outbox, RetryConfig, TaskRetry, to_dict
from opscore.limits import MAX_PAYLOAD_BYTES
from tests.conftest import Harness, eventually
from tests.support.sdk import client_for
from tests.test_agent import finished, make_agent, running, subscribed

T = pb.TaskState
S = lifecycle_pb2.AgentState
OUTCOME = pb.TaskAttemptOutcome


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[OpsCoreClient]:
    async with client_for(harness) as c:
        yield c


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[list[workstream.Item]]:
    """The items of every ConnectRequest the server handles, one list per
    message (the real handler runs; this only records)."""
    seen: list[list[workstream.Item]] = []
    handle = workstream.WorkStream.handle

    async def recording(self: workstream.WorkStream, items: list[workstream.Item]) -> None:
        seen.append(list(items))
        await handle(self, items)

    monkeypatch.setattr(workstream.WorkStream, "handle", recording)
    return seen


def completions(message: list[workstream.Item]) -> list[str]:
    return [i.task_id for i in message if isinstance(i, workstream.Completion)]


def the_stream(h: Harness, agent_id: str = "worker-1") -> Any:
    """The agent's one open subscription on the server (its work stream)."""
    assert h.server is not None
    (sub,) = h.server.dispatch._subs_by_agent[agent_id]
    return sub


async def attempts(client: OpsCoreClient, task_id: str) -> list[pb.TaskAttempt]:
    return list((await client.list_task_attempts(task_id)).items)


# ---------------------------------------------------------------------- batching


async def test_results_ready_together_go_in_one_message(harness, client, received):
    agent = make_agent(harness, max_in_flight=5)
    started: asyncio.Queue[str] = asyncio.Queue()
    release = asyncio.Event()

    @agent.task("batch")
    async def batch(task: TaskContext) -> dict[str, Any]:
        await started.put(task.task_id)
        await release.wait()
        return {"n": task.input["n"]}

    async with running(agent, client):
        tasks = [await client.enqueue_task("batch", input={"n": n}) for n in range(5)]
        for _ in tasks:
            await asyncio.wait_for(started.get(), 10)
        release.set()  # all five handlers return in the same turn of the loop
        done = [await finished(client, t.task_id) for t in tasks]
    assert [to_dict(d.output) for d in done] == [{"n": n} for n in range(5)]
    sizes = [len(completions(m)) for m in received if completions(m)]
    assert sum(sizes) == 5, sizes
    assert max(sizes) >= 2, f"completions went one per message: {sizes}"


async def test_a_lone_result_does_not_wait_for_others(harness, client, received):
    agent = make_agent(harness, max_in_flight=2)
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> str:
        if task.input.get("slow"):
            await release.wait()
        return "ok"

    async with running(agent, client):
        slow = await client.enqueue_task("job", input={"slow": True})
        quick = await client.enqueue_task("job")
        # The quick one is completed while the slow one still runs: nothing
        # waited to fill a batch.
        assert (await finished(client, quick.task_id)).state == T.TASK_STATE_COMPLETED
        assert (await client.get_task(slow.task_id)).state == T.TASK_STATE_ASSIGNED
        release.set()
        await finished(client, slow.task_id)
    assert [completions(m) for m in received if completions(m)] == [
        [quick.task_id],
        [slow.task_id],
    ]


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_result_for_a_lost_lease_is_dropped(harness, client, transport, caplog):
    agent = make_agent(harness, transport=transport)
    started = asyncio.Event()
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> str:
        if task.input.get("hold"):
            started.set()
            await release.wait()
        return "late"

    async with running(agent, client):
        opened = the_stream(harness).sub_id
        held = await client.enqueue_task(
            "job",
            input={"hold": True},
            timeout=timedelta(milliseconds=300),
            retry_policy=TaskRetry(initial_backoff=60),
        )
        await asyncio.wait_for(started.wait(), 10)

        async def expired() -> bool:
            return (await client.get_task(held.task_id)).state == T.TASK_STATE_SCHEDULED

        await eventually(expired, what="the lease of attempt 1 to expire")
        with caplog.at_level(logging.WARNING, logger="opscore.agent"):
            release.set()
            await eventually(lambda: agent.in_flight == 0, what="the agent to drop the task")
        # The same stream goes on and takes new work.
        assert the_stream(harness).sub_id == opened
        fresh = await client.enqueue_task("job")
        assert (await finished(client, fresh.task_id)).state == T.TASK_STATE_COMPLETED
    task = await client.get_task(held.task_id)
    assert task.state == T.TASK_STATE_SCHEDULED and not task.HasField("output")
    ignored = f"result of task {held.task_id} attempt 1 ignored by the server"
    assert any(ignored in r.getMessage() and "LEASE_LOST" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_result_for_a_finished_task_is_dropped(harness, client, transport, caplog):
    agent = make_agent(harness, transport=transport)
    started = asyncio.Event()
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"by": "agent"}

    async with running(agent, client):
        held = await client.enqueue_task("job")
        await asyncio.wait_for(started.wait(), 10)
        # Someone else finishes the attempt first (a unary call with its lease).
        await client.complete_task(held.task_id, "worker-1", 1, {"by": "test"})
        with caplog.at_level(logging.WARNING, logger="opscore.agent"):
            release.set()
            await eventually(lambda: agent.in_flight == 0, what="the agent to drop the task")
    task = await client.get_task(held.task_id)
    assert task.state == T.TASK_STATE_COMPLETED and to_dict(task.output) == {"by": "test"}
    ignored = f"result of task {held.task_id} attempt 1 ignored by the server"
    assert any(
        ignored in r.getMessage() and "TASK_FINISHED" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused_heartbeat_stops_the_handler(harness, client, transport):
    agent = make_agent(harness, transport=transport)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async with running(agent, client):
        held = await client.enqueue_task("job", heartbeat_timeout=timedelta(milliseconds=300))
        await asyncio.wait_for(started.wait(), 10)
        # The attempt ends elsewhere: the agent's next heartbeat is refused
        # (TASK_FINISHED), which stops the handler; no result is sent.
        await client.complete_task(held.task_id, "worker-1", 1, {"by": "test"})
        await asyncio.wait_for(cancelled.wait(), 10)
        await eventually(lambda: agent.in_flight == 0, what="the agent to drop the task")
    task = await client.get_task(held.task_id)
    assert task.state == T.TASK_STATE_COMPLETED and to_dict(task.output) == {"by": "test"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_output_the_server_refuses_fails_the_task_for_good(harness, client, transport):
    agent = make_agent(harness, transport=transport)

    @agent.task("huge")
    async def huge(task: TaskContext) -> dict[str, Any]:
        return {"blob": "x" * MAX_PAYLOAD_BYTES}  # JSON-like, but over the limit

    async with running(agent, client):
        opened = the_stream(harness).sub_id
        queued = await client.enqueue_task("huge", retry_policy=TaskRetry(max_attempts=3))
        done = await finished(client, queued.task_id)
        assert the_stream(harness).sub_id == opened, "a refused item never ends the stream"
    assert done.state == T.TASK_STATE_FAILED and done.attempt == 1
    assert done.last_error.type == "InvalidOutput"
    assert done.last_error.message.startswith("the server refused the handler's output: ")


# ---------------------------------------------------------------------- shutdown


async def test_shutdown_pauses_the_stream_finishes_and_half_closes(harness, client, caplog):
    agent = make_agent(harness, max_in_flight=2)
    started = asyncio.Event()
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> str:
        started.set()
        await release.wait()
        return "finished during shutdown"

    run = asyncio.create_task(agent.run(handle_signals=False))
    await subscribed(client, "worker-1", run)
    held = await client.enqueue_task("job")
    await asyncio.wait_for(started.wait(), 10)
    with caplog.at_level(logging.INFO, logger="opscore.rpc"):
        before = len(caplog.records)  # the RPCs of the shutdown only, below
        stopping = asyncio.create_task(agent.shutdown())
        # Capacity 0: the stream stays open, holding the task, taking no more.
        await eventually(lambda: the_stream(harness).max_in_flight == 0, what="capacity 0")
        late = await client.enqueue_task("job")
        assert (await client.get_task(held.task_id)).state == T.TASK_STATE_ASSIGNED
        release.set()
        await asyncio.wait_for(stopping, 15)
        await asyncio.wait_for(run, 5)
    done = await client.get_task(held.task_id)
    assert done.state == T.TASK_STATE_COMPLETED
    assert to_dict(done.output) == {"result": "finished during shutdown"}
    never = await client.get_task(late.task_id)
    assert never.state == T.TASK_STATE_QUEUED and never.attempt == 0
    registered = await client.get_agent("worker-1")
    assert registered.state == S.AGENT_STATE_FINISHED and registered.open_subscriptions == 0
    # The agent half-closed: the server ended the stream with OK, not CANCELLED.
    rpcs = caplog.records[before:]
    ends = [r for r in rpcs if getattr(r, "method", "").endswith("/Connect")]
    assert [getattr(r, "code", None) for r in ends] == ["OK"]
    # And FINISHED went on the stream: no ReportState call at the end.
    assert not [r for r in rpcs if getattr(r, "method", "").endswith("/ReportState")]


# ---------------------------------------------------------------------- reconnects


async def test_reconnect_after_a_restart_resends_the_held_task_and_completes_it_once(
    harness, client
):
    agent = make_agent(harness)
    runs: list[tuple[str, int]] = []
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> dict[str, Any]:
        runs.append((task.task_id, task.attempt))
        await release.wait()
        return {"ran": len(runs)}

    async with running(agent, client):
        held = await client.enqueue_task("job")
        await eventually(lambda: runs, what="the task to start")
        await harness.restart()
        # The agent's new stream is re-sent the lease it kept (same attempt)...
        assert harness.server is not None
        engine = harness.server.dispatch
        await eventually(
            lambda: any(
                held.task_id in s.in_flight for s in engine._subs_by_agent.get("worker-1", ())
            ),
            what="the held lease re-sent on the new stream",
        )
        # ...and ignores it: the handler is not started again.
        release.set()
        done = await finished(client, held.task_id)
    assert runs == [(held.task_id, 1)]
    assert done.state == T.TASK_STATE_COMPLETED and to_dict(done.output) == {"ran": 1}
    [attempt] = await attempts(client, held.task_id)
    assert (attempt.attempt, attempt.outcome) == (1, OUTCOME.TASK_ATTEMPT_OUTCOME_COMPLETED)


async def test_result_sent_while_the_server_is_down_is_accepted_once_it_is_back(
    harness, client, received
):
    agent = make_agent(harness)
    release = asyncio.Event()
    runs: list[int] = []

    @agent.task("job")
    async def job(task: TaskContext) -> str:
        runs.append(task.attempt)
        await release.wait()
        return "across the outage"

    async with running(agent, client) as run:
        held = await client.enqueue_task("job")
        await eventually(lambda: runs, what="the task to start")
        await harness.stop()
        release.set()  # the completion now waits for a stream
        assert agent._outbox is not None
        await eventually(lambda: agent._outbox.pending == 1, what="the completion queued")
        await harness.start()
        done = await finished(client, held.task_id)
        await subscribed(client, "worker-1", run)
    assert runs == [1]
    assert done.state == T.TASK_STATE_COMPLETED and to_dict(done.output) == {
        "result": "across the outage"
    }
    assert sum(len(completions(m)) for m in received) == 1, "sent once to the server that took it"


async def test_an_item_whose_answer_was_lost_is_sent_again_and_accepted_once(
    harness: Harness, client: OpsCoreClient
):
    """The SDK's Outbox with a real server: an answered-but-unread completion is
    re-sent on the next stream and answered as the first time, changing nothing."""
    await harness.register("raw", ["c"])
    outbox = Outbox()
    first = client.connect("raw")
    await first.open()
    queued = await client.enqueue_task("c")
    [message] = await first.read() or []
    task = message.assignment.task
    answer = outbox.submit(
        pb.AgentMessage(
            completion=pb.TaskCompletion(
                task_id=task.task_id, attempt=task.attempt, output=task.input
            )
        )
    )
    await first.send(await outbox.take())

    async def completed() -> bool:
        return (await client.get_task(queued.task_id)).state == T.TASK_STATE_COMPLETED

    await eventually(completed, what="the completion applied")
    first.cancel()  # its answer is never read
    assert not answer.done() and outbox.pending == 1

    again = client.connect("raw")
    await again.open()
    outbox.rewind()
    [resent] = await outbox.take()
    assert resent.completion.task_id == task.task_id
    await again.send([resent])
    while not answer.done():
        for m in await again.read() or []:
            if m.WhichOneof("message") == "result":
                outbox.resolve(m.result)
    result = answer.result()
    assert result is not None and result.id == resent.id
    assert (result.code, result.task_state) == (0, T.TASK_STATE_COMPLETED)
    assert outbox.pending == 0
    [attempt] = await attempts(client, queued.task_id)
    assert attempt.outcome == OUTCOME.TASK_ATTEMPT_OUTCOME_COMPLETED
    await again.done_writing()
    assert await again.read() is None  # half-closed: the server ends with OK


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="transport must be one of connect, subscribe"):
        Agent("x", transport="carrier-pigeon")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_registers_again_with_a_server_that_lost_its_database(
    harness, client, transport, monkeypatch
):
    """The server comes back with an empty database while the agent's IDLE
    report waits for a stream: the hello gets NOT_FOUND, the agent registers
    again (without waiting behind that report) and takes new work."""
    monkeypatch.setattr("opscore.agent.worker._MIN_ANSWER_WAIT", 0.2)
    own = client_for(harness, retry=RetryConfig(max_attempts=2))
    agent = make_agent(harness, transport=transport, client=own)
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> str:
        if task.input.get("hold"):
            await release.wait()
        return "done"

    try:
        async with running(agent, client) as run:
            await client.enqueue_task(
                "job", input={"hold": True}, timeout=timedelta(milliseconds=300)
            )
            await eventually(lambda: agent.in_flight == 1, what="the task to start")
            await harness.stop()
            for leftover in Path(harness.config.db).parent.glob("opscore.db*"):
                leftover.unlink()
            release.set()  # its result cannot be sent before the lease ends: given up
            await eventually(lambda: agent.in_flight == 0, what="the result given up")
            await eventually(
                lambda: (
                    agent._reporter is not None and agent._reporter.wanted == S.AGENT_STATE_IDLE
                ),
                what="IDLE to report",
            )
            await harness.start()
            await subscribed(client, "worker-1", run)
            fresh = await client.enqueue_task("job")
            assert (await finished(client, fresh.task_id)).state == T.TASK_STATE_COMPLETED
    finally:
        await own.close()
