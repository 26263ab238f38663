"""Sessions survive SIGKILL of the server and continue where they were (DESIGN §5)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import dispatch_pb2_grpc, workflow_pb2_grpc
from opscore_proto.v1 import workflow_pb2 as pb

from tests.conftest import eventually
from tests.support.procserver import running_server
from tests.support.worker import Worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STEPS = [f"s{i}" for i in range(6)]


@pytest.mark.asyncio
async def test_session_continues_after_sigkill(tmp_path):
    d = json_format.ParseDict(
        {
            "id": "crashy",
            "tasks": [
                {"id": s, "capability": "c", **({"depends_on": [STEPS[i - 1]]} if i else {})}
                for i, s in enumerate(STEPS)
            ],
        },
        pb.WorkflowDefinition(),
    )
    blocker = asyncio.Event()

    async def step(data: dict[str, Any], task: dpb.Task) -> dict[str, Any]:
        if task.workflow_task_id == "s3":
            await blocker.wait()  # the server dies while this one is held
        prev = list(data["upstream"].values())
        return {"n": (prev[0]["n"] if prev else 0) + 1}

    with running_server(tmp_path, "--agent-timeout", "30") as srv:
        port, db = srv.port, srv.db_path
        channel = grpc.aio.insecure_channel(srv.target)
        wf = workflow_pb2_grpc.WorkflowServiceStub(channel)
        await wf.CreateWorkflowDefinition(pb.CreateWorkflowDefinitionRequest(definition=d))
        input_ = struct_pb2.Struct()
        input_.update({"run": 1})
        session = (
            await wf.StartWorkflow(
                pb.StartWorkflowRequest(definition_id="crashy", input=input_, idempotency_key="k")
            )
        ).session
        worker = await Worker(channel, "w1", {"c": step}).start()
        await eventually(
            lambda: any(t.workflow_task_id == "s3" for t in worker.seen), what="s3 assigned"
        )
        srv.kill()
        await worker.stop()
        await channel.close()

    with running_server(tmp_path, port=port, db_path=db) as srv:
        channel = grpc.aio.insecure_channel(srv.target)
        wf = workflow_pb2_grpc.WorkflowServiceStub(channel)
        dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
        # Starting again with the same key finds the session that survived.
        again = await wf.StartWorkflow(
            pb.StartWorkflowRequest(definition_id="crashy", idempotency_key="k")
        )
        assert not again.created and again.session.session_id == session.session_id
        blocker.set()
        worker = await Worker(channel, "w1", {"c": step}).start()
        final = None
        async for resp in wf.WatchSession(
            pb.WatchSessionRequest(session_id=session.session_id), timeout=60
        ):
            final = resp.event
        assert final is not None
        assert final.event_type == pb.SESSION_EVENT_TYPE_SESSION_COMPLETED
        got = (await wf.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
        assert got.state == pb.SESSION_STATE_COMPLETED
        assert got.output["s5"]["n"] == 6
        # Exactly one completed dispatch task per step, and one completion event each.
        tasks = await dispatch.ListTasks(dpb.ListTasksRequest(session_id=session.session_id))
        completed = [t.workflow_task_id for t in tasks.tasks if t.state == dpb.TASK_STATE_COMPLETED]
        assert sorted(completed) == STEPS
        events = [
            e.event
            async for e in wf.WatchSession(pb.WatchSessionRequest(session_id=session.session_id))
        ]
        done_events = [
            e.workflow_task_id
            for e in events
            if e.event_type == pb.SESSION_EVENT_TYPE_TASK_COMPLETED
        ]
        assert sorted(done_events) == STEPS
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        await worker.stop()
        await channel.close()
        assert srv.terminate() == 0
