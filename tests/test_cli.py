"""The `opscore` CLI through its real entry point (the installed console script, in
a subprocess) against a real in-process server."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from opscore_proto.v1 import lifecycle_pb2

from opscore.cli.ids import short_id
from opscore.client import OpsCoreClient
from tests.conftest import eventually
from tests.support.cli import OPSCORE, REPO_ROOT, clean_env, opscore
from tests.support.procserver import free_port
from tests.support.sdk import client_for


@pytest.fixture
async def client(harness) -> AsyncIterator[OpsCoreClient]:
    async with client_for(harness) as c:
        yield c


@pytest.fixture
async def example_agent(harness, client) -> AsyncIterator[asyncio.subprocess.Process]:
    """examples/agent.py, running against the harness, subscribed and IDLE."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "examples" / "agent.py"),
        "--target",
        harness.target,
        "--agent-id",
        "example-1",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(PYTHONPATH=str(REPO_ROOT)),
    )

    async def ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"example agent exited with {proc.returncode}")
        try:
            agent = await client.get_agent("example-1")
        except Exception:
            return False
        return agent.open_subscriptions == 1 and agent.state == lifecycle_pb2.AGENT_STATE_IDLE

    try:
        await eventually(ready, what="example agent IDLE", timeout=20)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------------- health


async def test_health(harness):
    r = await opscore("health", target=harness.target)
    assert r.code == 0, r
    assert "opscore.v1.DispatchService" in r.out and "SERVING" in r.out
    r = await opscore("health", "--json", target=harness.target)
    assert r.code == 0, r
    data = r.json()
    assert data["status"] == "SERVING"
    assert data["services"]["opscore.v1.LifecycleService"] == "SERVING"


async def test_unreachable_server_is_a_clear_error():
    target = f"127.0.0.1:{free_port()}"
    r = await opscore("agents", "list", target=target)
    assert r.code == 1, r
    assert "UNAVAILABLE" in r.err and f"cannot reach an Ops-Core server at {target}" in r.err
    assert "Traceback" not in r.err
    r = await opscore("health", "--json", target=target)
    assert r.code == 1 and r.json()["status"] == "UNREACHABLE"


# ---------------------------------------------------------------------- agents


async def test_agents_list_get_history(harness, client):
    await client.register_agent("alpha", name="Alpha", capabilities=["text.summarize"])
    await client.register_agent("beta", capabilities=["text.translate"], metadata={"zone": "b"})
    await client.report_state("beta", "idle", details={"why": "ready"})

    r = await opscore("agents", "list", target=harness.target)
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["AGENT", "ID", "NAME"]
    assert any(line.split()[:3] == ["alpha", "Alpha", "INITIALIZING"] for line in lines)
    assert any(line.startswith("beta") and "IDLE" in line for line in lines)

    r = await opscore("agents", "list", "--state", "idle", "--json", target=harness.target)
    assert r.code == 0, r
    assert [a["agent_id"] for a in r.json()] == ["beta"]
    assert r.json()[0]["state"] == "AGENT_STATE_IDLE"

    r = await opscore("agents", "get", "beta", target=harness.target)
    assert r.code == 0, r
    assert "text.translate" in r.out and '"zone": "b"' in r.out and '"why": "ready"' in r.out
    r = await opscore("agents", "get", "beta", "--json", target=harness.target)
    assert r.json()["metadata"] == {"zone": "b"}

    r = await opscore("agents", "history", "beta", "--json", target=harness.target)
    assert r.code == 0, r
    assert [t["to_state"] for t in r.json()] == ["AGENT_STATE_IDLE", "AGENT_STATE_INITIALIZING"]
    r = await opscore("agents", "history", "beta", target=harness.target)
    assert "INITIALIZING" in r.out and '{"why": "ready"}' in r.out


async def test_errors_have_messages_and_exit_codes(harness):
    r = await opscore("agents", "get", "ghost", target=harness.target)
    assert r.code == 1, r
    assert r.out == ""
    assert "NOT_FOUND" in r.err and "ghost" in r.err and "request id" in r.err
    r = await opscore("agents", "get", "ghost", "--json", target=harness.target)
    assert r.code == 1
    error = json.loads(r.err)["error"]
    assert error["code"] == "NOT_FOUND" and error["reason"] and error["request_id"]
    r = await opscore("agents", "list", "--state", "sleepy", target=harness.target)
    assert r.code == 2 and "sleepy" in r.err  # usage errors are click's: exit 2
    r = await opscore("agents", "get", "bad id!", target=harness.target)
    assert r.code == 1 and "INVALID_ARGUMENT" in r.err and "agent_id" in r.err


async def test_agents_watch_streams_json_lines(harness, client):
    proc = await asyncio.create_subprocess_exec(
        *OPSCORE,
        "agents",
        "watch",
        "--json",
        "--target",
        harness.target,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        await eventually(
            lambda: len(harness.server.lifecycle.events) == 1, what="watcher", timeout=20
        )
        await client.register_agent("watched")
        await client.report_state("watched", "active")
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert first["event_type"] == "AGENT_EVENT_TYPE_REGISTERED"
    assert first["agent"]["agent_id"] == "watched"
    assert second["transition"]["to_state"] == "AGENT_STATE_ACTIVE"
    assert code == 130


# ---------------------------------------------------------------------- tasks


async def test_tasks_enqueue_list_get_cancel(harness, tmp_path):
    t = harness.target
    payload = tmp_path / "input.yaml"
    payload.write_text("text: from a file\nn: 2\n")
    r = await opscore(
        "tasks",
        "enqueue",
        "text.summarize",
        "--input",
        f"@{payload}",
        "--name",
        "first",
        "--priority",
        "3",
        "--timeout",
        "90s",
        "--heartbeat-timeout",
        "1m",
        "--max-attempts",
        "5",
        "--json",
        target=t,
    )
    assert r.code == 0, r
    task = r.json()
    assert task["state"] == "TASK_STATE_QUEUED"
    assert task["input"] == {"text": "from a file", "n": 2}
    assert task["timeout"] == "90s" and task["heartbeat_timeout"] == "60s"
    assert task["retry_policy"]["max_attempts"] == 5 and task["priority"] == 3

    r = await opscore(
        "tasks", "enqueue", "--capability", "text.translate", "--delay", "1h", target=t
    )
    assert r.code == 0, r
    assert r.out.startswith("queued task ") and "(SCHEDULED)" in r.out
    later_id = r.out.split()[2]

    r = await opscore("tasks", "list", "--json", target=t)
    assert {x["task_id"] for x in r.json()} == {task["task_id"], later_id}
    r = await opscore("tasks", "list", "--state", "scheduled", target=t)
    assert short_id(later_id) in r.out and short_id(task["task_id"]) not in r.out

    r = await opscore("tasks", "get", task["task_id"], target=t)
    assert r.code == 0, r
    assert "from a file" in r.out and "1 of 5" not in r.out and "0 of 5" in r.out

    r = await opscore("tasks", "cancel", later_id, "--reason", "not needed", target=t)
    assert r.code == 0 and f"cancelled task {later_id}" in r.out
    r = await opscore("tasks", "get", later_id, "--json", target=t)
    assert r.json()["state"] == "TASK_STATE_CANCELLED"


async def test_tasks_usage_errors(harness):
    t = harness.target
    r = await opscore("tasks", "enqueue", target=t)
    assert r.code == 2 and "CAPABILITY or --agent" in r.err
    r = await opscore("tasks", "enqueue", "c", "--input", "{not json", target=t)
    assert r.code == 2 and "not valid JSON" in r.err
    r = await opscore("tasks", "enqueue", "c", "--input", "[1, 2]", target=t)
    assert r.code == 2 and "JSON object" in r.err
    r = await opscore("tasks", "enqueue", "c", "--delay", "soon", target=t)
    assert r.code == 2 and "not a duration" in r.err
    r = await opscore("tasks", "enqueue", "c", "--input", "@/no/such/file.json", target=t)
    assert r.code == 2 and "cannot read" in r.err


async def test_enqueue_wait_with_the_example_agent(harness, example_agent):
    t = harness.target
    text = '{"text": "One two three. Four five!", "work_seconds": 0}'
    r = await opscore(
        "tasks", "enqueue", "text.summarize", "--input", text, "--wait", "--json", target=t
    )
    assert r.code == 0, r
    task = r.json()
    assert task["state"] == "TASK_STATE_COMPLETED"
    assert task["output"] == {"words": 5, "sentences": 2, "summary": "One two three."}
    bad = '{"text": "hello", "language": "klingon", "work_seconds": 0}'
    r = await opscore("tasks", "enqueue", "text.translate", "--input", bad, "--wait", target=t)
    assert r.code == 1, r  # the task FAILED
    assert "FAILED" in r.out and "UnknownLanguage" in r.out


# ---------------------------------------------------------------------- workflows


async def test_workflows_and_sessions(harness, example_agent, tmp_path):
    t = harness.target
    r = await opscore("workflows", "create", "-f", "examples/text-pipeline.yaml", target=t)
    assert r.code == 0, r
    assert r.out.strip() == "stored workflow text-pipeline version 1 (4 tasks)"
    r = await opscore("workflows", "list", "--json", target=t)
    assert [(d["id"], d["version"]) for d in r.json()] == [("text-pipeline", 1)]
    r = await opscore("workflows", "get", "text-pipeline", target=t)
    assert r.code == 0 and "pig-latin" in r.out and "text.translate" in r.out

    text = '{"text": "Agents work. Ops-Core watches.", "work_seconds": 0}'
    r = await opscore("sessions", "start", "text-pipeline", "--input", text, "--watch", target=t)
    assert r.code == 0, r
    assert "summarize assigned to example-1" in r.out
    assert "session completed" in r.out and "COMPLETED in" in r.out
    session_id = r.out.split()[2]
    assert '"translation": "Ops-Core watches. work. Agents"' not in r.out  # summary only
    assert '"translation": "work. Agents"' in r.out

    r = await opscore("sessions", "get", session_id, "--json", target=t)
    session = r.json()
    assert session["state"] == "SESSION_STATE_COMPLETED"
    assert session["output"]["stats"] == {"words": 4, "sentences": 2}
    r = await opscore("sessions", "list", "--json", target=t)
    assert [s["session_id"] for s in r.json()] == [session_id]
    r = await opscore("sessions", "get", session_id, target=t)
    assert "reverse" in r.out and "completed" in r.out

    # Watching a finished session replays it; --json gives one object per line.
    r = await opscore("sessions", "watch", session_id, "--json", target=t)
    assert r.code == 0, r
    lines = r.lines()
    assert lines[0]["event_type"] == "SESSION_EVENT_TYPE_SESSION_STARTED"
    assert lines[-2]["event_type"] == "SESSION_EVENT_TYPE_SESSION_COMPLETED"
    assert lines[-1]["state"] == "SESSION_STATE_COMPLETED"

    r = await opscore("sessions", "cancel", session_id, target=t)
    assert r.code == 1 and "FAILED_PRECONDITION" in r.err

    # A session that fails makes --watch exit 1.
    failing = tmp_path / "failing.yaml"
    failing.write_text(
        "id: failing\ntasks:\n  - id: translate\n    capability: text.translate\n"
        "    parameters: {language: klingon, work_seconds: 0}\n"
    )
    assert (await opscore("workflows", "create", "-f", str(failing), target=t)).code == 0
    r = await opscore(
        "sessions", "start", "failing", "--input", '{"text": "x"}', "--watch", "--json", target=t
    )
    assert r.code == 1, r
    assert r.lines()[-1]["state"] == "SESSION_STATE_FAILED"
    assert "UnknownLanguage" in r.lines()[-1]["error"]["type"]

    r = await opscore("workflows", "delete", "text-pipeline", target=t)
    assert r.code == 0 and "deleted 1 version of workflow text-pipeline" in r.out
    r = await opscore("workflows", "get", "text-pipeline", target=t)
    assert r.code == 1 and "NOT_FOUND" in r.err


async def test_cancel_a_running_session(harness, client):
    t = harness.target
    definition = {"id": "slow", "tasks": [{"id": "only", "capability": "nobody.has.this"}]}
    await client.create_workflow_definition(definition)
    r = await opscore("sessions", "start", "slow", "--json", target=t)
    assert r.code == 0, r
    session_id = r.json()["session_id"]
    r = await opscore("sessions", "list", "--state", "running", target=t)
    assert short_id(session_id) in r.out
    r = await opscore("sessions", "cancel", session_id, "--reason", "test", target=t)
    assert r.code == 0 and "CANCELLED" in r.out
    r = await opscore("sessions", "watch", session_id, target=t)
    assert r.code == 1  # the session did not complete
    assert "session cancelled" in r.out and "CANCELLED" in r.out


# ---------------------------------------------------------------------- auth


async def test_api_key_from_option_and_environment(make_harness):
    h = await make_harness(api_keys=frozenset({"k-123"}))
    r = await opscore("agents", "list", target=h.target)
    assert r.code == 1 and "UNAUTHENTICATED" in r.err
    r = await opscore("agents", "list", "--api-key", "k-123", target=h.target)
    assert r.code == 0 and "No agents." in r.out
    env = clean_env(OPSCORE_TARGET=h.target, OPSCORE_API_KEY="k-123")
    r = await opscore("agents", "list", "--json", env=env)
    assert r.code == 0 and r.json() == []
    env = clean_env(OPSCORE_TARGET=h.target, OPSCORE_API_KEY="wrong")
    r = await opscore("agents", "list", env=env)
    assert r.code == 1 and "did not accept the API key: set --api-key or OPSCORE_API_KEY" in r.err
    assert len(r.err.strip().splitlines()) == 1
