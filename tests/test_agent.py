"""The Agent worker end to end, against a real in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opscore_proto.v1 import dispatch_pb2, lifecycle_pb2

from opscore.agent import TRANSPORTS, Agent, NonRetryableError, TaskContext
from opscore.client import OpsCoreClient, TaskRetry, to_datetime, to_dict
from tests.conftest import eventually
from tests.support.sdk import client_for

S = lifecycle_pb2.AgentState
T = dispatch_pb2.TaskState
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_agent(harness: Any, agent_id: str = "worker-1", **kwargs: Any) -> Agent:
    kwargs.setdefault("env", {})
    return Agent("test-agent", agent_id=agent_id, target=harness.target, **kwargs)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each shape the Agent works in: the work stream (default) and SubscribeTasks."""
    return str(request.param)


async def subscribed(client: OpsCoreClient, agent_id: str, run: asyncio.Task[None]) -> None:
    """Wait until the server sees the agent's subscription open."""

    async def probe() -> bool:
        if run.done():
            run.result()  # raise what stopped the agent
            raise AssertionError("the agent stopped before subscribing")
        try:
            agent = await client.get_agent(agent_id)
        except Exception:
            return False
        return agent.open_subscriptions >= 1 and agent.state == S.AGENT_STATE_IDLE

    await eventually(probe, what=f"{agent_id} subscribed")


@contextlib.asynccontextmanager
async def running(agent: Agent, client: OpsCoreClient) -> AsyncIterator[asyncio.Task[None]]:
    run = asyncio.create_task(agent.run(handle_signals=False))
    try:
        await subscribed(client, agent.agent_id, run)
        yield run
    finally:
        await agent.shutdown(graceful=False)
        await asyncio.wait_for(run, 15)


async def finished(client: OpsCoreClient, task_id: str) -> dispatch_pb2.Task:
    async def probe() -> dispatch_pb2.Task | None:
        task = await client.get_task(task_id)
        final = (T.TASK_STATE_COMPLETED, T.TASK_STATE_FAILED, T.TASK_STATE_CANCELLED)
        return task if task.state in final else None

    return await eventually(probe, what=f"task {task_id} finished")


@pytest.fixture
async def client(harness) -> AsyncIterator[OpsCoreClient]:
    async with client_for(harness) as c:
        yield c


# ---------------------------------------------------------------------- handlers


async def test_async_and_sync_handlers_complete_tasks(harness, client, transport):
    agent = make_agent(harness, transport=transport, max_in_flight=2)
    threads: list[str] = []

    @agent.task("text.upper")
    async def upper(task: TaskContext) -> dict[str, Any]:
        return {"text": task.input["text"].upper(), "attempt": task.attempt}

    @agent.task("text.count")
    def count(task: TaskContext) -> int:
        threads.append(threading.current_thread().name)
        return len(task.input["text"].split())

    async with running(agent, client):
        registered = await client.get_agent("worker-1")
        assert list(registered.capabilities) == ["text.count", "text.upper"]
        a = await client.enqueue_task("text.upper", input={"text": "hello"})
        b = await client.enqueue_task("text.count", input={"text": "one two three"})
        done_a, done_b = await finished(client, a.task_id), await finished(client, b.task_id)
    assert done_a.state == T.TASK_STATE_COMPLETED
    assert to_dict(done_a.output) == {"text": "HELLO", "attempt": 1}
    assert to_dict(done_b.output) == {"result": 3}  # a non-dict value is wrapped
    assert threads and threads[0].startswith("opscore-handler")  # sync ran in a thread
    # The agent said it was busy while it worked, and FINISHED at the end.
    history = [t.to_state async for t in client.iter_state_transitions("worker-1")]
    assert S.AGENT_STATE_ACTIVE in history
    assert history[0] == S.AGENT_STATE_FINISHED


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stale_resend_of_a_finished_attempt_does_not_run_it_again(
    harness, client, transport
):
    """After a reconnect the server re-sends the leases it holds for the agent; on
    the older shape that re-send can arrive after the answer to the attempt's
    result (two separate calls), when the attempt is no longer running here.
    It must not run the attempt a second time. The re-send is fed to the agent
    where its stream reader hands assignments over."""
    agent = make_agent(harness, transport=transport)
    calls: list[int] = []

    @agent.task("once")
    async def once(task: TaskContext) -> dict[str, Any]:
        calls.append(task.attempt)
        return {}

    async with running(agent, client):
        queued = await client.enqueue_task("once")
        done = await finished(client, queued.task_id)
        assert done.state == T.TASK_STATE_COMPLETED and calls == [1]
        await eventually(lambda: agent.in_flight == 0, what="the attempt to be let go")
        agent._accept(done)  # the stale re-send: the same task at its finished attempt
        assert agent.in_flight == 0
        # A later attempt of the same task (a real retry) still runs.
        retry = dispatch_pb2.Task()
        retry.CopyFrom(done)
        retry.attempt = 2
        agent._accept(retry)
        await eventually(lambda: calls == [1, 2], what="the new attempt to run")
    assert calls == [1, 2]


async def test_failures_are_retried_and_non_retryable_ones_are_not(harness, client, transport):
    agent = make_agent(harness, transport=transport)
    attempts: list[int] = []

    @agent.task("flaky")
    async def flaky(task: TaskContext) -> dict[str, Any]:
        attempts.append(task.attempt)
        if task.attempt == 1:
            raise ValueError("first attempt always fails")
        return {"ok": True}

    @agent.task("doomed")
    def doomed(task: TaskContext) -> None:
        raise NonRetryableError("input is unusable", error_type="BadInput", details={"k": 1})

    async with running(agent, client):
        retry = TaskRetry(max_attempts=3, initial_backoff=0.01)
        a = await client.enqueue_task("flaky", retry_policy=retry)
        b = await client.enqueue_task("doomed", retry_policy=retry)
        done_a, done_b = await finished(client, a.task_id), await finished(client, b.task_id)
    assert done_a.state == T.TASK_STATE_COMPLETED and done_a.attempt == 2
    assert attempts == [1, 2]
    assert done_a.last_error.type == "ValueError"
    assert done_a.last_error.message == "first attempt always fails"
    assert "Traceback" in to_dict(done_a.last_error.details)["traceback"]
    assert done_b.state == T.TASK_STATE_FAILED and done_b.attempt == 1
    assert done_b.last_error.type == "BadInput"
    assert to_dict(done_b.last_error.details)["k"] == 1


async def test_max_in_flight_bounds_concurrency(harness, client, transport):
    agent = make_agent(harness, transport=transport, max_in_flight=2)
    started: asyncio.Queue[str] = asyncio.Queue()
    release = asyncio.Event()

    @agent.task("slow")
    async def slow(task: TaskContext) -> None:
        await started.put(task.task_id)
        await release.wait()

    async with running(agent, client):
        tasks = [await client.enqueue_task("slow", name=f"t{i}") for i in range(3)]
        first = {await asyncio.wait_for(started.get(), 10) for _ in range(2)}
        waiting = [t for t in tasks if t.task_id not in first]
        assert len(waiting) == 1
        assert (await client.get_task(waiting[0].task_id)).state == T.TASK_STATE_QUEUED
        assert agent.in_flight == 2
        release.set()
        results = [await finished(client, t.task_id) for t in tasks]
    assert all(r.state == T.TASK_STATE_COMPLETED for r in results)


async def test_cancellation_cancels_the_handler(harness, client, transport):
    agent = make_agent(harness, transport=transport)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @agent.task("forever")
    async def forever(task: TaskContext) -> None:
        if task.input.get("quick"):
            return
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with running(agent, client):
        held = await client.enqueue_task("forever")
        await asyncio.wait_for(started.wait(), 10)
        await client.cancel_task(held.task_id, reason="no longer needed")
        await asyncio.wait_for(cancelled.wait(), 10)
        # The slot is free again and the agent sent no result for the cancelled task.
        after = await client.enqueue_task("forever", input={"quick": True})
        assert (await finished(client, after.task_id)).state == T.TASK_STATE_COMPLETED
        task = await client.get_task(held.task_id)
    assert task.state == T.TASK_STATE_CANCELLED
    assert not task.HasField("output")
    # The cancellation's reason, not a result from the agent.
    assert (task.last_error.type, task.last_error.message) == ("Cancelled", "no longer needed")


async def test_heartbeats_keep_a_long_task_alive_and_carry_progress(harness, client, transport):
    agent = make_agent(harness, transport=transport)
    release = asyncio.Event()

    @agent.task("long")
    async def long(task: TaskContext) -> str:
        task.report_progress({"stage": "working"})
        await release.wait()
        return "done"

    async with running(agent, client):
        queued = await client.enqueue_task(
            "long", heartbeat_timeout=timedelta(milliseconds=300), timeout=60
        )

        async def assigned() -> dispatch_pb2.Task | None:
            task = await client.get_task(queued.task_id)
            return task if task.state == T.TASK_STATE_ASSIGNED else None

        first = await eventually(assigned, what="assigned")
        first_lease = to_datetime(first, "lease_expire_time")
        assert first_lease is not None

        async def extended_far() -> dispatch_pb2.Task | None:
            task = await client.get_task(queued.task_id)
            lease = to_datetime(task, "lease_expire_time")
            # Several heartbeat timeouts past the first lease, on the same attempt.
            if task.attempt == 1 and lease and lease - first_lease > timedelta(seconds=1):
                return task
            return None

        alive = await eventually(extended_far, what="lease extended by heartbeats")
        assert to_dict(alive.progress) == {"stage": "working"}
        release.set()
        done = await finished(client, queued.task_id)
    assert done.state == T.TASK_STATE_COMPLETED and done.attempt == 1
    assert to_dict(done.output) == {"result": "done"}


async def test_reconnects_after_the_server_restarts(harness, transport):
    agent = make_agent(harness, transport=transport)
    started = asyncio.Event()
    release = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> dict[str, Any]:
        if task.input.get("wait"):
            started.set()
            await release.wait()
        return {"n": task.input["n"]}

    client = client_for(harness)
    run = asyncio.create_task(agent.run(handle_signals=False))
    try:
        await subscribed(client, "worker-1", run)
        held = await client.enqueue_task("job", input={"n": 1, "wait": True})
        await asyncio.wait_for(started.wait(), 10)
        await harness.restart()
        # The agent kept its task across the restart; its result still counts.
        release.set()
        done = await finished(client, held.task_id)
        assert done.state == T.TASK_STATE_COMPLETED and done.attempt == 1
        assert to_dict(done.output) == {"n": 1}
        # And it subscribed again: new work reaches it.
        await subscribed(client, "worker-1", run)
        fresh = await client.enqueue_task("job", input={"n": 2})
        assert to_dict((await finished(client, fresh.task_id)).output) == {"n": 2}
    finally:
        await agent.shutdown()
        await asyncio.wait_for(run, 15)
        await client.close()


async def test_deregistration_stops_the_agent(harness, client, transport):
    agent = make_agent(harness, transport=transport)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @agent.task("job")
    async def job(task: TaskContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    run = asyncio.create_task(agent.run(handle_signals=False))
    await subscribed(client, "worker-1", run)
    await client.enqueue_task("job")
    await asyncio.wait_for(started.wait(), 10)
    await client.deregister_agent("worker-1")
    await asyncio.wait_for(run, 10)  # run() returns on its own
    assert cancelled.is_set()
    got = await client.get_agent("worker-1")
    assert got.deregistered and got.state == S.AGENT_STATE_FINISHED


async def test_shutdown_timeout_gives_unfinished_tasks_back(harness, client, transport):
    agent = make_agent(harness, transport=transport, shutdown_timeout=0.2)
    started = asyncio.Event()

    @agent.task("stuck")
    async def stuck(task: TaskContext) -> None:
        started.set()
        await asyncio.Event().wait()

    run = asyncio.create_task(agent.run(handle_signals=False))
    await subscribed(client, "worker-1", run)
    queued = await client.enqueue_task("stuck", retry_policy=TaskRetry(initial_backoff=60))
    await asyncio.wait_for(started.wait(), 10)
    await agent.shutdown()
    await asyncio.wait_for(run, 5)
    task = await client.get_task(queued.task_id)
    # Failed as retryable, so another agent gets it: not lost, not FAILED.
    assert task.state == T.TASK_STATE_SCHEDULED
    assert task.last_error.type == "AgentShutdown"
    assert (await client.get_agent("worker-1")).state == S.AGENT_STATE_FINISHED


async def test_task_without_a_matching_handler_fails_for_good(harness, client, transport):
    agent = make_agent(harness, transport=transport)
    agent.add_handler("a", lambda task: "a")
    agent.add_handler("b", lambda task: "b")
    with pytest.raises(ValueError, match="already registered"):
        agent.add_handler("a", lambda task: None)
    async with running(agent, client):
        by_name = await client.enqueue_task(agent_id="worker-1", name="b")
        unknown = await client.enqueue_task(agent_id="worker-1", name="c")
        done = await finished(client, by_name.task_id)
        failed = await finished(client, unknown.task_id)
    assert to_dict(done.output) == {"result": "b"}  # a pinned task found by name
    assert failed.state == T.TASK_STATE_FAILED and failed.last_error.type == "NoHandler"


# ---------------------------------------------------------------------- SIGTERM

AGENT_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from opscore.agent import Agent

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    agent = Agent(
        "sigterm-test", agent_id="sig-agent", target=sys.argv[1], transport=sys.argv[2],
        max_in_flight=2,
    )

    @agent.task("blocking")
    def blocking(task):
        task.report_progress({"stage": "holding"})
        line = sys.stdin.readline()  # the test releases the task by writing a line
        return {"released_with": line.strip()}

    agent.run_sync()
    print("agent exited cleanly", flush=True)
    """
)


@pytest.mark.slow
async def test_sigterm_finishes_held_work_then_exits(harness, client, tmp_path, transport):
    script = tmp_path / "agent_script.py"
    script.write_text(AGENT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        harness.target,
        transport,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        await eventually(lambda: _idle(client, "sig-agent"), what="agent IDLE", timeout=20)
        queued = await client.enqueue_task("blocking")

        async def holding() -> bool:
            task = await client.get_task(queued.task_id)
            return task.state == T.TASK_STATE_ASSIGNED and bool(to_dict(task.progress))

        await eventually(holding, what="task held by the agent")
        proc.send_signal(signal.SIGTERM)

        # It stops taking work at once, though it has room for one more task:
        # the subscription closes, or the work stream asks for nothing more...
        async def stopped_taking_work() -> bool:
            if transport == "subscribe":
                return (await client.get_agent("sig-agent")).open_subscriptions == 0
            assert harness.server is not None
            subs = harness.server.dispatch._subs_by_agent.get("sig-agent", ())
            return len(subs) == 1 and next(iter(subs)).max_in_flight == 0

        await eventually(stopped_taking_work, what="no new work taken after SIGTERM")
        late = await client.enqueue_task("blocking")
        # ...while it still holds the task, which it then finishes.
        assert (await client.get_task(queued.task_id)).state == T.TASK_STATE_ASSIGNED
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        code = await asyncio.wait_for(proc.wait(), 20)
        stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, stderr.decode()[-3000:]
    assert b"agent exited cleanly" in stdout
    done = await client.get_task(queued.task_id)
    assert done.state == T.TASK_STATE_COMPLETED
    assert to_dict(done.output) == {"released_with": "go"}
    agent = await client.get_agent("sig-agent")
    assert agent.state == S.AGENT_STATE_FINISHED
    assert agent.open_subscriptions == 0  # the stream ended with the agent
    # The task queued after SIGTERM never reached it.
    never = await client.get_task(late.task_id)
    assert never.state == T.TASK_STATE_QUEUED and never.attempt == 0


async def _idle(client: OpsCoreClient, agent_id: str) -> bool:
    try:
        agent = await client.get_agent(agent_id)
    except Exception:
        return False
    return agent.state == S.AGENT_STATE_IDLE and agent.open_subscriptions == 1
