"""Assembles the service: storage, engines, gRPC server, health, reflection; and
runs it until SIGTERM/SIGINT with a graceful drain; SIGHUP re-reads the auth file
and the TLS files (`reload`).

It also owns recovery. The engines keep their state in memory ahead of the
database (group commit); when a commit fails, or a change fails half-way, that
state can no longer be trusted. The server then refuses changes, ends every
stream (clients reconnect), rebuilds the engines from the database, which holds
exactly what was acknowledged, and serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

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

from opscore.api import convert
from opscore.api.health import NOT_SERVING, SERVING, HealthServicer
from opscore.api.interceptors import OpsCoreInterceptor
from opscore.api.servicers.dispatch import DispatchServicer
from opscore.api.servicers.lifecycle import LifecycleServicer
from opscore.api.servicers.workflow import WorkflowServicer
from opscore.config import Config, is_loopback, listen_host
from opscore.dispatch import DispatchEngine
from opscore.errors import ConfigError, OpsCoreError, ResourceExhausted, Unavailable
from opscore.lifecycle import LifecycleEngine
from opscore.netcheck import check_port_free
from opscore.observability.assembly import Observability
from opscore.retention import Retention
from opscore.security.authn import Authenticator
from opscore.security.tls import ServerCertificates
from opscore.storage import Storage, open_storage
from opscore.workflow.engine import WorkflowEngine

log = logging.getLogger("opscore.server")

SERVICE_NAMES = (
    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
    dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"].full_name,
    workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
)

# Room in every response for what is not payload (ids, times, enums).
_RESPONSE_MARGIN = 64 * 1024
# Recovery after repeated storage failures waits longer each time (up to this),
# so a full disk costs a reload now and then, not one per write.
_MAX_RECOVERY_PAUSE = 5.0
# How long past the drain grace stop() waits for gRPC to finish cancelled calls.
_STOP_MARGIN = 5.0


@dataclass
class OpsCoreServer:
    config: Config
    # An OpenTelemetry SpanExporter that gets every span as it ends (tests and
    # tools; users configure --otlp-endpoint). Given, it turns tracing on.
    span_exporter: Any = None
    observability: Observability = field(init=False)
    storage: Storage = field(init=False)
    lifecycle: LifecycleEngine = field(init=False)
    dispatch: DispatchEngine = field(init=False)
    workflow: WorkflowEngine = field(init=False)
    port: int = 0
    recoveries: int = 0
    _server: grpc.aio.Server | None = None
    _health: HealthServicer | None = None
    authenticator: Authenticator = field(init=False)
    interceptor: OpsCoreInterceptor = field(init=False)
    certificates: ServerCertificates | None = None
    retention: Retention | None = None
    _stopped: bool = False
    _recovery: asyncio.Task[None] | None = None
    _fault_again: bool = False
    _pause: float = 0.0

    def _build(self) -> grpc.aio.Server:
        cfg = self.config
        budget = cfg.max_message_bytes - _RESPONSE_MARGIN
        obs = self.observability = Observability(cfg, span_exporter=self.span_exporter)
        self.storage = open_storage(
            cfg.db,
            sync=cfg.sync,
            max_db_bytes=cfg.max_db_bytes,
            agent_timeout=cfg.agent_timeout,
            replica_address=cfg.listen,
        )
        self.lifecycle = LifecycleEngine(
            self.storage,
            agent_timeout=cfg.agent_timeout,
            encode_event=convert.agent_event_bytes,
            response_budget=budget,
        )
        self.dispatch = DispatchEngine(
            self.storage,
            self.lifecycle,
            max_subscriptions_per_agent=cfg.max_subscriptions_per_agent,
            response_budget=budget,
            observer=obs.observer,
        )
        self.workflow = WorkflowEngine(
            self.storage,
            self.dispatch,
            encode_event=convert.session_event_bytes,
            response_budget=budget,
            observer=obs.observer,
        )
        obs.attach(
            store=self.storage,
            lifecycle=self.lifecycle,
            dispatch=self.dispatch,
            workflow=self.workflow,
            recoveries=lambda: self.recoveries,
        )
        self.interceptor = OpsCoreInterceptor(
            self.authenticator, rpc_metrics=obs.rpc_metrics, tracer=obs.rpc_tracer
        )
        ms = lambda td: int(td.total_seconds() * 1000)  # noqa: E731
        server = grpc.aio.server(
            interceptors=[self.interceptor],
            options=[
                ("grpc.keepalive_time_ms", ms(cfg.keepalive_time)),
                ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", ms(cfg.min_client_ping_interval)),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
                ("grpc.server.max_pending_requests", cfg.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", cfg.max_pending_calls),
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
        return server

    def _load_security(self) -> None:
        """Principals and certificates, read before anything else starts: a wrong
        file is a ConfigError that leaves nothing behind."""
        cfg = self.config
        authenticator = Authenticator(
            api_keys=cfg.api_keys,
            auth_file=cfg.auth_file,
            client_certificates=bool(cfg.tls_client_ca),
        )
        authenticator.load()
        self.authenticator = authenticator
        if cfg.tls_cert and cfg.tls_key:
            self.certificates = ServerCertificates(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            self.certificates.load()

    async def start(self) -> None:
        cfg = self.config
        self._load_security()
        server = self._build()
        # The address first, then the database: a port in the way must not leave a
        # migrated (or locked) database behind.
        check_port_free(cfg.listen)
        try:
            if self.certificates is not None:
                self.port = server.add_secure_port(cfg.listen, self.certificates.credentials())
            else:
                self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:
            self.observability.close()
            raise ConfigError(f"cannot listen on {cfg.listen}: {exc}") from exc
        try:
            self.observability.listen()
            await self.storage.open()
        except BaseException:
            self.observability.close()
            await server.stop(None)
            raise
        try:
            await self._load()
            if cfg.workflows_dir:
                await self.workflow.load_directory(cfg.workflows_dir)
        except BaseException:
            self._stop_engines()
            await self.storage.close()
            self.observability.close()
            await server.stop(None)
            raise
        self.storage.on_failure = self._on_storage_failure
        await server.start()
        self._server = server
        self.retention = Retention(
            self.storage, cfg.retention, observer=self.observability.observer
        )
        self.retention.start()
        await self._set_health(SERVING)
        self.observability.serving()
        host = listen_host(cfg.listen)
        if not cfg.auth_enabled:
            log.warning(
                (
                    "authentication is off: every holder of a client certificate the CA "
                    "signed is admin"
                    if cfg.tls_client_ca
                    else "authentication is off: no API keys or auth file configured"
                    + ("" if is_loopback(host) else " and --insecure given")
                ),
                extra={"listen": cfg.listen},
            )
        if not cfg.tls_enabled and not is_loopback(host):
            log.warning("TLS is off on a non-loopback address (--insecure)")
        log.info(
            "serving",
            extra={
                "listen": cfg.listen,
                "port": self.port,
                "db": self.storage.display,
                "storage": self.storage.kind,
                **({"sync": cfg.sync} if self.storage.kind == "sqlite" else {}),
                "tls": "mtls" if cfg.tls_client_ca else ("tls" if cfg.tls_enabled else "off"),
                "principals": self.interceptor.authenticator.principal_count,
                "metrics_port": self.observability.metrics_port or None,
                "tracing": self.observability.tracing is not None,
                "retention": self.retention.describe(),
            },
        )

    def reload(self) -> None:
        """SIGHUP: re-read the auth file and end the streams of principals it no
        longer has; the TLS files are re-read at the next handshake. A file that
        cannot be used is logged and the previous principals stay."""
        authenticator = self.interceptor.authenticator
        if authenticator.auth_file is not None:
            try:
                authenticator.load()
            except ConfigError as exc:
                log.error("auth file not reloaded; the previous principals stay: %s", exc)
            else:
                ended = self.interceptor.revalidate()
                log.info(
                    "auth file reloaded",
                    extra={
                        "auth_file": authenticator.auth_file,
                        "principals": authenticator.principal_count,
                        "streams_ended": ended,
                    },
                )
        if self.certificates is not None:
            self.certificates.request_reload()

    async def _load(self) -> None:
        await self.storage.load()

    def _stop_engines(self) -> None:
        self.workflow.stop()

    async def _set_health(self, status: int) -> None:
        assert self._health is not None
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)  # type: ignore[arg-type]

    @property
    def metrics_port(self) -> int:
        """The port the metrics endpoint listens on; 0 when metrics are off."""
        return self.observability.metrics_port

    @property
    def target(self) -> str:
        host = listen_host(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    # ------------------------------------------------------------------ recovery

    def _on_storage_failure(self, error: OpsCoreError) -> None:
        # Refuse every change from now on: whatever is in memory may be ahead of
        # the database until the engines are rebuilt.
        if isinstance(error, ResourceExhausted):
            self.storage.refusing = error
        else:
            self.storage.refusing = Unavailable(
                "the server is rebuilding its state after a storage error; retry shortly",
                reason="RECOVERING",
            )
        if self._stopped:
            return
        if self._recovery is not None and not self._recovery.done():
            self._fault_again = True
            return
        self._recovery = asyncio.get_running_loop().create_task(
            self._recover(), name="opscore-recovery"
        )

    async def _recover(self) -> None:
        ended = Unavailable(
            "the server rebuilt its state after a storage error; reconnect", reason="RECOVERING"
        )
        self._pause = min(_MAX_RECOVERY_PAUSE, max(0.05, self._pause * 2))
        while True:
            self._fault_again = False
            self.recoveries += 1
            log.warning(
                "rebuilding in-memory state from the database",
                extra={"recoveries": self.recoveries, "pause_s": self._pause},
            )
            await self._set_health(NOT_SERVING)
            self.dispatch.reset(ended)
            self.lifecycle.reset(ended)
            self.workflow.reset(ended)
            self.storage.reset(ended)
            await asyncio.sleep(self._pause)
            try:
                await self._load()
            except Exception:
                log.exception("rebuilding state failed; trying again")
                self._pause = min(_MAX_RECOVERY_PAUSE, self._pause * 2)
                continue
            if not self._fault_again:
                break
        self.storage.refusing = None
        await self._set_health(SERVING)
        log.warning("state rebuilt from the database; serving again")
        # A quiet spell after this recovery lets the next one start with a short pause.
        asyncio.get_running_loop().call_later(30.0, self._calm)

    def _calm(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._pause = 0.0

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Drain: NOT_SERVING, end parked streams, let in-flight calls finish, close."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        log.info("draining")
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        if self._health is not None:
            await self._health.drain()
        # Parked streams never finish on their own: end them first, or stop()
        # waits out its whole grace period.
        self.dispatch.close_streams()
        self.lifecycle.events.close(Unavailable("server is shutting down; reconnect"))
        self.workflow.close_watchers()
        grace = self.config.drain_grace.total_seconds()
        try:
            # gRPC waits for every handler to return after cancelling them; one
            # stuck under a client that never reads must not hold the exit forever.
            await asyncio.wait_for(self._server.stop(grace), grace + _STOP_MARGIN)
        except TimeoutError:
            log.error(
                "calls still running %.0f s after the drain grace; stopping anyway", _STOP_MARGIN
            )
        if self.retention is not None:
            await self.retention.stop()
        self._stop_engines()
        await self.storage.close()
        self.interceptor.close()
        # Last: the final spans (streams ended by the drain) are flushed here.
        self.observability.stop_watch()
        await asyncio.to_thread(self.observability.close)
        log.info("stopped")


def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT on the configured event loop; the exit code."""
    factory = None
    if config.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if config.event_loop == "uvloop":
                raise ConfigError(
                    "--event-loop uvloop: uvloop is not installed (pip install uvloop)"
                ) from None
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(config))


async def serve(config: Config) -> int:
    server = OpsCoreServer(config)
    await server.start()
    # Starting leaves tens of thousands of objects that live as long as the
    # process (modules, gRPC and protobuf descriptors, the state loaded from the
    # database), and every full collection walked them all: 18-30 ms pauses, the
    # longest enqueue -> assignment waits at 500 tasks/s. Frozen, they are left
    # out of collections (freed as usual when nothing refers to them); the
    # longest wait in the same runs fell to 9-11 ms.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0
