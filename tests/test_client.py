"""The Python SDK (opscore.client) against a real in-process server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from opscore_proto.v1 import dispatch_pb2, lifecycle_pb2, workflow_pb2

from opscore.client import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OpsCoreClient,
    OpsCoreClientSync,
    RetryConfig,
    TaskRetry,
    UnauthenticatedError,
    UnavailableError,
    enqueue_request,
    to_datetime,
    to_dict,
    to_timedelta,
)
from opscore.client._client import CHANNEL_OPTIONS
from opscore.client.convert import enum_value, to_timestamp
from opscore.config import Config
from tests.conftest import eventually
from tests.support.sdk import client_for, workflow_service_available

S = lifecycle_pb2.AgentState
T = dispatch_pb2.TaskState


class RetryLog(logging.Handler):
    """Collects the client's retry log records and wakes waiters on each."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying"):
            self.records.append(record)
            self.changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async def enough() -> None:
            while len(self.records) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), timeout)


@pytest.fixture
def retry_log() -> Iterator[RetryLog]:
    logger = logging.getLogger("opscore.client")
    handler = RetryLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ---------------------------------------------------------------------- lifecycle


async def test_lifecycle_methods(harness):
    async with client_for(harness) as c:
        agent = await c.register_agent(
            "agent-1",
            name="one",
            version="1.2",
            capabilities=["text.summarize", "text.translate"],
            metadata={"team": "nlp"},
        )
        assert agent.state == S.AGENT_STATE_INITIALIZING
        assert agent.metadata == {"team": "nlp"}
        generated = await c.register_agent(capabilities=["x"])
        assert len(generated.agent_id) == 36

        active = await c.report_state("agent-1", "active", details={"load": 3})
        assert active.state == S.AGENT_STATE_ACTIVE
        assert to_dict(active.state_details) == {"load": 3}
        past = datetime.now(UTC) - timedelta(minutes=5)
        unchanged = await c.report_state("agent-1", S.AGENT_STATE_ERROR, observe_time=past)
        assert unchanged.state == S.AGENT_STATE_ACTIVE  # out of order: history only

        beat = await c.heartbeat("agent-1")
        assert to_datetime(beat, "last_seen_time") >= to_datetime(agent, "register_time")

        got = await c.get_agent("agent-1")
        assert got.name == "one" and list(got.capabilities) == ["text.summarize", "text.translate"]

        page = await c.list_agents(page_size=1)
        assert len(page) == 1 and page.next_page_token
        everyone = [a.agent_id async for a in c.iter_agents(page_size=1)]
        assert everyone == sorted(["agent-1", generated.agent_id])
        assert [a.agent_id async for a in c.iter_agents(state="active")] == ["agent-1"]
        assert [a.agent_id async for a in c.iter_agents(capability="x")] == [generated.agent_id]
        assert len([a async for a in c.iter_agents(limit=1)]) == 1

        history = await c.list_state_transitions("agent-1", page_size=2)
        assert [t.to_state for t in history] == [S.AGENT_STATE_ERROR, S.AGENT_STATE_ACTIVE]
        assert history.items[0].out_of_order
        all_states = [t.to_state async for t in c.iter_state_transitions("agent-1", page_size=1)]
        assert all_states == [
            S.AGENT_STATE_ERROR,
            S.AGENT_STATE_ACTIVE,
            S.AGENT_STATE_INITIALIZING,
        ]

        gone = await c.deregister_agent("agent-1")
        assert gone.deregistered and gone.state == S.AGENT_STATE_FINISHED
        with pytest.raises(FailedPreconditionError) as info:
            await c.report_state("agent-1", "idle")
        assert info.value.reason == "AGENT_DEREGISTERED"


async def test_errors_carry_code_reason_request_id_and_fields(harness):
    async with client_for(harness) as c:
        with pytest.raises(NotFoundError) as info:
            await c.get_agent("nobody")
        err = info.value
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert "nobody" in err.message
        assert err.reason  # from google.rpc.ErrorInfo
        assert len(err.request_id) == 32
        assert err.method == "GetAgent"
        assert "NOT_FOUND" in str(err) and err.request_id in str(err)

        with pytest.raises(InvalidArgumentError) as info:
            await c.register_agent("bad id!")
        assert info.value.reason == "INVALID_ARGUMENT"
        assert [v.field for v in info.value.field_violations] == ["agent_id"]

        with pytest.raises(ValueError, match="unknown value 'sleepy'"):
            await c.report_state("x", "sleepy")


async def test_watch_agents_streams_events(harness):
    async with client_for(harness) as c:
        events: asyncio.Queue[lifecycle_pb2.WatchAgentsResponse] = asyncio.Queue()

        async def watch() -> None:
            async for e in c.watch_agents(event_types=["registered", "state_changed"]):
                await events.put(e)

        watcher = asyncio.create_task(watch())
        await eventually(lambda: len(harness.server.lifecycle.events) == 1, what="watcher")
        await c.register_agent("w1")
        await c.report_state("w1", "idle")
        await c.heartbeat("w1")  # not an event of the requested kinds
        first = await asyncio.wait_for(events.get(), 10)
        second = await asyncio.wait_for(events.get(), 10)
        assert first.event_type == lifecycle_pb2.AGENT_EVENT_TYPE_REGISTERED
        assert second.event_type == lifecycle_pb2.AGENT_EVENT_TYPE_STATE_CHANGED
        assert second.transition.to_state == S.AGENT_STATE_IDLE
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        # Leaving the loop cancels the call: the server forgets the watcher.
        await eventually(lambda: len(harness.server.lifecycle.events) == 0, what="unwatched")


# ---------------------------------------------------------------------- dispatch


async def test_dispatch_methods(harness):
    async with client_for(harness) as c:
        await c.register_agent("worker", capabilities=["math.add"])
        later = await c.enqueue_task(
            "math.add",
            input={"a": 1, "b": 2.5, "tags": ["x"], "nested": {"ok": True, "none": None}},
            name="sum",
            priority=5,
            delay=timedelta(hours=1),
            retry_policy=TaskRetry(max_attempts=2, initial_backoff=0.5),
            timeout=60,
            heartbeat_timeout=timedelta(seconds=10),
        )
        assert later.state == T.TASK_STATE_SCHEDULED
        assert later.idempotency_key  # generated so that retries are safe
        assert to_dict(later.input) == {
            "a": 1,
            "b": 2.5,
            "tags": ["x"],
            "nested": {"ok": True, "none": None},
        }
        assert later.retry_policy.max_attempts == 2
        assert to_timedelta(later.retry_policy, "initial_backoff") == timedelta(seconds=0.5)
        assert to_timedelta(later, "timeout") == timedelta(seconds=60)
        assert to_timedelta(later, "heartbeat_timeout") == timedelta(seconds=10)
        at = datetime.now(UTC) + timedelta(days=1)
        scheduled = await c.enqueue_task("math.add", schedule_time=at)
        assert abs((to_datetime(scheduled, "schedule_time") - at).total_seconds()) < 0.001

        again = await c.enqueue_task("math.add", idempotency_key="k-1", input={"a": 1})
        same = await c.enqueue_task("math.add", idempotency_key="k-1", input={"a": 2})
        assert same.task_id == again.task_id

        batch = await c.enqueue_tasks(
            [enqueue_request("math.add", input={"i": i}) for i in range(3)]
        )
        assert [to_dict(t.input)["i"] for t in batch] == [0, 1, 2]

        pinned = await c.enqueue_task(agent_id="worker", name="pinned")
        with pytest.raises(NotFoundError):
            await c.enqueue_task(agent_id="ghost")
        with pytest.raises(InvalidArgumentError):
            await c.enqueue_task()

        # Subscribe and work through the ready tasks.
        stream = c.subscribe_tasks("worker", max_in_flight=1)
        message = await asyncio.wait_for(anext(stream), 10)
        task = message.assignment.task
        assert task.attempt == 1 and task.state == T.TASK_STATE_ASSIGNED
        beat = await c.heartbeat_task(task.task_id, "worker", 1, progress={"pct": 50})
        assert beat.cancel_requested is False and beat.HasField("lease_expire_time")
        assert to_dict((await c.get_task(task.task_id)).progress) == {"pct": 50}
        done = await c.complete_task(task.task_id, "worker", 1, output={"sum": 3})
        assert done.state == T.TASK_STATE_COMPLETED
        assert to_dict(done.output) == {"sum": 3}  # integral numbers come back as int
        repeat = await c.complete_task(task.task_id, "worker", 1, output={"sum": 3})
        assert repeat.state == T.TASK_STATE_COMPLETED  # a repeat is not an error
        with pytest.raises(FailedPreconditionError) as fenced:
            await c.complete_task(task.task_id, "worker", 2, output={"sum": 3})
        assert fenced.value.reason == "TASK_FINISHED"

        message = await asyncio.wait_for(anext(stream), 10)
        task = message.assignment.task
        failed = await c.fail_task(
            task.task_id,
            "worker",
            1,
            "bad input",
            error_type="ValueError",
            details={"field": "a"},
            non_retryable=True,
        )
        assert failed.state == T.TASK_STATE_FAILED
        assert failed.last_error.type == "ValueError"
        assert to_dict(failed.last_error.details) == {"field": "a"}

        message = await asyncio.wait_for(anext(stream), 10)
        held = message.assignment.task
        cancelled = await c.cancel_task(held.task_id, reason="changed my mind")
        assert cancelled.state == T.TASK_STATE_CANCELLED
        # The freed slot may bring the next assignment before the cancellation.
        messages = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]
        cancellation = next(m.cancellation for m in messages if m.HasField("cancellation"))
        assert cancellation.task_id == held.task_id
        assert cancellation.reason == "changed my mind"
        beat = await c.heartbeat_task(held.task_id, "worker", held.attempt)
        assert beat.cancel_requested is True
        await stream.aclose()

        listed = await c.list_tasks(state="scheduled")
        assert {t.task_id for t in listed} == {later.task_id, scheduled.task_id}
        pinned_tasks = [t.task_id async for t in c.iter_tasks(agent_id="worker", page_size=1)]
        assert pinned.task_id in pinned_tasks
        assert len([t async for t in c.iter_tasks(capability="math.add", limit=2)]) == 2
        assert (await c.get_task(later.task_id)).name == "sum"
        with pytest.raises(NotFoundError):
            await c.get_task("00000000-0000-0000-0000-000000000000")


# ---------------------------------------------------------------------- workflows


DEFINITION = {
    "id": "sdk-flow",
    "name": "SDK flow",
    "tasks": [
        {"id": "a", "capability": "step.a", "parameters": {"n": 1}},
        {"id": "b", "capability": "step.b", "depends_on": ["a"]},
    ],
}


async def test_workflow_methods(harness):
    async with client_for(harness) as c:
        if not await workflow_service_available(c):
            pytest.skip("WorkflowService is not registered in the server yet")
        created = await c.create_workflow_definition(DEFINITION)
        assert created.id == "sdk-flow" and created.version == 1
        same = await c.create_workflow_definition(source="id: sdk-flow\n" + _yaml_tasks())
        assert same.version == 1  # identical content: the stored one
        assert (await c.get_workflow_definition("sdk-flow")).name == "SDK flow"
        assert [d.id for d in await c.list_workflow_definitions()] == ["sdk-flow"]
        assert [d.id async for d in c.iter_workflow_definitions()] == ["sdk-flow"]

        await c.register_agent("wf-agent", capabilities=["step.a", "step.b"])
        session = await c.start_workflow("sdk-flow", input={"text": "hi"})
        assert session.state == workflow_pb2.SESSION_STATE_RUNNING
        assert session.idempotency_key
        assert (await c.get_session(session.session_id)).definition_id == "sdk-flow"
        listed = [s.session_id async for s in c.iter_sessions(definition_id="sdk-flow")]
        assert listed == [session.session_id]
        assert [s.session_id for s in await c.list_sessions(state="running")] == listed

        cancelled = await c.cancel_session(session.session_id, reason="test")
        assert cancelled.state == workflow_pb2.SESSION_STATE_CANCELLED
        events = [e.event_type async for e in c.watch_session(session.session_id)]
        assert events[0] == workflow_pb2.SESSION_EVENT_TYPE_SESSION_STARTED
        assert events[-1] == workflow_pb2.SESSION_EVENT_TYPE_SESSION_CANCELLED

        assert await c.delete_workflow_definition("sdk-flow") == 1
        with pytest.raises(NotFoundError):
            await c.get_workflow_definition("sdk-flow")


async def test_watch_session_resumes_across_a_server_restart(harness):
    async with client_for(harness) as c:
        if not await workflow_service_available(c):
            pytest.skip("WorkflowService is not registered in the server yet")
        definition = {"id": "parked", "tasks": [{"id": "only", "capability": "nobody.yet"}]}
        await c.create_workflow_definition(definition)
        session = await c.start_workflow("parked")
        seen: list[workflow_pb2.SessionEvent] = []
        two_events = asyncio.Event()

        async def watch() -> None:
            async for event in c.watch_session(session.session_id):
                seen.append(event)
                if len(seen) == 2:
                    two_events.set()

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(two_events.wait(), 10)  # started, task queued
        await harness.restart()  # ends the stream with UNAVAILABLE: the client resumes
        await c.cancel_session(session.session_id, reason="done waiting")
        await asyncio.wait_for(watcher, 20)
    sequences = [e.sequence for e in seen]
    assert sequences == list(range(1, len(seen) + 1))  # nothing lost, nothing repeated
    assert seen[-1].event_type == workflow_pb2.SESSION_EVENT_TYPE_SESSION_CANCELLED


class _Records(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.INFO)
        self.needle = needle
        self.count = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.count += 1
            self.changed.set()

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        async def enough() -> None:
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), timeout)


async def test_watch_session_outlasts_the_unary_retry_budget(harness):
    """A watch reconnects for as long as it is iterated, not just for the
    retries a unary call gets (it used to give up after ~6 s)."""
    logger = logging.getLogger("opscore.client")
    broken = _Records("session watch broken")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(broken)
    tiny = RetryConfig(
        max_attempts=2, initial_backoff=timedelta(milliseconds=20), max_backoff=timedelta(0.05)
    )
    try:
        async with client_for(harness, retry=tiny) as c:
            await c.create_workflow_definition(
                {"id": "parked", "tasks": [{"id": "only", "capability": "nobody.yet"}]}
            )
            session = await c.start_workflow("parked")
            seen: list[workflow_pb2.SessionEvent] = []
            two = asyncio.Event()

            async def watch() -> None:
                async for event in c.watch_session(session.session_id):
                    seen.append(event)
                    if len(seen) == 2:
                        two.set()

            watcher = asyncio.create_task(watch())
            await asyncio.wait_for(two.wait(), 10)
            await harness.stop()
            await broken.wait_for(5)  # far past max_attempts=2
            assert not watcher.done()
            await harness.start()
            async with client_for(harness) as other:
                await other.cancel_session(session.session_id)
            await asyncio.wait_for(watcher, 30)
    finally:
        logger.removeHandler(broken)
        logger.setLevel(old_level)
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].event_type == workflow_pb2.SESSION_EVENT_TYPE_SESSION_CANCELLED


async def test_response_methods_say_whether_something_was_created(harness):
    async with client_for(harness) as c:
        first = await c.register_agent_response("fresh", capabilities=["x"])
        again = await c.register_agent_response("fresh", capabilities=["x", "y"])
        assert first.created and not again.created
        assert list(again.agent.capabilities) == ["x", "y"]

        new = await c.enqueue_task_response("x", input={"n": 1}, idempotency_key="same")
        old = await c.enqueue_task_response("x", input={"n": 2}, idempotency_key="same")
        assert new.created and not old.created
        assert old.task.task_id == new.task.task_id and to_dict(old.task.input) == {"n": 1}
        batch = await c.enqueue_tasks_response(
            [enqueue_request("x", idempotency_key="same"), enqueue_request("x")]
        )
        assert [r.created for r in batch.results] == [False, True]

        definition = {"id": "once", "tasks": [{"id": "a", "capability": "x"}]}
        stored = await c.create_workflow_definition_response(definition)
        unchanged = await c.create_workflow_definition_response(definition)
        assert stored.created and not unchanged.created
        assert unchanged.definition.version == stored.definition.version == 1

        started = await c.start_workflow_response("once", idempotency_key="s")
        returned = await c.start_workflow_response("once", idempotency_key="s")
        assert started.created and not returned.created
        assert returned.session.session_id == started.session.session_id
        # The existing methods still return the resource itself.
        task = await c.enqueue_task("x", idempotency_key="same")
        assert task.task_id == new.task.task_id

    def blocking() -> bool:
        with OpsCoreClientSync(harness.target, env={}) as sync:
            return sync.enqueue_task_response("x", idempotency_key="same").created

    assert await asyncio.to_thread(blocking) is False


def test_json_like_problems_name_the_key_path():
    from opscore.client.convert import json_like_problem, to_struct

    when = datetime.now(UTC)
    assert json_like_problem({"a": [1, {"when": when}]}, "output") == (
        "output['a'][1]['when']: datetime is not JSON-like"
    )
    assert json_like_problem({1: "x"}, "input") == "input: key 1 is a int, not a string"
    assert json_like_problem({"x": float("nan")}, "input") == "input['x']: nan is not a JSON number"
    assert json_like_problem({"ok": [None, True, 1.5, "s", {"n": 1}]}) is None
    with pytest.raises(TypeError, match=r"details\['when'\]: datetime is not JSON-like"):
        to_struct({"when": when}, "details")


def _yaml_tasks() -> str:
    return (
        "name: SDK flow\n"
        "tasks:\n"
        "  - id: a\n    capability: step.a\n    parameters: {n: 1}\n"
        "  - id: b\n    capability: step.b\n    depends_on: [a]\n"
    )


# ---------------------------------------------------------------------- retries


async def test_unavailable_is_retried_until_the_server_is_back(harness, retry_log):
    await harness.register("survivor", ["c"])
    retry = RetryConfig(max_attempts=50, max_backoff=timedelta(milliseconds=200))
    async with client_for(harness, retry=retry) as c:
        assert (await c.get_agent("survivor")).agent_id == "survivor"
        await harness.stop()
        call = asyncio.create_task(c.get_agent("survivor"))
        enqueue = asyncio.create_task(c.enqueue_task("c", input={"n": 1}))
        await retry_log.wait_for(4)  # both calls failed and are retrying
        assert not call.done() and not enqueue.done()
        await harness.start()
        agent = await asyncio.wait_for(call, 20)
        task = await asyncio.wait_for(enqueue, 20)
        assert agent.agent_id == "survivor"
        methods = {r.method for r in retry_log.records}  # type: ignore[attr-defined]
        assert methods == {"GetAgent", "EnqueueTask"}
        # Exactly one task despite the retries (the generated idempotency key).
        assert [t.task_id async for t in c.iter_tasks(capability="c")] == [task.task_id]


async def test_calls_not_safe_to_repeat_are_not_retried(harness, retry_log):
    async with client_for(harness, retry=RetryConfig(max_attempts=3)) as c:
        await c.register_agent("a1")
        await harness.stop()
        try:
            with pytest.raises(UnavailableError):
                await c.deregister_agent("a1")
            with pytest.raises(UnavailableError):
                await c.enqueue_task("c", idempotency_key="")  # no key: not safe
            assert retry_log.records == []
            with pytest.raises(UnavailableError) as info:
                await c.get_agent("a1")  # safe: retried, then gives up
            assert len(retry_log.records) == 2
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await harness.start()


async def test_several_targets_a_call_moves_on_from_one_that_is_down(harness, retry_log):
    from tests.support.procserver import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    await harness.register("r1", ["c"])
    retry = RetryConfig(max_attempts=5, max_backoff=timedelta(milliseconds=100))
    async with OpsCoreClient(f"{dead}, {harness.target}", retry=retry, env={}) as c:
        assert c.targets == (dead, harness.target) and c.target == dead
        assert (await c.get_agent("r1")).agent_id == "r1"
        assert c.target == harness.target  # and stays there
        assert len(retry_log.records) == 1
        task = await c.enqueue_task("c")
        assert (await c.get_task(task.task_id)).task_id == task.task_id
    async with OpsCoreClient([harness.target, dead], env={}) as c:
        assert (await c.get_agent("r1")).agent_id == "r1" and c.target == harness.target
    with pytest.raises(ValueError, match="no server target"):
        OpsCoreClient(" , ", env={})


# ---------------------------------------------------------------------- auth


async def test_api_key_auth(make_harness):
    h = await make_harness(api_keys=frozenset({"secret-1"}))
    async with OpsCoreClient(h.target, env={}) as anonymous:
        with pytest.raises(UnauthenticatedError) as info:
            await anonymous.list_agents()
        assert info.value.reason == "API_KEY_MISSING"
        assert await anonymous.check_health() == "SERVING"  # health needs no key
    async with OpsCoreClient(h.target, api_key="wrong", env={}) as wrong:
        with pytest.raises(UnauthenticatedError) as info:
            await wrong.register_agent("a")
        assert info.value.reason == "API_KEY_INVALID"
    async with OpsCoreClient(h.target, api_key="secret-1") as good:
        assert (await good.register_agent("a")).agent_id == "a"
    env = {"OPSCORE_TARGET": h.target, "OPSCORE_API_KEY": "secret-1"}
    async with OpsCoreClient(env=env) as from_env:
        assert from_env.target == h.target
        assert [a.agent_id for a in await from_env.list_agents()] == ["a"]


async def test_health(harness):
    async with client_for(harness) as c:
        assert await c.check_health() == "SERVING"
        assert await c.check_health("opscore.v1.DispatchService") == "SERVING"
        with pytest.raises(NotFoundError):
            await c.check_health("no.such.Service")


# ---------------------------------------------------------------------- sync client


async def test_sync_client(harness):
    target = harness.target

    def script() -> tuple[list[str], str, list[int]]:
        with OpsCoreClientSync(target, env={}) as c:
            c.register_agent("s1", capabilities=["echo"])
            c.register_agent("s2", capabilities=["echo"])
            ids = [a.agent_id for a in c.iter_agents(page_size=1)]
            task = c.enqueue_task("echo", input={"say": "hi"})
            stream = c.subscribe_tasks("s1")
            assignment = next(stream).assignment.task
            stream.close()
            c.complete_task(assignment.task_id, "s1", assignment.attempt, {"said": "hi"})
            try:
                c.get_agent("ghost")
            except NotFoundError as exc:
                reason = exc.reason
            states = [t.to_state for t in c.iter_state_transitions("s1")]
            assert c.get_task(task.task_id).state == T.TASK_STATE_COMPLETED
        return ids, reason, states

    ids, reason, states = await asyncio.to_thread(script)
    assert ids == ["s1", "s2"]
    assert reason == "AGENT_NOT_FOUND"
    assert states[-1] == S.AGENT_STATE_INITIALIZING


# ---------------------------------------------------------------------- conversions


def test_conversions_are_strict_and_round_trip():
    with pytest.raises(ValueError, match="naive datetime"):
        to_timestamp(datetime(2030, 1, 1))
    ts = to_timestamp(datetime(2030, 1, 1, tzinfo=UTC))
    assert ts is not None and ts.seconds == 1893456000
    assert enum_value(lifecycle_pb2.AgentState, "AGENT_STATE_", "Idle") == S.AGENT_STATE_IDLE
    assert enum_value(dispatch_pb2.TaskState, "TASK_STATE_", "TASK_STATE_QUEUED") == 2
    with pytest.raises(ValueError, match="expected one of"):
        enum_value(dispatch_pb2.TaskState, "TASK_STATE_", "done")
    with pytest.raises(TypeError, match="JSON-like"):
        enqueue_request("c", input={"when": datetime.now(UTC)})


def test_keepalive_stays_within_what_the_server_permits():
    server = Config()
    options = dict(CHANNEL_OPTIONS)
    min_interval_ms = server.min_client_ping_interval.total_seconds() * 1000
    assert options["grpc.keepalive_time_ms"] >= min_interval_ms
    assert options["grpc.keepalive_timeout_ms"] <= server.keepalive_timeout.total_seconds() * 1000
