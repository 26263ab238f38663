"""Roles against a real server: every RPC and stream of the contract for every role
(allowed, or PERMISSION_DENIED with ROLE_NOT_ALLOWED), and agents that try to
act as other agents (PERMISSION_DENIED with AGENT_NOT_ALLOWED, nothing changed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import message_factory
from opscore_proto.v1 import dispatch_pb2, lifecycle_pb2, workflow_pb2

from opscore import security
from opscore.security import roles
from tests.conftest import StreamReader, expect_error
from tests.support.security import bearer, principal, reason, write_auth_file

# Written out here, not read from opscore.security.roles, so that a change to the
# table must be made twice: once on purpose, once in this test.
ALL = {"admin", "operator", "agent", "viewer"}
READ = {"admin", "operator", "viewer"}
EXPECTED: dict[str, set[str]] = {
    "LifecycleService.RegisterAgent": {"admin", "agent"},
    "LifecycleService.DeregisterAgent": {"admin", "agent"},
    "LifecycleService.GetAgent": ALL,
    "LifecycleService.ListAgents": READ,
    "LifecycleService.ReportState": {"admin", "agent"},
    "LifecycleService.Heartbeat": {"admin", "agent"},
    "LifecycleService.ListStateTransitions": ALL,
    "LifecycleService.WatchAgents": READ,
    "DispatchService.EnqueueTask": {"admin", "operator"},
    "DispatchService.EnqueueTasks": {"admin", "operator"},
    "DispatchService.SubscribeTasks": {"admin", "agent"},
    "DispatchService.Connect": {"admin", "agent"},
    "DispatchService.CompleteTask": {"admin", "agent"},
    "DispatchService.FailTask": {"admin", "agent"},
    "DispatchService.HeartbeatTask": {"admin", "agent"},
    "DispatchService.GetTask": READ,
    "DispatchService.ListTaskAttempts": READ,
    "DispatchService.ListTasks": READ,
    "DispatchService.CancelTask": {"admin", "operator"},
    "WorkflowService.CreateWorkflowDefinition": {"admin", "operator"},
    "WorkflowService.GetWorkflowDefinition": READ,
    "WorkflowService.ListWorkflowDefinitions": READ,
    "WorkflowService.DeleteWorkflowDefinition": {"admin", "operator"},
    "WorkflowService.StartWorkflow": {"admin", "operator"},
    "WorkflowService.GetSession": READ,
    "WorkflowService.ListSessions": READ,
    "WorkflowService.CancelSession": {"admin", "operator"},
    "WorkflowService.WatchSession": READ,
}
AGENT_SCOPED = {
    "LifecycleService.RegisterAgent",
    "LifecycleService.DeregisterAgent",
    "LifecycleService.GetAgent",
    "LifecycleService.ReportState",
    "LifecycleService.Heartbeat",
    "LifecycleService.ListStateTransitions",
    "DispatchService.SubscribeTasks",
    "DispatchService.Connect",
    "DispatchService.CompleteTask",
    "DispatchService.FailTask",
    "DispatchService.HeartbeatTask",
}
MINE, THEIRS = "summarizer-1", "translator-1"


def contract_methods() -> dict[str, Any]:
    """Short name -> MethodDescriptor for every RPC of the three services."""
    out = {}
    for module, service in (
        (lifecycle_pb2, "LifecycleService"),
        (dispatch_pb2, "DispatchService"),
        (workflow_pb2, "WorkflowService"),
    ):
        for m in module.DESCRIPTOR.services_by_name[service].methods:
            out[f"{service}.{m.name}"] = m
    return out


def test_table_covers_exactly_the_contract():
    methods = contract_methods()
    assert set(EXPECTED) == set(methods), "a new RPC needs a row here and in roles.py"
    for short, m in methods.items():
        full = f"/{m.containing_service.full_name}/{m.name}"
        assert full in roles.PERMISSIONS, f"{short} is missing from opscore.security.roles"
        rule = roles.PERMISSIONS[full]
        assert {r.value for r in rule.roles} == EXPECTED[short], short
        assert rule.agent_scoped == (short in AGENT_SCOPED), short
    assert len(roles.PERMISSIONS) == len(methods)
    # An RPC the table does not know is admin-only.
    assert roles.rule("/opscore.v1.DispatchService/Unknown").roles == {roles.Role.ADMIN}


async def call_any(
    channel: grpc.aio.Channel, method: Any, request: Any, key: str
) -> grpc.StatusCode | str:
    """Call `method` generically. "opened" when a stream was accepted and stays open."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_cls = message_factory.GetMessageClass(method.output_type)
    kw = {"request_serializer": type(request).SerializeToString}
    kw["response_deserializer"] = response_cls.FromString
    if not method.server_streaming:
        try:
            await channel.unary_unary(path, **kw)(request, metadata=bearer(key), timeout=10)
        except grpc.aio.AioRpcError as err:
            call_any.last_error = err  # type: ignore[attr-defined]
            return err.code()
        return grpc.StatusCode.OK
    if method.client_streaming:
        call = channel.stream_stream(path, **kw)(iter([request]), metadata=bearer(key), timeout=10)
    else:
        call = channel.unary_stream(path, **kw)(request, metadata=bearer(key), timeout=10)
    try:
        md = await call.initial_metadata()
        if any(k == "x-request-id" for k, _ in md or ()):
            return "opened"
        code = await call.code()
        if code != grpc.StatusCode.OK:
            try:
                await call.read()
            except grpc.aio.AioRpcError as err:
                call_any.last_error = err  # type: ignore[attr-defined]
        return code
    finally:
        call.cancel()


@pytest.fixture
async def secured(make_harness, tmp_path: Path):
    path = tmp_path / "auth.toml"
    made = write_auth_file(
        path,
        principal("root", "admin"),
        principal("ops", "operator"),
        principal("summarizers", "agent", agents=["summarizer-*"]),
        principal("translators", "agent", agents=["translator-*"]),
        principal("watcher", "viewer"),
    )
    h = await make_harness(auth_file=str(path))
    keys = {
        "admin": made["root"],
        "operator": made["ops"],
        "agent": made["summarizers"],
        "viewer": made["watcher"],
        "translator": made["translators"],
    }
    return h, keys, path


async def test_role_matrix_over_every_rpc(secured):
    h, keys, _ = secured
    for agent_id, cap in ((MINE, "summarize"), (THEIRS, "translate")):
        await h.lifecycle.RegisterAgent(
            lifecycle_pb2.RegisterAgentRequest(agent_id=agent_id, capabilities=[cap]),
            metadata=bearer(keys["admin"]),
        )
    channel = h.new_channel()
    methods = contract_methods()
    failures = []
    for short, method in methods.items():
        request = message_factory.GetMessageClass(method.input_type)()
        if "agent_id" in method.input_type.fields_by_name and short in AGENT_SCOPED:
            request.agent_id = MINE
        if short == "DispatchService.Connect":
            request.hello.agent_id = MINE
        for role in sorted(ALL):
            outcome = await call_any(channel, method, request, keys[role])
            assert outcome not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                short,
                role,
                outcome,
            )
            assert outcome != grpc.StatusCode.UNAUTHENTICATED, (short, role)
            denied = outcome == grpc.StatusCode.PERMISSION_DENIED
            if role in EXPECTED[short]:
                if denied:
                    failures.append(f"{short} by {role}: refused, expected allowed")
            elif not denied:
                failures.append(f"{short} by {role}: {outcome}, expected PERMISSION_DENIED")
            else:
                err = call_any.last_error  # type: ignore[attr-defined]
                assert reason(err) == "ROLE_NOT_ALLOWED", (short, role, err.details())
                assert role in err.details() and short.split(".")[1] in err.details()
    await channel.close()
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ impersonation


async def _assigned_task(h, keys) -> tuple[dispatch_pb2.Task, StreamReader]:
    """translator-1 (through its own principal) holds a task on an open stream."""
    for agent_id, cap, key in ((MINE, "summarize", "agent"), (THEIRS, "translate", "translator")):
        await h.lifecycle.RegisterAgent(
            lifecycle_pb2.RegisterAgentRequest(agent_id=agent_id, capabilities=[cap]),
            metadata=bearer(keys[key]),
        )
    stream = StreamReader(
        h.dispatch.SubscribeTasks(
            dispatch_pb2.SubscribeTasksRequest(agent_id=THEIRS), metadata=bearer(keys["translator"])
        )
    )
    await h.dispatch.EnqueueTask(
        dispatch_pb2.EnqueueTaskRequest(capability="translate"), metadata=bearer(keys["operator"])
    )
    msg = await stream.next()
    return msg.assignment.task, stream


async def test_agent_cannot_act_as_another_agent(secured):
    h, keys, _ = secured
    task, theirs = await _assigned_task(h, keys)
    admin = bearer(keys["admin"])
    before_agent = (
        await h.lifecycle.GetAgent(lifecycle_pb2.GetAgentRequest(agent_id=THEIRS), metadata=admin)
    ).agent
    mine = bearer(keys["agent"])
    L, D = lifecycle_pb2, dispatch_pb2
    attempts = {
        "RegisterAgent": h.lifecycle.RegisterAgent(
            L.RegisterAgentRequest(agent_id=THEIRS, capabilities=["evil"]), metadata=mine
        ),
        "DeregisterAgent": h.lifecycle.DeregisterAgent(
            L.DeregisterAgentRequest(agent_id=THEIRS), metadata=mine
        ),
        "ReportState": h.lifecycle.ReportState(
            L.ReportStateRequest(agent_id=THEIRS, state=L.AgentState.AGENT_STATE_ERROR),
            metadata=mine,
        ),
        "Heartbeat": h.lifecycle.Heartbeat(L.HeartbeatRequest(agent_id=THEIRS), metadata=mine),
        "GetAgent": h.lifecycle.GetAgent(L.GetAgentRequest(agent_id=THEIRS), metadata=mine),
        "ListStateTransitions": h.lifecycle.ListStateTransitions(
            L.ListStateTransitionsRequest(agent_id=THEIRS), metadata=mine
        ),
        "CompleteTask": h.dispatch.CompleteTask(
            D.CompleteTaskRequest(task_id=task.task_id, agent_id=THEIRS, attempt=task.attempt),
            metadata=mine,
        ),
        "FailTask": h.dispatch.FailTask(
            D.FailTaskRequest(
                task_id=task.task_id, agent_id=THEIRS, attempt=task.attempt, non_retryable=True
            ),
            metadata=mine,
        ),
        "HeartbeatTask": h.dispatch.HeartbeatTask(
            D.HeartbeatTaskRequest(task_id=task.task_id, agent_id=THEIRS, attempt=task.attempt),
            metadata=mine,
        ),
        # No agent id at all (the server would generate one): refused too.
        "RegisterAgent (no id)": h.lifecycle.RegisterAgent(L.RegisterAgentRequest(), metadata=mine),
    }
    for name, call in attempts.items():
        err = await expect_error(call, grpc.StatusCode.PERMISSION_DENIED)
        assert reason(err) == "AGENT_NOT_ALLOWED", (name, err.details())
        assert "summarizers" in err.details(), err.details()

    # A stream opened for another agent is refused before it subscribes.
    other = StreamReader(
        h.dispatch.SubscribeTasks(D.SubscribeTasksRequest(agent_id=THEIRS), metadata=mine)
    )
    await other.done.wait()
    assert isinstance(other.error, grpc.aio.AioRpcError)
    assert other.error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(other.error) == "AGENT_NOT_ALLOWED"

    # Its own id on another agent's task: the lease says no (fencing), nothing changes.
    err = await expect_error(
        h.dispatch.CompleteTask(
            D.CompleteTaskRequest(task_id=task.task_id, agent_id=MINE, attempt=task.attempt),
            metadata=mine,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    # It cannot read the task either.
    err = await expect_error(
        h.dispatch.GetTask(D.GetTaskRequest(task_id=task.task_id), metadata=mine),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(err) == "ROLE_NOT_ALLOWED"

    # Nothing changed: the agent record, its history, the task and its lease.
    after = (await h.lifecycle.GetAgent(L.GetAgentRequest(agent_id=THEIRS), metadata=admin)).agent
    assert after == before_agent
    got = (await h.dispatch.GetTask(D.GetTaskRequest(task_id=task.task_id), metadata=admin)).task
    assert got.state == D.TaskState.TASK_STATE_ASSIGNED
    assert (got.assigned_agent_id, got.attempt) == (THEIRS, task.attempt)
    assert got.lease_expire_time == task.lease_expire_time
    # And the real holder still completes it.
    done = await h.dispatch.CompleteTask(
        D.CompleteTaskRequest(task_id=task.task_id, agent_id=THEIRS, attempt=task.attempt),
        metadata=bearer(keys["translator"]),
    )
    assert done.task.state == D.TaskState.TASK_STATE_COMPLETED
    await theirs.close()


async def test_agent_acts_as_itself(secured):
    """The same principal does everything an agent does for an id it is allowed."""
    h, keys, _ = secured
    mine = bearer(keys["agent"])
    L, D = lifecycle_pb2, dispatch_pb2
    reg = await h.lifecycle.RegisterAgent(
        L.RegisterAgentRequest(agent_id=MINE, capabilities=["summarize"]), metadata=mine
    )
    assert reg.created
    stream = StreamReader(
        h.dispatch.SubscribeTasks(D.SubscribeTasksRequest(agent_id=MINE), metadata=mine)
    )
    await h.dispatch.EnqueueTask(
        D.EnqueueTaskRequest(capability="summarize"), metadata=bearer(keys["operator"])
    )
    task = (await stream.next()).assignment.task
    beat = await h.dispatch.HeartbeatTask(
        D.HeartbeatTaskRequest(task_id=task.task_id, agent_id=MINE, attempt=task.attempt),
        metadata=mine,
    )
    assert not beat.cancel_requested
    done = await h.dispatch.CompleteTask(
        D.CompleteTaskRequest(task_id=task.task_id, agent_id=MINE, attempt=task.attempt),
        metadata=mine,
    )
    assert done.task.state == D.TaskState.TASK_STATE_COMPLETED
    got = await h.lifecycle.GetAgent(L.GetAgentRequest(agent_id=MINE), metadata=mine)
    assert got.agent.state == L.AgentState.AGENT_STATE_IDLE
    await stream.close()


async def test_current_principal_is_visible_to_servicers(secured, monkeypatch):
    """What the interceptor decided reaches the servicer through the contextvar."""
    h, keys, _ = secured
    seen: list[tuple[str, str, bool, bool]] = []
    servicer_cls = type(h.server.lifecycle)
    original = servicer_cls.heartbeat

    async def spy(self: Any, agent_id: str) -> Any:
        p = security.current_principal()
        seen.append((p.name, p.role.value, p.allows_agent(MINE), p.allows_agent(THEIRS)))
        return await original(self, agent_id)

    monkeypatch.setattr(servicer_cls, "heartbeat", spy)
    await h.lifecycle.RegisterAgent(
        lifecycle_pb2.RegisterAgentRequest(agent_id=MINE), metadata=bearer(keys["agent"])
    )
    await h.lifecycle.Heartbeat(
        lifecycle_pb2.HeartbeatRequest(agent_id=MINE), metadata=bearer(keys["agent"])
    )
    await h.lifecycle.Heartbeat(
        lifecycle_pb2.HeartbeatRequest(agent_id=MINE), metadata=bearer(keys["admin"])
    )
    assert seen == [("summarizers", "agent", True, False), ("root", "admin", True, True)]
    # Outside any call: nobody, allowed nothing.
    assert not security.current_principal().allows_agent(MINE)
    with pytest.raises(Exception) as info:
        security.require_agent(MINE)
    assert getattr(info.value, "reason", "") == "AGENT_NOT_ALLOWED"
