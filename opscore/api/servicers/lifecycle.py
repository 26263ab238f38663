from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from opscore_proto.v1 import lifecycle_pb2 as pb
from opscore_proto.v1 import lifecycle_pb2_grpc

from opscore.api import convert as c
from opscore.api.interceptors import stream_ready
from opscore.events import FellBehind
from opscore.lifecycle import LifecycleEngine


class LifecycleServicer(lifecycle_pb2_grpc.LifecycleServiceServicer):
    def __init__(self, engine: LifecycleEngine) -> None:
        self.engine = engine

    async def RegisterAgent(
        self, request: pb.RegisterAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterAgentResponse:
        agent, created = await self.engine.register(
            agent_id=request.agent_id,
            name=request.name,
            version=request.version,
            capabilities=list(request.capabilities),
            contact_endpoint=request.contact_endpoint,
            metadata=dict(request.metadata),
        )
        return pb.RegisterAgentResponse(agent=c.agent(agent), created=created)

    async def DeregisterAgent(
        self, request: pb.DeregisterAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterAgentResponse:
        agent = await self.engine.deregister(request.agent_id)
        return pb.DeregisterAgentResponse(agent=c.agent(agent))

    async def GetAgent(
        self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAgentResponse:
        return pb.GetAgentResponse(agent=c.agent(await self.engine.get(request.agent_id)))

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        page = await self.engine.list(
            request.state, request.capability, request.page_size, request.page_token
        )
        return pb.ListAgentsResponse(
            agents=[c.agent(a) for a in page.items], next_page_token=page.next_page_token
        )

    async def ReportState(
        self, request: pb.ReportStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportStateResponse:
        agent, transition = await self.engine.report_state(
            request.agent_id,
            request.state,
            c.payload(request, "details"),
            c.from_ts(request, "observe_time"),
        )
        return pb.ReportStateResponse(agent=c.agent(agent), transition=c.transition(transition))

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(agent=c.agent(await self.engine.heartbeat(request.agent_id)))

    async def ListStateTransitions(
        self, request: pb.ListStateTransitionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStateTransitionsResponse:
        page = await self.engine.list_transitions(
            request.agent_id, request.page_size, request.page_token
        )
        return pb.ListStateTransitionsResponse(
            transitions=[c.transition(t) for t in page.items],
            next_page_token=page.next_page_token,
        )

    async def WatchAgents(
        self, request: pb.WatchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchAgentsResponse]:
        watcher = self.engine.watch(
            list(request.agent_ids), request.capability, list(request.event_types)
        )
        try:
            await stream_ready(context)
            async for _event, data in watcher:
                yield data  # encoded once for every watcher (c.agent_event_bytes)
        except FellBehind as exc:
            raise FellBehind(
                f"{exc.message}; list the agents again (ListAgents) to catch up, then watch again"
            ) from None
        finally:
            # At once: a generator closed from outside does not close the one it
            # iterates until it is collected.
            watcher.close()
