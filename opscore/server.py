"""Assembles the service: storage, engines, gRPC server, health, reflection; and
runs it until SIGTERM/SIGINT with a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opscore_proto.v1 import (
    dispatch_pb2,
    dispatch_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

from opscore.api.health import SERVING, HealthServicer
from opscore.api.interceptors import OpsCoreInterceptor
from opscore.api.servicers.dispatch import DispatchServicer
from opscore.api.servicers.lifecycle import LifecycleServicer
from opscore.api.servicers.workflow import WorkflowServicer
from opscore.config import Config, is_loopback, listen_host
from opscore.dispatch import DispatchEngine
from opscore.errors import ConfigError, Unavailable
from opscore.lifecycle import LifecycleEngine
from opscore.storage import Store
from opscore.workflow.engine import WorkflowEngine

log = logging.getLogger("opscore.server")

SERVICE_NAMES = (
    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
    dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"].full_name,
    workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
)


@dataclass
class OpsCoreServer:
    config: Config
    store: Store = field(init=False)
    lifecycle: LifecycleEngine = field(init=False)
    dispatch: DispatchEngine = field(init=False)
    workflow: WorkflowEngine = field(init=False)
    port: int = 0
    _server: grpc.aio.Server | None = None
    _health: HealthServicer | None = None
    _stopped: bool = False

    async def start(self) -> None:
        cfg = self.config
        self.store = Store(cfg.db, sync=cfg.sync)
        await self.store.open()
        self.lifecycle = LifecycleEngine(self.store, agent_timeout=cfg.agent_timeout)
        self.dispatch = DispatchEngine(self.store, self.lifecycle)
        self.workflow = WorkflowEngine(self.store, self.dispatch)
        try:
            await self.lifecycle.start()
            await self.dispatch.start()
            await self.workflow.start()
            if cfg.workflows_dir:
                await self.workflow.load_directory(cfg.workflows_dir)
        except BaseException:
            self.dispatch.stop()
            self.lifecycle.stop()
            await self.store.close()
            raise

        ms = lambda td: int(td.total_seconds() * 1000)  # noqa: E731
        server = grpc.aio.server(
            interceptors=[OpsCoreInterceptor(cfg.api_keys)],
            options=[
                ("grpc.keepalive_time_ms", ms(cfg.keepalive_time)),
                ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", ms(cfg.min_client_ping_interval)),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server(
            LifecycleServicer(self.lifecycle), server
        )
        dispatch_pb2_grpc.add_DispatchServiceServicer_to_server(
            DispatchServicer(self.dispatch), server
        )
        workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(
            WorkflowServicer(self.workflow), server
        )
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:
            await self.store.close()
            raise ConfigError(f"cannot listen on {cfg.listen}: {exc}") from exc
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, SERVING)
        host = listen_host(cfg.listen)
        if not cfg.auth_enabled:
            log.warning(
                "authentication is off: no API keys configured"
                + ("" if is_loopback(host) else " and --insecure given"),
                extra={"listen": cfg.listen},
            )
        log.info(
            "serving",
            extra={"listen": cfg.listen, "port": self.port, "db": cfg.db, "sync": cfg.sync},
        )

    @property
    def target(self) -> str:
        host = listen_host(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        """Drain: NOT_SERVING, end parked streams, let in-flight calls finish, close."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        log.info("draining")
        if self._health is not None:
            await self._health.drain()
        # Parked streams never finish on their own: end them first, or stop()
        # waits out its whole grace period.
        self.dispatch.close_streams()
        self.lifecycle.events.close(Unavailable("server is shutting down; reconnect"))
        self.workflow.close_watchers()
        await self._server.stop(self.config.drain_grace.total_seconds())
        self.dispatch.stop()
        self.lifecycle.stop()
        await self.store.close()
        log.info("stopped")


async def serve(config: Config) -> int:
    server = OpsCoreServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0
