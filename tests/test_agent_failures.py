"""Issue 14, agent authors: failures are visible where the agent runs, and
connection problems end an agent with one line that says what to fix."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opscore_proto.v1 import dispatch_pb2

from opscore.agent import TRANSPORTS, Agent, NonRetryableError, TaskContext
from opscore.client import TaskRetry, to_dict
from opscore.limits import MAX_DETAILS_BYTES
from tests.conftest import eventually
from tests.support.procserver import free_port
from tests.support.sdk import client_for

REPO_ROOT = Path(__file__).resolve().parents[1]
T = dispatch_pb2.TaskState

# The smallest agent of docs/agents.md: no logging configured at all.
SMALLEST = textwrap.dedent(
    """
    import sys
    from datetime import datetime, UTC
    from opscore.agent import Agent

    agent = Agent("smallest", agent_id="smallest-1", target=sys.argv[1])

    @agent.task("boom")
    async def boom(task):
        raise ValueError("boom: " + task.input["why"])

    @agent.task("date")
    async def date(task):
        return {"ok": True, "when": datetime.now(UTC)}

    agent.run_sync()
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


async def _final(client: Any, task_id: str) -> dispatch_pb2.Task:
    async def probe() -> dispatch_pb2.Task | None:
        task = await client.get_task(task_id)
        return task if task.state in (T.TASK_STATE_FAILED, T.TASK_STATE_COMPLETED) else None

    return await eventually(probe, what=f"task {task_id} final", timeout=20)


async def test_handler_failures_show_in_the_agents_terminal(harness, tmp_path):
    script = tmp_path / "smallest.py"
    script.write_text(SMALLEST)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        harness.target,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        async with client_for(harness) as client:

            async def subscribed() -> bool:
                try:
                    return (await client.get_agent("smallest-1")).open_subscriptions == 1
                except Exception:
                    return False

            await eventually(subscribed, what="agent subscribed", timeout=20)
            once = TaskRetry(max_attempts=1)
            boom = await client.enqueue_task("boom", input={"why": "bad"}, retry_policy=once)
            date = await client.enqueue_task("date")
            failed = await _final(client, boom.task_id)
            invalid = await _final(client, date.task_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    stderr = err.decode()

    assert failed.state == T.TASK_STATE_FAILED
    details = to_dict(failed.last_error.details)
    assert details["exception_type"] == "ValueError"
    assert "Traceback" in details["traceback"] and "ValueError: boom: bad" in details["traceback"]
    assert f"WARNING opscore.agent: task {boom.task_id} (boom) attempt 1 failed" in stderr
    assert "Traceback (most recent call last)" in stderr and "ValueError: boom: bad" in stderr

    assert invalid.state == T.TASK_STATE_FAILED and invalid.last_error.type == "InvalidOutput"
    expected = "output['when']: datetime is not JSON-like"
    assert expected in invalid.last_error.message
    assert expected in stderr
    assert proc.returncode == 0, stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_oversized_error_details_still_fail_the_task(harness, transport):
    agent = Agent("big", agent_id="big-1", target=harness.target, env={}, transport=transport)

    @agent.task("big")
    async def big(task: TaskContext) -> None:
        raise NonRetryableError("too much", details={"blob": "x" * (2 * MAX_DETAILS_BYTES)})

    run = asyncio.create_task(agent.run(handle_signals=False))
    try:
        async with client_for(harness) as client:
            queued = await client.enqueue_task("big")
            done = await _final(client, queued.task_id)
    finally:
        await agent.shutdown(graceful=False)
        await asyncio.wait_for(run, 15)
    assert done.state == T.TASK_STATE_FAILED and done.last_error.message == "too much"
    details = to_dict(done.last_error.details)
    assert "blob" not in details and "dropped" in details["details_error"]
    assert details["traceback"]


def _example(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "agent.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(**env),
        cwd=REPO_ROOT,
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
async def test_example_agent_says_what_to_fix(make_harness):
    h = await make_harness(api_keys=frozenset({"right"}))
    target = h.target
    missing = await asyncio.to_thread(_example, "--target", target)
    assert missing.returncode == 1
    assert _last_line(missing) == (
        f"example agent: the Ops-Core server at {target} requires an API key: "
        "set --api-key or OPSCORE_API_KEY"
    )
    wrong = await asyncio.to_thread(_example, OPSCORE_TARGET=target, OPSCORE_API_KEY="wrong")
    assert wrong.returncode == 1
    assert _last_line(wrong) == (
        f"example agent: the Ops-Core server at {target} did not accept the API key: "
        "set --api-key or OPSCORE_API_KEY"
    )
    nowhere = f"127.0.0.1:{free_port()}"
    unreachable = await asyncio.to_thread(_example, "--target", nowhere)
    assert unreachable.returncode == 1
    line = _last_line(unreachable)
    assert line.startswith(f"example agent: cannot reach an Ops-Core server at {nowhere}")
    assert line.endswith("Set --target or OPSCORE_TARGET"), line
