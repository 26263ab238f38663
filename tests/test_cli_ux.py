"""Issue 14, the CLI: honest output when something goes wrong, through the real
`opscore` entry point (a subprocess) against a real in-process server."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opscore_proto.v1 import lifecycle_pb2

from opscore.cli.ids import short_id
from opscore.client import OpsCoreClient
from tests.conftest import eventually
from tests.support.cli import OPSCORE, clean_env, opscore
from tests.support.sdk import client_for


@pytest.fixture
async def client(harness) -> AsyncIterator[OpsCoreClient]:
    async with client_for(harness) as c:
        yield c


class Streaming:
    """An `opscore` subprocess read line by line while it runs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Streaming:
        proc = await asyncio.create_subprocess_exec(
            *OPSCORE,
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or clean_env(),
        )
        return cls(proc)

    async def line(self, stream: str = "stdout", timeout: float = 15) -> str:
        reader = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert reader is not None
        raw = await asyncio.wait_for(reader.readline(), timeout)
        if not raw:
            raise AssertionError(f"{stream} closed (exit {self.proc.returncode})")
        return raw.decode()

    async def until(self, needle: str, stream: str = "stdout", timeout: float = 15) -> list[str]:
        seen: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            line = await self.line(stream, max(0.1, deadline - loop.time()))
            seen.append(line)
            if needle in line:
                return seen

    async def interrupt(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


# ---------------------------------------------------------------------- global options


async def test_global_options_before_or_after_the_command(harness, client):
    await client.register_agent("alpha")
    r = await opscore("--target", harness.target, "--json", "agents", "list")
    assert r.code == 0, r
    assert [a["agent_id"] for a in r.json()] == ["alpha"]
    # After the command wins over before it.
    r = await opscore("--target", "127.0.0.1:1", "agents", "list", "--json", target=harness.target)
    assert r.code == 0 and r.json()[0]["agent_id"] == "alpha", r
    r = await opscore("--help")
    assert r.code == 0
    for option in ("--json", "--target", "--api-key", "OPSCORE_TARGET", "OPSCORE_API_KEY"):
        assert option in r.out, r


async def test_usage_errors_are_json_with_json(harness):
    t = harness.target
    r = await opscore("--json", "tasks", "enqueue", target=t)
    assert r.code == 2, r
    error = json.loads(r.err)["error"]
    assert error["code"] == "USAGE" and "CAPABILITY or --agent" in error["message"]
    assert error["usage"].startswith("Usage: ")
    r = await opscore("tasks", "list", "--limit", "-1", "--json", target=t)
    assert r.code == 2 and json.loads(r.err)["error"]["code"] == "USAGE", r
    r = await opscore("--json", "tasks", "frobnicate")
    assert r.code == 2 and "frobnicate" in json.loads(r.err)["error"]["message"], r
    # Without --json, click's own text.
    r = await opscore("tasks", "list", "--limit", "-1", target=t)
    assert r.code == 2 and "Usage:" in r.err and "-1" in r.err, r


async def test_target_url_and_non_json_input_are_refused_before_sending(harness, tmp_path):
    r = await opscore("agents", "list", "--target", "http://127.0.0.1:50051")
    assert r.code == 2 and "without a scheme" in r.err and "--target 127.0.0.1:50051" in r.err, r
    r = await opscore("tasks", "enqueue", "c", "--input", '{"a": NaN}', target=harness.target)
    assert r.code == 2 and "NaN is not a JSON number" in r.err, r
    r = await opscore("tasks", "enqueue", "c", "--input", '{"a": -Infinity}', target=harness.target)
    assert r.code == 2 and "Infinity" in r.err, r
    # YAML values that JSON does not have (a date) are named with their key.
    yaml_file = tmp_path / "input.yaml"
    yaml_file.write_text("when: 2024-05-01\n")
    r = await opscore("tasks", "enqueue", "c", "--input", f"@{yaml_file}", target=harness.target)
    assert r.code == 2 and "input['when']: date is not JSON-like" in r.err, r


async def test_unreachable_and_unauthenticated_are_one_line(make_harness):
    h = await make_harness(api_keys=frozenset({"k-1"}))
    r = await opscore("tasks", "list", target=h.target)
    assert r.code == 1, r
    assert r.err.strip().splitlines() == [
        f"Error: UNAUTHENTICATED: the Ops-Core server at {h.target} requires an API key: "
        "set --api-key or OPSCORE_API_KEY"
    ]
    target = h.target
    await h.stop()
    r = await opscore("tasks", "list", "--api-key", "k-1", target=target)
    assert r.code == 1, r
    [line] = r.err.strip().splitlines()
    assert f"cannot reach an Ops-Core server at {target}" in line
    assert "--target or OPSCORE_TARGET" in line


# ---------------------------------------------------------------------- honest answers


async def test_created_is_surfaced(harness, client, tmp_path):
    t = harness.target
    args = ("tasks", "enqueue", "text.summarize", "--idempotency-key", "k1")
    r = await opscore(*args, "--input", '{"n": 1}', target=t)
    assert r.code == 0 and r.out.startswith("queued task "), r
    task_id = r.out.split()[2]
    r = await opscore(*args, "--input", '{"n": 2}', target=t)
    assert r.code == 0, r
    assert r.out.startswith(f"returned the existing task {task_id} (QUEUED)")
    assert "nothing new was queued" in r.out
    r = await opscore(*args, "--json", target=t)
    assert r.json()["task_id"] == task_id and r.json()["input"] == {"n": 1}
    assert "returned the existing task" in json.loads(r.err)["warning"]["message"]

    definition = tmp_path / "one.yaml"
    definition.write_text("id: one\ntasks:\n  - id: a\n    capability: nobody.has.this\n")
    r = await opscore("workflows", "create", "-f", str(definition), target=t)
    assert r.out.strip() == "stored workflow one version 1 (1 task)", r
    r = await opscore("workflows", "create", "-f", str(definition), target=t)
    assert r.out.strip() == (
        "unchanged: workflow one version 1 (1 task) was already stored with this content"
    ), r

    start = ("sessions", "start", "one", "--idempotency-key", "s1")
    r = await opscore(*start, target=t)
    assert r.code == 0 and r.out.startswith("started session "), r
    session_id = r.out.split()[2]
    r = await opscore(*start, "--input", '{"other": true}', target=t)
    assert r.out.startswith(f"returned the existing session {session_id} of one version 1")
    assert "nothing new was started" in r.out


async def test_limit_says_when_more_exist(harness, client):
    for i in range(3):
        await client.register_agent(f"agent-{i}")
    r = await opscore("agents", "list", "--limit", "2", target=harness.target)
    assert r.code == 0, r
    assert "agent-1" in r.out and "agent-2" not in r.out
    assert "showing the first 2 agents; more exist (--limit 0 shows all)" in r.err
    r = await opscore("agents", "list", "--limit", "3", target=harness.target)
    assert r.code == 0 and "agent-2" in r.out and r.err == "", r
    r = await opscore("agents", "list", "--limit", "2", "--json", target=harness.target)
    assert len(r.json()) == 2 and "more exist" in json.loads(r.err)["warning"]["message"]


async def test_short_ids_and_unique_prefixes(harness, client):
    t = harness.target
    tasks = [await client.enqueue_task("cap.x", name=f"task {i}") for i in range(2)]
    first = tasks[0].task_id
    # Find a prefix of the first id that the second does not share.
    n = next(i for i in range(1, 37) if first[:i] != tasks[1].task_id[:i])
    r = await opscore("tasks", "get", first[:n], "--json", target=t)
    assert r.code == 0 and r.json()["task_id"] == first, r
    r = await opscore("tasks", "cancel", first[: max(n, 4)], target=t)
    assert r.code == 0 and r.out.strip() == f"cancelled task {first}: cancelled by request", r
    r = await opscore("tasks", "cancel", first, target=t)
    assert r.out.strip() == f"task {first} was already cancelled", r

    await client.register_agent("worker-a1")
    await client.register_agent("worker-a2")
    r = await opscore("agents", "get", "worker-a", target=t)
    assert r.code == 1, r
    assert "'worker-a' is the start (or short id) of several agent ids: worker-a1, worker-a2" in (
        r.err
    )
    r = await opscore("agents", "history", "worker-a2", "--json", target=t)
    assert r.code == 0 and r.json()[0]["agent_id"] == "worker-a2"
    r = await opscore("agents", "get", "nobody", target=t)
    assert r.code == 1 and "NOT_FOUND" in r.err, r

    r = await opscore("tasks", "list", target=t)
    shown = short_id(tasks[1].task_id)
    assert shown == tasks[1].task_id[-8:]  # time-ordered ids: the random end
    assert shown in r.out and tasks[1].task_id not in r.out
    # The short id a table shows names the task wherever an id is taken.
    r = await opscore("tasks", "get", shown, "--json", target=t)
    assert r.code == 0 and r.json()["task_id"] == tasks[1].task_id, r
    # The end of a name someone chose is not a short id.
    r = await opscore("agents", "get", "a2", target=t)
    assert r.code == 1 and "NOT_FOUND" in r.err, r


async def test_tables_fit_80_columns(harness, client):
    for i in range(3):
        await client.register_agent(f"agent-with-a-rather-long-id-{i}", capabilities=["c"] * 1)
        await client.enqueue_task(
            "a.capability.with.a.long.name", name=f"a task with a long descriptive name {i}"
        )
    env = clean_env(COLUMNS="80")
    for args, rows in ((("tasks", "list"), 3), (("agents", "list"), 3)):
        r = await opscore(*args, target=harness.target, env=env)
        assert r.code == 0, r
        lines = r.out.rstrip("\n").splitlines()
        assert len(lines) == rows + 1, r.out  # one line per row, no wrapping
        assert all(len(line) <= 80 for line in lines), r.out


async def test_json_has_every_field_and_numbers(harness, client):
    await client.register_agent("numbers")
    await client.report_state("numbers", "idle")
    r = await opscore("agents", "history", "numbers", "--json", target=harness.target)
    assert [t["sequence"] for t in r.json()] == [2, 1], r
    task = await client.enqueue_task("cap.y")
    r = await opscore("tasks", "get", task.task_id, "--json", target=harness.target)
    data = r.json()
    for unset in ("output", "last_error", "lease_expire_time", "progress", "finish_time"):
        assert unset in data and data[unset] is None, (unset, data)
    assert data["attempt"] == 0 and data["session_id"] == ""


# ---------------------------------------------------------------------- nobody to run it


async def test_nobody_can_take_it(harness, client):
    t = harness.target
    queued = await client.enqueue_task("nobody.has.this")
    r = await opscore("tasks", "get", queued.task_id, target=t)
    assert r.code == 0, r
    assert "no agent has capability nobody.has.this: nobody can take it yet" in r.out

    await client.register_agent("offline-worker", capabilities=["lonely.cap"])
    proc = await Streaming.start(
        "tasks", "enqueue", "lonely.cap", "--wait", "--target", t, env=clean_env()
    )
    try:
        lines = await proc.until("is waiting", stream="stderr")
        assert (
            "no connected agent has capability lonely.cap (1 registered, none with an open "
            "task stream)"
        ) in lines[-1], lines
    finally:
        assert await proc.interrupt() == 130

    await client.create_workflow_definition(
        {"id": "stuck", "tasks": [{"id": "only", "capability": "nobody.has.this"}]}
    )
    session = await client.start_workflow("stuck")
    watcher = await Streaming.start("sessions", "watch", session.session_id, "--target", t)
    try:
        lines = await watcher.until("is waiting")
        assert "only is waiting: no agent has capability nobody.has.this" in lines[-1], lines
        await client.cancel_session(session.session_id)
        assert await asyncio.wait_for(watcher.proc.wait(), 15) == 1  # not completed
    finally:
        await watcher.interrupt()


# ---------------------------------------------------------------------- agents


async def test_agents_deregister(harness, client):
    await client.register_agent("gone-soon", capabilities=["x"])
    r = await opscore("agents", "deregister", "gone-soon", target=harness.target)
    assert r.code == 0 and r.out.strip() == "deregistered agent gone-soon (FINISHED)", r
    agent = await client.get_agent("gone-soon")
    assert agent.deregistered and agent.state == lifecycle_pb2.AGENT_STATE_FINISHED
    r = await opscore("agents", "list", target=harness.target)
    assert "FINISHED (deregistered)" in r.out


async def test_agents_watch_resumes_without_losing_or_repeating(harness, client):
    await client.register_agent("w1")
    proc = await Streaming.start("agents", "watch", "--json", "--target", harness.target)
    try:
        await eventually(
            lambda: len(harness.server.lifecycle.events) == 1, what="watcher", timeout=20
        )
        await client.report_state("w1", "active")
        first = json.loads(await proc.line())
        assert first["transition"]["to_state"] == "AGENT_STATE_ACTIVE"

        await harness.stop()
        # Let the watcher back off a few times (longer than the client's unary
        # retry budget would allow), then change states while it may be away.
        for _ in range(4):
            note = json.loads(await proc.line("stderr", timeout=30))
            assert "watch broken" in note["warning"]["message"]
        await harness.start()
        await client.report_state("w1", "error", details={"why": "in the gap"})
        await client.report_state("w1", "idle")
        seen: list[dict[str, Any]] = []
        while len(seen) < 2:
            seen.append(json.loads(await proc.line(timeout=30)))
        await client.report_state("w1", "active")
        seen.append(json.loads(await proc.line(timeout=15)))
    finally:
        code = await proc.interrupt()
    assert code == 130
    states = [e["transition"]["to_state"] for e in seen]
    assert states == ["AGENT_STATE_ERROR", "AGENT_STATE_IDLE", "AGENT_STATE_ACTIVE"], seen
    sequences = [e["transition"]["sequence"] for e in seen]
    assert sequences == sorted(set(sequences)), seen


# ---------------------------------------------------------------------- sessions


async def test_fan_out_summary_counts_replaced_tasks(harness, example_agent_in_process):
    t = harness.target
    r = await opscore("workflows", "create", "-f", "examples/fan-out-report.yaml", target=t)
    assert r.code == 0, r
    # FORCE_COLOR makes Rich treat the pipe as a terminal: the live view.
    env = clean_env(FORCE_COLOR="1", COLUMNS="120")
    text = '{"text": "One. Two! Three? Four.", "work_seconds": 0}'
    r = await opscore(
        "sessions", "start", "fan-out-report", "--input", text, "--watch", target=t, env=env
    )
    assert r.code == 0, r
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", r.out)
    assert "8/8 tasks finished: 7 completed, 1 replaced" in plain, plain[-2000:]


@pytest.fixture
async def example_agent_in_process(harness) -> AsyncIterator[None]:
    from tests.test_examples import load_example_agent_module

    agent = load_example_agent_module().build_agent(
        agent_id="example-in-process", target=harness.target, max_in_flight=4, env={}
    )
    runner = asyncio.create_task(agent.run(handle_signals=False))
    async with client_for(harness) as c:

        async def ready() -> bool:
            if runner.done():
                runner.result()
            try:
                return (await c.get_agent("example-in-process")).open_subscriptions == 1
            except Exception:
                return False

        await eventually(ready, what="example agent subscribed")
    try:
        yield
    finally:
        await agent.shutdown()
        await asyncio.wait_for(runner, 15)
