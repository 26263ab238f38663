"""The README tour's example workflows run to completion with the example agent."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import struct_pb2
from opscore_proto.v1 import workflow_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def load_example_agent_module():
    spec = importlib.util.spec_from_file_location("example_agent", ROOT / "examples" / "agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
async def test_example_workflows_complete_with_the_example_agent(harness):
    example = load_example_agent_module()
    agent = example.build_agent(
        agent_id="example-under-test", target=harness.target, max_in_flight=4
    )
    runner = asyncio.create_task(agent.run(handle_signals=False))
    try:
        outputs = {}
        for name, text in [
            ("text-pipeline", "Ops-Core runs agents. It is fast. It keeps state in SQLite."),
            ("fan-out-report", "One. Two! Three? Four."),
        ]:
            source = (ROOT / "examples" / f"{name}.yaml").read_text()
            await harness.workflow.CreateWorkflowDefinition(
                pb.CreateWorkflowDefinitionRequest(source=source)
            )
            inp = struct_pb2.Struct()
            inp.update({"text": text, "work_seconds": 0.01})
            session = (
                await harness.workflow.StartWorkflow(
                    pb.StartWorkflowRequest(definition_id=name, input=inp)
                )
            ).session
            async for _ in harness.workflow.WatchSession(
                pb.WatchSessionRequest(session_id=session.session_id), timeout=40
            ):
                pass  # ends after the terminal event
            final = (
                await harness.workflow.GetSession(
                    pb.GetSessionRequest(session_id=session.session_id)
                )
            ).session
            assert final.state == pb.SESSION_STATE_COMPLETED, final.error.message
            outputs[name] = final
        pipeline = outputs["text-pipeline"].output
        assert pipeline["reverse"]["translation"] == "agents. runs Ops-Core"
        assert pipeline["stats"]["words"] == 11
        runs = {r.workflow_task_id: r for r in outputs["fan-out-report"].task_runs}
        assert runs["klingon"].state == pb.TASK_RUN_STATE_REPLACED
        assert runs["klingon-fallback"].state == pb.TASK_RUN_STATE_COMPLETED
        assert set(outputs["fan-out-report"].output.keys()) == {"report"}
    finally:
        await agent.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
