from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from opscore_proto.v1 import workflow_pb2 as pb
from opscore_proto.v1 import workflow_pb2_grpc

from opscore.api import convert as c
from opscore.api.interceptors import stream_ready
from opscore.workflow.engine import WorkflowEngine


class WorkflowServicer(workflow_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, engine: WorkflowEngine) -> None:
        self.engine = engine

    async def CreateWorkflowDefinition(
        self, request: pb.CreateWorkflowDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWorkflowDefinitionResponse:
        which = request.WhichOneof("definition_source")
        if which == "source":
            definition = await self.engine.parse(request.source)
        else:
            definition = request.definition
        stored, created = await self.engine.create_definition(definition)
        return pb.CreateWorkflowDefinitionResponse(definition=stored, created=created)

    async def GetWorkflowDefinition(
        self, request: pb.GetWorkflowDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWorkflowDefinitionResponse:
        d = await self.engine.get_definition(request.definition_id, request.version)
        return pb.GetWorkflowDefinitionResponse(definition=d)

    async def ListWorkflowDefinitions(
        self, request: pb.ListWorkflowDefinitionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkflowDefinitionsResponse:
        page = await self.engine.list_definitions(request.page_size, request.page_token)
        return pb.ListWorkflowDefinitionsResponse(
            definitions=page.items, next_page_token=page.next_page_token
        )

    async def DeleteWorkflowDefinition(
        self, request: pb.DeleteWorkflowDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteWorkflowDefinitionResponse:
        n = await self.engine.delete_definition(request.definition_id, request.version)
        return pb.DeleteWorkflowDefinitionResponse(deleted_versions=n)

    async def StartWorkflow(
        self, request: pb.StartWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartWorkflowResponse:
        session, created = await self.engine.start_workflow(
            definition_id=request.definition_id,
            version=request.version,
            inline=request.definition if request.HasField("definition") else None,
            input=c.payload(request, "input"),
            agent_id=request.agent_id,
            idempotency_key=request.idempotency_key,
        )
        return pb.StartWorkflowResponse(
            session=c.session(session, budget=self.engine.response_budget), created=created
        )

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        session = await self.engine.get_session(request.session_id)
        return pb.GetSessionResponse(session=c.session(session, budget=self.engine.response_budget))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        page = await self.engine.list_sessions(
            request.state, request.definition_id, request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[c.session(s, with_runs=False) for s in page.items],
            next_page_token=page.next_page_token,
        )

    async def CancelSession(
        self, request: pb.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelSessionResponse:
        s = await self.engine.cancel_session(request.session_id, request.reason)
        return pb.CancelSessionResponse(session=c.session(s, budget=self.engine.response_budget))

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        events = self.engine.watch(
            request.session_id, request.after_sequence, on_ready=lambda: stream_ready(context)
        )
        async for data in events:
            yield data
