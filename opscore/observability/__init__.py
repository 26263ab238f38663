"""Observability: Prometheus metrics, OpenTelemetry traces, the no-agent watch.

The engines see only `observer.EngineObserver` (and the pure helpers of
`tracecontext`); nothing they import pulls in prometheus_client or
opentelemetry. This package's `__init__` stays empty for that reason: importing
`opscore.observability.observer` must not load `metrics` or `tracing`.
"""
