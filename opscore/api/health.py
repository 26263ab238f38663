"""grpc.health.v1 for Ops-Core.

Our own servicer rather than grpc_health's: its Watch waits forever, so an open
health watch would hold a graceful stop for the whole grace period. Here, once the
server drains, watchers get NOT_SERVING and their stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, Status] = {}
        self._changed = asyncio.Condition()
        self.draining = False

    async def set(self, service: str, status: Status) -> None:
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def drain(self) -> None:
        """Every service NOT_SERVING; watch streams send that, then end."""
        async with self._changed:
            self.draining = True
            for name in self._status:
                self._status[name] = NOT_SERVING
            self._changed.notify_all()

    def _moved(self, service: str, seen: Status | None) -> bool:
        return self._status.get(service, SERVICE_UNKNOWN) != seen or self.draining

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=last: self._moved(request.service, seen))
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                draining = self.draining
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if draining:
                return
