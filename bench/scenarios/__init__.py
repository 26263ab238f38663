"""One module per scenario; each has NAME, TITLE and run(ctx) -> result body."""

from bench.scenarios import (
    baselines,
    latency,
    lifecycle,
    observability,
    retention,
    scale,
    throughput,
    workflows,
)

ALL = [throughput, latency, workflows, lifecycle, scale, baselines, observability, retention]
BY_NAME = {m.NAME: m for m in ALL}
