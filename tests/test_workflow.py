"""WorkflowService: definitions, validation, sessions, fallbacks, cancel, watch."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import workflow_pb2 as pb

from opscore.errors import ConfigError
from tests.conftest import Harness, StreamReader, eventually, expect_error, make_config
from tests.support.security import reason
from tests.support.worker import Fail, Worker

pytestmark = pytest.mark.backends("sqlite", "postgres")


SS = pb.SessionState
RS = pb.TaskRunState
E = pb.SessionEventType


def definition(did: str, tasks: list[dict[str, Any]], **kw: Any) -> pb.WorkflowDefinition:
    return json_format.ParseDict({"id": did, "tasks": tasks, **kw}, pb.WorkflowDefinition())


def struct(**kw: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


async def create(h: Harness, d: pb.WorkflowDefinition) -> pb.CreateWorkflowDefinitionResponse:
    return await h.workflow.CreateWorkflowDefinition(
        pb.CreateWorkflowDefinitionRequest(definition=d)
    )


async def start(h: Harness, did: str = "", **kw: Any) -> pb.Session:
    resp = await h.workflow.StartWorkflow(pb.StartWorkflowRequest(definition_id=did, **kw))
    return resp.session


async def wait_final(h: Harness, session_id: str, timeout: float = 20) -> pb.Session:
    """Follow WatchSession to its terminal event, then read the session."""
    async for resp in h.workflow.WatchSession(
        pb.WatchSessionRequest(session_id=session_id), timeout=timeout
    ):
        if resp.event.event_type in (
            E.SESSION_EVENT_TYPE_SESSION_COMPLETED,
            E.SESSION_EVENT_TYPE_SESSION_FAILED,
            E.SESSION_EVENT_TYPE_SESSION_CANCELLED,
        ):
            break
    return (await h.workflow.GetSession(pb.GetSessionRequest(session_id=session_id))).session


def runs(s: pb.Session) -> dict[str, pb.TaskRun]:
    return {r.workflow_task_id: r for r in s.task_runs}


def echo(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
    return {"task": task.workflow_task_id, "seen": sorted(data.get("upstream", {}))}


# ------------------------------------------------------------------ validation

INVALID = [
    ({"id": "w", "tasks": []}, "at least one task", "tasks"),
    ({"id": "bad id", "tasks": [{"id": "a", "capability": "c"}]}, "definition id", "id"),
    (
        {"id": "w", "tasks": [{"id": "a", "capability": "c"}, {"id": "a", "capability": "c"}]},
        "task 'a' is defined twice",
        "tasks[1].id",
    ),
    (
        {"id": "w", "tasks": [{"id": "a", "capability": "c", "depends_on": ["zz"]}]},
        "task 'a' depends on unknown task 'zz'",
        "tasks[0].depends_on[0]",
    ),
    (
        {"id": "w", "tasks": [{"id": "a", "capability": "c", "fallback": "zz"}]},
        "task 'a' has unknown fallback 'zz'",
        "tasks[0].fallback",
    ),
    (
        {
            "id": "w",
            "tasks": [
                {"id": "a", "capability": "c", "depends_on": ["c"]},
                {"id": "b", "capability": "c", "depends_on": ["a"]},
                {"id": "c", "capability": "c", "depends_on": ["b"]},
            ],
        },
        "dependency cycle: a -> b -> c -> a",
        "tasks[0].depends_on",
    ),
    (
        {"id": "w", "tasks": [{"id": "a"}]},
        "task 'a' has neither capability nor agent_id",
        "tasks[0].capability",
    ),
    (
        {"id": "w", "tasks": [{"id": "a", "capability": "c", "timeout": "-1s"}]},
        "task 'a': timeout must be positive",
        "tasks[0].timeout",
    ),
    (
        {
            "id": "w",
            "tasks": [{"id": "a", "capability": "c", "retry_policy": {"initial_backoff": "-2s"}}],
        },
        "task 'a': retry_policy.initial_backoff must not be negative",
        "tasks[0].retry_policy.initial_backoff",
    ),
    (
        {
            "id": "w",
            "tasks": [
                {"id": "a", "capability": "c", "fallback": "b"},
                {"id": "b", "capability": "c", "depends_on": ["a"]},
            ],
        },
        "fallback of 'a' and must not have depends_on",
        "tasks[1].depends_on",
    ),
]


@pytest.mark.parametrize(("body", "message", "field"), INVALID)
async def test_validation_names_task_and_field(harness, body, message, field):
    for req in (
        pb.CreateWorkflowDefinitionRequest(
            definition=json_format.ParseDict(body, pb.WorkflowDefinition())
        ),
        pb.CreateWorkflowDefinitionRequest(source=json.dumps(body)),
    ):
        err = await expect_error(
            harness.workflow.CreateWorkflowDefinition(req),
            grpc.StatusCode.INVALID_ARGUMENT,
            message,
        )
        from google.rpc import error_details_pb2, status_pb2

        status = status_pb2.Status.FromString(
            dict(err.trailing_metadata())["grpc-status-details-bin"]
        )
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in status.details)
        assert field in [v.field for v in bad.field_violations]
    listed = await harness.workflow.ListWorkflowDefinitions(pb.ListWorkflowDefinitionsRequest())
    assert list(listed.definitions) == []


async def test_unparsable_and_unknown_fields_are_rejected(harness):
    W = harness.workflow
    await expect_error(
        W.CreateWorkflowDefinition(pb.CreateWorkflowDefinitionRequest(source="id: [unclosed")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "neither valid JSON nor valid YAML",
    )
    await expect_error(
        W.CreateWorkflowDefinition(
            pb.CreateWorkflowDefinitionRequest(
                source="id: w\ntasks:\n  - id: a\n    capabilty: c\n"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "capabilty",
    )
    await expect_error(
        W.CreateWorkflowDefinition(pb.CreateWorkflowDefinitionRequest(source="- just a list")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be a mapping",
    )


YAML_DEF = """
id: report
name: Weekly report
tasks:
  - id: fetch
    capability: data.fetch
    parameters: {source: sales}
    timeout: 30
  - id: summarize
    capability: text.summarize
    depends_on: [fetch]
    retry_policy: {max_attempts: 5, initial_backoff: 0.5}
"""


async def test_no_next_version_after_the_highest(harness):
    """ "Next" after version 2**31 - 1 would not fit the int32 field: a precise
    refusal, not INTERNAL, and the stored versions stay as they were."""
    top = 2**31 - 1
    first = await create(harness, definition("edge", [{"id": "a", "capability": "c"}], version=top))
    assert first.created and first.definition.version == top
    # The same content as the latest is returned, as ever.
    same = await create(harness, definition("edge", [{"id": "a", "capability": "c"}]))
    assert not same.created and same.definition.version == top
    err = await expect_error(
        create(harness, definition("edge", [{"id": "b", "capability": "c"}])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "highest",
        "new id",
    )
    assert reason(err) == "DEFINITION_VERSIONS_EXHAUSTED"
    latest = await harness.workflow.GetWorkflowDefinition(
        pb.GetWorkflowDefinitionRequest(definition_id="edge")
    )
    assert latest.definition.version == top and latest.definition.tasks[0].id == "a"
    # A version below the top can still be given explicitly.
    low = await create(harness, definition("edge", [{"id": "b", "capability": "c"}], version=7))
    assert low.created and low.definition.version == 7


async def test_yaml_definition_versions_and_immutability(harness):
    W = harness.workflow
    first = await W.CreateWorkflowDefinition(pb.CreateWorkflowDefinitionRequest(source=YAML_DEF))
    assert first.created and first.definition.version == 1
    d = first.definition
    assert d.tasks[0].timeout.seconds == 30 and d.tasks[1].retry_policy.max_attempts == 5
    assert d.tasks[1].retry_policy.initial_backoff.nanos == 500_000_000
    again = await W.CreateWorkflowDefinition(pb.CreateWorkflowDefinitionRequest(source=YAML_DEF))
    assert not again.created and again.definition.version == 1
    changed = YAML_DEF.replace("sales", "ops")
    v2 = await W.CreateWorkflowDefinition(pb.CreateWorkflowDefinitionRequest(source=changed))
    assert v2.created and v2.definition.version == 2
    clash = pb.WorkflowDefinition()
    clash.CopyFrom(v2.definition)
    clash.version = 1
    await expect_error(create(harness, clash), grpc.StatusCode.ALREADY_EXISTS, "immutable")
    latest = await W.GetWorkflowDefinition(pb.GetWorkflowDefinitionRequest(definition_id="report"))
    assert latest.definition.version == 2
    old = await W.GetWorkflowDefinition(
        pb.GetWorkflowDefinitionRequest(definition_id="report", version=1)
    )
    assert old.definition.tasks[0].parameters["source"] == "sales"
    await expect_error(
        W.GetWorkflowDefinition(pb.GetWorkflowDefinitionRequest(definition_id="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    await create(harness, definition("another", [{"id": "a", "capability": "c"}]))
    listed = await W.ListWorkflowDefinitions(pb.ListWorkflowDefinitionsRequest(page_size=1))
    assert [d.id for d in listed.definitions] == ["another"]
    rest = await W.ListWorkflowDefinitions(
        pb.ListWorkflowDefinitionsRequest(page_token=listed.next_page_token)
    )
    assert [(d.id, d.version) for d in rest.definitions] == [("report", 2)]


# ------------------------------------------------------------------ running


async def test_linear_chain_passes_data(harness):
    await create(
        harness,
        definition(
            "chain",
            [
                {"id": "one", "capability": "math", "parameters": {"add": 1}},
                {
                    "id": "two",
                    "capability": "math",
                    "parameters": {"add": 10},
                    "depends_on": ["one"],
                },
                {
                    "id": "three",
                    "capability": "math",
                    "parameters": {"add": 100},
                    "depends_on": ["two"],
                },
            ],
        ),
    )

    def add(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        upstream = list(data["upstream"].values())
        base = upstream[0]["value"] if upstream else data["input"]["start"]
        return {"value": base + data["parameters"]["add"]}

    w = await Worker(harness.channel, "w1", {"math": add}).start()
    s = await start(harness, "chain", input=struct(start=5))
    assert s.state == SS.SESSION_STATE_RUNNING
    final = await wait_final(harness, s.session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED
    assert final.output["three"]["value"] == 116
    r = runs(final)
    assert [r[k].output["value"] for k in ("one", "two", "three")] == [6, 16, 116]
    assert all(x.state == RS.TASK_RUN_STATE_COMPLETED for x in final.task_runs)
    # Tasks were real dispatch tasks carrying the session id.
    tasks = await harness.dispatch.ListTasks(dpb.ListTasksRequest(session_id=s.session_id))
    assert {t.workflow_task_id for t in tasks.tasks} == {"one", "two", "three"}
    await w.stop()


async def test_diamond_fan_in_waits_for_both(harness):
    await create(
        harness,
        definition(
            "diamond",
            [
                {"id": "a", "capability": "c"},
                {"id": "b", "capability": "c", "depends_on": ["a"]},
                {"id": "c", "capability": "c", "depends_on": ["a"]},
                {"id": "d", "capability": "c", "depends_on": ["b", "c"]},
            ],
        ),
    )
    order: list[str] = []

    def handler(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        order.append(task.workflow_task_id)
        return echo(data, task)

    w = await Worker(harness.channel, "w1", {"c": handler}).start()
    final = await wait_final(harness, (await start(harness, "diamond")).session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED
    assert order[0] == "a" and order[-1] == "d" and set(order[1:3]) == {"b", "c"}
    assert list(runs(final)["d"].output["seen"]) == ["b", "c"]
    assert set(final.output.keys()) == {"d"}
    await w.stop()


@pytest.mark.timeout(120)
async def test_wide_fan_out_fan_in(harness):
    width = 1000
    tasks = [{"id": "root", "capability": "c"}]
    tasks += [{"id": f"m{i}", "capability": "c", "depends_on": ["root"]} for i in range(width)]
    tasks.append({"id": "sink", "capability": "c", "depends_on": [f"m{i}" for i in range(width)]})
    await create(harness, definition("wide", tasks))
    workers = [
        await Worker(harness.channel, f"w{i}", {"c": echo}, max_in_flight=20).start()
        for i in range(4)
    ]
    final = await wait_final(harness, (await start(harness, "wide")).session_id, timeout=60)
    assert final.state == SS.SESSION_STATE_COMPLETED
    assert len(runs(final)["sink"].output["seen"]) == width
    assert sum(len(w.seen) for w in workers) == width + 2
    for w in workers:
        await w.stop()


async def test_retries_inside_a_session(harness):
    await create(
        harness,
        definition(
            "flaky",
            [
                {
                    "id": "f",
                    "capability": "c",
                    "retry_policy": {"max_attempts": 3, "initial_backoff": "0.01s"},
                }
            ],
        ),
    )
    attempts = []

    def flaky(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        attempts.append(task.attempt)
        if task.attempt < 3:
            raise Fail(f"try {task.attempt}")
        return {"ok": True}

    w = await Worker(harness.channel, "w1", {"c": flaky}).start()
    s = await start(harness, "flaky")
    final = await wait_final(harness, s.session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED and attempts == [1, 2, 3]
    assert runs(final)["f"].attempt == 3
    events = [
        e.event.event_type
        async for e in harness.workflow.WatchSession(
            pb.WatchSessionRequest(session_id=s.session_id)
        )
    ]
    assert events.count(E.SESSION_EVENT_TYPE_TASK_RETRYING) == 2
    await w.stop()


FALLBACK_DEF = [
    {"id": "primary", "capability": "c", "fallback": "backup", "retry_policy": {"max_attempts": 1}},
    {"id": "backup", "capability": "c"},
    {"id": "after", "capability": "c", "depends_on": ["primary"]},
]


async def test_fallback_taken(harness):
    await create(harness, definition("fb", FALLBACK_DEF))

    def handler(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        if task.workflow_task_id == "primary":
            raise Fail("primary is down")
        if task.workflow_task_id == "after":
            return {"got": data["upstream"]["primary"]}
        return {"from": task.workflow_task_id}

    w = await Worker(harness.channel, "w1", {"c": handler}).start()
    final = await wait_final(harness, (await start(harness, "fb")).session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED
    r = runs(final)
    assert r["primary"].state == RS.TASK_RUN_STATE_REPLACED
    assert r["primary"].error.message == "primary is down"
    assert r["backup"].state == RS.TASK_RUN_STATE_COMPLETED
    assert r["after"].output["got"]["from"] == "backup"
    await w.stop()


async def test_fallback_not_taken_is_skipped(harness):
    await create(harness, definition("fb2", FALLBACK_DEF))
    w = await Worker(harness.channel, "w1", {"c": echo}).start()
    final = await wait_final(harness, (await start(harness, "fb2")).session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED
    r = runs(final)
    assert r["backup"].state == RS.TASK_RUN_STATE_SKIPPED and not r["backup"].task_id
    assert set(final.output.keys()) == {"after"}
    await w.stop()


async def test_failure_fails_session_and_cancels_open_tasks(harness):
    await create(
        harness,
        definition(
            "doomed",
            [
                {"id": "slow", "capability": "slow"},
                {"id": "bad", "capability": "bad"},
                {"id": "later", "capability": "bad", "depends_on": ["bad"]},
            ],
        ),
    )
    release = asyncio.Event()

    async def slow(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        await release.wait()
        return {}

    def bad(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        raise Fail("cannot", non_retryable=True)

    ws = await Worker(harness.channel, "ws", {"slow": slow}).start()
    s = await start(harness, "doomed")
    await eventually(lambda: ws.seen, what="slow task assigned")
    wb = await Worker(harness.channel, "wb", {"bad": bad}).start()
    final = await wait_final(harness, s.session_id)
    assert final.state == SS.SESSION_STATE_FAILED
    assert "task 'bad' failed: cannot" in final.error.message
    r = runs(final)
    assert r["slow"].state == RS.TASK_RUN_STATE_CANCELLED
    assert r["later"].state == RS.TASK_RUN_STATE_CANCELLED
    await eventually(lambda: ws.cancelled, what="cancellation delivered to the slow agent")
    assert ws.cancelled == [r["slow"].task_id]
    task = await harness.dispatch.GetTask(dpb.GetTaskRequest(task_id=r["slow"].task_id))
    assert task.task.state == dpb.TASK_STATE_CANCELLED
    await ws.stop()
    await wb.stop()


async def test_cancel_session_while_assigned(harness):
    await create(harness, definition("long", [{"id": "x", "capability": "c"}]))
    hold = asyncio.Event()

    async def wait_forever(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        await hold.wait()
        return {}

    w = await Worker(harness.channel, "w1", {"c": wait_forever}).start()
    s = await start(harness, "long")
    await eventually(lambda: w.seen, what="task assigned")
    resp = await harness.workflow.CancelSession(
        pb.CancelSessionRequest(session_id=s.session_id, reason="user changed plans")
    )
    assert resp.session.state == SS.SESSION_STATE_CANCELLED
    await eventually(lambda: w.cancelled, what="agent receives the cancellation")
    assert w.cancelled == [w.seen[0].task_id]
    again = await harness.workflow.CancelSession(pb.CancelSessionRequest(session_id=s.session_id))
    assert again.session.state == SS.SESSION_STATE_CANCELLED
    await expect_error(
        harness.workflow.CancelSession(pb.CancelSessionRequest(session_id="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    await w.stop()


async def test_watch_before_during_and_after(harness):
    await create(
        harness,
        definition(
            "watched",
            [{"id": "a", "capability": "c"}, {"id": "b", "capability": "c", "depends_on": ["a"]}],
        ),
    )
    gate = asyncio.Event()

    async def gated(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        await gate.wait()
        return {"t": task.workflow_task_id}

    s = await start(harness, "watched")
    early = StreamReader(
        harness.workflow.WatchSession(pb.WatchSessionRequest(session_id=s.session_id))
    )
    await early.call.initial_metadata()
    w = await Worker(harness.channel, "w1", {"c": gated}).start()
    await eventually(lambda: w.seen, what="first task assigned")
    during = StreamReader(
        harness.workflow.WatchSession(pb.WatchSessionRequest(session_id=s.session_id))
    )
    await during.call.initial_metadata()
    gate.set()
    await wait_final(harness, s.session_id)
    after = [
        e.event
        async for e in harness.workflow.WatchSession(
            pb.WatchSessionRequest(session_id=s.session_id)
        )
    ]
    kinds = [e.event_type for e in after]
    assert kinds[0] == E.SESSION_EVENT_TYPE_SESSION_STARTED
    assert kinds[-1] == E.SESSION_EVENT_TYPE_SESSION_COMPLETED
    assert kinds.count(E.SESSION_EVENT_TYPE_TASK_COMPLETED) == 2
    assert [e.sequence for e in after] == list(range(1, len(after) + 1))
    for reader in (early, during):
        await asyncio.wait_for(reader.done.wait(), 10)
        got = []
        while not reader.queue.empty():
            got.append(reader.queue.get_nowait().event)
        assert [e.sequence for e in got] == [e.sequence for e in after]
        assert reader.error is None
    resumed = [
        e.event.sequence
        async for e in harness.workflow.WatchSession(
            pb.WatchSessionRequest(session_id=s.session_id, after_sequence=3)
        )
    ]
    assert resumed == list(range(4, len(after) + 1))
    await expect_error(
        harness.workflow.WatchSession(pb.WatchSessionRequest(session_id="nope")).read(),
        grpc.StatusCode.NOT_FOUND,
    )
    await w.stop()


async def test_inline_definition_pinned_agent_and_idempotency(harness):
    w = await Worker(harness.channel, "pinned-agent", {"anything": echo}).start()
    inline = definition(
        "",
        [{"id": "a", "capability": "other"}, {"id": "b", "capability": "x", "depends_on": ["a"]}],
    )
    req = pb.StartWorkflowRequest(
        definition=inline, agent_id="pinned-agent", idempotency_key="once"
    )
    first = await harness.workflow.StartWorkflow(req)
    second = await harness.workflow.StartWorkflow(req)
    assert first.created and not second.created
    assert second.session.session_id == first.session.session_id
    final = await wait_final(harness, first.session.session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED and final.definition_id == "inline"
    assert {t.assigned_agent_id for t in w.seen} == {"pinned-agent"}
    await expect_error(
        harness.workflow.StartWorkflow(pb.StartWorkflowRequest(definition_id="missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        harness.workflow.StartWorkflow(pb.StartWorkflowRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one",
    )
    await expect_error(
        harness.workflow.StartWorkflow(
            pb.StartWorkflowRequest(definition=inline, agent_id="ghost")
        ),
        grpc.StatusCode.NOT_FOUND,
        "ghost",
    )
    await w.stop()


async def test_delete_definition_never_harms_running_sessions(harness):
    await create(harness, definition("temp", [{"id": "a", "capability": "c"}]))
    s = await start(harness, "temp")
    resp = await harness.workflow.DeleteWorkflowDefinition(
        pb.DeleteWorkflowDefinitionRequest(definition_id="temp")
    )
    assert resp.deleted_versions == 1
    await expect_error(
        harness.workflow.GetWorkflowDefinition(
            pb.GetWorkflowDefinitionRequest(definition_id="temp")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        harness.workflow.DeleteWorkflowDefinition(
            pb.DeleteWorkflowDefinitionRequest(definition_id="temp")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    w = await Worker(harness.channel, "w1", {"c": echo}).start()
    final = await wait_final(harness, s.session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED and final.definition_id == "temp"
    await w.stop()


async def test_legacy_sample_runs_to_completion(harness):
    legacy = {
        "id": "legacy-sample",
        "name": "Sample Workflow",
        "description": "earlier Ops-Core format",
        "version": "1.0",
        "tasks": [
            {
                "taskId": "step_1",
                "name": "First step",
                "agentCapability": "test_capability",
                "parameters": {"message": "hello"},
                "nextTaskId": "step_2",
            },
            {
                "taskId": "step_2",
                "name": "Second step",
                "agentCapability": "another_capability",
                "parameters": {},
            },
        ],
    }
    created = await harness.workflow.CreateWorkflowDefinition(
        pb.CreateWorkflowDefinitionRequest(source=json.dumps(legacy))
    )
    d = created.definition
    assert [(t.id, t.capability, list(t.depends_on)) for t in d.tasks] == [
        ("step_1", "test_capability", []),
        ("step_2", "another_capability", ["step_1"]),
    ]
    w = await Worker(
        harness.channel,
        "legacy-agent",
        {
            "test_capability": lambda data, t: {"said": data["parameters"]["message"]},
            "another_capability": lambda data, t: {"heard": data["upstream"]["step_1"]["said"]},
        },
    ).start()
    final = await wait_final(harness, (await start(harness, "legacy-sample")).session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED
    assert final.output["step_2"]["heard"] == "hello"
    await w.stop()


async def test_list_sessions_filters(harness):
    await create(harness, definition("l1", [{"id": "a", "capability": "nobody"}]))
    await create(harness, definition("l2", [{"id": "a", "capability": "nobody"}]))
    ids = [(await start(harness, d)).session_id for d in ("l1", "l2", "l1")]
    await harness.workflow.CancelSession(pb.CancelSessionRequest(session_id=ids[0]))
    l1 = await harness.workflow.ListSessions(pb.ListSessionsRequest(definition_id="l1"))
    assert [s.session_id for s in l1.sessions] == [ids[2], ids[0]]
    assert all(not s.task_runs for s in l1.sessions)
    running = await harness.workflow.ListSessions(
        pb.ListSessionsRequest(state=SS.SESSION_STATE_RUNNING)
    )
    assert {s.session_id for s in running.sessions} == {ids[1], ids[2]}
    page = await harness.workflow.ListSessions(pb.ListSessionsRequest(page_size=2))
    assert len(page.sessions) == 2 and page.next_page_token


async def test_list_sessions_by_state_and_definition_pages_newest_first(harness):
    """CANCELLED (read through its own partial index), RUNNING (the open one's) and
    a definition with a state: exactly their sessions, newest first, across pages."""
    await create(harness, definition("m1", [{"id": "a", "capability": "nobody"}]))
    await create(harness, definition("m2", [{"id": "a", "capability": "nobody"}]))
    defs = ["m1", "m2", "m1", "m1", "m2", "m1"]
    ids = [(await start(harness, d)).session_id for d in defs]
    for i in (0, 1, 3, 5):
        await harness.workflow.CancelSession(pb.CancelSessionRequest(session_id=ids[i]))

    async def listed(**kw: object) -> list[str]:
        out, token = [], ""
        while True:
            page = await harness.workflow.ListSessions(
                pb.ListSessionsRequest(page_size=2, page_token=token, **kw)
            )
            out += [x.session_id for x in page.sessions]
            token = page.next_page_token
            if not token:
                return out

    cancelled = SS.SESSION_STATE_CANCELLED
    assert await listed(state=cancelled) == [ids[5], ids[3], ids[1], ids[0]]
    assert await listed(state=cancelled, definition_id="m1") == [ids[5], ids[3], ids[0]]
    assert await listed(state=SS.SESSION_STATE_RUNNING) == [ids[4], ids[2]]
    assert await listed(state=SS.SESSION_STATE_FAILED) == []
    assert await listed(definition_id="m2") == [ids[4], ids[1]]


async def test_sessions_continue_after_restart(harness):
    await create(
        harness,
        definition(
            "durable",
            [{"id": "a", "capability": "c"}, {"id": "b", "capability": "c", "depends_on": ["a"]}],
        ),
    )
    w = await Worker(harness.channel, "w1", {"c": echo}, max_in_flight=1).start()
    s = await start(harness, "durable")
    await eventually(lambda: len(w.seen) >= 1, what="first task done")
    await w.stop()
    await harness.restart()
    w2 = await Worker(harness.channel, "w1", {"c": echo}).start()
    final = await wait_final(harness, s.session_id)
    assert final.state == SS.SESSION_STATE_COMPLETED
    assert set(final.output.keys()) == {"b"}
    await w2.stop()


# ------------------------------------------------------------------ --workflows-dir


async def test_workflows_dir_loads_and_refuses_bad_files(tmp_path, make_harness):
    good = tmp_path / "defs"
    good.mkdir()
    (good / "report.yaml").write_text(YAML_DEF)
    (good / "legacy.json").write_text(
        json.dumps({"id": "lg", "tasks": [{"taskId": "s1", "agentCapability": "c"}]})
    )
    (good / "notes.txt").write_text("ignored")
    h = await make_harness(workflows_dir=str(good))
    listed = await h.workflow.ListWorkflowDefinitions(pb.ListWorkflowDefinitionsRequest())
    assert {d.id for d in listed.definitions} == {"report", "lg"}
    await h.restart()  # loading again is idempotent
    again = await h.workflow.ListWorkflowDefinitions(pb.ListWorkflowDefinitionsRequest())
    assert {(d.id, d.version) for d in again.definitions} == {("report", 1), ("lg", 1)}

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("id: x\ntasks:\n  - id: a\n    depends_on: [zz]\n")
    from opscore.server import OpsCoreServer

    server = OpsCoreServer(make_config(tmp_path / "other", workflows_dir=str(bad)))
    with pytest.raises(ConfigError) as info:
        await server.start()
    assert "broken.yaml" in str(info.value) and "zz" in str(info.value)
