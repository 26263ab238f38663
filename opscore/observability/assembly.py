"""What the server builds for observability, from its Config, in one place.

Nothing configured: the engines get the no-op observer, the interceptor gets no
hooks, and neither prometheus_client nor opentelemetry is imported. Only the
no-agent log watch and the event-loop lag probe always run (cheap timers that
log what an operator must hear of).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opscore.config import Config
from opscore.observability.hub import combine
from opscore.observability.looplag import LoopLagProbe
from opscore.observability.noagent import NoAgentWatch
from opscore.observability.observer import EngineObserver

if TYPE_CHECKING:
    from opscore.dispatch import DispatchEngine
    from opscore.lifecycle import LifecycleEngine
    from opscore.observability.endpoint import MetricsEndpoint
    from opscore.observability.metrics import Metrics, RpcMetrics
    from opscore.observability.tracing import RpcTracer, Tracing
    from opscore.storage.api import Storage as Store
    from opscore.workflow.engine import WorkflowEngine


class Observability:
    def __init__(self, config: Config, *, span_exporter: Any = None) -> None:
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        self.rpc_metrics: Callable[[str], RpcMetrics] | None = None
        self.rpc_tracer: RpcTracer | None = None
        self.endpoint: MetricsEndpoint | None = None
        self.watch: NoAgentWatch | None = None
        self.lag: LoopLagProbe | None = None
        self._listen = config.metrics_listen
        metrics_observer = tracing_observer = None
        if config.metrics_listen is not None:
            from opscore.observability.metrics import Metrics, MetricsObserver, RpcMetrics

            self.metrics = Metrics()
            self.rpc_metrics = functools.partial(RpcMetrics, self.metrics)
            metrics_observer = MetricsObserver(self.metrics)
        if config.otlp_endpoint or span_exporter is not None:
            from opscore import __version__
            from opscore.observability.tracing import RpcTracer, Tracing, TracingObserver

            self.tracing = Tracing(
                otlp_endpoint=config.otlp_endpoint,
                exporter=span_exporter,
                service_version=__version__,
            )
            self.rpc_tracer = RpcTracer(self.tracing)
            tracing_observer = TracingObserver(self.tracing)
        self.observer: EngineObserver = combine(metrics_observer, tracing_observer)

    def attach(
        self,
        *,
        store: Store,
        lifecycle: LifecycleEngine,
        dispatch: DispatchEngine,
        workflow: WorkflowEngine,
        recoveries: Callable[[], int],
    ) -> None:
        """Connect to the engines once they exist (before storage opens)."""
        self.watch = NoAgentWatch(dispatch)
        self.lag = LoopLagProbe(self.metrics.loop_lag.observe if self.metrics else None)
        if self.metrics is not None:
            from opscore.observability.metrics import EngineCollector

            store.on_commit = self.metrics.commit_done
            EngineCollector(
                self.metrics,
                asyncio.get_running_loop(),
                store=store,
                lifecycle=lifecycle,
                dispatch=dispatch,
                workflow=workflow,
                recoveries=recoveries,
            )

    def listen(self) -> None:
        """Open the metrics endpoint: with the gRPC port, before the database."""
        if self.metrics is not None and self._listen is not None:
            from opscore.observability.endpoint import MetricsEndpoint

            self.endpoint = MetricsEndpoint(self.metrics.registry, self._listen)
            self.endpoint.start()

    @property
    def metrics_port(self) -> int:
        return self.endpoint.port if self.endpoint is not None else 0

    def serving(self) -> None:
        """The server is up: start the watch, the lag probe and the log correlation."""
        if self.watch is not None:
            self.watch.start()
        if self.lag is not None:
            self.lag.start()
        if self.tracing is not None:
            self.tracing.install_log_correlation()

    def stop_watch(self) -> None:
        """On the event loop (the watch and the probe are loop timers)."""
        if self.watch is not None:
            self.watch.stop()
        if self.lag is not None:
            self.lag.stop()

    def close(self) -> None:
        """Stop the endpoint, flush and stop tracing. Idempotent; blocking (flushing
        traces, joining the endpoint's thread), so the server runs it off the loop."""
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
        if self.tracing is not None:
            self.tracing.shutdown()
            self.tracing = None
